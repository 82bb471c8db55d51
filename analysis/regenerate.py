"""One command per paper figure: train the study's missing runs, then draw it.

    python -m analysis.regenerate FIGURE|all [FIGURE ...] [--scale cpu|gpu] [--runs DIR]
        [--out DIR] [--launcher local|slurm|basic] [--jobs N] [--no-train] [--force]
        [--draw-jobs N] [--dry-run]

For each figure (a study of :mod:`analysis.studies`): plan its runs, each named after its
resolved config, so that a run two figures share is trained once; train the missing ones in one
Hydra multirun (``hydra/sweeper=jobs``) on the configured launcher (two local processes by
default on CPU, ``--launcher slurm`` on a cluster), showing progress; then write ``FIGURE.png``,
``FIGURE.pdf`` and ``FIGURE.json`` under ``--out``: the numbers behind the figure, the published
claim, our verdict, and every run directory the numbers came from (relative to the JSON file).

A figure whose runs and analysis code did not change since it was drawn is not drawn again
(``--force`` redraws): with every run there, the command takes about a second. The multirun's
log goes to ``<runs>/.jobs/``; the plan (every job's overrides and run directory) is cached in
``<runs>/.plans/``.

Exit status: 0; 1 if a run failed to train or a figure could not be drawn (the others are);
2 for a bad argument.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from analysis import studies as S

DEFAULT_RUNS = Path("runs/studies")
DEFAULT_OUT = {"cpu": Path("figures"), "gpu": Path("figures/gpu")}
LAUNCHERS = {
    "local": None,  # the scale's default: local processes (joblib)
    "slurm": ("hydra/launcher=slurm",),
    "basic": ("hydra/launcher=basic",),  # one process, one run after the other
}
DONE = ("completed", "diverged", "stopped")
PNG_DPI = 200
"""PNG resolution: sharp at column width, and ten figures stay under 2 MB (the PDF is vector)."""


def _say(message: str) -> None:
    print(f"[regenerate] {message}", file=sys.stderr, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- which runs exist -----------------------------------------------------------------------


def run_status(run_dir: Path) -> str | None:
    """``summary.json``'s status of a run directory; None if it has none (missing/unfinished)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def missing_runs(plan: S.Plan, names: Sequence[str], root: Path) -> list[str]:
    """Run directories the figures need that hold no finished run."""
    wanted = dict.fromkeys(d for n in names for d in plan.studies[n])
    return [d for d in wanted if run_status(root / d) not in DONE]


def _last_step(path: Path) -> int:
    """Step of the last complete line of a metrics.jsonl (0 if none), reading only its tail."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class Progress:
    """Counts finished runs and trained steps of a launch; prints one status line."""

    def __init__(self, plan: S.Plan, todo: Sequence[str], root: Path) -> None:
        self.todo = list(todo)
        self.root = root
        self.steps = {d: plan.jobs[d].steps for d in self.todo}
        self.total = sum(self.steps.values())
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0

    def line(self) -> str:
        done = running = steps = 0
        for d in self.todo:
            if run_status(self.root / d) in DONE:
                done += 1
                steps += self.steps[d]
            elif (self.root / d / "metrics.jsonl").is_file():
                running += 1
                steps += min(_last_step(self.root / d / "metrics.jsonl"), self.steps[d])
        elapsed = time.monotonic() - self.start
        frac = steps / self.total if self.total else 1.0
        eta = f", ~{_fmt_time(elapsed * (1 - frac) / frac)} left" if frac > 0.02 else ""
        return (f"trained {done}/{len(self.todo)} runs, {running} running, "
                f"{steps}/{self.total} steps ({100 * frac:.0f}%), {_fmt_time(elapsed)}{eta}")

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty and not final:
            print(f"\r[regenerate] {self.line()}\033[K", end="", file=sys.stderr, flush=True)
        elif final or now - self._last_print >= 30:
            if self.tty:
                print("\r\033[K", end="", file=sys.stderr)
            _say(self.line())
            self._last_print = now


# --- training -------------------------------------------------------------------------------


def train(plan: S.Plan, todo: Sequence[str], root: Path, launcher: Sequence[str],
          env: dict[str, str], poll_s: float = 2.0) -> int:
    """Train runs in one Hydra multirun (``hydra/sweeper=jobs``); return its exit status.

    The longest runs go first, so that two workers end at about the same time.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs_dir = root / ".jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = jobs_dir / f"{stamp}.json"
    order = sorted(todo, key=lambda d: -plan.jobs[d].cost)
    common = list(S.SCALES[plan.scale].common)
    jobs_file.write_text(json.dumps(
        [{"subdir": d, "overrides": [*common, *plan.jobs[d].overrides]} for d in order], indent=1))
    cmd = [sys.executable, "-m", "stability.train", "-m", "hydra/sweeper=jobs",
           f"hydra.sweeper.jobs_file={jobs_file.resolve()}",
           f"hydra.sweep.dir={root.resolve()}", *launcher]
    log_path = jobs_dir / f"{stamp}.log"
    _say(f"training {len(order)} runs: {' '.join(cmd[1:5])} ... (log: {log_path})")
    progress = Progress(plan, order, root)
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the runs too
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=S.REPO,
                                env={**os.environ, **env}, start_new_session=True)
        try:
            while proc.poll() is None:
                progress.show()
                time.sleep(poll_s)
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)  # our own child's process group (its workers)
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    progress.show(final=True)
    if proc.returncode:
        tail = log_path.read_text().splitlines()[-15:]
        _say(f"the multirun exited with {proc.returncode}; its log ends:\n  " + "\n  ".join(tail))
    return proc.returncode


