"""What the builtin families share beyond the public primitives of ``scalarlens``.

The primitives themselves — :class:`scalarlens.Recipe` (DST + formula + sources + kernel, with
``direction=True`` appending g), ``recipe_factories``, ``raw_source``, ``need`` and the common
kernels — come from ``scalarlens``, as they would for a third-party plugin.  What is left here
is specific to this catalogue:

* **token-pair flattening** — one generic transform from a ``T×S×…`` DST to a
  ``TOKEN_PAIRS×…`` view (:func:`pairs_view`);
* **the plugin option namespace** ``options["builtins"]`` and its attrs schema;
* the :data:`FIRST_LAYER_ONLY` indexer and the shorthands the declaration tables use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from scalarlens import (
    NOT_NEEDED,
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Inputs,
    LayerIndex,
    LocationWithinLayer,
    PassType,
    Recipe,
    WeightLocationType,
    need,
)

if TYPE_CHECKING:  # kernels import torch when they run: declarations load without it
    import torch

ALT = ActivationLocationType
Loc = LocationWithinLayer
FORWARD, BACKWARD = PassType.FORWARD, PassType.BACKWARD
NAMESPACE = "builtins"

# Dimension shorthands for the declaration tables.
T, S, P = Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS, Dimension.TOKEN_PAIRS
D, H, F = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.ATTN_HEADS, Dimension.MLP_ACTS
DV, V, ONE = Dimension.VALUE_CHANNELS, Dimension.VOCAB_SIZE, Dimension.SINGLETON


# --- post-norms ----------------------------------------------------------------------------


def post_norm(
    scale: torch.Tensor | None, gain: WeightLocationType, layer: LayerIndex, ctx: DeriveContext
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(γ, σ)`` of a sublayer's post-norm (Gemma's sandwich norms), or ``None`` without one.

    With the scale ``σ`` (``T×1``) frozen, as for the final norm, the post-norm is linear, so a
    component's write to the residual stream is its write into the norm times ``γ/σ[t]`` and
    the write decompositions still close exactly.  Models without post-norms skip the work.
    """
    if not ctx.dims.post_norms:
        return None
    return ctx.weight(gain, layer), need(scale)


def nonzero_rows(g: torch.Tensor) -> torch.Tensor | None:
    """Indices of the token rows where ``g`` (``T×…``) is not all zero, or ``None`` when that
    is most of them.  A logit objective's direction is non-zero only at the positions it reads,
    so a direct-effect kernel that projects those rows alone does ``1/T`` of the work."""
    nonzero = g.reshape(g.shape[0], -1).ne(0).any(dim=1)
    count = int(nonzero.sum())
    return None if count * 2 > g.shape[0] else nonzero.nonzero().squeeze(1)


# --- plugin options ------------------------------------------------------------------------


def _check_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{attribute.name} must be an integer, got {value!r}")


@attrs.frozen
class NeuronOption:
    """An MLP neuron: ``layer`` and ``index`` into its ``F`` axis."""

    layer: int = attrs.field(validator=_check_int)
    index: int = attrs.field(validator=_check_int)


def _to_neuron(value: Any) -> NeuronOption | None:
    if value is None or isinstance(value, NeuronOption):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"neuron must be a mapping {{layer, index}}, got {value!r}")
    return NeuronOption(**value)


@attrs.frozen
class BuiltinsOptions:
    """Schema of ``DstConfig.options["builtins"]``.

    * ``neuron`` — the MLP neuron of ``vocab.write_to_input_direction``.

    The direction g of every ``*_to_final_residual_grad`` DST is core configuration,
    ``DstConfig.direction``, shared with other plugins; the norm epsilon is the model's
    (``ctx.dims.norm_eps``).
    """

    neuron: NeuronOption | None = attrs.field(default=None, converter=_to_neuron)


def builtin_options(config: DstConfig) -> BuiltinsOptions:
    return config.plugin_options(NAMESPACE, BuiltinsOptions)


# --- layer indexers ------------------------------------------------------------------------


@attrs.frozen
class FirstLayerOnly:
    """Layer 0 reads a layer-less source (the embedding); every other layer reads nothing."""

    def source_layer(self, target: LayerIndex, n_layers: int) -> Any:
        return None if target == 0 else NOT_NEEDED

    def describe(self) -> str:
        return "no_layers(first layer only)"


FIRST_LAYER_ONLY = FirstLayerOnly()


# --- token pairs ---------------------------------------------------------------------------


def token_pair_index(n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) of every pair with ``s ≤ t``, row-major: flat index ``t(t+1)/2 + s``."""
    import torch

    t, s = torch.tril_indices(n_tokens, n_tokens, device=device)
    return t, s


def flatten_lower_triangle(tensor: torch.Tensor) -> torch.Tensor:
    """``T×S×…`` → ``TOKEN_PAIRS×…``: keep the causal lower triangle, row-major."""
    t, s = token_pair_index(tensor.shape[0], tensor.device)
    return tensor[t, s]


def unflatten_lower_triangle(tensor: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Inverse of :func:`flatten_lower_triangle`; entries with ``s > t`` are 0."""
    out = tensor.new_zeros((n_tokens, n_tokens, *tensor.shape[1:]))
    t, s = token_pair_index(n_tokens, tensor.device)
    out[t, s] = tensor
    return out


def _flatten_kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    (tensor,) = inputs
    return flatten_lower_triangle(need(tensor))


def pairs_view(base: DerivedScalarType, name: str, description: str) -> Recipe:
    """The token-pair ("flattened") view of a ``T×S×…`` DST, for any pass the base supports.

    One transform for every pair DST: the base is referenced by name in the same pass as
    requested, so the gradient of the view is the flattened gradient of the base.
    """
    if base.shape[:2] != (T, S):
        raise ValueError(f"{base.name} is not a T×S×… DST; cannot take token pairs")
    dst = DerivedScalarType(
        name,
        (P, *base.shape[2:]),
        base.node_type,
        description,
        location=base.location,
        pass_types=base.pass_types,
        has_no_layers=base.has_no_layers,
    )
    return Recipe(
        dst=dst,
        formula=f"flatten_lower_triangle({base.name}): [t(t+1)/2 + s, …] = {base.name}[t, s, …]",
        kernel=_flatten_kernel,
        sources=(DstReference(base.name, None),),
    )
