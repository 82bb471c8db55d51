"""Turns JSONL or text files into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    python -m stability.data.preprocess --input 'data/*.jsonl' notes.txt \\
        --output-prefix data/mycorpus [--tokenizer my.model] [--json-key text] [--workers 2]

Inputs: `.jsonl` / `.json` (one JSON object per line; the document is its `--json-key` field)
and `.txt` (the whole file is one document), each optionally compressed (`.gz`, `.xz`, `.bz2`).
Globs are expanded here (quote them), `**` included. Every input, the key in each JSONL file's
first record, and the tokenizer are checked before any work starts; a bad one exits with status
2 and a message naming it. Train on the result with `data.name=indexed data.path=PREFIX` (and
`data.tokenizer=MODEL` for a tokenizer other than the sample one). The tokenizer is a
SentencePiece `.model` or a Hugging Face `tokenizer.json` (or a folder holding one).
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import json
import lzma
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from stability.data.sample import SAMPLE_TOKENIZER
from stability.data.tokenizer import HFTokenizer, Tokenizer, open_tokenizer, tokenizer_file

PROG = "python -m stability.data.preprocess"
FORMATS = (".jsonl", ".json", ".txt")
COMPRESSIONS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open, "": None}
CHUNK_DOCUMENTS = 256
"""Documents per unit of work handed to a tokenizer process."""


class InputError(Exception):
    """A bad input; the message names the file (and line) and what is wrong."""


def split_suffix(path: Path) -> tuple[str, str]:
    """Returns (format, compression) of a file name, e.g. ('.jsonl', '.gz'), or raises."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    fmt_suffixes = suffixes[:-1] if compression else suffixes
    fmt = fmt_suffixes[-1] if fmt_suffixes else ""
    if fmt not in FORMATS:
        raise InputError(
            f"--input {str(path)!r}: unknown file type; expected one of "
            f"{', '.join(FORMATS)}, optionally followed by .gz, .xz or .bz2"
        )
    return fmt, compression


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expands globs and checks that every input exists and has a known type (in order)."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise InputError(f"--input {pattern!r} matches no file")
            found = [Path(match) for match in matches if Path(match).is_file()]
        else:
            path = Path(pattern).expanduser()
            if not path.is_file():
                raise InputError(f"--input {pattern!r}: no such file")
            found = [path]
        for path in found:
            split_suffix(path)
            if path not in paths:
                paths.append(path)
    return paths


class _Source:
    """An input file opened for reading, decompressed, counting compressed bytes consumed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.format, compression = split_suffix(path)
        self.raw: BinaryIO = open(path, "rb")  # closed in close()
        opener = COMPRESSIONS[compression]
        self.stream: BinaryIO = opener(self.raw, "rb") if opener else self.raw

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _record_text(line: bytes, path: Path, line_number: int, key: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}:{line_number}: not a JSON object ({error})") from error
    if not isinstance(record, dict):
        raise InputError(f"{path}:{line_number}: not a JSON object")
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise InputError(f"{path}:{line_number}: no key --json-key {key!r} (keys: {keys})")
    if not isinstance(record[key], str):
        raise InputError(f"{path}:{line_number}: --json-key {key!r} is not a string")
    return record[key]


def check_first_record(path: Path, key: str) -> None:
    """Fails fast when a JSONL file's first record is unreadable or lacks `key`."""
    source = _Source(path)
    try:
        for line_number, line in enumerate(source.stream, 1):
            if line.strip():
                _record_text(line, path, line_number, key)
                return
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise InputError(f"{path}: cannot be read ({error})") from error
    finally:
        source.close()


def iter_documents(paths: list[Path], key: str, progress: tqdm) -> Iterator[str]:
    """Yields each non-empty document of the inputs in order, advancing `progress` by bytes."""
    for path in paths:
        source = _Source(path)
        position = 0
        try:
            if source.format == ".txt":
                text = source.stream.read().decode("utf-8")
                if text.strip():
                    yield text
            else:
                for line_number, line in enumerate(source.stream, 1):
                    if line.strip():
                        text = _record_text(line, path, line_number, key)
                        if text:
                            yield text
                    new_position = source.raw.tell()
                    progress.update(new_position - position)
                    position = new_position
        except UnicodeDecodeError as error:
            raise InputError(f"{path}: not UTF-8 text ({error})") from error
        except (OSError, EOFError, lzma.LZMAError) as error:
            raise InputError(f"{path}: cannot be read ({error})") from error
        finally:
            progress.update(path.stat().st_size - position)
            source.close()


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == CHUNK_DOCUMENTS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_worker_tokenizer: Tokenizer | HFTokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = open_tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None, "worker not initialized"
    return [_worker_tokenizer.encode(text) for text in texts]


