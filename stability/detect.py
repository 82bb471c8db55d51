"""Run spike detectors offline on a finished (or running) run's ``metrics.jsonl``.

Usage::

    python -m stability.detect RUN_DIR_OR_METRICS_JSONL [--detector NAME ...]
        [--param NAME.KEY=VALUE ...] [--state-out FILE] [--list]

Prints one JSON event per line (the fields of ``events.jsonl``), in row then detector order:
the same events the live run produces, since the loop feeds the detectors the same rows in the
same order. NaN/Infinity tokens are read as floats; a torn last line (a run killed mid-write)
is ignored. Bad input (a missing file, an unknown detector or parameter) prints one line naming
the bad value and the allowed values, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stability.detectors import DEFAULT_DETECTORS, REGISTRY, DetectorSuite, read_metrics
from stability.errors import ConfigError


def _parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot or not name or not param:
            raise ConfigError("--param", item, "NAME.KEY=VALUE, e.g. loss_spike.floor_large=0.3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        out.setdefault(name, {})[param] = value
    return out


def _metrics_path(path: Path) -> Path:
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            "PATH", str(path), "an existing metrics.jsonl or a run directory with one"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m stability.detect",
        description="Replay spike detectors on a metrics.jsonl and print events as JSON lines.",
    )
    p.add_argument("path", type=Path, nargs="?", help="metrics.jsonl or a run directory")
    p.add_argument(
        "--detector",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=f"detectors to run (default: {' '.join(DEFAULT_DETECTORS)}); "
        f"one of {', '.join(sorted(REGISTRY))}",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="detector parameter (VALUE is JSON), e.g. loss_spike.floor_large=0.3",
    )
    p.add_argument("--state-out", type=Path, help="write the detectors' final state (JSON) here")
    p.add_argument("--list", action="store_true", help="list the detectors and exit")
    a = p.parse_args(argv)
    if a.list:
        for name in sorted(REGISTRY):
            doc = (REGISTRY[name].__doc__ or "").strip().splitlines()[0]
            mark = "*" if name in DEFAULT_DETECTORS else " "
            print(f"{mark} {name:22s} {doc}")
        return 0
    try:
        if a.path is None:
            raise ConfigError("PATH", None, "a metrics.jsonl or a run directory")
        path = _metrics_path(a.path)
        suite = DetectorSuite.from_names(a.detector or DEFAULT_DETECTORS, _parse_params(a.param))
        for row in read_metrics(path):
            for ev in suite.update(int(row["step"]), row):
                print(json.dumps(ev.to_json()))
        sys.stdout.flush()
    except (ConfigError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    if a.state_out:
        a.state_out.write_text(json.dumps(suite.state_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