# --- drawing --------------------------------------------------------------------------------


def load_dirs(root: Path, dirs: Sequence[str], jobs: int = 1):
    """Load the given run directories (relative to root) into one :class:`RunData`; run ids
    are the relative paths; ``jobs`` processes parse them (:func:`analysis.runs.read_runs`)."""
    from analysis import runs as R

    return R.read_runs(root, dirs, jobs=jobs)


def draw(name: str, plan: S.Plan, data: Any, root: Path, out: Path) -> dict:
    """Draw one figure from loaded runs; write PNG, PDF and JSON; return the JSON object."""
    from analysis import figures, style

    study = S.get(name)
    dirs = plan.studies[name]
    ids = set(dirs)
    sub = type(data)(runs=data.runs[data.runs["run_id"].isin(ids)].reset_index(drop=True),
                     metrics=data.metrics[data.metrics["run_id"].isin(ids)],
                     events=data.events[data.events["run_id"].isin(ids)])
    result = figures.draw(name, sub, plan.scale, dirs)
    paths = style.save_figure(result.fig, out, name, dpi=PNG_DPI)
    style.close(result.fig)
    _shrink_png(paths[0])
    runs = []
    for d in dirs:
        entry: dict[str, Any] = {"dir": d, **dirs[d]}
        entry.update(result.runs.get(d, {"status": "missing"}))
        runs.append(entry)
    cpu = sub.runs.get("summary.cpu_seconds")
    cost = {"runs": len(sub.runs), "core_minutes": None if cpu is None else
            round(float(cpu.fillna(0).sum()) / 60, 1),
            "note": "CPU time of the training processes (summary.json cpu_seconds); runs "
                    "shared with other figures count in each"}
    obj = {
        "figure": name,
        "title": study.title,
        "scale": plan.scale,
        "sweeps": {part: {"sweep": g.sweep, "overrides": list(g.scales[plan.scale])}
                   for part, g in study.grids.items()},
        "claim": study.claim,
        "source": study.source,
        "verdict": result.verdict,
        "false_positive_rate": result.false_positive_rate,
        "finding": result.finding,
        "levels": result.levels,
        "arms": result.arms,
        "grid": result.grid,
        "tests": result.tests,
        "numbers": result.numbers,
        "cost": cost,
        "definitions": result.definitions,
        "runs_root": os.path.relpath(os.path.abspath(root), os.path.abspath(out)),
        "runs": runs,
        "files": [p.name for p in paths],
        "command": f"python -m analysis.regenerate {name} --scale {plan.scale} --runs {root}",
    }
    text = json.dumps(_jsonable(obj), indent=1, allow_nan=False)
    (out / f"{name}.json").write_text(text + "\n")
    return obj


def _shrink_png(path: Path) -> None:
    """Re-encode a PNG with a 256-colour palette (no dithering): a third of the size and no
    visible change for line plots on white, so that the figures can be committed."""
    from PIL import Image

    with Image.open(path) as im:
        quantized = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.NONE)
    quantized.save(path, optimize=True)


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (the JSON files are for any reader, not only Python's)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_SOURCES = ("analysis/figures", "analysis/style.py", "analysis/metrics.py", "analysis/stats.py",
            "analysis/runs.py", "analysis/regenerate.py", "analysis/studies.py",
            "analysis/verdicts.py", "analysis/corpus.py")