def tokenized(
    documents: Iterator[str], tokenizer: Tokenizer | HFTokenizer, workers: int
) -> Iterator[list[int]]:
    """Token ids of each document, in input order, spread over `workers` processes."""
    if workers == 1:
        for chunk in _chunks(documents):
            yield from tokenizer.encode_batch(chunk)
        return
    with multiprocessing.Pool(
        workers, initializer=_init_worker, initargs=(str(tokenizer.model_path),)
    ) as pool:
        for ids in pool.imap(_encode_chunk, _chunks(documents)):
            yield from ids


def preprocess(
    paths: list[Path],
    output_prefix: Path,
    tokenizer: Tokenizer | HFTokenizer,
    json_key: str,
    workers: int,
) -> dict[str, object]:
    """Tokenizes `paths` into PREFIX.bin/.idx/.meta.json; returns the sidecar metadata.

    The files are written under a temporary name and renamed at the end, so a failure leaves
    no partial output behind.
    """
    from stability.data.indexed import metadata_path, write_indexed_dataset  # imports megatron

    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = output_prefix.with_name(f".{output_prefix.name}.tmp{os.getpid()}")
    outputs = [
        Path(f"{output_prefix}.bin"),
        Path(f"{output_prefix}.idx"),
        metadata_path(output_prefix),
    ]
    temporary = [Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx"), metadata_path(tmp_prefix)]
    total_bytes = sum(path.stat().st_size for path in paths)
    try:
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr
        ) as progress:
            documents = iter_documents(paths, json_key, progress)
            metadata = write_indexed_dataset(
                tokenized(documents, tokenizer, workers),
                tmp_prefix,
                tokenizer,
                {"inputs": [str(path) for path in paths], "json_key": json_key},
            )
        for tmp, final in zip(temporary, outputs, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize JSONL/text files into a megatron-core .bin/.idx dataset.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help=".jsonl/.json (JSON lines) or .txt files, optionally .gz/.xz/.bz2",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        type=Path,
        metavar="PREFIX",
        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=SAMPLE_TOKENIZER,
        metavar="MODEL",
        help="SentencePiece .model, Hugging Face tokenizer.json, or a folder holding one "
        "(default: the sample tokenizer)",
    )
    parser.add_argument("--json-key", default="text", help="document field in JSONL records")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return parser


def check_arguments(args: argparse.Namespace) -> tuple[Tokenizer | HFTokenizer, list[Path]]:
    """Checks every argument before any work; returns the tokenizer and the input files.

    Raises:
        InputError: Naming the bad argument and value.
    """
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be >= 1")
    if not tokenizer_file(args.tokenizer).is_file():
        raise InputError(f"--tokenizer {str(args.tokenizer)!r}: no such file")
    try:
        tokenizer = open_tokenizer(args.tokenizer)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--tokenizer {str(args.tokenizer)!r}: not usable ({error})") from error
    prefix = args.output_prefix
    if prefix.suffix in (".bin", ".idx"):
        raise InputError(f"--output-prefix {str(prefix)!r}: give it without .bin/.idx")
    outputs = {Path(f"{prefix}{ext}").resolve() for ext in (".bin", ".idx", ".meta.json")}
    paths = resolve_inputs(args.input)
    for path in paths:
        if path.resolve() in outputs:
            raise InputError(f"--output-prefix {str(prefix)!r} would overwrite input {str(path)!r}")
        if split_suffix(path)[0] != ".txt":
            check_first_record(path, args.json_key)
    return tokenizer, paths


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns 0, or exits with status 2 for bad input (after saying why)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tokenizer, paths = check_arguments(args)
    except InputError as error:
        parser.error(str(error))  # exits with status 2

    import stability.data.indexed  # noqa: F401 - megatron-core takes seconds to import; not timed

    start = time.perf_counter()
    try:
        metadata = preprocess(paths, args.output_prefix, tokenizer, args.json_key, args.workers)
    except InputError as error:  # a bad record found while reading
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.output_prefix}.bin/.idx: {metadata['documents']} documents, "
        f"{metadata['tokens']} tokens (EOD included) from {len(paths)} file(s) in {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
