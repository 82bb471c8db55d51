"""The config keys and their defaults are a public interface: this test compares them with the
committed snapshot ``config_keys.txt`` (torchtitan's frozen-CLI test), so that a rename or a new
default is a deliberate change. After one, rewrite the snapshot:

    python tests/config/test_config_keys.py > tests/config/config_keys.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("config_keys.txt")


def keys_and_defaults() -> list[str]:
    """``key = default`` for every leaf of the schema (defaults as JSON), sorted."""
    from stability.config import Config, to_dict
    from stability.resume import flatten

    return [f"{key} = {json.dumps(value)}"
            for key, value in sorted(flatten(to_dict(Config())).items())]


def test_config_keys_and_defaults_match_the_snapshot():
    current = keys_and_defaults()
    committed = SNAPSHOT.read_text().splitlines()
    added = sorted(set(current) - set(committed))
    removed = sorted(set(committed) - set(current))
    assert not added and not removed, (
        f"config keys or defaults changed (added {added}, removed {removed}); if that is "
        f"deliberate, regenerate {SNAPSHOT.name} (see this file's docstring)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print("\n".join(keys_and_defaults()))
