"""Checkpoints are atomic: a half-written one is never picked for resume."""

from __future__ import annotations

import json

from stability.checkpoint import complete_checkpoints


def test_incomplete_and_temporary_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step_00000010"
    good.mkdir(parents=True)
    (good / "rank_00000.pt").write_bytes(b"x")
    (good / "meta.json").write_text(json.dumps({"step": 10}))
    torn = root / ".tmp-step_00000020"  # killed while saving: never renamed
    torn.mkdir()
    (torn / "rank_00000.pt").write_bytes(b"partial")
    no_meta = root / "step_00000030"  # renamed by hand without its meta.json
    no_meta.mkdir()
    assert complete_checkpoints(root) == [good]
    assert complete_checkpoints(tmp_path / "missing") == []
