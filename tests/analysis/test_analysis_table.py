"""The table command (python -m analysis.table), run as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]


def _table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "analysis.table", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_table_rows_sorted_and_aligned(
    tmp_path: Path, make_run: Callable, make_config: Callable
) -> None:
    for job, lr in enumerate((0.01, 0.001, 0.1, 0.003)):  # lexical order would put 0.1 first
        make_run(
            tmp_path / str(job),
            [5.0, 4.0, 3.0 + lr],
            config=make_config(lr),
            overrides=[f"optim.lr={lr}", "recipe=gpt"],
        )
    res = _table(str(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "# common overrides: recipe=gpt"
    header, rows = lines[1].split(), lines[2:]
    assert header == ["run", "overrides", "status", "steps", "final_loss", "spikes"]
    assert [r.split()[1] for r in rows] == [
        "optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.01", "optim.lr=0.1"
    ]  # fmt: skip
    assert [r.split()[0] for r in rows] == ["1", "3", "0", "2"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned: every line equally wide
    assert rows[0].split()[2:] == ["completed", "3", "4.0003", "0"]


def test_table_csv_and_metric(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "table.csv"
    res = _table(str(sweep), "--csv", str(out), "--metric", "optim.lr", "--metric", "loss:max")
    assert res.returncode == 0, res.stderr
    assert "incomplete" in res.stdout and "diverged" in res.stdout
    csv = pd.read_csv(out)
    assert len(csv) == 6
    assert csv.columns.tolist() == [
        "run_id", "overrides", "status", "steps", "final_loss", "num_spikes", "optim.lr",
        "loss:max", "run_dir",
    ]  # fmt: skip
    assert csv["overrides"].str.endswith("recipe=gpt").all()  # the CSV keeps full overrides
    assert csv.set_index("run_id").loc[2, "num_spikes"] == 2
    assert csv["loss:max"].tolist() == [5.0, 5.0, 5.0, 5.0, 6.0, 5.0]  # run 4 ends at 6


def test_table_unknown_metric(sweep: Path) -> None:
    res = _table(str(sweep), "--metric", "nope")
    assert res.returncode == 2 and "nope" in res.stderr


def test_table_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    res = _table(str(missing))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and str(missing) in res.stderr


def test_table_empty_dir(tmp_path: Path) -> None:
    res = _table(str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and str(tmp_path) in res.stderr
