"""Canonical weights (``WeightLocationType`` layouts) read off a family's HF modules.

Every reader returns a view of the module's parameter (no copies: a DST that reads ``W_O`` on
an 8B model must not allocate it again), in ScalarLens's layout: ``W_Q`` as ``H×D×dk``,
``W_K``/``W_V`` as ``KV×D×d``, ``W_O`` as ``H×dv×D``, MLP weights as ``D×F``/``F×D``.
Biases a model does not have are zeros; norm gains are the effective multiplier (Gemma's
``1 + w``); the embedding includes Gemma's ``√d`` scale, as it enters the residual stream.
"""

from __future__ import annotations

from typing import Any

import torch
from scalarlens import ModelDims, ModelInputError
from scalarlens import WeightLocationType as W

from ._families import Family
from ._hooks import resolve

__all__ = ["read_weight"]

_QKV = {W.ATTN_TO_QUERY: 0, W.ATTN_TO_KEY: 1, W.ATTN_TO_VALUE: 2}
_QKV_BIAS = {W.ATTN_BIAS_QUERY: 0, W.ATTN_BIAS_KEY: 1, W.ATTN_BIAS_VALUE: 2}


def _linear_in_out(module: Any, conv1d: bool) -> torch.Tensor:
    """``in×out`` weight of an ``nn.Linear`` (``out×in``) or a GPT-2 ``Conv1D`` (``in×out``)."""
    weight: torch.Tensor = module.weight
    return weight if conv1d else weight.T


