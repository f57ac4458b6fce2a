"""Raw twins: one DST per capturable location, with the location's own name and shape.

Forward pass: the captured value ``X``.  Backward pass: ``∇X``, the objective's gradient at
that hook point.  Kernel: identity.
"""

from __future__ import annotations

from scalarlens import ActivationLocationType as ALT
from scalarlens import DerivedScalarType, DstConfig, Factory, ScalarDeriver, raw_deriver, raw_dst

DESCRIPTIONS: dict[ALT, str] = {
    ALT.RESID_POST_EMBEDDING: "embedding x_emb as it enters layer 0 (layer-less)",
    ALT.ATTN_INPUT_LAYER_NORM_SCALE: "σ of the attention-input norm, per token",
    ALT.ATTN_QUERY: "queries u·W_Q + b_Q per head (unscaled; after rotary / q-norm)",
    ALT.ATTN_KEY: "keys per query head (unscaled; after rotary / k-norm), by attended-to token",
    ALT.ATTN_VALUE: "values u·W_V + b_V per query head (its KV group's), by attended-to token",
    ALT.ATTN_QK_LOGITS: "attention logits Q·K·scale (soft-capped if capped), −inf if masked",
    ALT.ATTN_QK_PROBS: "attention probabilities softmax over attended-to tokens",
    ALT.ATTN_WEIGHTED_SUM_OF_VALUES: "per-head mixed values o = Σ_s p·V, before W_O",
    ALT.ATTN_POST_NORM_SCALE: "σ of the attention post-norm, per token (1 without post-norms)",
    ALT.RESID_DELTA_ATTN: "attention block's write to the residual stream (incl. b_O, post-norm)",
    ALT.RESID_POST_ATTN: "residual stream after the attention block",
    ALT.MLP_INPUT_LAYER_NORM_SCALE: "σ of the MLP-input norm, per token",
    ALT.MLP_PRE_ACT: "MLP (gate) pre-activations LN2(x)·W_in + b_in",
    ALT.MLP_UP: "gated MLPs only: the up projection LN2(x)·W_up + b_up",
    ALT.MLP_POST_ACT: "MLP neurons act(pre_act), times mlp.up in a gated MLP",
    ALT.MLP_POST_NORM_SCALE: "σ of the MLP post-norm, per token (1 without post-norms)",
    ALT.RESID_DELTA_MLP: "MLP block's write to the residual stream (incl. b_out, post-norm)",
    ALT.RESID_POST_MLP: "residual stream after the MLP block",
    ALT.RESID_FINAL_LAYER_NORM_SCALE: "σ of the final norm, per token (layer-less)",
    ALT.LOGITS: "output logits LN_f(x)·U, soft-capped where the model caps (layer-less)",
}

RAW_DSTS: dict[ALT, DerivedScalarType] = {
    location: raw_dst(location, DESCRIPTIONS[location]) for location in ALT
}


def _factory(location: ALT, dst: DerivedScalarType) -> Factory:
    def build(config: DstConfig) -> ScalarDeriver:
        return raw_deriver(dst, location, config)

    build.__doc__ = f"Raw twin of {location.value}: identity on the captured tensor."
    return build


FACTORIES = {dst: _factory(location, dst) for location, dst in RAW_DSTS.items()}
