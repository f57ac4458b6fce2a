"""Figures from ``derive --plot`` / ``plot_dst``: colour maps that suit the values, whole titles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import scalarlens
import torch
from scalarlens._report import DIVERGING_CMAP, SEQUENTIAL_CMAP, color_scale, plot_writer

plt = pytest.importorskip("matplotlib.pyplot")

PROMPT = "the old king saw a red fox the old king saw a red"
LONG = "attn.write_to_final_residual_grad_per_token"  # 43 characters, only 4 heads wide


@pytest.fixture(scope="module")
def store() -> scalarlens.DerivedScalarStore:
    dsts = ["attn.write_norm_per_token", LONG, "attn.qk_probs", "mlp.act_times_grad"]
    return scalarlens.derive(scalarlens.load_model(), PROMPT, dsts, target="fox", distractor="king")


def test_color_scale_is_sequential_for_non_negative_values() -> None:
    assert color_scale(torch.tensor([[0.0, 2.0], [0.5, 1.0]])) == {
        "cmap": SEQUENTIAL_CMAP,
        "vmin": 0.0,
        "vmax": 2.0,
    }
    assert color_scale(torch.zeros(2, 3))["cmap"] == SEQUENTIAL_CMAP
    nan = torch.tensor([[float("nan"), 1.0]])
    assert color_scale(nan) == {"cmap": SEQUENTIAL_CMAP, "vmin": 0.0, "vmax": 1.0}


def test_color_scale_is_diverging_and_centred_for_signed_values() -> None:
    assert color_scale(torch.tensor([[-1.0, 3.0]])) == {
        "cmap": DIVERGING_CMAP,
        "vmin": -3.0,
        "vmax": 3.0,
    }


def _draw(store: scalarlens.DerivedScalarStore, dst: str, path: Path) -> Any:
    """The figure ``plot_writer`` drew, after writing it to ``path``; titles overflowing it.

    Measured before saving: saving closes the figure (and drops its renderer).
    """
    writer = plot_writer(store, dst, path)
    fig = plt.gcf()
    renderer = fig.canvas.get_renderer()
    frame = fig.get_window_extent(renderer)
    fig.overflowing = [  # the title, and how far it sticks out (pixels) on the worse side
        (title.get_text(), max(frame.x0 - box.x0, box.x1 - frame.x1))
        for title in [ax.title for ax in fig.axes if ax.get_title()]
        for box in [title.get_window_extent(renderer)]
        if box.x0 < frame.x0 or box.x1 > frame.x1
    ]
    fig.n_titles = sum(1 for ax in fig.axes if ax.get_title())
    writer(path)
    return fig


def _cmaps(fig: Any) -> set[str]:
    return {image.get_cmap().name for ax in fig.axes for image in ax.images}


def test_heatmaps_pick_the_colour_map_from_the_values(
    store: scalarlens.DerivedScalarStore, tmp_path: Path
) -> None:
    norms = _draw(store, "attn.write_norm_per_token", tmp_path / "norms.png")
    assert _cmaps(norms) == {SEQUENTIAL_CMAP}
    assert norms.axes[0].images[0].get_clim()[0] == 0.0
    effects = _draw(store, "mlp.act_times_grad", tmp_path / "effects.png")
    assert _cmaps(effects) == {DIVERGING_CMAP}
    low, high = effects.axes[0].images[0].get_clim()
    assert low == -high < 0
    probs = _draw(store, "attn.qk_probs", tmp_path / "probs.png")
    assert _cmaps(probs) == {SEQUENTIAL_CMAP}


@pytest.mark.parametrize("dst", [LONG, "attn.qk_probs", "mlp.act_times_grad"])
def test_titles_fit_inside_the_figure(
    store: scalarlens.DerivedScalarStore, tmp_path: Path, dst: str
) -> None:
    fig = _draw(store, dst, tmp_path / "plot.png")
    assert fig.n_titles >= 1 and fig.overflowing == []
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_long_title_widens_a_narrow_heatmap(
    store: scalarlens.DerivedScalarStore, tmp_path: Path
) -> None:
    fig = _draw(store, LONG, tmp_path / "long.png")
    # 4 heads would give a 3-inch figure; the title alone needs about twice that.
    assert fig.get_figwidth() > 5
    assert LONG in fig.axes[0].get_title()
