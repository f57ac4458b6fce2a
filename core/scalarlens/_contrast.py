"""The runs the engine makes from a (main, baseline) prompt pair: integrated gradients at a
node and activation patching.

Both are *raw* values to the planner (``PromptCombo.INTEGRATED`` / ``PATCHED`` sources), so
the DSTs built on them are ordinary derivers.  Both are computed with interventions on extra
batched forward passes of the main prompt, many rows per pass (``DstConfig.batch_rows``):

* integrated gradients at (location, layer): row ``k`` replaces the value there with
  ``b + α_k (a − b)`` (``a`` main, ``b`` baseline) and captures the objective's gradient at it;
  the gradients are averaged with Gauss–Legendre weights.  Everything upstream stays as on the
  main prompt, so at a full cut of the network (the residual stream at a layer) the
  attributions sum to ``objective(main) − objective(baseline)`` (completeness).
* activation patching: row ``r`` replaces one component (one head, neuron or latent at one
  position; vector channels whole) with its baseline value; the effect is
  ``objective(main) − objective(patched)``, read against an unpatched row of the same pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ._activations import _layer_sort_key
from ._layers import LayerIndex
from ._locations import CaptureLocation
from ._model import CaptureRequest, Intervention, ModelAdapter, Objective, RunResult
from ._sources import PromptCombo
from ._vocab import ActivationLocationType, Dimension, PassType
from .exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from ._activations import RawActivationStore
    from ._config import DstConfig
    from ._plan import Plan

Key = tuple[CaptureLocation, PassType]
Captured = Mapping[Key, Mapping[LayerIndex, "torch.Tensor"]]
Values = dict[Key, dict[LayerIndex, "torch.Tensor"]]
Wanted = Mapping[Key, frozenset[LayerIndex]]
Site = tuple[CaptureLocation, LayerIndex]
#: ``progress(what, done, total)``, called after each batched pass of an engine run.
Progress = Callable[[str, int, int], None]
#: Per location and layer: the batch rows to replace and how (``fn(value[rows]) -> new``).
Replacements = dict[
    CaptureLocation,
    dict[LayerIndex, tuple["torch.Tensor", Callable[["torch.Tensor"], "torch.Tensor"]]],
]

#: Axes of a vector (patched whole); every other axis indexes components.
CHANNEL_AXES = frozenset(
    {
        Dimension.RESIDUAL_STREAM_CHANNELS,
        Dimension.QUERY_AND_KEY_CHANNELS,
        Dimension.VALUE_CHANNELS,
        Dimension.VOCAB_SIZE,
        Dimension.SINGLETON,
    }
)


def gauss_legendre(steps: int) -> tuple[list[float], list[float]]:
    """Nodes in (0, 1) and weights summing to 1 of the ``steps``-point Gauss–Legendre rule.

    Golub–Welsch (eigenvalues of the Jacobi matrix, float64), so no numpy is needed.  The rule
    integrates polynomials of degree ``2·steps − 1`` exactly, far better than the left Riemann
    sum of the original integrated-gradients recipe at the same number of backward passes.
    """
    import torch

    if steps == 1:
        return [0.5], [1.0]
    k = torch.arange(1, steps, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = vectors[0] ** 2  # 2·v0² on [-1, 1], halved on [0, 1]
    return ((nodes + 1) / 2).tolist(), weights.tolist()


def component_rank(location: CaptureLocation) -> int:
    """How many leading axes of ``location`` index components (the rest are channels)."""
    shape = location.shape
    rank = len(shape)
    while rank and shape[rank - 1] in CHANNEL_AXES:
        rank -= 1
    if rank == 0 or any(d in CHANNEL_AXES for d in shape[:rank]):
        raise ConfigError(
            f"activation patching at {location.value!r} ({', '.join(d.value for d in shape)}): "
            "its component axes must lead and its channel axes trail"
        )
    return rank


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _sorted(layers: frozenset[LayerIndex]) -> list[LayerIndex]:
    return sorted(layers, key=_layer_sort_key)


def _replace(
    by_layer: Mapping[LayerIndex, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]],
    value: torch.Tensor,
    layer: LayerIndex,
) -> torch.Tensor:
    """Intervention body: rows ``idx`` of the batch-leading ``value`` become ``fn(value[idx])``."""
    if layer not in by_layer:
        return value
    idx, fn = by_layer[layer]
    out = value.clone()
    out[idx] = fn(value[idx]).to(dtype=value.dtype)
    return out


def _interventions(replacements: Replacements) -> list[Intervention]:
    out = []
    for location, by_layer in replacements.items():
        if not isinstance(location, ActivationLocationType):
            raise ConfigError(
                f"integrated gradients and activation patching intervene on model locations; "
                f"{location.value!r} is a plugin's splice point"
            )
        layers = None if location.has_no_layers else _ints(by_layer)
        fn = functools.partial(_replace, by_layer)
        out.append(Intervention(location, fn, layers, name="scalarlens.contrast"))
    return out


def _constant(value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda _old: value


def _ints(layers: Iterable[LayerIndex]) -> list[int]:
    return [x for x in layers if x is not None]


class _Step(NamedTuple):
    location: CaptureLocation
    layer: LayerIndex
    k: int  # quadrature point


def _path_points(
    chunk: Sequence[_Step], main: Captured, baseline: Captured, alphas: Sequence[float]
) -> Replacements:
    """Row ``i`` of the pass holds ``b + α_k (a − b)`` at ``chunk[i]``'s location and layer."""
    import torch

    replacements: Replacements = {}
    for site in dict.fromkeys((r.location, r.layer) for r in chunk):
        loc, layer = site
        picked = [(i, r.k) for i, r in enumerate(chunk) if (r.location, r.layer) == site]
        a = main[(loc, PassType.FORWARD)][layer]
        b = baseline[(loc, PassType.FORWARD)][layer]
        alpha = torch.tensor([alphas[k] for _, k in picked], dtype=a.dtype, device=a.device)
        path = b + alpha.reshape(-1, *([1] * a.dim())) * (a - b)
        idx = torch.tensor([i for i, _ in picked], dtype=torch.long)
        replacements.setdefault(loc, {})[layer] = (idx, _constant(path))
    return replacements


