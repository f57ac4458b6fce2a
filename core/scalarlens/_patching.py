"""Activation patching: the exact effect of each component, many patched copies per pass.

For every component (one head, neuron or latent at one position; vector channels patched
whole) of every wanted (location, layer): ``objective(main) − objective(main with the
component's value from the baseline)``.  Each batched pass holds one unpatched row, the
reference its patched rows are compared with, so a patch that changes nothing reads exactly 0.

Two facts of causal transformers cut the work, both exact:

* a patch at token ``t`` cannot reach an objective read at an earlier token, and a component
  whose baseline value equals its main value changes nothing: such components are 0 without
  a run;
* it cannot reach earlier layers or earlier tokens either, so an adapter offering
  ``resume_objectives`` (``ResumableModel``) runs only layers ``l…`` on tokens ``t…`` of each
  pass, with the earlier tokens' keys and values taken from one clean pass: about a quarter
  of the full forward, averaged over layers and positions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from ._contrast import (
    Captured,
    Progress,
    Replacements,
    Site,
    Values,
    Wanted,
    _interventions,
    _replace,
    _sorted,
    component_rank,
)
from ._layers import LayerIndex
from ._locations import CaptureLocation
from ._model import (
    CaptureRequest,
    Intervention,
    LogitDiffObjective,
    LogProbObjective,
    ModelAdapter,
    Objective,
    resolve_position,
)
from ._vocab import ActivationLocationType, Dimension, PassType

if TYPE_CHECKING:
    import torch

HookFn = Callable[[str, "int | None", "torch.Tensor"], "torch.Tensor"]
ALT = ActivationLocationType
#: What a resumable adapter reads from one clean pass: the residual entering every layer
#: (the embedding sum, then each layer's output) and every layer's keys and values.
RESUME_CAPTURES = (ALT.RESID_POST_EMBEDDING, ALT.RESID_POST_MLP, ALT.ATTN_KEY, ALT.ATTN_VALUE)


@runtime_checkable
class ResumableModel(Protocol):
    """Optional adapter capability: run only the part of a forward pass a patch can change."""

    def resume_objectives(
        self,
        prefix: Captured,
        start_layer: int,
        offset: int,
        n_rows: int,
        hook: HookFn,
        objective: LogitDiffObjective | LogProbObjective,
    ) -> list[float]:
        """The objective of ``n_rows`` copies of the clean prompt (``prefix`` holds its
        ``RESUME_CAPTURES``), run from layer ``start_layer`` on tokens ``offset…`` only, with
        ``hook(name, layer, tensor)`` called at every location (tensors hold tokens
        ``offset…``)."""
        ...


def _where(mask: torch.Tensor, base: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    return lambda old: torch.where(mask, base.to(old.dtype), old)


class _Patch(NamedTuple):
    location: CaptureLocation
    layer: LayerIndex
    component: tuple[int, ...]  # index along the leading component axes
    start: int  # first component of the group along the last component axis

    def where(self, group: int, offset: int = 0) -> tuple[int | slice, ...]:
        """The patched entries; ``offset`` shifts the leading token axis (resumed passes)."""
        last = slice(self.start, self.start + group)
        if not offset:
            return (*self.component, last)
        if self.component:
            return (self.component[0] - offset, *self.component[1:], last)
        return (slice(self.start - offset, self.start - offset + group),)

    @property
    def token(self) -> int:
        first = (*self.component, self.start)[0]
        return first


def _patches(
    chunk: Sequence[_Patch],
    baseline: Captured,
    shapes: Mapping[Site, tuple[int, ...]],
    group: int,
    offset: int = 0,
) -> Replacements:
    """Row ``i + 1`` of the pass patches ``chunk[i]`` (row 0 stays unpatched)."""
    import torch

    replacements: Replacements = {}
    for site in dict.fromkeys((j.location, j.layer) for j in chunk):
        loc, layer = site
        picked = [(i + 1, j) for i, j in enumerate(chunk) if (j.location, j.layer) == site]
        b = baseline[(loc, PassType.FORWARD)][layer][offset:]
        shape = (shapes[site][0] - offset, *shapes[site][1:])
        masks = torch.zeros((len(picked), *shape), dtype=torch.bool, device=b.device)
        for m, (_, job) in enumerate(picked):
            masks[(m, *job.where(group, offset))] = True
        masks = masks.reshape(*masks.shape, *([1] * (b.dim() - len(shape))))
        idx = torch.tensor([i for i, _ in picked], dtype=torch.long)
        replacements.setdefault(loc, {})[layer] = (idx, _where(masks, b))
    return replacements


def patch_shapes(baseline: Captured, wanted: Wanted) -> dict[Site, tuple[int, ...]]:
    """Component shape (the location's shape without channel axes) of every wanted site."""
    shapes: dict[Site, tuple[int, ...]] = {}
    for (loc, _), layers in wanted.items():
        rank = component_rank(loc)
        for layer in _sorted(layers):
            shapes[(loc, layer)] = tuple(baseline[(loc, PassType.FORWARD)][layer].shape[:rank])
    return shapes


def _axes(
    location: CaptureLocation, sizes: Sequence[int], positions: Sequence[int] | None
) -> list[range | list[int]]:
    """Indices to patch along each component axis: token axes only at ``positions``."""
    out: list[range | list[int]] = []
    for dim, n in zip(location.shape, sizes, strict=False):
        if positions is not None and dim is Dimension.TOKENS:
            out.append(sorted({resolve_position(p, n, "patch position") for p in positions}))
        else:
            out.append(range(n))
    return out


def _token_led(location: CaptureLocation) -> bool:
    """Whether the location's only token axis is its first (a patch there is at one token)."""
    shape = location.shape
    return shape[0] is Dimension.TOKENS and not any(d.is_token_axis for d in shape[1:])


def _objective_position(objective: Objective, n_tokens: int) -> int | None:
    if isinstance(objective, (LogitDiffObjective, LogProbObjective)):
        return resolve_position(objective.position, n_tokens)
    return None


def _jobs(
    shapes: Mapping[Site, tuple[int, ...]],
    group: int,
    positions: Sequence[int] | None,
    read_at: int | None,
    unchanged: Callable[[_Patch], bool],
) -> list[_Patch]:
    """Every patch to run, in (location, layer, token) order; tokens after the objective's
    position and patches that change no value are left out (their effect is exactly 0)."""
    jobs = [
        _Patch(loc, layer, index, start)
        for (loc, layer), shape in shapes.items()
        for index in itertools.product(*_axes(loc, shape[:-1], positions))
        for start in _axes(loc, shape, positions)[-1][::group]
    ]
    if read_at is not None:
        jobs = [j for j in jobs if not _token_led(j.location) or j.token <= read_at]
    return [j for j in jobs if not unchanged(j)]


def _same_values(main: Captured, baseline: Captured, group: int) -> Callable[[_Patch], bool]:
    """Whether a patch would write the values already there (bit for bit)."""
    import torch

    def unchanged(job: _Patch) -> bool:
        key = (job.location, PassType.FORWARD)
        where = job.where(group)
        a, b = main[key][job.layer][where], baseline[key][job.layer][where]
        return bool(torch.equal(a, b))

    return unchanged


def activation_patching(
    adapter: ModelAdapter,
    tokens: Sequence[int],
    main: Captured,
    baseline: Captured,
    wanted: Wanted,
    objective: Objective,
    *,
    group: int,
    batch_rows: int,
    positions: Sequence[int] | None = None,
    interventions: Sequence[Intervention] = (),
    progress: Progress | None = None,
) -> Values:
    """The effect of patching every component of every wanted site (module docstring)."""
    import torch

    shapes = patch_shapes(baseline, wanted)
    read_at = _objective_position(objective, len(tokens))
    jobs = _jobs(shapes, group, positions, read_at, _same_values(main, baseline, group))
    out: Values = {}
    for (loc, layer), shape in shapes.items():
        dtype = baseline[(loc, PassType.FORWARD)][layer].dtype
        out.setdefault((loc, PassType.FORWARD), {})[layer] = torch.zeros(shape, dtype=dtype)
    run = _pass_runner(adapter, tokens, baseline, shapes, objective, group, interventions)
    done = 0
    if progress is not None:
        progress("activation patching", 0, len(jobs))
    for chunk in _passes(jobs, max(batch_rows - 1, 1), len(tokens)):
        values = run(chunk)
        for job, patched in zip(chunk, values[1:], strict=True):
            target = out[(job.location, PassType.FORWARD)][job.layer]
            target[job.where(group)] = values[0] - patched
        done += len(chunk)
        if progress is not None:
            progress("activation patching", done, len(jobs))
    return out


def _passes(jobs: Sequence[_Patch], size: int, n_tokens: int) -> Iterator[list[_Patch]]:
    """Jobs grouped into passes of at most ``size``, each at one location and layer and over
    nearby tokens: a resumed pass runs from its earliest layer and token for every row, so a
    pass mixing layers, or tokens far apart, would redo work for its later rows.  A pass is cut
    when the next job's token would add more than a quarter of the remaining tokens."""
    chunk: list[_Patch] = []
    for job in jobs:
        if chunk:
            first = chunk[0]
            spread = job.token - first.token
            if (
                len(chunk) == size
                or (job.location, job.layer) != (first.location, first.layer)
                or spread * 4 > max(n_tokens - first.token, 4)
            ):
                yield chunk
                chunk = []
        chunk.append(job)
    if chunk:
        yield chunk


PassRunner = Callable[[Sequence[_Patch]], list[float]]


def _pass_runner(
    adapter: ModelAdapter,
    tokens: Sequence[int],
    baseline: Captured,
    shapes: Mapping[Site, tuple[int, ...]],
    objective: Objective,
    group: int,
    interventions: Sequence[Intervention],
) -> PassRunner:
    """How one pass (an unpatched row, then one row per patch) is run: resumed where the
    adapter, the objective and the locations allow, a full forward otherwise."""
    resumable = (
        isinstance(adapter, ResumableModel)
        and isinstance(objective, (LogitDiffObjective, LogProbObjective))
        and not interventions
        and all(_token_led(loc) and isinstance(loc, ALT) for loc, _ in shapes)
    )
    if not resumable:

        def full(chunk: Sequence[_Patch]) -> list[float]:
            results = adapter.run(
                [list(tokens)] * (len(chunk) + 1),
                [],
                objective,
                interventions=[
                    *interventions,
                    *_interventions(_patches(chunk, baseline, shapes, group)),
                ],
                return_logits=False,
            )
            values: list[float] = []
            for r in results:
                if r.objective_value is None:
                    raise AssertionError(f"{type(adapter).__name__}.run evaluated no objective")
                values.append(r.objective_value)
            return values

        return full
    assert isinstance(adapter, ResumableModel)
    assert isinstance(objective, (LogitDiffObjective, LogProbObjective))
    captures = [CaptureRequest(loc, PassType.FORWARD) for loc in RESUME_CAPTURES]
    prefix = adapter.run([list(tokens)], captures, None, return_logits=False)[0].captured
    resumed_objective = objective

    def resumed(chunk: Sequence[_Patch]) -> list[float]:
        start = min(0 if j.layer is None else j.layer for j in chunk)
        offset = min(j.token for j in chunk)
        replacements = _patches(chunk, baseline, shapes, group, offset)
        hook = _hook(replacements)
        return adapter.resume_objectives(
            prefix, start, offset, len(chunk) + 1, hook, resumed_objective
        )

    return resumed


def _hook(replacements: Replacements) -> HookFn:
    """A model hook applying the replacements at their locations and layers."""
    by_name = {loc.value: by_layer for loc, by_layer in replacements.items()}

    def hook(name: str, layer: int | None, tensor: torch.Tensor) -> torch.Tensor:
        by_layer = by_name.get(name)
        return tensor if by_layer is None else _replace(by_layer, tensor, layer)

    return hook