def _source_digest() -> str:
    h = hashlib.sha1()
    for rel in _SOURCES:
        path = S.REPO / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(name: str, plan: S.Plan, root: Path, sources: str) -> str:
    """What a figure depends on: its runs (files' sizes and modification times), the overrides
    the study gave them, and the analysis code. Equal fingerprints: the figure is up to date."""
    h = hashlib.sha1(sources.encode())
    h.update(json.dumps([plan.scale, plan.studies[name]], sort_keys=True).encode())
    for d in plan.studies[name]:
        for f in ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json"):
            try:
                st = (root / d / f).stat()
                h.update(f"{d}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{d}/{f}:-".encode())
    return h.hexdigest()


def _stamp(out: Path, name: str) -> Path:
    return out / ".regenerate" / f"{name}.fingerprint"


def up_to_date(name: str, out: Path, fp: str) -> bool:
    """PNG, PDF and JSON are there and were drawn from the same inputs."""
    files = [out / f"{name}.{ext}" for ext in ("png", "pdf", "json")]
    try:
        return all(f.is_file() for f in files) and _stamp(out, name).read_text() == fp
    except OSError:
        return False


def _draw_some(names: Sequence[str], plan: S.Plan, data: Any, root: Path, out: Path,
               fps: dict[str, str]) -> list[tuple[str, str]]:
    """Draw figures; returns (name, verdict or 'error: ...') for each."""
    import matplotlib

    matplotlib.use("Agg")
    done = []
    for name in names:
        try:
            obj = draw(name, plan, data, root, out)
        except Exception as err:  # one figure's bug must not cost the others
            if os.environ.get("REGENERATE_RAISE"):
                raise
            done.append((name, f"error: {type(err).__name__}: {err}"))
            continue
        _stamp(out, name).parent.mkdir(parents=True, exist_ok=True)
        _stamp(out, name).write_text(fps[name])
        done.append((name, obj["verdict"]))
    return done


def draw_all(names: Sequence[str], plan: S.Plan, root: Path, out: Path, fps: dict[str, str],
             jobs: int) -> list[tuple[str, str]]:
    """Load the runs of the figures once, then draw them in ``jobs`` forked processes."""
    dirs = list(dict.fromkeys(d for n in names for d in plan.studies[n]))
    data = load_dirs(root, dirs, jobs)
    have = set(data.runs["run_id"]) if len(data.runs) else set()
    results = [(n, "error: no runs") for n in names if not have & set(plan.studies[n])]
    names = [n for n in names if have & set(plan.studies[n])]
    # biggest first, dealt round-robin, so that the processes finish together
    names = sorted(names, key=lambda n: -len(plan.studies[n]))
    jobs = max(1, min(jobs, len(names)))
    if jobs == 1 or "fork" not in mp.get_all_start_methods():
        return results + _draw_some(names, plan, data, root, out, fps)
    ctx = mp.get_context("fork")  # the children share the loaded tables
    with ctx.Pool(jobs) as pool:
        parts = pool.starmap(_draw_some, [(names[i::jobs], plan, data, root, out, fps)
                                          for i in range(jobs)])
    return results + [r for part in parts for r in part]


def _rates(rates: dict) -> str:
    """The rule's false-positive rates as the table prints them: how often it says
    ``reproduced``, and ``partly`` or better, when nothing differs."""
    yes, some = rates.get("reproduced"), rates.get("partly_or_better")
    if not isinstance(yes, float):
        return ""
    if not isinstance(some, float) or abs(some - yes) < 5e-4:
        return f" ({100 * yes:.1f}%)"
    return f" ({100 * yes:.2g}% / {100 * some:.1f}%)"


def findings_table(out: Path, names: Sequence[str] | None = None) -> str:
    """A Markdown table of the figures' JSON files in ``out``: claim, our numbers, verdict."""
    names = list(names or S.study_names())
    rows = ["| figure | published claim | our numbers (mean [95% t-interval] over seeds) | "
            "verdict (rule's false-positive rate: reproduced / partly or better) |",
            "|---|---|---|---|"]
    for name in names:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        obj = json.loads(path.read_text())

        def cell(text: str) -> str:
            return text.replace("|", "/").replace("\n", " ")

        fpr = _rates(obj.get("false_positive_rate", {}))
        rows.append(f"| [{name}]({name}.png) | {cell(obj['claim'])} ({cell(obj['source'])}) | "
                    f"{cell(obj['finding'])} | **{obj['verdict']}**{fpr} |")
    return "\n".join(rows) + "\n"


