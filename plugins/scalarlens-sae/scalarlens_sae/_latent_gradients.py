"""Latent-gradient and attention→latent DSTs (reference §2.8), and the encoder's read vectors.

Notation as in :mod:`scalarlens_sae._derivers`: ``x`` the SAE's input at layer ``L``
(``T×d_in``), ``z = enc(x)`` (``T×A``); ``j`` the latent named by
``DstConfig.options["sae_latent"]["index"]``; attention at layer ``L``: ``p`` (``T×S×H``),
``Vv`` (``S×H×dv``), ``o`` (``T×H×dv``), ``W_O`` (``H×dv×D``), ``c[s,h] = Vv[s,h] W_O[h]``.

* ``G_j[t,:] = ∂(Σ_t' z_j[t'])/∂x[t,:]`` by autograd through the encoder (the derivative of a
  jump or top-k selection is zero, as everywhere in this plugin).
* Attention→latent, for an SAE reading ``resid.delta_attn`` (same layer only): how much each
  head and token pair's write moves latent ``j``, to first order: ``p[t,s,h]·(c[s,h]·G_j[t])``.
  On a model with attention post-norms the write is ``c·γ/σ[t]`` (``σ`` frozen), as in the
  builtin ``attn.write``, so ``Σ_{s,h} = (resid.delta_attn[t] − b_O·γ/σ[t])·G_j[t]``.
* Batched: every latent at once, for a linear encoder with a ReLU-like gate (standard, JumpReLU,
  TopK, BatchTopK, gated; not run-time input normalisation): ``∂z_j/∂x = 1[z_j > 0]·W_eff[:,j]``
  with ``W_eff = W_enc`` (``W_enc ⊙ exp(r_mag)`` for gated SAEs), so the batched forms equal the
  unbatched ones at every ``j``.
* ``sae.input_jacobian_*`` (``T×A×d_in``): ``∂z[t,j]/∂x[t,:]``, each latent's read vector in the
  SAE's input basis at its token.  Other plugins (``scalarlens-circuits``' SAE in-edges) read it
  by name to push a residual write through the encoder without importing this plugin.

Every DST lives at the SAE's layer ``L``; other layers hold exact zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from scalarlens import (
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Factory,
    Inputs,
    LayerIndex,
    LocationWithinLayer,
    NodeType,
    PassType,
    RawScalarSource,
    ScalarDeriver,
    ScalarSource,
    StaticLayerIndexer,
    WeightLocationType,
    need,
    recipe_factories,
)

from ._derivers import SaeRecipe, _sae_for, n_latents, per_token_scale
from ._errors import SaeConfigError
from ._options import SaeOptions, sae_options

if TYPE_CHECKING:
    import torch

    from ._sae import SparseAutoencoder

__all__ = [
    "LATENT_NAMESPACE",
    "LATENT_GRADIENT_DSTS",
    "LATENT_GRADIENT_FACTORIES",
    "LatentOptions",
    "latent_gradient_example_configs",
    "latent_index",
]

ALT, W = ActivationLocationType, WeightLocationType
FORWARD = PassType.FORWARD
T, S, H, A = (
    Dimension.TOKENS,
    Dimension.ATTENDED_TO_TOKENS,
    Dimension.ATTN_HEADS,
    Dimension.AUTOENCODER_LATENTS,
)
D, F, ONE = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.MLP_ACTS, Dimension.SINGLETON
ATTN = LocationWithinLayer.ATTN
LATENT_NAMESPACE = "sae_latent"
ATTENTION_INPUT = ALT.RESID_DELTA_ATTN.value


# --- options["sae_latent"]: which latent j ---------------------------------------------------


def _int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"{attribute.name} must be an integer (a latent of the SAE), got {value!r}"
        )


@attrs.frozen(kw_only=True)
class LatentOptions:
    """Schema of ``DstConfig.options["sae_latent"]``: ``index`` = the latent ``j``.

    A namespace of its own (not a field of ``options["sae"]``) because it names a node, not
    the SAE: every other SAE DST ignores it.  The range is checked against the SAE's latent
    count when the deriver is built.
    """

    index: int = attrs.field(validator=_int)


def latent_index(config: DstConfig, n: int, dst: str) -> int:
    """The validated latent ``j`` of ``config``; errors name the valid range."""
    if LATENT_NAMESPACE not in config.options:
        raise SaeConfigError(
            f"{dst} is about one latent j: DstConfig(options={{'sae': {{...}}, "
            f"'{LATENT_NAMESPACE}': {{'index': j}}}}) with 0 ≤ j < {n} (the SAE's latents); "
            f"options['{LATENT_NAMESPACE}'] is missing"
        )
    index = config.plugin_options(LATENT_NAMESPACE, LatentOptions).index
    if not 0 <= index < n:
        raise SaeConfigError(
            f"{dst}: options['{LATENT_NAMESPACE}']['index'] = {index} is out of range: the SAE "
            f"has {n} latents, valid 0..{n - 1}"
        )
    return index


# --- sources --------------------------------------------------------------------------------


def _at(opts: SaeOptions) -> StaticLayerIndexer:
    """Every layer reads layer L (only L is captured; the others are zeros)."""
    return StaticLayerIndexer(opts.layer)


def _input(config: DstConfig) -> tuple[ScalarSource, ...]:
    """``x``: the builtin twin of the SAE's location, by name (biases included)."""
    opts = sae_options(config)
    return (DstReference(opts.location, FORWARD, _at(opts)),)


