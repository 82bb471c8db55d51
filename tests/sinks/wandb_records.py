"""Read an offline W&B run file (``run-<id>.wandb``) back, offline, for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each ``crc32 (4) | length (2, little-endian) | type (1) | data``; a record is one
FULL chunk or FIRST, MIDDLE..., LAST chunks; a block tail shorter than a chunk header is zero
padding. Each record is a ``wandb.proto.wandb_internal_pb2.Record``. (wandb 0.31 dropped its own
Python reader; ``wandb leet inspect --json`` prints the same records from the command line.)
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a .wandb file, in order."""
    data = Path(path).read_bytes()
    if len(data) < len(HEADER):  # not written yet
        return []
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B transaction log")
    records, pending, pos = [], b"", len(HEADER)
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # zero padding at the end of a block
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:  # unwritten tail
            break
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_finished(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run, waiting for its ``exit`` record.

    ``run.finish()`` can return before W&B's service process has written the run file (seen
    offline with wandb 0.31: a 7-byte file right after ``finish()``, complete a moment later).
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout:g} s")
        time.sleep(0.1)


def _items(items) -> dict[str, Any]:
    """History/summary items as a dict of JSON-decoded values.

    An item names its key with ``key`` or with a ``nested_key`` path (``["spike/events_table",
    "nrows"]`` for a field of a logged table); paths become nested dicts.
    """
    out: dict[str, Any] = {}
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = json.loads(item.value_json)
    return out


def history(records) -> list[dict[str, Any]]:
    """The logged rows (``run.log`` calls), NaN/Infinity decoded as floats."""
    return [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def alerts(records) -> list[dict[str, Any]]:
    """The ``run.alert`` records: title, text, level, wait_duration."""
    return [MessageToDict(r.alert, preserving_proto_field_name=True)
            for r in records if r.WhichOneof("record_type") == "alert"]


def summary(records) -> dict[str, Any]:
    """The run summary: the updates of every summary record, later ones winning."""
    out: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for key, value in _items(r.summary.update).items():
                if isinstance(value, dict) and isinstance(out.get(key), dict):
                    out[key].update(value)
                else:
                    out[key] = value
    return out


def run_info(records) -> wandb_internal_pb2.RunRecord:
    """The first ``run`` record (id, project, display name, config, tags)."""
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def run_file(wandb_dir: Path) -> Path:
    """The single ``offline-run-*/run-*.wandb`` file under a ``wandb/`` directory."""
    files = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]
