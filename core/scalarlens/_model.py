"""The model-adapter contract: how derivers see a model without knowing its implementation.

A deriver never touches a ``torch.nn.Module``.  It reads weights through
``ModelAdapter.weight`` *at derive time* (so a deriver is a light, serialisable value), and the
engine asks the adapter to ``run`` a batch while capturing exactly the raw
(location, pass, layers) triples the plan needs.  Other architectures plug in by implementing
this protocol and contributing a loader through the ``scalarlens_model_loaders`` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ._vocab import ActivationLocationType, Dimension, PassType, WeightLocationType

if TYPE_CHECKING:
    import torch

LayerIndex = int | None

__all__ = [
    "CallableObjective",
    "CaptureRequest",
    "DirectionObjective",
    "Intervention",
    "LogProbObjective",
    "LogitDiffObjective",
    "ModelAdapter",
    "ModelDims",
    "NodeObjective",
    "Objective",
    "RunResult",
]


def _layer_set(value: Iterable[int] | None) -> frozenset[int] | None:
    return None if value is None else frozenset(value)


@attrs.frozen
class ModelDims:
    """Sizes of a transformer's model-intrinsic axes."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_vocab: int
    n_ctx: int

    def sizes(self) -> dict[Dimension, int]:
        return {
            Dimension.LAYERS: self.n_layers,
            Dimension.RESIDUAL_STREAM_CHANNELS: self.d_model,
            Dimension.ATTN_HEADS: self.n_heads,
            Dimension.QUERY_AND_KEY_CHANNELS: self.d_head,
            Dimension.VALUE_CHANNELS: self.d_head,
            Dimension.MLP_ACTS: self.d_mlp,
            Dimension.VOCAB_SIZE: self.n_vocab,
            Dimension.MAX_CONTEXT_LENGTH: self.n_ctx,
            Dimension.SINGLETON: 1,
        }


@attrs.frozen
class CaptureRequest:
    """Capture ``location`` in ``pass_type`` at ``layers`` (``None`` for layer-less locations)."""

    location: ActivationLocationType
    pass_type: PassType
    layers: frozenset[int] | None = attrs.field(default=None, converter=_layer_set)


# --- backward objectives -------------------------------------------------------------------
# Each objective is a per-prompt scalar; a batch's objectives are summed before one backward,
# which keeps per-prompt gradients exact because prompts never interact in a transformer.


@attrs.frozen
class LogitDiffObjective:
    """``logits[position, target] - logits[position, distractor]`` (the direction of interest)."""

    target: int
    distractor: int
    position: int = -1


@attrs.frozen
class LogProbObjective:
    """``log_softmax(logits[position])[target]``."""

    target: int
    position: int = -1


@attrs.frozen
class CallableObjective:
    """Any scalar function of one prompt's ``T×V`` logits."""

    fn: Callable[[torch.Tensor], torch.Tensor] = attrs.field(eq=False)
    name: str = "callable"


@attrs.frozen
class NodeObjective:
    """One node's activation ("why did this node fire?"): trace upstream from it.

    ``index`` addresses the per-prompt tensor at ``location`` and ``layer``: ``(t, n)`` for an
    MLP neuron, ``(t, s, h)`` for an attention logit or probability.
    """

    location: ActivationLocationType
    layer: LayerIndex
    index: tuple[int, ...]


@attrs.frozen
class DirectionObjective:
    """``residual[position] · direction`` at a residual-stream location and layer."""

    location: ActivationLocationType
    layer: LayerIndex
    position: int
    direction: torch.Tensor = attrs.field(eq=False)


Objective = (
    LogitDiffObjective | LogProbObjective | CallableObjective | NodeObjective | DirectionObjective
)


@attrs.frozen
class Intervention:
    """Replace the value at ``location`` (forward pass) with ``fn(value, layer)``.

    Runs before any capture at that location, so captured values and gradients are those of the
    intervened model.  Used for the final-LayerNorm-scale detach, ablations and SAE splicing.
    """

    location: ActivationLocationType
    fn: Callable[[torch.Tensor, LayerIndex], torch.Tensor] = attrs.field(eq=False)
    layers: frozenset[int] | None = attrs.field(default=None, converter=_layer_set)
    name: str = "intervention"


@attrs.frozen
class RunResult:
    """What one prompt of a batch produced: raw captures (unpadded), logits and objective."""

    tokens: tuple[int, ...]
    logits: torch.Tensor = attrs.field(eq=False)
    captured: Mapping[
        tuple[ActivationLocationType, PassType], Mapping[LayerIndex, torch.Tensor]
    ] = attrs.field(eq=False)
    objective_value: float | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    """What the engine needs from a model."""

    @property
    def name(self) -> str: ...

    @property
    def dims(self) -> ModelDims: ...

    @property
    def capturable_locations(self) -> frozenset[ActivationLocationType]: ...

    def weight(self, location: WeightLocationType, layer: LayerIndex = None) -> torch.Tensor:
        """The weight in its canonical layout (see ``WeightLocationType``), detached."""
        ...

    def run(
        self,
        tokens: Sequence[Sequence[int]],
        captures: Sequence[CaptureRequest],
        objective: Objective | None = None,
        *,
        interventions: Sequence[Intervention] = (),
        detach_final_ln_scale: bool = False,
    ) -> list[RunResult]:
        """Run the batch once forward (and once backward when an objective is given)."""
        ...

    def config_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description of the model, stored in result metadata."""
        ...