def integrated_gradients(
    adapter: ModelAdapter,
    tokens: Sequence[int],
    main: Captured,
    baseline: Captured,
    wanted: Wanted,
    objective: Objective,
    *,
    steps: int,
    batch_rows: int,
    interventions: Sequence[Intervention] = (),
    memory: str = "default",
    progress: Progress | None = None,
) -> Values:
    """Path-averaged gradients ``Σ_k w_k ∇f(b + α_k(a − b))`` at every wanted (location, layer).

    Rows of all (location, layer) jobs share batched passes; each row reads only its own job's
    gradient.
    """

    alphas, weights = gauss_legendre(steps)
    # Only passed when asked for, so adapters written before memory modes keep working.
    low: dict[str, Any] = {"memory": memory} if memory != "default" else {}
    rows = [
        _Step(loc, layer, k)
        for (loc, _), layers in wanted.items()
        for layer in _sorted(layers)
        for k in range(steps)
    ]
    out: Values = {}
    done = 0
    if progress is not None:
        progress("integrated gradients", 0, len(rows))
    for chunk in _chunks(rows, batch_rows):
        replacements = _path_points(chunk, main, baseline, alphas)
        captures = [
            CaptureRequest(loc, PassType.BACKWARD, None if loc.has_no_layers else _ints(by_layer))
            for loc, by_layer in replacements.items()
        ]
        results = adapter.run(
            [list(tokens)] * len(chunk),
            captures,
            objective,
            interventions=[*interventions, *_interventions(replacements)],
            return_logits=False,
            **low,
        )
        for i, row in enumerate(chunk):
            grad = results[i].captured[(row.location, PassType.BACKWARD)][row.layer]
            per_layer = out.setdefault((row.location, PassType.BACKWARD), {})
            term = grad * weights[row.k]
            previous = per_layer.get(row.layer)
            per_layer[row.layer] = term if previous is None else previous + term
        done += len(chunk)
        if progress is not None:
            progress("integrated gradients", done, len(rows))
    return out


def engine_runs(
    plan: Plan,
    adapter: ModelAdapter,
    main: RunResult,
    baseline: RunResult,
    objective: Objective,
    interventions: Sequence[Intervention],
    config: DstConfig,
    progress: Progress | None = None,
) -> dict[PromptCombo, RawActivationStore]:
    """The integrated-gradient and patched runs ``plan`` needs for one (main, baseline) pair."""
    from ._activations import RawActivationStore

    out: dict[PromptCombo, RawActivationStore] = {}
    wanted = plan.engine_runs
    if PromptCombo.INTEGRATED in wanted:
        values = integrated_gradients(
            adapter,
            main.tokens,
            main.captured,
            baseline.captured,
            wanted[PromptCombo.INTEGRATED],
            objective,
            steps=config.steps,
            batch_rows=config.batch_rows,
            interventions=interventions,
            memory=config.memory,
            progress=progress,
        )
        out[PromptCombo.INTEGRATED] = RawActivationStore.from_nested_dict(values)
    if PromptCombo.PATCHED in wanted:
        from ._patching import activation_patching

        values = activation_patching(
            adapter,
            main.tokens,
            main.captured,
            baseline.captured,
            wanted[PromptCombo.PATCHED],
            objective,
            group=config.patch_group,
            batch_rows=config.batch_rows,
            positions=config.patch_positions,
            interventions=interventions,
            progress=progress,
        )
        out[PromptCombo.PATCHED] = RawActivationStore.from_nested_dict(values)
    return out
