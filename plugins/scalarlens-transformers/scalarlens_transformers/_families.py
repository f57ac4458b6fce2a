"""One declarative row per model family: where each ScalarLens location lives in the HF module tree.

The adapter never re-implements a family's layer maths.  It hooks the unmodified Hugging Face
modules named here; the only maths it owns are the norms (their scale ``σ`` must be a hook
point, so they are recomputed with the module's own weight and epsilon, and a test checks
them against the module) and the attention core (``softmax(q·k·scale)·v``, registered as a
Hugging Face attention implementation, because the ``T×S×H`` logits and probabilities are
hook points too).  Adding a family is one :class:`Family` row plus a tiny test model; see the
"writing a model adapter" guide in the docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["FAMILIES", "Family", "family_for"]

NORM_KINDS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")
QKV_LAYOUTS = ("separate", "gpt2_conv1d", "neox_fused")


@attrs.frozen
class Family:
    """Module names (attribute paths) and wiring of one architecture.

    Paths are relative to the causal-LM wrapper (``base``, ``lm_head``) or to its base model
    (``embed``, ``layers``, ``final_norm``) or to one decoder layer (everything else).
    ``pre_mlp_norm`` is the norm whose input is the residual stream the MLP reads;
    ``attn_post_norm``/``mlp_post_norm`` are Gemma's sandwich norms (``None`` elsewhere).
    """

    name: str
    model_types: tuple[str, ...]
    base: str
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    input_norm: str
    attn: str
    pre_mlp_norm: str
    mlp: str
    mlp_in: str
    mlp_out: str
    o_proj: str
    norm: str = attrs.field(validator=attrs.validators.in_(NORM_KINDS))
    qkv: str = attrs.field(default="separate", validator=attrs.validators.in_(QKV_LAYOUTS))
    mlp_up: str | None = None
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    position_embed: str | None = None
    # Config keys, first one present wins.
    eps_keys: tuple[str, ...] = ("rms_norm_eps",)
    parallel_key: str | None = None
    softcap_key: str | None = None
    position: str = "rotary"
    notes: str = ""

    @property
    def gated(self) -> bool:
        return self.mlp_up is not None

    @property
    def post_norms(self) -> bool:
        return self.attn_post_norm is not None

    def parallel(self, config: Any) -> bool:
        return bool(self.parallel_key and getattr(config, self.parallel_key, False))

    def softcap(self, config: Any) -> float | None:
        value = getattr(config, self.softcap_key, None) if self.softcap_key else None
        return float(value) if value else None

    def eps(self, config: Any) -> float:
        for key in self.eps_keys:
            value = getattr(config, key, None)
            if value is not None:
                return float(value)
        return 1e-5


_LLAMA_LIKE: dict[str, Any] = dict(
    base="model",
    embed="embed_tokens",
    layers="layers",
    final_norm="norm",
    lm_head="lm_head",
    input_norm="input_layernorm",
    attn="self_attn",
    pre_mlp_norm="post_attention_layernorm",
    mlp="mlp",
    mlp_in="gate_proj",
    mlp_up="up_proj",
    mlp_out="down_proj",
    o_proj="o_proj",
    norm="rmsnorm",
)

_GEMMA: dict[str, Any] = {
    **_LLAMA_LIKE,
    "norm": "rmsnorm_plus_one",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
    "softcap_key": "final_logit_softcapping",
}

FAMILIES: tuple[Family, ...] = (
    Family(
        "Llama",
        ("llama",),
        **_LLAMA_LIKE,
        notes="RMSNorm, rotary, grouped-query attention, gated SwiGLU MLP",
    ),
    Family("Mistral", ("mistral",), **_LLAMA_LIKE, notes="as Llama, sliding-window attention"),
    Family("Qwen2", ("qwen2",), **_LLAMA_LIKE, notes="as Llama, biases on q/k/v"),
    Family("Qwen3", ("qwen3",), **_LLAMA_LIKE, notes="as Llama, RMSNorm on each head's q and k"),
    Family(
        "Gemma 2",
        ("gemma2",),
        **_GEMMA,
        notes="√d-scaled embeddings, (1+w) RMSNorm, sandwich post-norms, attention and final "
        "logit soft-capping, alternating sliding-window layers",
    ),
    Family(
        "Gemma 3",
        ("gemma3_text",),
        **_GEMMA,
        notes="as Gemma 2 with q/k norms instead of attention soft-capping, local/global rotary",
    ),
    Family(
        "GPT-NeoX / Pythia",
        ("gpt_neox",),
        base="gpt_neox",
        embed="embed_in",
        layers="layers",
        final_norm="final_layer_norm",
        lm_head="lm_head",
        input_norm="input_layernorm",
        attn="attention",
        pre_mlp_norm="post_attention_layernorm",
        mlp="mlp",
        mlp_in="dense_h_to_4h",
        mlp_out="dense_4h_to_h",
        o_proj="dense",
        norm="layernorm",
        qkv="neox_fused",
        eps_keys=("layer_norm_eps",),
        parallel_key="use_parallel_residual",
        notes="LayerNorm, parallel residual (the MLP reads the residual before attention), "
        "partial rotary, fused per-head q/k/v",
    ),
    Family(
        "GPT-2",
        ("gpt2",),
        base="transformer",
        embed="wte",
        position_embed="wpe",
        layers="h",
        final_norm="ln_f",
        lm_head="lm_head",
        input_norm="ln_1",
        attn="attn",
        pre_mlp_norm="ln_2",
        mlp="mlp",
        mlp_in="c_fc",
        mlp_out="c_proj",
        o_proj="c_proj",
        norm="layernorm",
        qkv="gpt2_conv1d",
        eps_keys=("layer_norm_epsilon",),
        position="learned",
        notes="LayerNorm, learned positions, Conv1D (in×out) weights; the core's own GPT-2 "
        "adapter gives the same numbers",
    ),
)

_BY_MODEL_TYPE: Mapping[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def family_for(model_type: str) -> Family | None:
    """The family of a ``config.json`` ``model_type``, or ``None`` if unsupported."""
    return _BY_MODEL_TYPE.get(model_type)
