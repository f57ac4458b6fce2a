"""Estimates against the exact effect: how far to trust attribution patching or IG.

A DST declared with ``estimate_of=`` (attribution patching, integrated gradients) estimates
another DST (activation patching) in the same units, component by component.  ``compare``
pairs them over every layer, position and component of one prompt and answers what
researchers ask first: how well do they correlate, and where do they disagree most?
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from ._vocab import Dimension, PassType
from .exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from ._dst import DerivedScalarType
    from ._output_files import Writer
    from ._store import DerivedScalarStore, NodeRecord


@attrs.frozen
class Comparison:
    """One estimate DST against the exact DST it estimates, on one prompt.

    ``pearson`` and ``spearman`` are over every component (layer × position × unit);
    ``disagreements`` are the components with the largest ``|estimate − exact|``, as
    ``(record of the exact value, estimate)`` pairs.
    """

    estimate: str
    exact: str
    n: int
    pearson: float
    spearman: float
    disagreements: tuple[tuple[NodeRecord, float], ...]
    estimates: tuple[float, ...] = attrs.field(repr=False)
    exacts: tuple[float, ...] = attrs.field(repr=False)

    def report(self, words: Sequence[str] | None = None) -> str:
        """The correlations and the worst disagreements as text (``words``: the prompt's)."""
        return format_comparison(self, words)


def compare(
    store: DerivedScalarStore, estimate: str, *, prompt: int = 0, top: int = 5
) -> Comparison:
    """Correlate ``estimate`` with the exact DST it declares, over one prompt's components."""
    import torch

    est = store.activations(estimate, PassType.FORWARD, prompt)
    exact = est.dst.estimate_of
    if exact is None:
        raise ConfigError(
            f"{estimate} does not estimate another DST (it declares no estimate_of); compare "
            "attribution patching or integrated gradients with activation patching"
        )
    if exact not in {d.name for d in store.dsts}:
        raise ConfigError(
            f"comparing {estimate} needs {exact} in the same store: derive both (the CLI's "
            "--compare adds it for you)"
        )
    ref = store.activations(exact, PassType.FORWARD, prompt)
    layers = [layer for layer in est.layer_indices if layer in ref.layer_indices]
    config = store.metadata.get("config", {})
    group, positions = config.get("patch_group", 1), config.get("patch_positions")
    pairs = [_aligned(est[layer], est.dst, positions, group) for layer in layers]
    keep = torch.cat([k.reshape(-1) for _, k in pairs])
    a_all = torch.cat([e.reshape(-1) for e, _ in pairs])
    b_all = torch.cat([ref[layer].reshape(-1) for layer in layers]).to(torch.float64)
    kept = keep.nonzero().flatten()
    a, b = a_all[kept], b_all[kept]
    gap = (a - b).abs()
    order = kept[torch.argsort(gap, descending=True, stable=True)[:top]].tolist()
    sizes = [est[layer].numel() for layer in layers]
    worst = []
    for flat in order:
        layer_pos, offset = _locate(flat, sizes)
        layer = layers[layer_pos]
        key = store._key(exact, PassType.FORWARD)
        record = store._record(key, layer, prompt, ref[layer], offset)
        worst.append((record, float(a_all[flat])))
    return Comparison(
        estimate,
        exact,
        int(a.numel()),
        _pearson(a, b),
        _pearson(_ranks(a), _ranks(b)),
        tuple(worst),
        tuple(a.tolist()),
        tuple(b.tolist()),
    )


def _aligned(
    estimate: torch.Tensor, dst: DerivedScalarType, positions: Sequence[int] | None, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate in the exact DST's terms, and which entries were actually patched.

    Patched in groups, every member of a group holds the group's effect: the estimate is
    summed over the group to match and only the group's first member is compared.  Patched at
    some positions only, the other positions hold 0, not an effect: they are left out.
    """
    import torch

    from ._model import resolve_position

    e = estimate.to(torch.float64)
    keep = torch.ones(e.shape, dtype=torch.bool)
    last = len(dst.shape) - 1 - (dst.shape[-1] is Dimension.SINGLETON)
    if group > 1:
        if positions is not None and last == 0:
            raise ConfigError(
                f"cannot compare {dst.name} patched with both patch_positions and patch_group "
                "along its token axis; patch with one of them"
            )
        n = e.shape[last]
        member = torch.arange(n) // group
        sums = torch.zeros((*e.shape[:last], -(-n // group), *e.shape[last + 1 :]), dtype=e.dtype)
        e = sums.index_add_(last, member, e).index_select(last, member)
        first = (torch.arange(n) % group == 0).reshape(-1, *([1] * (e.dim() - last - 1)))
        keep &= first
    if positions is not None and dst.shape[0] is Dimension.TOKENS:
        n_tokens = e.shape[0]
        rows = torch.zeros(n_tokens, dtype=torch.bool)
        rows[[resolve_position(p, n_tokens, "patch position") for p in positions]] = True
        keep &= rows.reshape(-1, *([1] * (e.dim() - 1)))
    return e, keep


def _locate(flat: int, sizes: Sequence[int]) -> tuple[int, int]:
    for i, size in enumerate(sizes):
        if flat < size:
            return i, flat
        flat -= size
    raise IndexError(flat)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    import torch

    ordered, order = torch.sort(x, stable=True)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each run of ties' first member
    mean_rank = first.to(x.dtype) + (counts.to(x.dtype) - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[group]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def format_comparison(c: Comparison, words: Sequence[str] | None = None) -> str:
    """A short report: the correlations, then the worst disagreements as a table."""
    lines = [
        f"{c.estimate} vs {c.exact}: Pearson r = {c.pearson:.3f}, Spearman ρ = "
        f"{c.spearman:.3f} over {c.n} components",
        f"  {'layer':>5} {'token':<14} {'unit':>6} {'estimate':>10} {'exact':>10} {'gap':>10}",
    ]
    for record, estimate in c.disagreements:
        token = f"{record.token} {words[record.token]!r}" if words else str(record.token)
        unit = ",".join(map(str, record.component)) or "-"
        layer = "-" if record.layer is None else str(record.layer)
        lines.append(
            f"  {layer:>5} {token:<14} {unit:>6} {estimate:>+10.4f} {record.value:>+10.4f} "
            f"{estimate - record.value:>+10.4f}"
        )
    return "\n".join(lines)


def comparison_plot_writer(comparisons: Sequence[Comparison], path: str) -> Writer:
    """Scatter plots, estimate against exact, one panel per estimate DST (diagonal drawn)."""
    from ._report import _pyplot, figure_writer, fit_titles, plot_format

    fmt = plot_format(path)
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(comparisons), figsize=(4.5 * len(comparisons), 4.2), squeeze=False
    )
    for ax, c in zip(axes[0], comparisons, strict=True):
        ax.scatter(c.exacts, c.estimates, s=10, alpha=0.6)
        low = min(min(c.exacts), min(c.estimates))
        high = max(max(c.exacts), max(c.estimates))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"{c.exact} (exact)")
        ax.set_ylabel(c.estimate)
        ax.set_title(f"r = {c.pearson:.3f}, ρ = {c.spearman:.3f}")
    fit_titles(fig)
    return figure_writer(plt, fig, fmt, dpi=110)
