"""The spike dashboard as a W&B workspace: ``python -m stability.dashboard --entity E --project P``.

Sections (all charts use our ``step`` as the x axis; names from :mod:`stability.sinks.wandb`):

- **Loss**: ``train/loss`` with the spike markers ``spike/marker/loss`` (the loss at every step
  a detector fired) on the same chart; a scatter of all detector events (step, value) from the
  events table; the running event count ``spike/events``, whose steps line up with the loss.
- **Gradients**: ``train/grad_norm`` (+ its markers) and the per-layer ``spike/grad_norm/layer_*``.
- **Attention and logits**: ``spike/attn_logit_max`` (+ markers) and per layer,
  ``spike/logsumexp_mean``, ``spike/logit_max_abs``, ``train/z_loss``.
- **Spike score**: ``spike/spike_score``, ``spike/update_ratio_max`` and per layer,
  ``spike/adam_v_below_eps``, ``spike/embedding_std``, ``spike/skipped``.
- **Events**: the ``spike/events_table`` table (one row per detector event).

Markers: a W&B line plot cannot draw point markers on a series for every run (``line_marks`` is
keyed by run id), so the sink logs the marker series ``spike/marker/<metric>`` only at event steps,
and the Loss section adds a scatter of the events table (W&B's built-in ``wandb/scatter/v0``
custom chart).

``build_workspace`` is pure and offline; ``--print`` prints the definition, ``--spec`` the view
spec that ``--save`` uploads (saving needs the network and a W&B API key). ``--save`` updates
the project's saved view of the same name when there is one (:func:`save`), so saving again
after a change replaces the dashboard instead of adding another.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from pydantic import TypeAdapter

from stability.sinks.wandb import EVENTS_KEY, MARKER_PREFIX, STEP_KEY, TABLE_KEY, wandb_name

SECTIONS = ("Loss", "Gradients", "Attention and logits", "Spike score", "Events")
"""Section names, top to bottom."""

WIDE = wr.Layout(x=0, y=0, w=24, h=10)
"""A full-width panel."""


def _line(title: str, *keys: str, marker: str | None = None, log_y: bool | None = None,
          regex: str | None = None) -> wr.LinePlot:
    """A line plot of ``keys`` (``metrics.jsonl`` names, mapped to W&B names) over ``step``.

    Args:
        title: Chart title.
        keys: metrics.jsonl keys to plot.
        marker: Also plot ``spike/marker/<marker>``: the metric's value at event steps.
        log_y: Logarithmic y axis.
        regex: Plot every W&B key matching this regular expression (per-layer series).
    """
    y = [wandb_name(k) for k in keys]
    if marker is not None:
        y.append(MARKER_PREFIX + marker)
    return wr.LinePlot(title=title, x=STEP_KEY, y=y, log_y=log_y, metric_regex=regex)


def _per_layer(family: str) -> str:
    """Regex of the per-layer W&B keys of a metrics.jsonl family (``grad_norm`` -> all layers)."""
    return "^" + wandb_name(f"{family}/layer_1").removesuffix("1") + "[0-9]+$"


def build_workspace(entity: str, project: str, name: str = "Spike dashboard") -> ws.Workspace:
    """The spike dashboard of ``entity/project`` (pure: no network, nothing saved)."""
    events_scatter = wr.CustomChart(
        query={"summaryTable": {"tableKey": TABLE_KEY}}, chart_name="wandb/scatter/v0",
        chart_fields={"x": "step", "y": "value"},
        chart_strings={"title": "detector events (value at step)"})
    sections = {
        "Loss": [
            _line("loss (points: detector events)", "loss", marker="loss"),
            events_scatter,
            wr.LinePlot(title="detector events (running count)", x=STEP_KEY, y=[EVENTS_KEY]),
        ],
        "Gradients": [
            _line("grad norm", "grad_norm", marker="grad_norm", log_y=True),
            _line("grad norm per layer", log_y=True, regex=_per_layer("grad_norm")),
        ],
        "Attention and logits": [
            _line("max attention logit", "attn_logit_max", marker="attn_logit_max"),
            _line("max attention logit per layer", regex=_per_layer("attn_logit_max")),
            _line("output logsumexp (mean)", "logsumexp_mean", marker="logsumexp_mean"),
            _line("max |output logit|", "logit_max_abs"),
            _line("z-loss", "z_loss"),
        ],
        "Spike score": [
            _line("spike score", "spike_score"),
            _line("update / parameter ratio (max)", "update_ratio_max",
                  marker="update_ratio_max", log_y=True),
            _line("update / parameter ratio per layer", log_y=True,
                  regex=_per_layer("update_ratio")),
            _line("Adam sqrt(v) < eps (share)", "adam_v_below_eps"),
            _line("embedding output std", "embedding_std"),
            _line("skipped steps", "skipped"),
        ],
        "Events": [wr.WeavePanelSummaryTable(table_name=TABLE_KEY, layout=WIDE)],
    }
    assert tuple(sections) == SECTIONS
    return ws.Workspace(
        entity=entity, project=project, name=name,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY),
        sections=[ws.Section(name=title, panels=panels, is_open=True,
                             panel_settings=ws.SectionPanelSettings(x_axis=STEP_KEY))
                  for title, panels in sections.items()])


def panel_keys(panel: Any) -> list[str]:
    """The W&B keys a panel reads: a line plot's y keys (and regex), a table's key."""
    if isinstance(panel, wr.LinePlot):
        return [str(y) for y in panel.y] + ([panel.metric_regex] if panel.metric_regex else [])
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return [panel.table_name]
    if isinstance(panel, wr.CustomChart):
        return [panel.query.get("summaryTable", {}).get("tableKey", "")]
    return []


def describe(workspace: ws.Workspace) -> dict[str, Any]:
    """A readable, JSON-ready definition: sections and their panels (type and set fields)."""
    def panel(p: Any) -> dict[str, Any]:
        fields = TypeAdapter(type(p)).dump_python(p, mode="json", exclude_none=True)
        fields = {k: v for k, v in fields.items() if not k.startswith("_") and k != "layout"}
        return {"type": type(p).__name__, **fields}

    return {"entity": workspace.entity, "project": workspace.project, "name": workspace.name,
            "x_axis": workspace.settings.x_axis,
            "sections": [{"name": s.name, "panels": [panel(p) for p in s.panels]}
                         for s in workspace.sections]}


def view_spec(workspace: ws.Workspace) -> dict[str, Any]:
    """The view spec ``save()`` uploads (wandb-workspaces' internal model, built offline)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


VIEWS_QUERY = """
query ProjectViews($entityName: String, $name: String) {
    project(name: $name, entityName: $entityName) {
        allViews(viewType: "project-view") {
            edges { node { id name displayName } }
        }
    }
}
"""
"""The project's saved workspace views (id, internal name, display name)."""


def saved_views(entity: str, project: str, name: str, execute: Any = None) -> list[dict]:
    """The saved views of ``entity/project`` whose display name is ``name`` (W&B's API).

    Args:
        execute: ``(query, variables) -> response``; None = W&B's API with the local key.
    """
    if execute is None:
        import wandb
        from wandb_workspaces._graphql import execute_graphql

        api = wandb.Api()
        execute = lambda query, variables: execute_graphql(api, query, variables)  # noqa: E731
    response = execute(VIEWS_QUERY, {"entityName": entity, "name": project})
    edges = ((response.get("project") or {}).get("allViews") or {}).get("edges") or []
    return [e["node"] for e in edges if e.get("node", {}).get("displayName") == name]


def save(workspace: ws.Workspace, execute: Any = None) -> str:
    """Save ``workspace``: over the saved view of the same name when the project has one (the
    first, when several do), else as a new view. ``updated`` or ``created``."""
    existing = saved_views(workspace.entity, workspace.project, workspace.name, execute)
    if existing:
        workspace._internal_name = existing[0]["name"]
        workspace._internal_id = existing[0]["id"]
    workspace.save()
    return "updated" if existing else "created"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stability.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True, help="W&B entity (team or user)")
    parser.add_argument("--project", required=True, help="W&B project")
    parser.add_argument("--name", default="Spike dashboard", help="workspace (view) name")
    parser.add_argument("--print", dest="print_", action="store_true",
                        help="print the definition as JSON (offline)")
    parser.add_argument("--spec", action="store_true",
                        help="print the view spec that --save uploads, as JSON (offline)")
    parser.add_argument("--save", action="store_true",
                        help="save the workspace to W&B, over the view of the same name if the "
                             "project has one (needs the network and an API key)")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name)
    if args.print_ or not (args.spec or args.save):
        print(json.dumps(describe(workspace), indent=1))
    if args.spec:
        print(json.dumps(view_spec(workspace), indent=1))
    if args.save:
        try:
            how = save(workspace)
        except Exception as err:  # no key, no network, no such entity/project, ...
            print(f"could not save the workspace to {args.entity}/{args.project}: "
                  f"{type(err).__name__}: {err}\nSaving needs the network and a W&B API key "
                  "(`wandb login` or WANDB_API_KEY); --print and --spec work offline.",
                  file=sys.stderr)
            return 1
        print(f"{how}: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
