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

from ._layers import LayerIndex
from ._locations import CaptureLocation, PluginLocation
from ._vocab import (
    ActivationLocationType,
    Dimension,
    PassType,
    WeightLocationType,
)

if TYPE_CHECKING:
    import torch


__all__ = [
    "CallableObjective",
    "CaptureRequest",
    "DirectionObjective",
    "FinalResidualReadout",
    "Intervention",
    "LogProbObjective",
    "LogitDiffObjective",
    "ModelAdapter",
    "ModelDims",
    "NodeObjective",
    "Objective",
    "ObjectiveInfo",
    "PluginLocation",
    "RunResult",
]


def _layer_set(value: Iterable[int] | None) -> frozenset[int] | None:
    return None if value is None else frozenset(value)


NORM_KINDS = ("layernorm", "rmsnorm")


def _check_norm_kind(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in NORM_KINDS:
        from .exceptions import ConfigError

        raise ConfigError(f"ModelDims.norm_kind: expected one of {NORM_KINDS}, got {value!r}")


def _positive_or_none(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        from .exceptions import ConfigError

        raise ConfigError(f"ModelDims.{attribute.name}: expected a positive number, got {value!r}")


@attrs.frozen
class ModelDims:
    """Sizes of a transformer's model-intrinsic axes, and the architectural facts kernels need.

    ``norm_kind`` is ``"layernorm"`` (centre, divide by ``sqrt(var + eps)``, gain and bias) or
    ``"rmsnorm"`` (divide by ``sqrt(mean(x²) + eps)``, gain only); ``norm_eps`` is its epsilon.
    Kernels read them (or call ``ctx.final_norm`` / ``ctx.layer_norm``) instead of digging in
    ``config_dict()``.

    The flags describe the block's wiring, so a kernel can follow the model instead of
    assuming GPT-2: ``n_kv_heads`` (grouped-query attention: query head ``h`` reads key/value
    head ``h // (n_heads // n_kv_heads)``; defaults to ``n_heads``), ``gated_mlp``
    (``act(gate)·up``), ``parallel_residual`` (the MLP reads the residual *before* attention,
    so attention cannot influence the same layer's MLP), ``post_norms`` (each sublayer's output
    passes through a norm before it is added to the residual stream), ``logit_softcap`` (final
    logits are ``c·tanh(l/c)``; objectives read the capped logits).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_vocab: int
    n_ctx: int
    norm_eps: float = 1e-5
    norm_kind: str = attrs.field(default="layernorm", validator=_check_norm_kind)
    n_kv_heads: int = attrs.field(default=attrs.Factory(lambda self: self.n_heads, takes_self=True))
    gated_mlp: bool = False
    parallel_residual: bool = False
    post_norms: bool = False
    logit_softcap: float | None = attrs.field(default=None, validator=_positive_or_none)

    def __attrs_post_init__(self) -> None:
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            from .exceptions import ConfigError

            raise ConfigError(
                f"ModelDims: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def sizes(self) -> dict[Dimension, int]:
        return {
            Dimension.LAYERS: self.n_layers,
            Dimension.RESIDUAL_STREAM_CHANNELS: self.d_model,
            Dimension.ATTN_HEADS: self.n_heads,
            Dimension.KV_HEADS: self.n_kv_heads,
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

    location: CaptureLocation
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
class ObjectiveInfo:
    """The objective as a kernel sees it (``ctx.objective``), resolved for one prompt.

    ``kind`` is ``"logit_diff"``, ``"log_prob"``, ``"callable"``, ``"node"`` or ``"direction"``;
    ``target``/``distractor`` are token ids where the kind has them; ``position`` is the token
    index the objective reads, already made non-negative for this prompt's length.
    """

    kind: str
    objective: Objective = attrs.field(eq=False)
    target: int | None = None
    distractor: int | None = None
    position: int | None = None

    @classmethod
    def of(cls, objective: Objective, n_tokens: int) -> ObjectiveInfo:
        if isinstance(objective, LogitDiffObjective):
            t = resolve_position(objective.position, n_tokens)
            return cls("logit_diff", objective, objective.target, objective.distractor, t)
        if isinstance(objective, LogProbObjective):
            t = resolve_position(objective.position, n_tokens)
            return cls("log_prob", objective, objective.target, None, t)
        if isinstance(objective, DirectionObjective):
            t = resolve_position(objective.position, n_tokens, "DirectionObjective position")
            return cls("direction", objective, position=t)
        if isinstance(objective, NodeObjective):
            t = resolve_position(objective.index[0], n_tokens, "NodeObjective token index")
            return cls("node", objective, position=t)
        return cls("callable", objective)


Emit = Callable[[PluginLocation, "torch.Tensor"], "torch.Tensor"]


@attrs.frozen
class Intervention:
    """Replace the value at ``location`` (forward pass) with ``fn(value, layer)``.

    Runs before any capture at that location, so captured values and gradients are those of the
    intervened model.  Used for the final-LayerNorm-scale detach, ablations and SAE splicing.

    An intervention that declares ``emits`` is called as ``fn(value, layer, emit)``: it passes
    each intermediate it wants to expose through ``emit(plugin_location, tensor)`` and uses the
    returned tensor downstream, which is how the adapter captures its forward value and its
    gradient (e.g. SAE latents) exactly like a built-in location.
    """

    location: ActivationLocationType
    fn: Callable[..., torch.Tensor] = attrs.field(eq=False)
    layers: frozenset[int] | None = attrs.field(default=None, converter=_layer_set)
    name: str = "intervention"
    emits: tuple[PluginLocation, ...] = ()


@attrs.frozen
class RunResult:
    """What one prompt of a batch produced: raw captures (unpadded), logits and objective."""

    tokens: tuple[int, ...]
    logits: torch.Tensor | None = attrs.field(eq=False)
    captured: Mapping[tuple[CaptureLocation, PassType], Mapping[LayerIndex, torch.Tensor]] = (
        attrs.field(eq=False)
    )
    objective_value: float | None = None


class CaptureSink(Protocol):
    """Takes some captures while the model runs instead of the run returning them.

    ``run(..., sink=...)`` hands every capture whose (location, pass) is in ``keys`` to
    ``offer`` as soon as it exists — one unpadded tensor per prompt, in the accumulation dtype
    — and leaves it out of ``RunResult.captured``.  A gradient the backward pass never reaches
    is offered as zeros after the backward, a post-norm scale the model lacks as ones, exactly
    as ``captured`` would hold them.  The engine uses it to reduce each layer's captures (e.g.
    act×grad) while the model runs, so they never pile up; it passes ``sink`` only to adapters
    that declare ``accepts_capture_sink = True`` (``HookedAdapter`` does).
    """

    @property
    def keys(self) -> frozenset[tuple[CaptureLocation, PassType]]: ...

    def offer(
        self,
        key: tuple[CaptureLocation, PassType],
        layer: LayerIndex,
        values: Sequence[torch.Tensor],
        *,
        hold: bool = False,
    ) -> None:
        """``hold=True`` while the model is inside a layer it will recompute (a checkpointed
        layer with ``memory="low"``): the sink must not run autograd until a later offer."""
        ...


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
        return_logits: bool = True,
        memory: str = "default",
    ) -> list[RunResult]:
        """Run the batch once forward, and once backward if a gradient capture is requested.

        ``return_logits=False`` lets the adapter skip the unembedding when nothing else needs
        the logits (``RunResult.logits`` is then ``None``): they are often the largest tensor.
        Interventions receive the padded, batch-leading tensor.  ``memory="low"`` asks for
        per-layer recomputation in the backward pass (same results, less memory); an adapter
        that cannot recompute layer by layer raises ``ModelInputError`` saying so.
        """
        ...

    def config_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description of the model, stored in result metadata."""
        ...


@runtime_checkable
class FinalResidualReadout(Protocol):
    """Optional adapter capability: the model's own head applied to a final residual.

    With it, ``derive`` computes the objective's gradient at the final residual locally
    (through the final norm and unembedding only) when that is the only gradient a plan needs,
    and ``ctx.final_norm`` uses the model's exact norm.  Adapters without it still work: the
    engine then runs a real backward, and ``ctx.final_norm`` uses ``ModelDims.norm_kind``.
    """

    def final_norm(self, resid: torch.Tensor, *, detach_scale: bool = False) -> torch.Tensor:
        """The final norm of ``resid`` (``…×D``), differentiably."""
        ...

    def logits_from_final_residual(
        self, resid: torch.Tensor, *, detach_ln_scale: bool = False
    ) -> torch.Tensor:
        """``…×V`` logits from the residual entering the final norm, differentiably.

        May also accept ``columns=`` (vocabulary ids) and return only those logits: a logit
        difference then unembeds two columns, not all ``V`` (``derive`` checks the signature).
        """
        ...


LOGIT_OBJECTIVES = (LogitDiffObjective, LogProbObjective, CallableObjective)


def resolve_position(pos: int, length: int, what: str = "objective position") -> int:
    """A token index into a prompt of ``length`` tokens; negative counts from the last token."""
    from .exceptions import ModelInputError

    if not -length <= pos < length:
        raise ModelInputError(
            f"{what} {pos} is out of range for a {length}-token prompt "
            f"(valid: {-length}..{length - 1}; -1 is the last token)"
        )
    return pos % length


def logits_objective(objective: Objective, logits: torch.Tensor) -> torch.Tensor:
    """One prompt's scalar objective from its unpadded ``T×V`` logits.

    Only for objectives that depend on the logits alone (``LOGIT_OBJECTIVES``); node and
    direction objectives need the live forward pass.
    """
    import torch

    from .exceptions import ModelInputError

    length = logits.shape[0]

    if isinstance(objective, LogitDiffObjective):
        t = resolve_position(objective.position, length)
        return logits[t, objective.target] - logits[t, objective.distractor]
    if isinstance(objective, LogProbObjective):
        t = resolve_position(objective.position, length)
        return torch.log_softmax(logits[t], dim=-1)[objective.target]
    if isinstance(objective, CallableObjective):
        value = objective.fn(logits)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            raise ModelInputError(
                f"CallableObjective {objective.name!r} must return a one-element tensor, got "
                f"{type(value).__name__}{shape}"
            )
        return value.reshape(())
    raise ModelInputError(f"{type(objective).__name__} is not a function of the logits alone")
