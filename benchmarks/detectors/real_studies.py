"""The ``real-studies`` families: the project's paper-study runs, compacted and labelled.

``python -m benchmarks.detectors.real_studies import RUNS_ROOT [--split SPLIT]`` reads the run
directories of a ``python -m analysis.regenerate`` at CPU scale
(``RUNS_ROOT/<recipe>-<size>/<hash>/``, with ``config.yaml``, ``metrics.jsonl`` and
``summary.json``; the study of each run from the plans under ``RUNS_ROOT/.plans/``), keeps a
subset chosen by configuration alone (:func:`selected`), compacts each run to the detectors'
columns (:func:`benchmarks.detectors.real_runs.compact`), and labels it from its loss curve by
the rule of ``real/README.md`` (:func:`label_study_run`: ``label_run`` and the injected fault).
It writes, in the split's folder (:data:`SPLITS`: ``real/studies/``, ``real/studies-heldout/``
or ``real/studies-heldout2/``), ``runs/<name>.jsonl``, ``labels.json`` and ``provenance.json``
(study, part, overrides, a config summary and the source run directory of every trace). It
never reads a run's ``events.jsonl`` and never runs a detector: the labels exist before any
detector sees these traces.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.detectors.real_runs import REAL_DIR, compact, label_run

STUDIES_DIR = REAL_DIR / "studies"
STUDIES_HELDOUT_DIR = REAL_DIR / "studies-heldout"
STUDIES_HELDOUT2_DIR = REAL_DIR / "studies-heldout2"

SPLITS = {"studies": (STUDIES_DIR, (1,)), "studies-heldout": (STUDIES_HELDOUT_DIR, (2, 3)),
          "studies-heldout2": (STUDIES_HELDOUT2_DIR, (4, 5))}
"""Split -> (folder, seeds): every finished run of every study whose ``trainer.seed`` is in the
seeds. ``studies`` (seed 1, every configuration once) was scored once as held out, then looked
at while the detectors were revised (first revision). ``studies-heldout`` (seeds 2 and 3 of the
same configurations: other initialisations and data orders) was labelled before that revision
and scored once with its rules, then looked at for the second revision. ``studies-heldout2``
(seeds 4 and 5, which only the gpt_vs_llama2 study trains: its LR grid of both recipes) was
labelled before the second revision and is scored with its final rules only."""
SEEDS = SPLITS["studies"][1]

FINISHED = ("completed", "diverged", "stopped")
"""Run statuses that are a result (``stability.runfiles.FINISHED``): crashed or preempted runs
are incomplete curves and are left out."""

SUMMARY_KEYS = {
    "recipe": "recipe", "size": "size", "lr": "optim.lr", "warmup": "optim.warmup_steps",
    "clip": "optim.clip_grad", "wd": "optim.weight_decay",
    "wd_lr_indep": "optim.weight_decay_lr_independent", "eps": "optim.eps",
    "hidden": "model.hidden_size", "layers": "model.num_layers", "norm": "model.norm_type",
    "norm_pos": "model.norm_position", "qk_ln": "model.qk_layernorm",
    "init_std": "model.init_std", "scaled_emb": "model.scaled_embedding",
    "emb_ln": "model.embedding_layernorm", "z_loss": "loss.z_loss", "loss_scale": "loss.scale",
    "tokenizer": "data.tokenizer", "steps": "trainer.train_steps", "seed": "trainer.seed",
    "on_spike": "actions.on_spike", "fault_at": "fault.at_step",
}
"""Config summary recorded per trace: short name -> dotted key."""


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def study_map(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Run directory (relative) -> the studies that use it, from every plan under
    ``root/.plans/`` (``{"study", "part", "overrides"}``, in the paper's order)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((root / ".plans").glob("*.json")):
        plan = json.loads(path.read_text())
        for study, dirs in plan["studies"].items():
            for subdir, info in dirs.items():
                entry = {"study": study, "part": info["part"], "overrides": info["overrides"]}
                if entry not in out.setdefault(subdir, []):
                    out[subdir].append(entry)
    return out


def selected(config: Mapping[str, Any], seeds: tuple[int, ...] = SEEDS) -> tuple[bool, str]:
    """Whether a run belongs to the family, from its config alone, and why not.

    Left out: runs whose spike policy acts on the run (``actions.on_spike`` other than
    ``alert``: rollbacks and skipped steps change the curve they are judged on), and seeds not
    in ``seeds``.
    """
    policy = _get(config, "actions.on_spike")
    if policy != "alert":
        return False, f"actions.on_spike={policy}"
    if _get(config, "trainer.seed") not in seeds:
        return False, "seed"
    return True, ""


def trace_name(subdir: str, studies: list[dict[str, Any]]) -> str:
    """``<first study>-<recipe>-<size>-<hash>``: readable, unique by the hash."""
    group, run_hash = subdir.split("/")
    first = studies[0]["study"] if studies else "unplanned"
    return f"{first}-{group}-{run_hash}"


FAULT_TAIL = 20
"""Steps after an injected fault that still belong to it."""


def label_study_run(rows: list[dict[str, Any]], fault_at: int | None) -> dict[str, Any]:
    """The written rule (:func:`label_run`), plus the run's injected fault, if it has one
    (``fault.at_step`` in its config: the spike_timeline study injects an LR spike): an
    incident from that step, whatever the loss did (added 2026-12-01: an LR x30 for one step
    barely moves these runs' loss, and the rule alone called them calm)."""
    lab = label_run(rows)
    steps = [int(r["step"]) for r in rows]
    if fault_at is not None and fault_at in steps:
        end = steps[min(len(steps) - 1, steps.index(fault_at) + FAULT_TAIL)]
        inside = [d for d in lab["incidents"] if d["start"] <= fault_at <= d["end"]]
        if not inside:
            lab["incidents"].append({"kind": "spike", "shape": "fault", "onset": fault_at,
                                     "start": fault_at, "end": end})
            lab["incidents"].sort(key=lambda d: d["onset"])
    return lab


def import_runs(root: Path, out: Path = STUDIES_DIR, split: str = "studies") -> dict[str, Any]:
    """Compact and label the selected finished runs of ``split`` under ``root``; write them
    to ``out``."""
    import yaml

    from stability.detectors import read_metrics

    studies = study_map(root)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    skipped: Counter[str] = Counter()
    for run in sorted(p.parent for p in root.glob("*/*/config.yaml")):
        subdir = f"{run.parent.name}/{run.name}"
        summary_path = run / "summary.json"
        if not summary_path.is_file():
            skipped["unfinished"] += 1
            continue
        summary = json.loads(summary_path.read_text())
        if summary.get("status") not in FINISHED:
            skipped[f"status {summary.get('status')}"] += 1
            continue
        config = yaml.safe_load((run / "config.yaml").read_text())
        ok, why = selected(config, SPLITS[split][1])
        if not ok:
            skipped[why] += 1
            continue
        rows = compact(list(read_metrics(run / "metrics.jsonl")))
        name = trace_name(subdir, studies.get(subdir, []))
        key = f"runs/{name}.jsonl"
        with (runs_dir / f"{name}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        lab = label_study_run(rows, _get(config, "fault.at_step"))
        lab["split"] = split
        labels[key] = lab
        provenance[key] = {
            "source": subdir,
            "studies": studies.get(subdir, []),
            "status": summary.get("status"),
            "steps": summary.get("steps"),
            "rows": len(rows),
            "config": {k: _get(config, d) for k, d in SUMMARY_KEYS.items()},
        }
    write_labels(out, labels)
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    return {"labels": labels, "provenance": provenance, "skipped": dict(skipped)}


def write_labels(folder: Path, labels: Mapping[str, Any]) -> None:
    """``folder/labels.json``, in the one format every split has."""
    (folder / "labels.json").write_text(json.dumps(labels, indent=1, sort_keys=True) + "\n")


def relabel(split: str) -> dict[str, Any]:
    """Label the split's compacted traces again by :func:`label_study_run` (after the rule changed);
    write ``labels.json``. The traces and provenance stay as imported."""
    from stability.detectors import read_metrics

    folder = SPLITS[split][0]
    prov = json.loads((folder / "provenance.json").read_text())
    labels: dict[str, Any] = {}
    for path in sorted((folder / "runs").glob("*.jsonl")):
        fault_at = prov[f"runs/{path.name}"]["config"].get("fault_at")
        lab = label_study_run(list(read_metrics(path)), fault_at)
        lab["split"] = split
        labels[f"runs/{path.name}"] = lab
    write_labels(folder, labels)
    return labels


def label_counts(labels: Mapping[str, Any]) -> dict[str, int]:
    """Runs per label: ``calm`` and each incident shape (a run may have several)."""
    c: Counter[str] = Counter()
    for lab in labels.values():
        shapes = [d["shape"] for d in lab["incidents"]]
        c.update(shapes or ["calm"])
    c["runs"] = len(labels)
    return dict(sorted(c.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detectors.real_studies",
                                description=__doc__)
    p.add_argument("command", choices=["import", "relabel", "counts"])
    p.add_argument("root", nargs="?", type=Path, help="runs root of a CPU-scale regenerate")
    p.add_argument("--split", choices=sorted(SPLITS), default="studies",
                   help="which seeds, into which folder (default: studies, seed 1)")
    a = p.parse_args(argv)
    folder = SPLITS[a.split][0]
    if a.command == "import":
        if a.root is None:
            p.error("import needs RUNS_ROOT")
        res = import_runs(a.root, folder, a.split)
        for key, lab in sorted(res["labels"].items()):
            kinds = ", ".join(f"{d['shape']}@{d['onset']}" for d in lab["incidents"]) or "calm"
            print(f"{key}: {kinds}")
        print("skipped:", res["skipped"])
        labels = res["labels"]
    elif a.command == "relabel":
        labels = relabel(a.split)
    else:
        labels = json.loads((folder / "labels.json").read_text())
    print("label counts:", label_counts(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
