"""Spike detectors: streams of statistics -> events. Pure Python, no torch.

The same detectors run live (the loop calls :meth:`DetectorSuite.update` with each metrics row)
and offline (``python -m stability.detect RUN/metrics.jsonl``), and produce the same events.
See docs/detectors.md for the rules, their sources and their benchmark.
"""

from stability.detectors import (  # noqa: F401
    baselines,
    early,
    gradnorm,
    leading,
    nonfinite,
    trend,
)
from stability.detectors.base import (
    KINDS,
    REGISTRY,
    SEVERITIES,
    BaseDetector,
    Detector,
    Event,
    allowed_params,
    build_detectors,
    register,
)
from stability.detectors.replay import DetectorSuite, read_metrics

DEFAULT_DETECTORS: list[str] = [
    "nonfinite",
    "loss_spike",
    "loss_rebound",
    "attn_logit_growth",
    "logsumexp_drift",
    "update_ratio_growth",
]
"""The default set (``detectors=`` in the config): what the benchmark's bar is measured on."""

__all__ = [
    "DEFAULT_DETECTORS",
    "KINDS",
    "REGISTRY",
    "SEVERITIES",
    "BaseDetector",
    "Detector",
    "DetectorSuite",
    "Event",
    "allowed_params",
    "build_detectors",
    "read_metrics",
    "register",
]
