"""The preprocess command: JSONL/text files -> .bin/.idx, and its errors before any work."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stability.data.preprocess import main
from stability.data.tokenizer import Tokenizer
from stability.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    "The first document.\nIt has two lines.",
    "二番目の文書です。日本語のテキスト。",
    "Third, from a compressed file: 圧縮されたファイル。",
]
TEXT_FILE = "A whole text file is one document.\n\nEven with blank lines. 空行があっても。\n"


def write_inputs(folder: Path) -> None:
    (folder / "part1.jsonl").write_text(
        json.dumps({"text": DOCS[0], "id": 1})
        + "\n\n"  # blank lines are skipped
        + json.dumps({"text": DOCS[1]}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    with gzip.open(folder / "part2.jsonl.gz", "wt", encoding="utf-8") as out:
        out.write(json.dumps({"text": DOCS[2]}, ensure_ascii=False) + "\n")
    (folder / "notes.txt").write_text(TEXT_FILE, encoding="utf-8")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stability.data.preprocess", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a subprocess that imports megatron-core (about 10 s of CPU)
def test_cli_turns_jsonl_and_text_into_a_trainable_dataset(
    tmp_path: Path, tokenizer: Tokenizer, make_train_data
) -> None:
    write_inputs(tmp_path)
    prefix = tmp_path / "out" / "corpus"
    result = run_cli(
        "--input", str(tmp_path / "part*.jsonl*"), str(tmp_path / "notes.txt"),
        "--output-prefix", str(prefix), "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tokenizing" in result.stderr  # the progress bar
    assert "4 documents" in result.stdout

    dataset = IndexedDataset(str(prefix))
    decoded = [tokenizer.decode(dataset[i][:-1]) for i in range(len(dataset))]
    assert decoded == [*DOCS, TEXT_FILE]
    assert all(dataset[i][-1] == tokenizer.eod for i in range(len(dataset)))
    assert not [p for p in prefix.parent.iterdir() if p.name.startswith(".")]

    data = make_train_data(name="indexed", path=str(prefix), split="1", train_samples=16)
    batch = data.loader.next_micro_batch()
    assert batch["tokens"].shape == (4, 32) and data.valid is None


def test_cli_exits_2_naming_a_missing_file(tmp_path: Path) -> None:
    result = run_cli("--input", str(tmp_path / "missing.jsonl"), "--output-prefix", "x")
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "no such file" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "{d}/*.parquet"], "matches no file"),
        (["--input", "{d}/table.csv"], "unknown file type"),
        (["--input", "{d}/part1.jsonl", "--json-key", "body"], "no key --json-key 'body'"),
        (["--input", "{d}/notes.txt", "--tokenizer", "{d}/none.model"], "none.model"),
        (["--input", "{d}/notes.txt", "--workers", "0"], "--workers 0"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, args, message) -> None:
    write_inputs(tmp_path)
    (tmp_path / "table.csv").write_text("a,b\n")
    argv = [arg.format(d=tmp_path) for arg in args] + ["--output-prefix", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))


def test_bad_record_later_in_a_file_exits_2_and_leaves_no_output(tmp_path, capsys) -> None:
    lines = [json.dumps({"text": "fine"}), json.dumps({"txt": "typo"})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["--input", str(tmp_path / "data.jsonl"), "--output-prefix", str(tmp_path / "o")])
    assert code == 2
    assert "data.jsonl:2: no key --json-key 'text'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_indexed_data_refuses_a_different_tokenizer(
    tmp_path: Path, small_tokenizer: Tokenizer, make_train_data
) -> None:
    from stability.data.indexed import write_indexed_dataset

    texts = [*DOCS, TEXT_FILE] * 5
    write_indexed_dataset(small_tokenizer.encode_batch(texts), tmp_path / "ds", small_tokenizer)
    with pytest.raises(ConfigError, match="data.tokenizer") as error:
        make_train_data(name="indexed", path=str(tmp_path / "ds"))  # the sample tokenizer
    assert small_tokenizer.sha256 in str(error.value)
    data = make_train_data(
        name="indexed", path=str(tmp_path / "ds"), tokenizer=str(small_tokenizer.model_path)
    )
    assert data.tokenizer.vocab_size == 1500
    assert int(data.loader.next_micro_batch()["tokens"].max()) < 1500