def _bias(module: Any, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return like.new_zeros(size) if bias is None else bias


def _gain(kind: str, module: Any) -> torch.Tensor:
    weight: torch.Tensor = module.weight
    return weight + 1.0 if kind == "rmsnorm_plus_one" else weight


def _norm_bias(module: Any, d: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    weight: torch.Tensor = module.weight
    return weight.new_zeros(d) if bias is None else bias


def _qkv(fam: Family, attn: Any, dims: ModelDims, which: int) -> torch.Tensor:
    """``W_Q`` (``H×D×dk``) or ``W_K``/``W_V`` (``KV×D×d``)."""
    d, dk = dims.d_model, dims.d_head
    heads = dims.n_heads if which == 0 else dims.n_kv_heads
    if fam.qkv == "separate":
        proj = getattr(attn, ("q_proj", "k_proj", "v_proj")[which])
        return proj.weight.view(heads, dk, d).transpose(1, 2)
    if fam.qkv == "gpt2_conv1d":  # columns [Q | K | V], each H·dk wide
        w = attn.c_attn.weight[:, which * d : (which + 1) * d]
        return w.reshape(d, heads, dk).permute(1, 0, 2)
    # NeoX: rows grouped per head as [q | k | v] of dk each
    w = attn.query_key_value.weight.view(heads, 3, dk, d)[:, which]
    return w.transpose(1, 2)


def _qkv_bias(fam: Family, attn: Any, dims: ModelDims, which: int) -> torch.Tensor:
    heads = dims.n_heads if which == 0 else dims.n_kv_heads
    dk = dims.d_head
    if fam.qkv == "separate":
        proj = getattr(attn, ("q_proj", "k_proj", "v_proj")[which])
        return _bias(proj, heads * dk, proj.weight).view(heads, dk)
    if fam.qkv == "gpt2_conv1d":
        d = dims.d_model
        return attn.c_attn.bias[which * d : (which + 1) * d].view(heads, dk)
    fused = attn.query_key_value
    bias = _bias(fused, 3 * heads * dk, fused.weight)
    return bias.view(heads, 3, dk)[:, which]


def _model_weight(fam: Family, model: Any, location: W, dims: ModelDims) -> torch.Tensor:
    base = resolve(model, fam.base)
    if location is W.EMBEDDING:
        embed = resolve(base, fam.embed)
        scale = getattr(embed, "embed_scale", None)
        return embed.weight if scale is None else embed.weight * scale.to(embed.weight.dtype)
    if location is W.POSITION_EMBEDDING:
        if fam.position_embed is None:
            raise ModelInputError(
                f"weight 'position_embedding': {fam.name} models use rotary position "
                "embeddings, which rotate q and k inside attention; there is no learned "
                "position embedding added to the residual stream"
            )
        weight: torch.Tensor = resolve(base, fam.position_embed).weight
        return weight
    if location is W.UNEMBEDDING:
        return resolve(model, fam.lm_head).weight.T
    final = resolve(base, fam.final_norm)
    if location is W.LAYER_NORM_GAIN_FINAL:
        return _gain(fam.norm, final)
    return _norm_bias(final, dims.d_model)  # LAYER_NORM_BIAS_FINAL


def _missing(fam: Family, location: W, what: str) -> ModelInputError:
    return ModelInputError(
        f"weight {location.value!r}: {fam.name} models have no such weight ({what})"
    )


def _block_weight(fam: Family, layer: Any, location: W, dims: ModelDims) -> torch.Tensor:
    attn, mlp = resolve(layer, fam.attn), resolve(layer, fam.mlp)
    conv1d = fam.qkv == "gpt2_conv1d"
    if location in _QKV:
        return _qkv(fam, attn, dims, _QKV[location])
    if location in _QKV_BIAS:
        return _qkv_bias(fam, attn, dims, _QKV_BIAS[location])
    o_proj = resolve(attn, fam.o_proj)
    if location is W.ATTN_TO_RESIDUAL:
        return _linear_in_out(o_proj, conv1d).reshape(dims.n_heads, dims.d_head, dims.d_model)
    if location is W.ATTN_BIAS_RESIDUAL:
        return _bias(o_proj, dims.d_model, o_proj.weight)
    norms = {
        W.LAYER_NORM_GAIN_PRE_ATTN: fam.input_norm,
        W.LAYER_NORM_GAIN_PRE_MLP: fam.pre_mlp_norm,
        W.ATTN_POST_NORM_GAIN: fam.attn_post_norm,
        W.MLP_POST_NORM_GAIN: fam.mlp_post_norm,
    }
    if location in norms:
        path = norms[location]
        if path is None:
            raise _missing(fam, location, "they have no post-norms")
        return _gain(fam.norm, resolve(layer, path))
    if location is W.LAYER_NORM_BIAS_PRE_ATTN:
        return _norm_bias(resolve(layer, fam.input_norm), dims.d_model)
    if location is W.LAYER_NORM_BIAS_PRE_MLP:
        return _norm_bias(resolve(layer, fam.pre_mlp_norm), dims.d_model)
    return _mlp_weight(fam, mlp, location, dims, conv1d)


def _mlp_weight(fam: Family, mlp: Any, location: W, dims: ModelDims, conv1d: bool) -> torch.Tensor:
    if location in (W.MLP_TO_UP, W.MLP_BIAS_UP):
        if fam.mlp_up is None:
            raise _missing(fam, location, "their MLP is not gated")
        up = resolve(mlp, fam.mlp_up)
        if location is W.MLP_TO_UP:
            return _linear_in_out(up, conv1d)
        return _bias(up, dims.d_mlp, up.weight)
    fc_in, fc_out = resolve(mlp, fam.mlp_in), resolve(mlp, fam.mlp_out)
    readers = {
        W.MLP_TO_HIDDEN: lambda: _linear_in_out(fc_in, conv1d),
        W.MLP_BIAS_HIDDEN: lambda: _bias(fc_in, dims.d_mlp, fc_in.weight),
        W.MLP_TO_RESIDUAL: lambda: _linear_in_out(fc_out, conv1d),
        W.MLP_BIAS_RESIDUAL: lambda: _bias(fc_out, dims.d_model, fc_out.weight),
    }
    return readers[location]()


def read_weight(
    fam: Family, model: Any, location: W, layer: int | None, dims: ModelDims
) -> torch.Tensor:
    """``location`` (at ``layer``) in its canonical layout; ``ModelInputError`` if absent."""
    if location.has_no_layers:
        return _model_weight(fam, model, location, dims)
    assert layer is not None
    decoder = list(resolve(resolve(model, fam.base), fam.layers))[layer]
    return _block_weight(fam, decoder, location, dims)
