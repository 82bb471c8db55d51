"""Detector tests import the repository (``benchmarks``, ``stability``) from its root."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest tests/detectors` from anywhere
    sys.path.insert(0, str(ROOT))
