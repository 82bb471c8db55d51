"""Loading run directories into tables (analysis.runs)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from analysis import runs as R

MakeRun = Callable[..., Path]


def test_find_runs_recursive_natural_order(tmp_path: Path, make_run: MakeRun) -> None:
    for name in ("0", "2", "10", "1"):
        make_run(tmp_path / "sweep" / name, [3.0, 2.0])
    make_run(tmp_path / "single", [3.0])
    make_run(tmp_path / "sweep" / "0" / "wandb" / "x", [3.0])  # inside a run: not a run
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "config.yaml").write_text("recipe: gpt\n")
    found = [p.relative_to(tmp_path).as_posix() for p in R.find_runs(tmp_path)]
    assert found == ["single", "sweep/0", "sweep/1", "sweep/2", "sweep/10"]


def test_load_sweep_tables(sweep: Path) -> None:
    data = R.load_runs(sweep)
    runs = data.runs.set_index("run_id")
    assert list(runs.index) == ["0", "1", "2", "3", "4", "5"]
    assert runs.loc["0", "optim.lr"] == pytest.approx(1e-3)
    assert runs.loc["5", "trainer.seed"] == 1
    assert runs.loc["0", "model.norm_type"] == "layernorm"
    assert runs.loc["0", "optim.betas"] == (0.9, 0.95)  # lists become hashable tuples
    assert runs.loc["0", "overrides"] == "optim.lr=0.001 trainer.seed=0 recipe=gpt"
    assert runs.loc["0", "status"] == "completed"
    assert runs.loc["3", "status"] == "incomplete"  # no summary.json
    assert runs.loc["5", "status"] == "diverged"
    assert runs.loc["0", "final_loss"] == pytest.approx(3.0)
    assert runs.loc["0", "loss_at_init"] == pytest.approx(5.0)
    assert runs.loc["0", "best_loss"] == pytest.approx(3.0)
    assert runs.loc["0", "summary.final_loss"] == pytest.approx(3.0)
    assert runs.loc["3", "steps"] == 30  # from the last logged step
    assert runs["diverged"].tolist() == [False, False, False, False, True, True]
    assert math.isinf(runs.loc["5", "final_loss"])  # ended on NaN
    assert runs.loc["2", "num_events"] == 3
    assert runs.loc["2", "num_spikes"] == 2  # events at 10, 11 -> one incident; 60 -> another
    assert runs.loc["2", "spike_rate"] == pytest.approx(2 * 1000 / 30)


def test_truncated_last_line_and_nan_tokens(sweep: Path) -> None:
    data = R.load_runs(sweep)
    m = data.metrics
    assert m.columns[:2].tolist() == ["run_id", "step"]
    assert (m["run_id"] == "1").sum() == 30  # the half-written 31st line is dropped
    nan_run = m[m["run_id"] == "5"]
    assert nan_run["loss"].isna().sum() == 2
    assert len(m) == 5 * 30 + 5
    assert data.runs.set_index("run_id").loc["1", "num_logged"] == 30


def test_events_table(sweep: Path) -> None:
    ev = R.load_runs(sweep).events
    assert ev.columns[: len(R.EVENT_COLUMNS)].tolist() == R.EVENT_COLUMNS
    assert ev["run_id"].tolist() == ["2", "2", "2"]
    assert ev["step"].tolist() == [10, 11, 60]


def test_read_jsonl_tolerates_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n{"step": 3, "lo')
    records = R.read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[0]["loss"]) and records[1]["loss"] == math.inf
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    assert [r["step"] for r in R.read_jsonl(path)] == [1, 3]  # nothing after it is lost
    assert R.read_jsonl(tmp_path / "missing.jsonl") == []


def test_analysis_reads_run_files_with_the_one_reader() -> None:
    import stability.runfiles

    assert R.read_jsonl is stability.runfiles.read_jsonl


def test_resumed_run_keeps_last_record_per_step(tmp_path: Path, make_run: MakeRun) -> None:
    run = make_run(tmp_path / "r", [5.0, 4.0, 3.0, 9.0])
    with (run / "metrics.jsonl").open("a") as f:  # rolled back to step 3 and re-logged
        f.write('{"step": 3, "loss": 2.9, "grad_norm": 1.0}\n{"step": 4, "loss": 2.8}\n')
    data = R.load_run(run)
    assert data.metrics["step"].tolist() == [1, 2, 3, 4]
    assert data.metrics["loss"].tolist() == [5.0, 4.0, 2.9, 2.8]
    assert data.runs["run_id"].tolist() == ["r"]


def test_vocab_size_sets_loss_at_init(sweep: Path) -> None:
    runs = R.load_runs(sweep, vocab_size=256).runs
    assert runs["loss_at_init"].tolist() == pytest.approx([math.log(256)] * 6)


def test_summary_loss_at_init_is_used(tmp_path: Path, make_run: MakeRun) -> None:
    summary = {"status": "completed", "steps": 3, "loss_at_init": 5.5, "num_spikes": 0}
    runs = R.load_run(make_run(tmp_path / "r", [5.0, 4.0, 3.0], summary=summary)).runs
    assert runs["loss_at_init"].iat[0] == 5.5
    assert runs["summary.num_spikes"].iat[0] == 0


def test_load_run_rejects_non_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        R.load_run(tmp_path)


def test_empty_root_gives_empty_tables(tmp_path: Path) -> None:
    data = R.load_runs(tmp_path)
    assert len(data) == 0
    assert "run_id" in data.metrics.columns and "step" in data.events.columns


def test_imports_no_training_code_torch_or_wandb() -> None:
    # The run directory's files are read through stability.runfiles (no torch), nothing else.
    allowed = ("stability", "stability.runfiles")
    code = (
        "import sys, analysis, analysis.table, analysis.style\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'wandb', 'megatron')\n"
        f"       or (m.startswith('stability') and m not in {allowed!r})]\n"
        "assert not bad, bad\n"
        "assert callable(analysis.load_wandb_project)"
    )
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_load_many_runs_fast(
    tmp_path: Path, make_run: MakeRun, make_config: Callable, make_event: Callable
) -> None:
    n_runs, n_steps = 50, 1000
    losses = [5.0 - i / n_steps for i in range(n_steps)]
    for i in range(n_runs):
        make_run(
            tmp_path / str(i),
            losses,
            config=make_config(1e-3 * (i + 1), seed=i % 3),
            events=[make_event(100), make_event(500)],
        )
    # CPU time of this process, not wall time: the bound holds on a loaded machine too.
    start = time.process_time()
    data = R.load_runs(tmp_path)
    elapsed = time.process_time() - start
    assert len(data.runs) == n_runs and len(data.metrics) == n_runs * n_steps
    assert elapsed < 5.0, f"loading {n_runs} runs took {elapsed:.2f} s of CPU"


def test_trainer_diverged_status_counts(tmp_path: Path, make_run: MakeRun) -> None:
    summary = {"status": "diverged", "steps": 3, "counts": {"spikes": 1}}
    runs = R.load_run(make_run(tmp_path / "r", [5.0, 4.0, 3.0], summary=summary)).runs
    assert runs["diverged"].iat[0]  # finite, falling losses, but the trainer said so
    assert runs["summary.counts.spikes"].iat[0] == 1
