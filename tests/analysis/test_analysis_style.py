"""The paper style (analysis.style)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # the Agg backend: conftest sets MPLBACKEND
import pytest

from analysis import style


def test_figsize() -> None:
    assert style.figsize() == (3.3, pytest.approx(3.3 * 0.75))
    assert style.figsize("double", aspect=0.5) == (6.9, pytest.approx(3.45))
    assert style.figsize(5) == (5.0, 3.75)
    with pytest.raises(ValueError):
        style.figsize("wide")


def test_palette_is_stable() -> None:
    colors = style.palette(["post-LN", "gpt", "llama2", "sandwich"])
    assert colors["gpt"] == style.RECIPE_COLORS["gpt"]
    assert colors["llama2"] == style.RECIPE_COLORS["llama2"]
    assert len(set(colors.values())) == 4


def test_lr_axis_legend_and_save(tmp_path: Path) -> None:
    style.apply()
    fig, ax = plt.subplots(figsize=style.figsize("single"))
    for name in ("gpt", "llama2"):
        ax.plot([1e-3, 1e-2, 1e-1], [3.0, 2.5, 3.5], marker="o", label=name)
    style.lr_axis(ax)
    ax.set_ylabel(style.label("final_loss"))
    legend = style.legend_outside(ax)
    assert ax.get_xscale() == "log"
    assert "learning rate" in ax.get_xlabel()
    fig.canvas.draw()
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1  # beside the axes, not over the data
    paths = style.save_figure(fig, tmp_path / "figs", "lr_sweep")
    style.close(fig)
    assert [p.name for p in paths] == ["lr_sweep.png", "lr_sweep.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[1].read_bytes().startswith(b"%PDF")
