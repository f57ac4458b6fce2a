"""``ScalarDeriver``: how one DST is computed, layer by layer, from its sources.

A deriver is a frozen value: its DST, the config it was built with, its ordered sources and a
per-layer kernel ``fn(inputs, layer, ctx) -> tensor``.  Weights are *not* closed over at build
time; the kernel asks ``ctx.weight(...)`` at derive time, so derivers stay light, device-free
and rebuildable elsewhere from ``to_serializable_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._config import DstConfig
from ._dst import DerivedScalarType
from ._layers import IDENTITY, LayerIndex, LayerIndexer
from ._sources import (
    DstReference,
    PromptCombo,
    RawScalarSource,
    ScalarSource,
    _check_engine_run,
    pass_name,
    prompt_name,
)
from ._vocab import ActivationLocationType, Dimension, PassType, WeightLocationType
from .exceptions import ConfigError, UnsupportedPassError

if TYPE_CHECKING:
    import torch

    from ._locations import PluginLocation
    from ._model import ModelAdapter, ModelDims, ObjectiveInfo


@attrs.frozen
class DeriveContext:
    """What a kernel may consult besides its input tensors.

    * ``weight(location, layer)`` — a model weight in its canonical layout (read-only: the
      engine refuses in-place writes to it);
    * ``dims`` — the model's sizes plus ``norm_kind`` and ``norm_eps``;
    * ``objective`` — the objective resolved for this prompt (kind, token ids, position), for
      DSTs declared with ``needs_objective=True``;
    * ``final_norm(x)`` / ``unembed(x)`` — the model's final norm and unembedding, so a logit
      lens is ``ctx.unembed(ctx.final_norm(resid))``;
    * ``pass_type``, ``config``, ``dst`` — what is being derived.
    """

    pass_type: PassType
    config: DstConfig
    dst: DerivedScalarType
    model: ModelAdapter | None = None
    objective_info: ObjectiveInfo | None = None

    def weight(self, location: WeightLocationType, layer: LayerIndex = None) -> torch.Tensor:
        """A model weight, read now through the adapter (never cached in the deriver)."""
        from ._guard import guarded_weight

        return guarded_weight(
            self._model("reads the weight " + repr(location.value)).weight(location, layer)
        )

    def _model(self, why: str) -> ModelAdapter:
        if self.model is None:
            raise ConfigError(
                f"{self.dst.name} {why} but no model was given; pass `model=` to the executor "
                "(scalarlens.derive does this for you)"
            )
        return self.model

    @property
    def dims(self) -> ModelDims:
        return self._model("needs the model's dimensions").dims

    @property
    def objective(self) -> ObjectiveInfo:
        """The objective of this prompt; declare ``needs_objective=True`` to be given one."""
        if self.objective_info is None:
            raise ConfigError(
                f"{self.dst.name} reads ctx.objective but no objective was given: pass "
                "target= and distractor= (CLI: --target/--distractor) or objective=, and declare "
                "the DST with needs_objective=True so this is checked before the model runs"
            )
        return self.objective_info

    def final_norm(self, x: torch.Tensor, *, detach_scale: bool = False) -> torch.Tensor:
        """The model's final norm applied to residual vectors ``x`` (``…×D``).

        The adapter's own norm when it offers one (``FinalResidualReadout``); otherwise
        ``dims.norm_kind`` with the final gain/bias weights and ``dims.norm_eps``.
        """
        from ._model import FinalResidualReadout
        from ._vocab import WeightLocationType as W

        model = self._model("applies the final norm")
        if isinstance(model, FinalResidualReadout):
            return model.final_norm(x, detach_scale=detach_scale)
        return self._norm(
            x, W.LAYER_NORM_GAIN_FINAL, W.LAYER_NORM_BIAS_FINAL, None, detach_scale=detach_scale
        )

    def layer_norm(self, which: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s input norm of the ``"attn"`` or ``"mlp"`` sublayer applied to ``x``.

        Follows ``dims.norm_kind`` (LayerNorm centres and adds a bias, RMSNorm does neither)
        with the model's effective gain, so a kernel that feeds vectors straight into a
        sublayer (e.g. vocabulary rows into an MLP) is right on every architecture.
        """
        from ._vocab import WeightLocationType as W
        from .exceptions import ConfigError

        norms = {
            "attn": (W.LAYER_NORM_GAIN_PRE_ATTN, W.LAYER_NORM_BIAS_PRE_ATTN),
            "mlp": (W.LAYER_NORM_GAIN_PRE_MLP, W.LAYER_NORM_BIAS_PRE_MLP),
        }
        if which not in norms:
            raise ConfigError(f"ctx.layer_norm: which must be 'attn' or 'mlp', got {which!r}")
        gain, bias = norms[which]
        return self._norm(x, gain, bias, layer)

    def _norm(
        self,
        x: torch.Tensor,
        gain: WeightLocationType,
        bias: WeightLocationType,
        layer: int | None,
        *,
        detach_scale: bool = False,
    ) -> torch.Tensor:
        dims = self._model("applies a norm").dims
        if dims.norm_kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
        scale = (x.pow(2).mean(dim=-1, keepdim=True) + dims.norm_eps).sqrt()
        if detach_scale:
            scale = scale.detach()
        out = x / scale * self.weight(gain, layer)
        if dims.norm_kind == "layernorm":
            out = out + self.weight(bias, layer)
        return out

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``…×V`` of already-normed residual vectors ``x`` (``…×D``)."""
        from ._vocab import WeightLocationType as W

        return x @ self.weight(W.UNEMBEDDING)


Inputs = tuple["torch.Tensor | None", ...]
Kernel = Callable[[Inputs, LayerIndex, DeriveContext], "torch.Tensor"]


def _to_sources(value: Iterable[ScalarSource]) -> tuple[ScalarSource, ...]:
    return tuple(value)


def _to_passes(value: Iterable[PassType]) -> frozenset[PassType]:
    return frozenset(value)


def _freeze_sizes(
    value: Mapping[Dimension, int] | Iterable[tuple[Dimension, int]] | None,
) -> tuple[tuple[Dimension, int], ...]:
    # Accepts its own frozen form too, so attrs.evolve (used when resolving references)
    # round-trips.
    pairs = value.items() if isinstance(value, Mapping) else (value or ())
    return tuple(sorted(pairs))


@attrs.frozen
class DerivedScalarSource:
    """The output of another deriver."""

    scalar_deriver: ScalarDeriver
    pass_type: PassType | None = PassType.FORWARD
    layer_indexer: LayerIndexer = IDENTITY
    prompt: PromptCombo | None = attrs.field(default=None, validator=_check_engine_run)

    def describe(self) -> str:
        return (
            f"{self.scalar_deriver.dst.name}/{pass_name(self.pass_type)}"
            f"{prompt_name(self.prompt)} [{self.layer_indexer.describe()}]"
        )


@attrs.frozen
class ScalarDeriver:
    """Computes ``dst`` from ``sub_scalar_sources`` with a per-layer kernel.

    ``derivable_pass_types`` declares what the kernel can produce: ``FORWARD`` (the value) and,
    for derivers whose kernel passes gradients through, ``BACKWARD`` (the gradient of the
    objective with respect to the value).  Asking for anything else fails at planning time.
    """

    dst: DerivedScalarType
    config: DstConfig
    sub_scalar_sources: tuple[ScalarSource, ...] = attrs.field(converter=_to_sources)
    tensor_calculate_derived_scalar_fn: Kernel = attrs.field(eq=False)
    derivable_pass_types: frozenset[PassType] = attrs.field(
        default=frozenset({PassType.FORWARD}), converter=_to_passes
    )
    dimension_sizes: tuple[tuple[Dimension, int], ...] = attrs.field(
        default=None, converter=_freeze_sizes
    )
    # Set by the registry to the providing plugin's name, so kernel errors can name it.
    plugin: str | None = attrs.field(default=None, eq=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        extra = self.derivable_pass_types - self.dst.pass_types
        if extra:
            raise UnsupportedPassError(
                f"deriver for {self.dst.name} claims pass(es) {sorted(p.value for p in extra)} "
                f"that the DST does not declare ({sorted(p.value for p in self.dst.pass_types)})"
            )

    # --- introspection --------------------------------------------------------------------

    @property
    def parameter_sizes(self) -> dict[Dimension, int]:
        """Sizes of option-decided axes: declared here, else inherited from the derivers this
        one reads (a DST over another plugin's SAE latents has that SAE's latent count)."""
        sizes: dict[Dimension, int] = {}
        for source in self.sub_scalar_sources:
            if isinstance(source, DerivedScalarSource):
                sizes.update(source.scalar_deriver.parameter_sizes)
        sizes.update(self.dimension_sizes)
        return sizes

    def check_pass(self, pass_type: PassType, needed_by: str = "") -> None:
        if pass_type not in self.derivable_pass_types:
            who = f" (needed by {needed_by})" if needed_by else ""
            raise UnsupportedPassError(
                f"{self.dst.name} cannot be derived for the {pass_type.value} pass{who}; it "
                f"supports {sorted(p.value for p in self.derivable_pass_types)}"
            )

    def raw_requirements(
        self, pass_type: PassType = PassType.FORWARD
    ) -> frozenset[tuple[ActivationLocationType | PluginLocation, PassType]]:
        """Every raw (location, pass) this deriver's tree reads when asked for ``pass_type``."""
        self.check_pass(pass_type)
        found: set[tuple[ActivationLocationType | PluginLocation, PassType]] = set()
        for source in self.sub_scalar_sources:
            resolved = pass_type if source.pass_type is None else source.pass_type
            if isinstance(source, RawScalarSource):
                found.add((source.location, resolved))
            elif isinstance(source, DerivedScalarSource):
                found |= source.scalar_deriver.raw_requirements(resolved)
            elif isinstance(source, DstReference):
                raise ConfigError(
                    f"{self.dst.name} still holds an unresolved reference to "
                    f"{source.dst_name!r}; build derivers through a Registry"
                )
        return frozenset(found)

    def needs_backward(self, pass_type: PassType = PassType.FORWARD) -> bool:
        return any(p is PassType.BACKWARD for _, p in self.raw_requirements(pass_type))

    def needs_objective(self, pass_type: PassType = PassType.FORWARD) -> bool:
        """A backward pass, a patched run, or a kernel in the tree that reads ``ctx.objective``."""
        return (
            self.needs_backward(pass_type)
            or PromptCombo.PATCHED in self.prompts_read()
            or self._reads_objective()
        )

    def prompts_read(self) -> frozenset[PromptCombo]:
        """The explicit ``prompt`` of every source in the tree (empty: one prompt suffices)."""
        found: set[PromptCombo] = set()
        for source in self.sub_scalar_sources:
            prompt = getattr(source, "prompt", None)
            if prompt is not None:
                found.add(prompt)
            if isinstance(source, DerivedScalarSource):
                found |= source.scalar_deriver.prompts_read()
        return frozenset(found)

    def reads_baseline(self) -> bool:
        """Whether deriving this needs a baseline prompt besides the main one."""
        return bool(self.prompts_read() - {PromptCombo.MAIN})

    def _reads_objective(self) -> bool:
        return self.dst.needs_objective or any(
            source.scalar_deriver._reads_objective()
            for source in self.sub_scalar_sources
            if isinstance(source, DerivedScalarSource)
        )

    def to_serializable_dict(self) -> dict[str, Any]:
        """Enough to rebuild this deriver elsewhere: ``registry.from_serializable_dict(d)``."""
        return {"dst": self.dst.name, "config": self.config.to_dict()}

    # --- transforms (names kept from the reference) ---------------------------------------

    def apply_transform_fn_to_output(
        self,
        transform_fn: Callable[[torch.Tensor], torch.Tensor],
        pass_type_to_transform: PassType,
        output_dst: DerivedScalarType,
    ) -> ScalarDeriver:
        """A new deriver computing ``transform_fn(self's output)`` on every layer."""
        return self.apply_layerwise_transform_fn_to_output(
            lambda tensor, _layer, _ctx: transform_fn(tensor), pass_type_to_transform, output_dst
        )

    def apply_layerwise_transform_fn_to_output(
        self,
        layerwise_transform_fn: Callable[[torch.Tensor, LayerIndex, DeriveContext], torch.Tensor],
        pass_type_to_transform: PassType,
        output_dst: DerivedScalarType,
    ) -> ScalarDeriver:
        """Like ``apply_transform_fn_to_output`` with the layer and context passed along."""

        def kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
            (tensor,) = inputs
            assert tensor is not None
            return layerwise_transform_fn(tensor, layer, ctx)

        return ScalarDeriver(
            dst=output_dst,
            config=self.config,
            sub_scalar_sources=(DerivedScalarSource(self, pass_type_to_transform),),
            tensor_calculate_derived_scalar_fn=kernel,
        )

    def apply_layerwise_transform_fn_to_output_and_other_tensor(
        self,
        layerwise_transform_fn: Callable[
            [torch.Tensor, torch.Tensor | None, LayerIndex, DeriveContext], torch.Tensor
        ],
        pass_type_to_transform: PassType,
        output_dst: DerivedScalarType,
        other_scalar_source: ScalarSource,
    ) -> ScalarDeriver:
        """Combine this deriver's output with one more source (typically a gradient direction).

        The other tensor is ``None`` where its indexer says the layer needs nothing from it.
        """

        def kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
            tensor, other = inputs
            assert tensor is not None
            return layerwise_transform_fn(tensor, other, layer, ctx)

        return ScalarDeriver(
            dst=output_dst,
            config=self.config,
            sub_scalar_sources=(
                DerivedScalarSource(self, pass_type_to_transform, IDENTITY),
                other_scalar_source,
            ),
            tensor_calculate_derived_scalar_fn=kernel,
        )


def identity_kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """Kernel of raw twins: hand the single input through unchanged."""
    (tensor,) = inputs
    assert tensor is not None
    return tensor


def raw_deriver(
    dst: DerivedScalarType, location: ActivationLocationType, config: DstConfig
) -> ScalarDeriver:
    """The deriver of a raw twin: the captured value, or its gradient when asked for BACKWARD."""
    from ._layers import NO_LAYERS

    return ScalarDeriver(
        dst=dst,
        config=config,
        sub_scalar_sources=(
            RawScalarSource(location, None, NO_LAYERS if location.has_no_layers else IDENTITY),
        ),
        tensor_calculate_derived_scalar_fn=identity_kernel,
        derivable_pass_types=frozenset(PassType),
    )