def _attention(config: DstConfig) -> tuple[ScalarSource, ...]:
    """``p``, ``Vv``, ``o``, the post-norm scale ``σ``, at layer L."""
    at = _at(sae_options(config))
    return tuple(
        RawScalarSource(loc, FORWARD, at)
        for loc in (
            ALT.ATTN_QK_PROBS,
            ALT.ATTN_VALUE,
            ALT.ATTN_WEIGHTED_SUM_OF_VALUES,
            ALT.ATTN_POST_NORM_SCALE,
        )
    )


def _attention_and_grad(config: DstConfig) -> tuple[ScalarSource, ...]:
    grad = DstReference("sae.latent_input_grad_resid", FORWARD, _at(sae_options(config)))
    return (*_attention(config), grad)


def _attention_and_input(config: DstConfig) -> tuple[ScalarSource, ...]:
    return (*_attention(config), *_input(config))


# --- kernels --------------------------------------------------------------------------------


def _latent_input_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``G_j = ∂(Σ_t z_j[t])/∂x`` by autograd through the encoder."""
    import torch

    opts = sae_options(ctx.config)
    x = need(inputs[0], "the SAE input")
    if layer != opts.layer:
        return torch.zeros_like(x)
    sae = _sae_for(opts, ctx, x)
    j = latent_index(ctx.config, sae.n_latents, ctx.dst.name)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(sae.encode(leaf)[:, j].sum(), leaf)
    return grad


def _input_jacobian(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``∂z[t,j]/∂x[t,:]`` (``T×A×d_in``): ``1[z > 0]·∂pre/∂x``, per token."""
    import torch

    opts = sae_options(ctx.config)
    x = need(inputs[0], "the SAE input")
    n = n_latents(opts)
    if layer != opts.layer:
        return x.new_zeros((x.shape[0], n, x.shape[1]))
    sae = _sae_for(opts, ctx, x)
    active = (sae.encode(x) > 0).to(x.dtype)
    if sae.normalize == "none":  # pre is affine in x: its Jacobian is W_eff
        jac = _effective_encoder(sae).T.unsqueeze(0).expand(x.shape[0], -1, -1)
    else:  # per-token input normalisation: differentiate it

        def row(v: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = sae.pre_activation(v.unsqueeze(0))[0]
            return out

        jac = torch.func.vmap(torch.func.jacrev(row))(x.detach())
    return jac * active.unsqueeze(-1)


def _post_factor(scale: torch.Tensor | None, layer: int, ctx: DeriveContext) -> Any:
    """``γ/σ[t]`` (``T×D``) of the attention post-norm, or 1 without post-norms."""
    if not ctx.dims.post_norms:
        return 1.0
    return ctx.weight(W.ATTN_POST_NORM_GAIN, layer)[None, :] / need(scale, "attn post-norm σ")


def _attn_to_latent(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``p[t,s,h]·(c[s,h]·γ/σ[t]·G_j[t])`` (``T×S×H``)."""
    import torch

    probs = need(inputs[0], "attn.qk_probs")
    opts = sae_options(ctx.config)
    if layer != opts.layer:
        return torch.zeros_like(probs)
    values, g = need(inputs[1], "attn.v"), need(inputs[4], "G_j")
    u = _pulled_back(g * _post_factor(inputs[3], opts.layer, ctx), opts.layer, ctx)
    return torch.einsum("tsh,shv,thv->tsh", probs, values, u)


def _attn_to_latent_per_token(
    inputs: Inputs, layer: LayerIndex, ctx: DeriveContext
) -> torch.Tensor:
    """``(o[t,h] W_O[h])·γ/σ[t]·G_j[t]`` (``T×H``)."""
    import torch

    mixed = need(inputs[2], "attn.v_out")
    opts = sae_options(ctx.config)
    if layer != opts.layer:
        return mixed.new_zeros(mixed.shape[:2])
    g = need(inputs[4], "G_j") * _post_factor(inputs[3], opts.layer, ctx)
    return torch.einsum("thv,thv->th", mixed, _pulled_back(g, opts.layer, ctx))


def _pulled_back(g: torch.Tensor, layer: int, ctx: DeriveContext) -> torch.Tensor:
    """``W_O[h] g[t]`` (``T×H×dv``)."""
    import torch

    return torch.einsum("td,hvd->thv", g, ctx.weight(W.ATTN_TO_RESIDUAL, layer).to(g.dtype))


def _sum_heads(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    return need(inputs[0], "sae.attn_write_to_latent").sum(dim=-1, keepdim=True)


def _effective_encoder(sae: SparseAutoencoder) -> torch.Tensor:
    """``W_eff`` (``d_in×A``): the encoder's linear map before the gate."""
    if sae.architecture == "gated":
        assert sae.r_mag is not None
        return sae.W_enc * sae.r_mag.exp()
    return sae.W_enc


def _batched_setup(
    inputs: Inputs, ctx: DeriveContext, opts: SaeOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_O[h]·γ) W_eff`` (``H×dv×A``) and the per-query weight ``1[z > 0]/σ`` (``T×A``;
    ``σ`` is the post-norm's scale, 1 without post-norms)."""
    import torch

    x = need(inputs[4], "resid.delta_attn")
    sae = _sae_for(opts, ctx, x)
    w_o = ctx.weight(W.ATTN_TO_RESIDUAL, opts.layer).to(x.dtype)
    weight = (sae.encode(x) > 0).to(x.dtype)
    if ctx.dims.post_norms:
        w_o = w_o * ctx.weight(W.ATTN_POST_NORM_GAIN, opts.layer).to(x.dtype)
        weight = weight / need(inputs[3], "attn post-norm σ")  # σ is T×1
    return torch.einsum("hvd,da->hva", w_o, _effective_encoder(sae)), weight


def _attn_to_latents_batched(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    """``((Σ_h ATTN_WRITE[t,s,h,:]) W_eff)[j]·1[z_j[t] > 0]`` (``T×S×A``)."""
    import torch

    probs = need(inputs[0], "attn.qk_probs")
    opts = sae_options(ctx.config)
    n = n_latents(opts)
    if layer != opts.layer:
        return probs.new_zeros((*probs.shape[:2], n))
    read, weight = _batched_setup(inputs, ctx, opts)
    per_source = torch.einsum("shv,hva->sha", need(inputs[1], "attn.v"), read)
    return torch.einsum("tsh,sha->tsa", probs, per_source) * weight.unsqueeze(1)


def _attn_to_latents_per_token_batched(
    inputs: Inputs, layer: LayerIndex, ctx: DeriveContext
) -> torch.Tensor:
    """``o[t,h]·(W_O[h] W_eff)[:,j]·1[z_j[t] > 0]`` (``T×H×A``)."""
    import torch

    mixed = need(inputs[2], "attn.v_out")
    opts = sae_options(ctx.config)
    n = n_latents(opts)
    if layer != opts.layer:
        return mixed.new_zeros((*mixed.shape[:2], n))
    read, weight = _batched_setup(inputs, ctx, opts)
    return torch.einsum("thv,hva->tha", mixed, read) * weight.unsqueeze(1)


# --- recipes --------------------------------------------------------------------------------


@attrs.frozen
class LatentRecipe(SaeRecipe):
    """An :class:`SaeRecipe` with the checks of §2.8, all made when the deriver is built.

    ``basis`` fixes the SAE's input basis (``"mlp"``/``"resid"``), ``latent`` requires
    ``options["sae_latent"]``, ``attention`` an SAE reading ``resid.delta_attn``, ``batched``
    an encoder that is linear before its gate (no run-time input normalisation).
    """

    latent: bool = False
    attention: bool = False
    batched: bool = False

    def build(self, config: DstConfig) -> ScalarDeriver:
        opts = sae_options(config)
        name = self.dst.name
        if self.attention and opts.location != ATTENTION_INPUT:
            raise SaeConfigError(
                f"{name} needs an SAE reading the attention write of its own layer: "
                f"options['sae']['location'] = '{ATTENTION_INPUT}', got {opts.location!r}"
            )
        if self.batched and per_token_scale(opts):
            raise SaeConfigError(
                f"{name} assumes an encoder that is linear before its gate, but this SAE "
                "normalises its input per token (normalize_activations); use the unbatched "
                "sae.attn_write_to_latent* DSTs with options['sae_latent']"
            )
        if self.latent:
            latent_index(config, n_latents(opts), name)
        return SaeRecipe.build(self, config)


def _dst(name: str, shape: tuple[Dimension, ...], node: NodeType, text: str, **kw: Any) -> Any:
    return DerivedScalarType(name, shape, node, text, **kw)


LATENT = NodeType.AUTOENCODER_LATENT
HEAD = NodeType.ATTENTION_HEAD

RECIPES: tuple[LatentRecipe, ...] = (
    LatentRecipe(
        _dst(
            "sae.latent_input_grad_mlp",
            (T, F),
            NodeType.MLP_NEURON,
            "gradient of latent j (summed over tokens) w.r.t. an mlp.post_act SAE's input",
            location=LocationWithinLayer.MLP,
        ),
        "G_j[t,:] = ∂(Σ_t' z_j[t'])/∂x[t,:] by autograd through the encoder",
        _latent_input_grad,
        _input,
        basis="mlp",
        latent=True,
    ),
    LatentRecipe(
        _dst(
            "sae.latent_input_grad_resid",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "gradient of latent j (summed over tokens) w.r.t. a residual-basis SAE's input",
        ),
        "G_j[t,:] = ∂(Σ_t' z_j[t'])/∂x[t,:] by autograd through the encoder",
        _latent_input_grad,
        _input,
        basis="resid",
        latent=True,
    ),
    LatentRecipe(
        _dst(
            "sae.input_jacobian_mlp",
            (T, A, F),
            LATENT,
            "each latent's read vector in an mlp.post_act SAE's input basis, at its token",
            location=LocationWithinLayer.MLP,
        ),
        "∂z[t,j]/∂x[t,:] = 1[z[t,j] > 0]·∂pre[t,j]/∂x[t,:]",
        _input_jacobian,
        _input,
        basis="mlp",
    ),
    LatentRecipe(
        _dst(
            "sae.input_jacobian_resid",
            (T, A, D),
            LATENT,
            "each latent's read vector in a residual-basis SAE's input basis, at its token",
        ),
        "∂z[t,j]/∂x[t,:] = 1[z[t,j] > 0]·∂pre[t,j]/∂x[t,:]",
        _input_jacobian,
        _input,
        basis="resid",
    ),
    LatentRecipe(
        _dst(
            "sae.attn_write_to_latent",
            (T, S, H),
            HEAD,
            "first-order effect of each head and token pair's write on latent j of an SAE "
            "reading resid.delta_attn of the same layer",
            location=ATTN,
        ),
        "p[t,s,h]·(c[s,h]·G_j[t]) (c·γ/σ[t] with an attention post-norm)",
        _attn_to_latent,
        _attention_and_grad,
        latent=True,
        attention=True,
    ),
    LatentRecipe(
        _dst(
            "sae.attn_write_to_latent_sum_heads",
            (T, S, ONE),
            NodeType.LAYER,
            "sae.attn_write_to_latent summed over heads: each attended-to token's effect",
            location=ATTN,
        ),
        "Σ_h p[t,s,h]·(c[s,h]·G_j[t])",
        _sum_heads,
        (DstReference("sae.attn_write_to_latent", FORWARD),),
        latent=True,
        attention=True,
    ),
    LatentRecipe(
        _dst(
            "sae.attn_write_to_latent_per_token",
            (T, H),
            HEAD,
            "first-order effect of each head's write at each query token on latent j",
            location=ATTN,
        ),
        "(o[t,h] W_O[h])·G_j[t] (times γ/σ[t] with an attention post-norm)",
        _attn_to_latent_per_token,
        _attention_and_grad,
        latent=True,
        attention=True,
    ),
    LatentRecipe(
        _dst(
            "sae.attn_write_to_latents_batched",
            (T, S, A),
            LATENT,
            "each attended-to token's write into every latent's pre-activation, where the "
            "latent is active (linear encoder + ReLU-like gate)",
            location=ATTN,
        ),
        "((Σ_h ATTN_WRITE[t,s,h,:]) W_eff)[j]·1[z_j[t] > 0]",
        _attn_to_latents_batched,
        _attention_and_input,
        attention=True,
        batched=True,
    ),
    LatentRecipe(
        _dst(
            "sae.attn_write_to_latents_per_token_batched",
            (T, H, A),
            LATENT,
            "each head's write at each query token into every latent's pre-activation, "
            "where the latent is active (linear encoder + ReLU-like gate)",
            location=ATTN,
        ),
        "o[t,h]·(W_O[h] W_eff)[:,j]·1[z_j[t] > 0]",
        _attn_to_latents_per_token_batched,
        _attention_and_input,
        attention=True,
        batched=True,
    ),
)

LATENT_GRADIENT_DSTS: tuple[DerivedScalarType, ...] = tuple(r.dst for r in RECIPES)
LATENT_GRADIENT_FACTORIES: dict[DerivedScalarType, Factory] = recipe_factories(RECIPES)


def latent_gradient_example_configs(
    n_latents: int = 8, seed: int = 0, layer: int = 0, latent: int = 3
) -> dict[str, DstConfig]:
    """A config for every DST here: a random SAE at ``layer``, latent ``latent``."""
    out = {}
    for recipe in RECIPES:
        location = "mlp.post_act" if recipe.basis == "mlp" else ATTENTION_INPUT
        options: dict[str, Any] = {
            "sae": {
                "random_init": {"n_latents": n_latents, "seed": seed},
                "location": location,
                "layer": layer,
            }
        }
        if recipe.latent:
            options[LATENT_NAMESPACE] = {"index": latent}
        out[recipe.dst.name] = DstConfig(options=options)
    return out
