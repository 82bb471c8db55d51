"""One paper style for every figure (seaborn + matplotlib).

Usage::

    from analysis import style
    style.apply()
    fig, ax = plt.subplots(figsize=style.figsize("single"))
    ...
    style.lr_axis(ax)
    style.legend_outside(ax)
    style.save_figure(fig, "figures", "lr_sweep")

Colours are Okabe & Ito's colour-blind-safe set (the order of seaborn's ``colorblind`` palette
differs; we fix ours so a recipe keeps its colour across figures). Sizes fit a two-column paper:
3.3 in for one column, 6.9 in for both; fonts are 8 pt (7 pt ticks and legends), readable at that
width.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.ticker import LogLocator

OKABE_ITO = [
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow (weak on white: last)
    "#000000",  # black
]
SINGLE_COLUMN = 3.3
"""Width in inches of a one-column figure."""
DOUBLE_COLUMN = 6.9
"""Width in inches of a figure spanning both columns."""
DPI = 300

RECIPE_COLORS = {"llama2": OKABE_ITO[0], "gpt": OKABE_ITO[1]}
"""Fixed colours of the recipes, the same in every figure."""

LABELS = {
    "optim.lr": "Peak learning rate",
    "loss": "Training loss (nats/token)",
    "final_loss": "Final loss (nats/token)",
    "eval_loss": "Held-out loss (nats/token)",
    "lr_sensitivity": "LR sensitivity (nats)",
    "grad_norm": "Gradient norm (L2)",
    "step": "Training step",
    "attn_logit_max": "Max attention logit",
    "logsumexp_mean": "Output logsumexp (mean)",
}
"""Axis labels with units for common columns."""


def rc_params() -> dict[str, object]:
    """The matplotlib rc settings of the paper style."""
    return {
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "legend.title_fontsize": 7,
        "legend.frameon": False,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.5,
        "axes.linewidth": 0.6,
        "grid.linewidth": 0.4,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=OKABE_ITO),
        "figure.dpi": 100,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "savefig.pad_inches": 0.02,
        "pdf.fonttype": 42,  # embed TrueType: editable text, accepted by publishers
        "ps.fonttype": 42,
    }


def apply() -> None:
    """Set the paper style globally (seaborn ``ticks`` theme, Okabe-Ito palette, our sizes)."""
    sns.set_theme(context="paper", style="ticks", palette=OKABE_ITO, rc=rc_params())


def palette(names: Iterable[str]) -> dict[str, str]:
    """Colour of each name: recipes keep their fixed colours, others follow the Okabe-Ito order."""
    names = list(dict.fromkeys(names))
    free = iter(c for c in OKABE_ITO if c not in RECIPE_COLORS.values())
    return {n: RECIPE_COLORS[n] if n in RECIPE_COLORS else next(free) for n in names}


def figsize(width: str | float = "single", aspect: float = 0.75) -> tuple[float, float]:
    """Figure size in inches, height = width * aspect.

    Args:
        width: ``"single"`` (3.3 in), ``"double"`` (6.9 in) or a width in inches.
        aspect: Height over width.
    """
    if width == "single":
        w = SINGLE_COLUMN
    elif width == "double":
        w = DOUBLE_COLUMN
    elif isinstance(width, int | float) and not isinstance(width, bool):
        w = float(width)
    else:
        raise ValueError(f"width must be 'single', 'double' or inches, got {width!r}")
    return (w, w * aspect)


def label(column: str) -> str:
    """Axis label with units for a column name (the name itself if unknown)."""
    return LABELS.get(column, column)


def lr_axis(ax: Axes, which: str = "x", text: str | None = None) -> None:
    """Log-scale an LR axis with decade ticks and a labelled name.

    Args:
        ax: The axes.
        which: ``"x"`` or ``"y"``.
        text: Axis label; default ``"Peak learning rate"`` (dimensionless, log scale).
    """
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=10)
    axis.set_major_locator(LogLocator(base=10))
    axis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
    axis.set_label_text(text or f"{LABELS['optim.lr']} (log scale)")


def legend_outside(
    ax: Axes, where: str = "right", title: str | None = None, **kwargs: object
) -> Legend:
    """Put the legend outside the axes so that it never covers data.

    Args:
        ax: The axes whose handles are shown.
        where: ``"right"`` (beside the axes) or ``"top"`` (above it, in a row).
        title: Legend title.
        **kwargs: Passed to ``ax.legend``.
    """
    handles, labels = ax.get_legend_handles_labels()
    if where == "right":
        opts = {"loc": "center left", "bbox_to_anchor": (1.02, 0.5)}
    elif where == "top":
        opts = {"loc": "lower center", "bbox_to_anchor": (0.5, 1.02), "ncol": max(len(labels), 1)}
    else:
        raise ValueError(f"where must be 'right' or 'top', got {where!r}")
    return ax.legend(handles, labels, title=title, borderaxespad=0.0, **{**opts, **kwargs})


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, dpi: int = DPI) -> list[Path]:
    """Write ``name.png`` (``dpi``, at least 200) and ``name.pdf`` under ``out_dir``.

    Returns:
        The two paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=max(dpi, 200), bbox_inches="tight")
    # No creation date: redrawing the same numbers gives the same bytes (clean diffs).
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    return paths


def close(fig: Figure) -> None:
    """Free a figure's memory (figures made in loops pile up otherwise)."""
    plt.close(fig)