def training_cost(plan: S.Plan, names: Sequence[str], root: Path) -> str:
    """One line: the CPU time (core-minutes) and wall time of the figures' distinct runs."""
    cpu = wall = 0.0
    dirs = list(dict.fromkeys(d for n in names for d in plan.studies[n]))
    counted = 0
    for d in dirs:
        try:
            summary = json.loads((root / d / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        if "cpu_seconds" in summary:
            counted += 1
            cpu += float(summary["cpu_seconds"])
            wall += float(summary.get("wall_seconds", 0.0))
    return (f"Training cost: {cpu / 60:.0f} core-minutes of CPU time ({wall / 60:.0f} "
            f"process-minutes of wall time) for {counted} of {len(dirs)} distinct runs.")


# --- command line ---------------------------------------------------------------------------


def _names(figures: Sequence[str]) -> list[str]:
    known = S.study_names()
    if "all" in figures:
        return known
    bad = [f for f in figures if f not in known]
    if bad:
        raise ValueError(f"unknown figure {', '.join(bad)}; known: all, {', '.join(known)}")
    return list(dict.fromkeys(figures))


def main(argv: Sequence[str] | None = None, *, say: Callable[[str], None] = _say) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m analysis.regenerate",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("figures", nargs="+", metavar="FIGURE", help="a figure name or 'all'")
    parser.add_argument("--scale", choices=sorted(S.SCALES), default="cpu")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS,
                        help=f"root of the run directories (default {DEFAULT_RUNS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="where figures go (default figures/, figures/gpu/ for --scale gpu)")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local",
                        help="Hydra launcher of missing runs (default: local processes)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time with the local launcher (default: the scale's)")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the launcher, e.g. "
                             "hydra.launcher.partition=gpu (repeatable)")
    parser.add_argument("--no-train", action="store_true",
                        help="draw from the runs there are; train nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs that would be trained, and exit")
    parser.add_argument("--force", action="store_true",
                        help="redraw figures even where their runs and code did not change")
    parser.add_argument("--draw-jobs", type=int, default=2,
                        help="processes that draw figures (default 2)")
    args = parser.parse_args(argv)
    try:
        names = _names(args.figures)
    except ValueError as err:
        parser.error(str(err))
    out = args.out or DEFAULT_OUT[args.scale]
    root: Path = args.runs
    scale = S.SCALES[args.scale]

    t0 = time.monotonic()
    plan = S.plan(names, args.scale, root, progress=say)
    todo = missing_runs(plan, names, root)
    steps = sum(plan.jobs[d].steps for d in todo)
    say(f"{len(names)} figure(s), {sum(len(plan.studies[n]) for n in names)} runs "
        f"({len({d for n in names for d in plan.studies[n]})} distinct), {len(todo)} to train "
        f"({steps} steps)")
    if args.dry_run:
        for d in todo:
            print(f"{d}  {' '.join(plan.jobs[d].overrides)}")
        return 0
    status = 0
    if todo and not args.no_train:
        launcher = list(LAUNCHERS[args.launcher] or scale.launcher)
        if args.jobs is not None:
            if args.launcher != "local":
                parser.error("--jobs is for --launcher local")
            launcher.append(f"hydra.launcher.n_jobs={args.jobs}")
        launcher.extend(args.launcher_arg)
        train(plan, todo, root, launcher, dict(scale.env))
        still = missing_runs(plan, names, root)
        if still:
            say(f"{len(still)} run(s) did not finish: {', '.join(still[:5])}"
                + (" ..." if len(still) > 5 else ""))
            status = 1
    t1 = time.monotonic()
    sources = _source_digest()
    fps = {n: fingerprint(n, plan, root, sources) for n in names}
    stale = [n for n in names if args.force or not up_to_date(n, out, fps[n])]
    for n in names:
        if n not in stale:
            say(f"{n}: up to date ({out / n}.png/.pdf/.json)")
    if stale:
        say(f"drawing {len(stale)} figure(s) from their runs")
        for name, verdict in draw_all(stale, plan, root, out, fps, args.draw_jobs):
            if verdict.startswith("error"):
                status = 1
                say(f"{name}: {verdict}")
            else:
                say(f"{name}: {verdict} -> {out / name}.png/.pdf/.json")
    if stale:
        (out / "findings.md").write_text(
            f"# Findings ({args.scale} scale)\n\nWritten by `python -m analysis.regenerate`; "
            "see docs/findings.md.\n\n" + training_cost(plan, names, root) + "\n\n"
            + findings_table(out))
    say(training_cost(plan, names, root))
    say(f"done in {_fmt_time(time.monotonic() - t0)} (figures {time.monotonic() - t1:.1f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
