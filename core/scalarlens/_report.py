"""Turning a ``DerivedScalarStore`` into something a person reads: tables and figures.

Plots pick their form from the DST's declared shape, so any plugin's DST gets a sensible
picture: token × token for attention patterns, layer × component heatmaps for per-neuron,
per-head or per-latent quantities, per-token bars for layer-less scalars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._output_files import Writer, check_output_path
from ._vocab import Dimension, PassType
from .exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from ._store import DerivedScalarStore, NodeRecord


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for cell, width in zip(cells, widths, strict=True):
            numeric = cell.replace(".", "", 1).replace("-", "", 1).replace("%", "").isdigit()
            out.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def format_columns(cells: Sequence[str], width: int = 100) -> str:
    """``cells`` in as many aligned columns as fit ``width``, read down then across (like ls)."""
    if not cells:
        return ""
    cell_width = max(map(len, cells)) + 2
    n_columns = max(1, width // cell_width)
    n_rows = -(-len(cells) // n_columns)
    lines = []
    for row in range(n_rows):
        line = "".join(cell.ljust(cell_width) for cell in cells[row::n_rows])
        lines.append(line.rstrip())
    return "\n".join(lines)


def token_label(words: Sequence[str] | None, index: int | None) -> str:
    if index is None:
        return ""
    return f"{index}:{words[index]}" if words is not None else str(index)


def records_table(
    records: Sequence[NodeRecord], words: Sequence[str] | None = None, *, show_dst: bool = True
) -> str:
    headers = ["#", "DST", "layer", "token", "attends to", "component", "value"]
    rows = [
        [
            str(i + 1),
            r.dst,
            "-" if r.layer is None else str(r.layer),
            token_label(words, r.token),
            token_label(words, r.attended_token),
            ",".join(map(str, r.component)) or "-",
            f"{r.value:.4g}",
        ]
        for i, r in enumerate(records)
    ]
    if not show_dst:
        headers.pop(1)
        for row in rows:
            row.pop(1)
    return format_table(headers, rows)


PLOT_HINT = (
    "figure: not drawn (matplotlib is not installed); to get it: pip install 'scalarlens[plot]'"
)


def plotting_available() -> bool:
    """Whether matplotlib is importable (found without importing it: that takes ~0.5 s)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'scalarlens[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def layer_component_matrix(
    store: DerivedScalarStore,
    dst: str,
    pass_type: PassType = PassType.FORWARD,
    prompt: int = 0,
) -> torch.Tensor:
    """``layers × components``: each layer's tensor summed over every axis but the last."""
    import torch

    aam = store.activations(dst, pass_type, prompt)
    rows = [aam[layer].reshape(-1, aam[layer].shape[-1]).sum(0) for layer in aam.layer_indices]
    return torch.stack(rows)


def plot_dst(
    store: DerivedScalarStore,
    dst: str,
    path: str | Path,
    *,
    pass_type: PassType = PassType.FORWARD,
    prompt: int = 0,
    words: Sequence[str] | None = None,
) -> Path:
    """Write a PNG suited to ``dst``'s shape and return its path (atomically)."""
    from ._output_files import atomic_write

    check_output_path(path, "plot")  # before drawing: a bad path should not cost a figure
    writer = plot_writer(store, dst, path, pass_type=pass_type, prompt=prompt, words=words)
    return atomic_write(path, writer, "plot")


