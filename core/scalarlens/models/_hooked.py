"""``HookedAdapter``: everything a ``ModelAdapter`` does that does not depend on the model.

A concrete adapter (``GPT2Adapter`` here, the Hugging Face adapter of ``scalarlens-transformers``,
a third party's) supplies three things: its ``ModelDims``, a forward pass that calls
``hook(name, layer, tensor)`` at each ``ActivationLocationType`` it can produce and lets the
returned tensor flow downstream, and its weights in the canonical layouts.  This class turns
that into the protocol: validation, capture planning, interventions, objectives, batching and
the backward pass.

Batching: prompts of different lengths are **right-padded into one batch** with an attention
mask over padded keys.  Real tokens keep positions ``0..len-1`` and never attend to padding, so
each prompt's values and gradients equal those of running it alone (up to float rounding of
differently-shaped matmuls); every returned tensor is truncated back to the prompt's length.

Gradients: parameters are frozen, and during a backward run every hooked tensor that does not
require grad (the embedding sum, a detached norm scale, a constant an intervention wrote) is
turned into a grad-requiring leaf, so the objective's gradient *at that point* is still captured
while nothing flows upstream of a detach.  Gradient hooks are registered on the tensor the hook
*returns*, i.e. the value that flows downstream, after interventions.  A captured location the
objective does not depend on (e.g. a layer after a ``NodeObjective``'s node) is never reached by
the backward pass; its gradient is returned as exact zeros, which is the true gradient.

Post-norm scales on a model without post-norms are ones (and their gradients zeros): the
identity norm, so a kernel's "write through the post-norm" is one formula for every model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .._layers import LayerIndex
from .._locations import CaptureLocation, PluginLocation
from .._model import (
    LOGIT_OBJECTIVES,
    CallableObjective,
    CaptureRequest,
    CaptureSink,
    DirectionObjective,
    Intervention,
    LogitDiffObjective,
    LogProbObjective,
    ModelDims,
    NodeObjective,
    Objective,
    RunResult,
    logits_objective,
    resolve_position,
)
from .._vocab import ActivationLocationType as ALT
from .._vocab import Dimension, PassType, WeightLocationType
from ..exceptions import ModelInputError

__all__ = ["POST_NORM_SCALES", "HookFn", "HookedAdapter"]

HookFn = Callable[[str, "int | None", torch.Tensor], torch.Tensor]
"""``hook(name, layer, tensor) -> tensor``; ``name`` is an ``ActivationLocationType`` value."""

POST_NORM_SCALES = frozenset({ALT.ATTN_POST_NORM_SCALE, ALT.MLP_POST_NORM_SCALE})


W = WeightLocationType
_Key = tuple[CaptureLocation, PassType]
_ATTN_PAIR_LOCATIONS = (ALT.ATTN_QK_LOGITS, ALT.ATTN_QK_PROBS)
_ALT_BY_HOOK_NAME: dict[str, ALT] = {alt.value: alt for alt in ALT}
# Objectives that always depend differentiably on every layer before their site, so the backward
# pass recomputes those layers (a callable objective may not be differentiable at all).
_DIFFERENTIABLE_OBJECTIVES = (
    LogitDiffObjective,
    LogProbObjective,
    NodeObjective,
    DirectionObjective,
)


def _token_index(location: CaptureLocation, length: int) -> tuple[slice, ...]:
    return tuple(slice(0, length) if d.is_token_axis else slice(None) for d in location.shape)


def _split_prompts(
    location: CaptureLocation, batch: torch.Tensor, lengths: Sequence[int]
) -> list[torch.Tensor]:
    """Per-prompt tensors of a batch-leading tensor, every token axis cut to the prompt's length.

    Copies when the batch is padded or holds several prompts, so the padded batch tensor can
    be freed as soon as the pass moves on; a single unpadded prompt keeps the tensor itself
    (a copy would only double the peak memory of the capture).
    """
    if len(lengths) == 1 and lengths[0] == batch.shape[1]:
        return [batch[0].detach()]
    return [
        batch[b][_token_index(location, length)].detach().clone()
        for b, length in enumerate(lengths)
    ]


@attrs.define
class _RunState:
    """Everything one ``run`` call's hook needs; lives only for that call."""

    plan: dict[_Key, frozenset[LayerIndex]]
    interventions: Sequence[Intervention]
    backward: bool
    detach_final_ln_scale: bool
    objective_site: tuple[ALT, LayerIndex] | None
    lengths: Sequence[int]
    # Per (location, pass) and layer: one unpadded tensor per prompt.
    forward_values: dict[_Key, dict[LayerIndex, list[torch.Tensor]]] = attrs.field(factory=dict)
    grads: dict[_Key, dict[LayerIndex, list[torch.Tensor]]] = attrs.field(factory=dict)
    # Per-prompt shapes of every value seen at a requested backward location, so a gradient
    # the backward pass never reaches can be returned as zeros of the right shape.
    seen_shapes: dict[tuple[CaptureLocation, LayerIndex], list[tuple[int, ...]]] = attrs.field(
        factory=dict
    )
    objective_tensor: torch.Tensor | None = None
    # Captures handed to the engine as they are made instead of being returned (see
    # ``CaptureSink``), with what has been offered so far and the dtype it is offered in.
    sink: CaptureSink | None = None
    sink_dtype: torch.dtype | None = None
    offered: set[tuple[_Key, LayerIndex]] = attrs.field(factory=set)
    # True while a checkpointed layer is being recomputed for the backward pass (low memory):
    # hooks then apply interventions exactly as before but capture nothing a second time —
    # except the forward values awaiting the recomputation (see ``_awaits_recomputation``).
    recomputing: bool = False
    recompute_captures: bool = False
    checkpointed_calls: int = 0  # > 0 inside a layer the backward pass recomputes
    awaiting: set[tuple[_Key, LayerIndex]] = attrs.field(factory=set)

    def checkpoint(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one layer ``fn(*args, **kwargs)`` without keeping its intermediate tensors for
        the backward pass, which recomputes them (``memory="low"``).

        Non-reentrant checkpointing keeps the autograd graph of the first run (so gradient
        hooks registered there fire) and only recomputes the tensors it saved; the second call
        of ``fn`` is that recomputation, during which hooks capture only the forward values
        left for it (``_awaits_recomputation``).
        """
        from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

        calls = 0

        def run(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            self.recomputing = calls > 1
            self.checkpointed_calls += 1
            try:
                return fn(*a, **kw)
            finally:
                self.recomputing = False
                self.checkpointed_calls -= 1

        if not self.recompute_captures:
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        # Without early stop the recomputation runs the whole layer, so every hook in it fires
        # (the setting is read when the checkpoint is entered; a context, unlike checkpoint's
        # early_stop= argument, exists on every torch this package supports).
        with set_checkpoint_early_stop(False):
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

    def touches(self, location: ALT, layer: LayerIndex) -> bool:
        """Whether this run captures or intervenes at ``location`` and ``layer`` (an adapter may
        skip the work of exposing a location nobody reads, e.g. materialising attention)."""
        if any(layer in self.plan.get((location, p), ()) for p in PassType):
            return True
        if location is ALT.RESID_FINAL_LAYER_NORM_SCALE and self.detach_final_ln_scale:
            return True
        return any(
            iv.location is location and (iv.layers is None or layer in iv.layers)
            for iv in self.interventions
        ) or (self.objective_site is not None and self.objective_site == (location, layer))

    def hook(self, name: str, layer: int | None, tensor: torch.Tensor) -> torch.Tensor:
        """The model's hook: interventions first, then observation of what flows on."""
        alt = _ALT_BY_HOOK_NAME[name]
        for iv in self.interventions:
            if iv.location is alt and (iv.layers is None or layer in iv.layers):
                if iv.emits:
                    tensor = iv.fn(tensor, layer, functools.partial(self._emit, layer=layer))
                else:
                    tensor = iv.fn(tensor, layer)
        if self.detach_final_ln_scale and alt is ALT.RESID_FINAL_LAYER_NORM_SCALE:
            tensor = tensor.detach()
        return self._observe(alt, layer, tensor)

    def _emit(
        self, location: PluginLocation, tensor: torch.Tensor, *, layer: LayerIndex
    ) -> torch.Tensor:
        """``emit`` handed to interventions that declare ``emits`` (e.g. SAE latents)."""
        return self._observe(location, None if location.has_no_layers else layer, tensor)

    def _observe(
        self, location: CaptureLocation, layer: LayerIndex, tensor: torch.Tensor
    ) -> torch.Tensor:
        """Capture ``tensor`` as requested and return the tensor that must flow downstream."""
        if self.backward and not tensor.requires_grad:
            # A constant (embedding sum, detached scale, value an intervention wrote): make it
            # a leaf so its own gradient is still observed, while nothing flows upstream.
            tensor = tensor.detach().requires_grad_(True)
        fwd_key = (location, PassType.FORWARD)
        if self.recomputing:  # captured (and hooked for gradients) on the first run
            if (fwd_key, layer) in self.awaiting:
                self.awaiting.remove((fwd_key, layer))
                self._keep(fwd_key, layer, _split_prompts(location, tensor, self.lengths))
            return tensor
        if self.objective_site == (location, layer):
            self.objective_tensor = tensor
        if layer in self.plan.get(fwd_key, ()):
            if self._awaits_recomputation(fwd_key, layer):
                self.awaiting.add((fwd_key, layer))
            else:
                self._keep(fwd_key, layer, _split_prompts(location, tensor, self.lengths))
        bwd_key = (location, PassType.BACKWARD)
        if layer in self.plan.get(bwd_key, ()):
            self.seen_shapes[(location, layer)] = [
                tuple(tensor[b][_token_index(location, n)].shape)
                for b, n in enumerate(self.lengths)
            ]

            def save_grad(grad: torch.Tensor, _layer: LayerIndex = layer) -> None:
                self._keep(bwd_key, _layer, _split_prompts(location, grad, self.lengths))

            tensor.register_hook(save_grad)  # type: ignore[no-untyped-call]
        return tensor

    def _awaits_recomputation(self, key: _Key, layer: LayerIndex) -> bool:
        """Whether a forward value the sink takes is captured when its layer is recomputed in
        the backward pass (low memory) rather than now, so that no layer's activations are held
        from the forward pass until its gradient arrives.

        Only inside a checkpointed layer the backward pass is sure to recompute: every layer
        for an objective on the logits, the layers before a node or direction objective's; and
        never with interventions (one could cut a layer off from the objective).
        """
        # Inside a checkpointed layer's first run (``_observe`` never asks while recomputing).
        if not (self.recompute_captures and self.checkpointed_calls > 0):
            return False
        if self.sink is None or key not in self.sink.keys or self.interventions:
            return False
        site = self.objective_site
        if site is None:
            return True
        return isinstance(layer, int) and isinstance(site[1], int) and layer < site[1]

    def _keep(self, key: _Key, layer: LayerIndex, values: list[torch.Tensor]) -> None:
        """Store a capture for the run's result, or hand it to the sink that takes it."""
        if self.sink is not None and key in self.sink.keys:
            self.offered.add((key, layer))
            dtype = self.sink_dtype
            cast = [v if v.dtype == dtype else v.to(dtype) for v in values]
            self.sink.offer(key, layer, cast, hold=self.checkpointed_calls > 0)
            return
        values_of = self.forward_values if key[1] is PassType.FORWARD else self.grads
        values_of.setdefault(key, {})[layer] = values

    def offer_the_rest(self, dtype: torch.dtype, device: torch.device) -> None:
        """After the run: offer the sink what the model never produced, as ``captured`` fills
        it (zero gradients the backward did not reach, unit scales of absent post-norms)."""
        if self.sink is None:
            return
        for key, layers in self.plan.items():
            if key not in self.sink.keys:
                continue
            for layer in sorted(layers, key=lambda x: -1 if x is None else x):
                if (key, layer) not in self.offered:
                    prompts = range(len(self.lengths))
                    self._keep(
                        key, layer, [self._fill(key, layer, b, dtype, device) for b in prompts]
                    )

    def captured(
        self, b: int, dtype: torch.dtype, device: torch.device
    ) -> dict[_Key, dict[LayerIndex, torch.Tensor]]:
        """Prompt ``b``'s captures; a gradient the backward never reached is exact zeros."""
        out: dict[_Key, dict[LayerIndex, torch.Tensor]] = {}
        for key, layers in self.plan.items():
            pass_type = key[1]
            source = (self.forward_values if pass_type is PassType.FORWARD else self.grads).get(
                key, {}
            )
            if self.sink is not None and key in self.sink.keys:
                continue  # handed over while the model ran
            per_layer: dict[LayerIndex, torch.Tensor] = {}
            for layer in sorted(layers, key=lambda x: -1 if x is None else x):
                if layer in source:
                    per_layer[layer] = source[layer][b]
                else:
                    per_layer[layer] = self._fill(key, layer, b, dtype, device)
            out[key] = per_layer
        return out

    def _fill(
        self, key: _Key, layer: LayerIndex, b: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Prompt ``b``'s value of a capture the model never produced."""
        location, pass_type = key
        if (location, layer) not in self.seen_shapes and location in POST_NORM_SCALES:
            # The model has no such norm: the identity, scale 1 (gradient 0).
            fill = torch.ones if pass_type is PassType.FORWARD else torch.zeros
            return fill((self.lengths[b], 1), dtype=dtype, device=device)
        # The objective does not depend on this value: its gradient is zero.
        shape = self.seen_shapes[(location, layer)][b]
        return torch.zeros(shape, dtype=dtype, device=device)


class HookedAdapter:
    """The model-independent part of a ``ModelAdapter`` (see the module docstring).

    Subclasses implement ``dtype``, ``device``, ``config_dict``, ``_forward_model`` and
    ``_read_weight``, and may narrow ``capturable_locations``.  The model must be in eval mode
    with frozen parameters: the adapter only ever needs gradients with respect to activations.
    """

    def __init__(
        self,
        *,
        name: str,
        dims: ModelDims,
        tokenizer: Any = None,
        source: str | None = None,
    ) -> None:
        self._name = name
        self._dims = dims
        self._source = source
        self.tokenizer = tokenizer

    # --- what a subclass provides -----------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _forward_model(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        hook: HookFn,
        *,
        unembed: bool,
        wanted: Callable[[ALT, LayerIndex], bool],
        rows: torch.Tensor | None = None,
        checkpoint: Callable[..., Any] | None = None,
    ) -> torch.Tensor | None:
        """``B×T×V`` logits (``None`` when ``unembed`` is false), calling ``hook`` at each
        location; ``attention_mask`` is ``B×T``, true for real (right-padded) tokens.
        ``wanted(location, layer)`` says whether anything reads a location at that layer.
        ``rows`` (``B``): unembed only position ``rows[b]`` of prompt ``b`` and return
        ``B×1×V`` — all a logit-difference or log-prob objective reads (the ``logits`` hook is
        then not called: nothing captures it).  ``checkpoint`` (low memory; only passed when
        ``recomputes_layers`` is true): call each layer as ``checkpoint(layer_fn, *args,
        **kwargs)``; hooks inside the layer then run twice (the engine decides what each run
        captures)."""
        raise NotImplementedError

    def _read_weight(self, location: WeightLocationType, layer: LayerIndex) -> torch.Tensor:
        """The weight in its canonical layout; ``ModelInputError`` if the model has none."""
        raise NotImplementedError

    def _session(
        self,
        hook: HookFn,
        wanted: Callable[[ALT, LayerIndex], bool],
        checkpoint: Callable[..., Any] | None,
    ) -> contextlib.AbstractContextManager[None]:
        """A context held around the forward pass *and* the backward pass of one run.

        Adapters that hook a model by installing module hooks (rather than passing ``hook``
        down the call) install them here: with ``memory="low"`` the backward pass recomputes
        layers, and the hooks must still be there when it does.
        """
        return contextlib.nullcontext()

    recomputes_layers = False
    """Whether ``_forward_model`` honours ``checkpoint`` (``memory="low"``)."""

    accepts_capture_sink = True
    """``run`` takes ``sink=`` (``CaptureSink``): every hooked adapter does."""

    # --- protocol properties ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def dims(self) -> ModelDims:
        return self._dims

    @property
    def capturable_locations(self) -> frozenset[ALT]:
        gated = frozenset() if self._dims.gated_mlp else frozenset({ALT.MLP_UP})
        return frozenset(ALT) - gated

    # --- weights --------------------------------------------------------------------------

    def _check_layer(self, what: str, has_no_layers: bool, layer: LayerIndex) -> None:
        n = self._dims.n_layers
        if has_no_layers:
            if layer is not None:
                raise ModelInputError(f"{what} has no layer index; pass layer=None (got {layer})")
            return
        if layer is None or not isinstance(layer, int) or not 0 <= layer < n:
            raise ModelInputError(
                f"{what}: layer {layer!r} is out of range; this model has {n} layers "
                f"(valid layers: 0..{n - 1})"
            )

    def weight(self, location: WeightLocationType, layer: LayerIndex = None) -> torch.Tensor:
        """The weight in its canonical layout (``WeightLocationType.shape``), detached.

        Not cloned: callers must not modify it in place (kernels get it through ``ctx.weight``,
        which refuses in-place writes).
        """
        self._check_layer(f"weight {location.value!r}", location.has_no_layers, layer)
        weight = self._read_weight(location, layer).detach()
        acc = self.accumulation_dtype
        return weight if weight.dtype == acc else weight.to(acc)

    @property
    def accumulation_dtype(self) -> torch.dtype:
        """The dtype derived scalars are computed in: float32 for a bfloat16/float16 model
        (captures and weights are upcast, so sums over thousands of terms keep their bits)."""
        return torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype

    # --- validation -------------------------------------------------------------------------

    def _validate_tokens(self, tokens: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2:
                shape = tuple(tokens.shape)
                raise ModelInputError(
                    f"a token tensor must be 2-D (prompts × tokens), got shape {shape}"
                )
            tokens = tokens.tolist()
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise ModelInputError(
                "tokens must be a sequence of prompts, each a sequence of token ids; tokenize "
                "text first (e.g. adapter.tokenizer.encode(text))"
            )
        if len(tokens) == 0:
            raise ModelInputError("no prompts given; pass at least one prompt of token ids")
        if any(isinstance(p, int) for p in tokens):
            raise ModelInputError(
                "tokens must be a list of prompts (a list of lists of ids); wrap a single "
                "prompt as [ids]"
            )
        n_vocab, n_ctx = self._dims.n_vocab, self._dims.n_ctx
        prompts: list[list[int]] = []
        for i, prompt in enumerate(tokens):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ModelInputError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(ids) > n_ctx:
                raise ModelInputError(
                    f"prompt {i} has {len(ids)} tokens but the model's context length (n_ctx) is "
                    f"{n_ctx}; shorten it or split it into prompts of at most {n_ctx} tokens"
                )
            bad = [(pos, t) for pos, t in enumerate(ids) if not 0 <= t < n_vocab]
            if bad:
                shown = ", ".join(f"id {t} at position {pos}" for pos, t in bad[:10])
                more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
                raise ModelInputError(
                    f"prompt {i} has token id(s) outside the vocabulary: {shown}{more}; valid ids "
                    f"are 0..{n_vocab - 1} (vocab size {n_vocab}). Was it tokenized for a "
                    "different model?"
                )
            prompts.append(ids)
        return prompts

    def _plan(
        self, captures: Sequence[CaptureRequest], interventions: Sequence[Intervention]
    ) -> dict[_Key, frozenset[LayerIndex]]:
        """Merge requests into ``{(location, pass): layers}``, validating every layer.

        A ``PluginLocation`` is capturable only where an intervention emits it; ``layers=None``
        then means every layer that intervention runs at.
        """
        all_layers: frozenset[LayerIndex] = frozenset(range(self._dims.n_layers))
        plan: dict[_Key, frozenset[LayerIndex]] = {}
        for req in captures:
            loc = req.location
            available = all_layers
            if isinstance(loc, PluginLocation):
                emitters = [iv for iv in interventions if loc in iv.emits]
                if not emitters:
                    raise ModelInputError(
                        f"plugin location {loc.name!r} (from {loc.provider!r}) is captured only "
                        "while an intervention that emits it is spliced in; none of the given "
                        "interventions declares it in `emits`"
                    )
                available = frozenset().union(
                    *(all_layers if iv.layers is None else iv.layers for iv in emitters)
                )
            elif loc not in self.capturable_locations:
                raise ModelInputError(f"location {loc!r} cannot be captured by {self._name}")
            layers: frozenset[LayerIndex]
            if loc.has_no_layers:
                if req.layers is not None:
                    raise ModelInputError(
                        f"capture of {loc.value!r} has no layers; use layers=None "
                        f"(got {sorted(req.layers)})"
                    )
                layers = frozenset({None})
            elif req.layers is None:
                layers = available
            else:
                for layer in req.layers:
                    self._check_layer(f"capture of {loc.value!r}", False, layer)
                    if layer not in available:
                        emitted = sorted(x for x in available if x is not None)
                        raise ModelInputError(
                            f"capture of {loc.value!r} at layer {layer}: no intervention emits "
                            f"it there (emitted at layers {emitted})"
                        )
                layers = frozenset(req.layers)
            key = (loc, req.pass_type)
            plan[key] = plan.get(key, frozenset()) | layers
        return plan

    def _check_memory(self, memory: str) -> None:
        if memory not in ("default", "low"):
            raise ModelInputError(f"memory must be 'default' or 'low', got {memory!r}")
        if memory == "low" and not self.recomputes_layers:
            raise ModelInputError(
                f"{self._name} ({type(self).__name__}) cannot recompute layer by layer, so "
                "memory='low' is not available for it; use memory='default'"
            )

    def _check_interventions(self, interventions: Sequence[Intervention]) -> None:
        for iv in interventions:
            if iv.location.has_no_layers:
                if iv.layers is not None:
                    raise ModelInputError(
                        f"intervention {iv.name!r} at {iv.location.value!r}: that location has no "
                        "layers; use layers=None"
                    )
            elif iv.layers is not None:
                for layer in iv.layers:
                    self._check_layer(
                        f"intervention {iv.name!r} at {iv.location.value!r}", False, layer
                    )

    def _check_vocab_id(self, tok: int, what: str) -> None:
        if not 0 <= tok < self._dims.n_vocab:
            raise ModelInputError(
                f"{what} {tok} is outside the vocabulary (valid ids 0..{self._dims.n_vocab - 1})"
            )

    def _objective_site(self, objective: Objective | None) -> tuple[ALT, LayerIndex] | None:
        """Validate the prompt-independent parts of an objective; return the hook it reads."""
        if isinstance(objective, LogitDiffObjective):
            self._check_vocab_id(objective.target, "LogitDiffObjective target")
            self._check_vocab_id(objective.distractor, "LogitDiffObjective distractor")
        elif isinstance(objective, LogProbObjective):
            self._check_vocab_id(objective.target, "LogProbObjective target")
        elif isinstance(objective, (NodeObjective, DirectionObjective)):
            alt, layer = objective.location, objective.layer
            kind = type(objective).__name__
            self._check_layer(f"{kind} at {alt.value!r}", alt.has_no_layers, layer)
            if isinstance(objective, NodeObjective):
                if len(objective.index) != len(alt.shape):
                    raise ModelInputError(
                        f"NodeObjective index {objective.index} has {len(objective.index)} "
                        f"entries but {alt.value!r} is per-prompt "
                        f"({', '.join(d.value for d in alt.shape)})"
                    )
            else:
                if alt.shape != (Dimension.TOKENS, Dimension.RESIDUAL_STREAM_CHANNELS):
                    raise ModelInputError(
                        f"DirectionObjective needs a residual-stream location (tokens × "
                        f"residual channels); {alt.value!r} is not one"
                    )
                if tuple(objective.direction.shape) != (self._dims.d_model,):
                    raise ModelInputError(
                        f"DirectionObjective direction has shape {tuple(objective.direction.shape)}"
                        f", expected ({self._dims.d_model},)"
                    )
            return (alt, layer)
        elif objective is not None and not isinstance(objective, CallableObjective):
            raise ModelInputError(f"unsupported objective type {type(objective).__name__}")
        return None

    def _node_index(self, objective: NodeObjective, length: int) -> tuple[int, ...]:
        alt, sizes = objective.location, self._dims.sizes()
        index: list[int] = []
        for dim, i in zip(alt.shape, objective.index, strict=True):
            if dim.is_token_axis:
                index.append(resolve_position(i, length, f"NodeObjective {dim.value} index"))
            else:
                n = sizes[dim]
                if not -n <= i < n:
                    raise ModelInputError(
                        f"NodeObjective {dim.value} index {i} is out of range (size {n})"
                    )
                index.append(i % n)
        if alt in _ATTN_PAIR_LOCATIONS and index[1] > index[0]:
            raise ModelInputError(
                f"NodeObjective at {alt.value!r}: attended-to token {index[1]} is after query "
                f"token {index[0]}; causal attention only has entries with s <= t"
            )
        return tuple(index)

    def _prompt_objective(
        self,
        objective: Objective,
        b: int,
        length: int,
        logits: torch.Tensor,
        site: torch.Tensor | None,
    ) -> torch.Tensor:
        """The scalar objective of prompt ``b`` (``logits`` is its unpadded ``T×V``)."""
        if isinstance(objective, LOGIT_OBJECTIVES):
            return logits_objective(objective, logits)
        assert site is not None, "objective site was not reached in the forward pass"
        if isinstance(objective, NodeObjective):
            return site[b][self._node_index(objective, length)]
        assert isinstance(objective, DirectionObjective)
        t = resolve_position(objective.position, length, "DirectionObjective position")
        direction = objective.direction.to(device=site.device, dtype=site.dtype)
        return site[b, t] @ direction

    # --- running ------------------------------------------------------------------------------

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
        sink: CaptureSink | None = None,
    ) -> list[RunResult]:
        """One padded forward pass (and one backward when a BACKWARD capture is requested).

        The backward runs only when some capture asks for ``PassType.BACKWARD``; an objective
        without backward captures is just evaluated (``RunResult.objective_value``).  Per-prompt
        objectives are summed before the single backward, which is exact because prompts never
        interact.  ``sink`` takes the captures it names as they are made (``CaptureSink``).
        """
        prompts = self._validate_tokens(tokens)
        self._check_memory(memory)
        self._check_interventions(interventions)
        plan = self._plan(captures, interventions)
        backward = any(p is PassType.BACKWARD for _, p in plan)
        lengths = [len(p) for p in prompts]
        site_key = self._check_objective(objective, plan, lengths, backward)
        state = _RunState(
            plan=plan,
            interventions=interventions,
            backward=backward,
            detach_final_ln_scale=detach_final_ln_scale,
            objective_site=site_key,
            lengths=lengths,
            sink=sink,
            sink_dtype=self.accumulation_dtype,
            recompute_captures=_recompute_captures(memory, backward, sink, objective),
        )
        wants_logits = return_logits or any(k[0] is ALT.LOGITS for k in plan)
        unembed = wants_logits or objective is not None
        rows = None if wants_logits else self._objective_rows(objective, lengths)
        low = memory == "low" and backward
        logits, values = self._forward_backward(prompts, state, objective, unembed, rows, low)
        _check_all_produced(state)
        state.offer_the_rest(self.dtype, self.device)
        return [
            RunResult(
                tokens=tuple(ids),
                logits=None
                if logits is None or not return_logits
                else _prompt_logits(logits, b, len(ids), len(prompts)).to(self.accumulation_dtype),
                captured=_upcast(
                    state.captured(b, self.dtype, self.device), self.accumulation_dtype
                ),
                objective_value=float(values[b].detach()) if values else None,
            )
            for b, ids in enumerate(prompts)
        ]

    def _objective_rows(
        self, objective: Objective | None, lengths: Sequence[int]
    ) -> torch.Tensor | None:
        """The one position per prompt a logit objective reads: unembed only that row
        (``T×V → 1×V``); ``None`` when the objective needs more."""
        if not isinstance(objective, (LogitDiffObjective, LogProbObjective)):
            return None
        positions = [resolve_position(objective.position, n) for n in lengths]
        return torch.tensor(positions, dtype=torch.long, device=self.device)

    def _check_objective(
        self,
        objective: Objective | None,
        plan: dict[_Key, frozenset[LayerIndex]],
        lengths: Sequence[int],
        backward: bool,
    ) -> tuple[ALT, LayerIndex] | None:
        """Validate the objective against every prompt before spending a forward pass."""
        if backward and objective is None:
            wanted = sorted(a.value for a, p in plan if p is PassType.BACKWARD)
            raise ModelInputError(
                f"backward captures {wanted} need an objective to differentiate; pass e.g. "
                "LogitDiffObjective(target, distractor) or NodeObjective(...)"
            )
        site_key = self._objective_site(objective)
        for length in lengths:
            if isinstance(objective, LogitDiffObjective | LogProbObjective | DirectionObjective):
                resolve_position(objective.position, length, "objective position")
            elif isinstance(objective, NodeObjective):
                self._node_index(objective, length)
        return site_key

    def _forward_backward(
        self,
        prompts: list[list[int]],
        state: _RunState,
        objective: Objective | None,
        unembed: bool,
        rows: torch.Tensor | None = None,
        low_memory: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Right-padded forward (hooks capture), per-prompt objectives, one summed backward."""
        t_max = max(state.lengths)
        batch = torch.zeros(len(prompts), t_max, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(prompts), t_max, dtype=torch.bool, device=self.device)
        for b, ids in enumerate(prompts):
            batch[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = True
        values: list[torch.Tensor] = []
        checkpoint = state.checkpoint if low_memory else None
        session = self._session(state.hook, state.touches, checkpoint)
        with torch.set_grad_enabled(state.backward), session:
            extra = {"checkpoint": checkpoint} if low_memory else {}
            logits = self._forward_model(
                batch, mask, state.hook, unembed=unembed, wanted=state.touches, rows=rows, **extra
            )
            if objective is not None:
                assert logits is not None
                read = objective
                if rows is not None:  # one unembedded row per prompt, now at position 0
                    assert isinstance(objective, (LogitDiffObjective, LogProbObjective))
                    read = attrs.evolve(objective, position=0)
                for b, length in enumerate(state.lengths):
                    n = length if rows is None else 1
                    values.append(
                        self._prompt_objective(
                            read,
                            b,
                            n,
                            logits[b, :n].to(self.accumulation_dtype),
                            state.objective_tensor,
                        )
                    )
            state.objective_tensor = None
            if state.backward:
                total = torch.stack(values).sum()
                if total.requires_grad:
                    torch.autograd.backward(total)
        return (None if logits is None else logits.detach()), values


def _recompute_captures(
    memory: str, backward: bool, sink: CaptureSink | None, objective: Objective | None
) -> bool:
    """Whether a low-memory run may leave the sink's forward values for the recomputation."""
    return (
        memory == "low"
        and backward
        and sink is not None
        and isinstance(objective, _DIFFERENTIABLE_OBJECTIVES)
    )


def _prompt_logits(logits: torch.Tensor, b: int, length: int, n_prompts: int) -> torch.Tensor:
    """Prompt ``b``'s unpadded ``T×V`` logits (not copied for a single unpadded prompt)."""
    if n_prompts == 1:
        return _split_prompts(ALT.LOGITS, logits[b : b + 1], [length])[0]
    return logits[b, :length].clone()


def _upcast(
    captured: dict[_Key, dict[LayerIndex, torch.Tensor]], dtype: torch.dtype
) -> dict[_Key, dict[LayerIndex, torch.Tensor]]:
    """Captures in the accumulation dtype (a no-op for float32/float64 models)."""
    return {
        key: {layer: t if t.dtype == dtype else t.to(dtype) for layer, t in per_layer.items()}
        for key, per_layer in captured.items()
    }


def _check_all_produced(state: _RunState) -> None:
    """Every requested forward capture was produced (a plugin location needs its ``emit``)."""
    if state.awaiting:  # _awaits_recomputation promised a recomputation that never came
        never = sorted((key[0].value, layer) for key, layer in state.awaiting)
        raise RuntimeError(
            f"{never} were left for the backward pass's recomputation, which never ran them; "
            "please report this with the objective used (memory='default' avoids it)"
        )
    missing = [
        (key[0].value, layer)
        for key, layers in state.plan.items()
        for layer in layers
        if layer
        not in (state.forward_values if key[1] is PassType.FORWARD else state.grads).get(key, {})
        and (key, layer) not in state.offered
        and (key[1] is PassType.FORWARD or (key[0], layer) not in state.seen_shapes)
        and key[0] not in POST_NORM_SCALES
    ]
    if missing:
        raise ModelInputError(
            f"requested capture(s) {missing} were never produced by the forward pass; a "
            "plugin location exists only where its intervention calls `emit` for it"
        )
