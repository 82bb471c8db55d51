"""The spike dashboard's definition, built and serialized offline."""

from __future__ import annotations

import json
import re

import pytest
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from stability.dashboard import (
    SECTIONS,
    build_workspace,
    describe,
    main,
    panel_keys,
    save,
    view_spec,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from wandb-workspaces


@pytest.fixture(scope="module")
def workspace():
    return build_workspace("my-team", "stability", "Spike dashboard")


def keys_of(workspace, section: str) -> list[str]:
    found = next(s for s in workspace.sections if s.name == section)
    return [k for panel in found.panels for k in panel_keys(panel)]


def test_sections_in_order(workspace):
    assert (workspace.entity, workspace.project, workspace.name) == \
        ("my-team", "stability", "Spike dashboard")
    assert [s.name for s in workspace.sections] == list(SECTIONS) == [
        "Loss", "Gradients", "Attention and logits", "Spike score", "Events"]
    assert workspace.settings.x_axis == "step"


def test_panels_read_the_sinks_names(workspace):
    loss = keys_of(workspace, "Loss")
    assert {"train/loss", "spike/marker/loss", "spike/events", "spike/events_table"} <= set(loss)
    grads = keys_of(workspace, "Gradients")
    assert "train/grad_norm" in grads
    regex = next(k for k in grads if k.startswith("^"))
    assert re.match(regex, "spike/grad_norm/layer_12") and not re.match(regex, "train/grad_norm")
    attention = keys_of(workspace, "Attention and logits")
    assert {"spike/attn_logit_max", "spike/logsumexp_mean", "spike/logit_max_abs"} <= set(attention)
    score = keys_of(workspace, "Spike score")
    assert {"spike/spike_score", "spike/update_ratio_max"} <= set(score)
    events = next(s for s in workspace.sections if s.name == "Events").panels
    assert isinstance(events[0], wr.WeavePanelSummaryTable)
    assert events[0].table_name == "spike/events_table"
    for section in workspace.sections:
        for panel in section.panels:
            if isinstance(panel, wr.LinePlot):
                assert panel.x == "step", panel.title


def test_definition_and_view_spec_serialize_offline(workspace):
    definition = json.loads(json.dumps(describe(workspace)))
    assert [s["name"] for s in definition["sections"]] == list(SECTIONS)
    assert definition["sections"][0]["panels"][0]["y"] == ["train/loss", "spike/marker/loss"]
    spec = json.dumps(view_spec(workspace))
    for key in ("train/loss", "spike/marker/loss", "spike/grad_norm/layer_", "spike/events_table",
                "spike/attn_logit_max", "spike/spike_score", "wandb/scatter/v0"):
        assert key in spec, key


def test_command_prints_offline(capsys):
    assert main(["--entity", "e", "--project", "p", "--print"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["entity"] == "e" and len(printed["sections"]) == len(SECTIONS)


def test_save_without_a_key_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert main(["--entity", "e", "--project", "p", "--save"]) == 1
    err = capsys.readouterr().err
    assert "could not save the workspace to e/p" in err and "API key" in err


def test_save_updates_the_view_of_the_same_name(monkeypatch):
    """A second --save replaces the dashboard: the view whose display name matches is updated
    (its id and internal name go to W&B's upsert), and only a new name makes a new view."""
    views = [{"id": "VmlldzoxMjM=", "name": "nw-abc-v", "displayName": "Spike dashboard"},
             {"id": "VmlldzoxMjQ=", "name": "nw-def-v", "displayName": "Other"}]
    queries = []

    def execute(query, variables):
        queries.append(variables)
        return {"project": {"allViews": {"edges": [{"node": v} for v in views]}}}

    saved = []
    monkeypatch.setattr(ws.Workspace, "save",
                        lambda self: saved.append((self._internal_id, self._internal_name)))
    assert save(build_workspace("e", "p"), execute) == "updated"
    assert save(build_workspace("e", "p", name="New one"), execute) == "created"
    assert saved == [("VmlldzoxMjM=", "nw-abc-v"), ("", "")]
    assert queries == [{"entityName": "e", "name": "p"}] * 2
    model = build_workspace("e", "p")
    model._internal_id, model._internal_name = "VmlldzoxMjM=", "nw-abc-v"
    view = model._to_model()  # what W&B's upsert receives: the existing view's id and name
    assert (view.id, view.name, view.display_name) == ("VmlldzoxMjM=", "nw-abc-v",
                                                       "Spike dashboard")