def plot_writer(
    store: DerivedScalarStore,
    dst: str,
    path: str | Path,
    *,
    pass_type: PassType = PassType.FORWARD,
    prompt: int = 0,
    words: Sequence[str] | None = None,
) -> Writer:
    """Draw ``dst``'s figure now; return the function that saves it (to any file name).

    Drawing and saving are split so the CLI can draw before writing any output, then write
    the store and the figure as one set.
    """
    fmt = plot_format(path)
    plt = _pyplot()
    aam = store.activations(dst, pass_type, prompt)
    shape = aam.dst.shape
    layers = aam.layer_indices
    if len(shape) >= 3 and shape[1] is Dimension.ATTENDED_TO_TOKENS:
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
        for ax, layer in zip(axes[0], layers, strict=True):
            tensor = aam[layer]
            head = int(tensor.reshape(-1, tensor.shape[-1]).abs().sum(0).argmax())
            _token_heatmap(ax, tensor[..., head].reshape(tensor.shape[0], tensor.shape[1]), words)
            ax.set_title(f"{dst} layer {layer}, head {head}")
    elif aam.dst.has_no_layers or (len(shape) == 2 and shape[1] is Dimension.SINGLETON):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for layer in layers:
            values = aam[layer].reshape(aam[layer].shape[0], -1).sum(-1)
            ax.plot(values.tolist(), marker="o", label=f"layer {layer}")
        ax.set_xticks(range(len(store.tokens[prompt])))
        ax.set_xticklabels(words or store.tokens[prompt], rotation=90)
        ax.set_title(dst)
        ax.legend(fontsize="small")
    else:
        matrix = layer_component_matrix(store, dst, pass_type, prompt)
        fig, ax = plt.subplots(
            figsize=(min(14, 2 + 0.25 * matrix.shape[1]), 1.5 + 0.5 * len(layers))
        )
        _heatmap(ax, matrix, f"{dst} (summed over tokens)", shape[-1].value)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer) for layer in layers])
        ax.set_ylabel("layer")
    fit_titles(fig)
    return figure_writer(plt, fig, fmt, dpi=110)


def plot_format(path: str | Path, what: str = "plot") -> str:
    """The image format ``path`` asks for by its suffix (PNG when it has none).

    Checked before any work: an unknown suffix would otherwise fail only at the very end.
    """
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(
            f"{what} {path}: matplotlib cannot write {fmt!r} images; use one of these suffixes: "
            + ", ".join(f".{s}" for s in sorted(supported))
        )
    return fmt


def figure_writer(plt: Any, fig: Any, fmt: str, **savefig: Any) -> Writer:
    """A ``Writer`` saving ``fig`` in ``fmt`` (the target's format, not the temporary name's)."""

    def write(path: Path) -> None:
        try:
            fig.savefig(path, format=fmt, **savefig)
        finally:
            plt.close(fig)

    return write


SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"


def color_scale(matrix: torch.Tensor) -> dict[str, Any]:
    """``imshow`` colour arguments: sequential from 0 for non-negative values, else diverging.

    Norms and probabilities are never negative, so a diverging map would waste its lower
    half and make every value look "positive, strongly"; signed values (effects, act×grad)
    keep white at 0 and a symmetric range so the sign reads at a glance.
    """
    finite = matrix[matrix.isfinite()]
    if finite.numel() == 0:
        return {"cmap": SEQUENTIAL_CMAP, "vmin": 0.0, "vmax": 1.0}
    if float(finite.min()) >= 0:
        return {"cmap": SEQUENTIAL_CMAP, "vmin": 0.0, "vmax": float(finite.max()) or 1.0}
    bound = float(finite.abs().max()) or 1.0
    return {"cmap": DIVERGING_CMAP, "vmin": -bound, "vmax": bound}


def fit_titles(fig: Any, margin_inches: float = 0.2) -> None:
    """Widen ``fig`` until every axes title and the suptitle fit inside it (after layout).

    Long DST names make long titles; a fixed-size figure would cut them off at the edges.
    """
    for _ in range(3):  # widening re-flows the layout, which can move a title again
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        figure_box = fig.get_window_extent(renderer)
        titles = [ax.title for ax in fig.axes if ax.get_title()] + list(fig.texts)  # suptitle
        overflow = 0.0
        for title in titles:
            box = title.get_window_extent(renderer)
            overflow = max(overflow, figure_box.x0 - box.x0, box.x1 - figure_box.x1)
        if overflow <= 0:
            return
        width = fig.get_figwidth()
        fig.set_figwidth(width + 2 * overflow / fig.dpi + margin_inches)


def _heatmap(ax: Any, matrix: torch.Tensor, title: str, xlabel: str) -> None:
    image = ax.imshow(matrix.numpy(), aspect="auto", **color_scale(matrix))
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    ax.set_xlabel(xlabel)


def _token_heatmap(ax: Any, matrix: torch.Tensor, words: Sequence[str] | None) -> None:
    image = ax.imshow(matrix.numpy(), aspect="auto", **color_scale(matrix))
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    if words is not None and len(words) <= 40:
        ax.set_xticks(range(len(words)))
        ax.set_xticklabels(words, rotation=90, fontsize=7)
        ax.set_yticks(range(len(words)))
        ax.set_yticklabels(words, fontsize=7)
    ax.set_xlabel("attended-to token")
    ax.set_ylabel("query token")
