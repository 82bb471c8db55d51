"""Paper figures, one function per study: run tables in, a figure and its numbers out.

``draw(name, data, scale)`` returns a :class:`~analysis.figures.common.FigureResult`: the
matplotlib figure, the numbers behind it, the verdict on the study's published claim, and one
entry of per-run values for each run used. The functions read only the loaded tables (which
:mod:`analysis.runs` builds from run directories).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from analysis.figures import ablation, curves, lr_grid, spikes
from analysis.figures.common import FigureResult

FIGURES: dict[str, Callable[..., FigureResult]] = {
    "gpt_vs_llama2": lr_grid.gpt_vs_llama2,
    "norm_placement": lr_grid.norm_placement,
    "qk_norm": lr_grid.qk_norm,
    "z_loss": curves.z_loss,
    "spike_no_more": curves.spike_no_more,
    "adam_eps": lr_grid.adam_eps,
    "init_std": lr_grid.init_std,
    "width_scaling": lr_grid.width_scaling,
    "ablation": ablation.ablation,
    "spike_recovery": spikes.spike_recovery,
    "spike_timeline": spikes.spike_timeline,
}


def draw(name: str, data, scale: str, info: Mapping[str, Mapping[str, Any]]) -> FigureResult:
    """Draw figure ``name`` from the study's loaded runs (:class:`analysis.runs.RunData`).

    ``info`` maps each run id to ``{"part": ..., "overrides": [...]}``: the study's part the run
    belongs to and the overrides the study gave it; figure functions that need it take it.
    """
    from analysis import style

    style.apply()
    fn = FIGURES[name]
    if "info" in inspect.signature(fn).parameters:
        return fn(data, scale, info=info)
    return fn(data, scale)
