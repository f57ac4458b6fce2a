"""``GPT2Adapter``: the ``ModelAdapter`` for ScalarLens's own GPT-2 module.

Everything model-independent (validation, capture planning, interventions, objectives,
batching, the backward pass) lives in :class:`HookedAdapter`; this module says where GPT-2's
weights live and how to run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from .._layers import LayerIndex
from .._model import (
    LogitDiffObjective,
    LogProbObjective,
    ModelDims,
    logits_objective,
    resolve_position,
)
from .._reconstitute import AttentionParts
from .._vocab import ActivationLocationType as ALT
from .._vocab import PassType, WeightLocationType
from ..exceptions import ModelInputError
from ._gpt2 import GPT2Model
from ._hooked import HookedAdapter, HookFn
from ._tokenizer import WordTokenizer

__all__ = ["GPT2Adapter"]

W = WeightLocationType


def _qkv(which: int) -> Callable[[Any, ModelDims], torch.Tensor]:
    """``W_Q``/``W_K``/``W_V`` as ``H×D×dk``: Conv1D columns are [Q | K | V], split into heads."""

    def read(block: Any, dims: ModelDims) -> torch.Tensor:
        d, h, dk = dims.d_model, dims.n_heads, dims.d_head
        w: torch.Tensor = block.attn.c_attn.weight[:, which * d : (which + 1) * d]
        return w.reshape(d, h, dk).permute(1, 0, 2)

    return read


def _qkv_bias(which: int) -> Callable[[Any, ModelDims], torch.Tensor]:
    def read(block: Any, dims: ModelDims) -> torch.Tensor:
        d = dims.d_model
        bias: torch.Tensor = block.attn.c_attn.bias[which * d : (which + 1) * d]
        return bias.reshape(dims.n_heads, dims.d_head)

    return read


# Where each canonical weight lives in a GPT2Model: layer-less ones read the model, per-layer
# ones read a block.  One row per WeightLocationType member (a test checks the table is whole).
_MODEL_WEIGHTS: dict[WeightLocationType, Callable[[GPT2Model], torch.Tensor]] = {
    W.EMBEDDING: lambda m: m.wte.weight,
    W.POSITION_EMBEDDING: lambda m: m.wpe.weight,
    W.UNEMBEDDING: lambda m: m.unembedding().T,
    W.LAYER_NORM_GAIN_FINAL: lambda m: m.ln_f.weight,
    W.LAYER_NORM_BIAS_FINAL: lambda m: m.ln_f.bias,
}
_BLOCK_WEIGHTS: dict[WeightLocationType, Callable[[Any, ModelDims], torch.Tensor]] = {
    W.ATTN_TO_QUERY: _qkv(0),
    W.ATTN_TO_KEY: _qkv(1),
    W.ATTN_TO_VALUE: _qkv(2),
    W.ATTN_BIAS_QUERY: _qkv_bias(0),
    W.ATTN_BIAS_KEY: _qkv_bias(1),
    W.ATTN_BIAS_VALUE: _qkv_bias(2),
    W.ATTN_TO_RESIDUAL: lambda b, d: b.attn.c_proj.weight.reshape(d.n_heads, d.d_head, d.d_model),
    W.ATTN_BIAS_RESIDUAL: lambda b, d: b.attn.c_proj.bias,
    W.LAYER_NORM_GAIN_PRE_ATTN: lambda b, d: b.ln_1.weight,
    W.LAYER_NORM_BIAS_PRE_ATTN: lambda b, d: b.ln_1.bias,
    W.LAYER_NORM_GAIN_PRE_MLP: lambda b, d: b.ln_2.weight,
    W.LAYER_NORM_BIAS_PRE_MLP: lambda b, d: b.ln_2.bias,
    W.MLP_TO_HIDDEN: lambda b, d: b.mlp.c_fc.weight,
    W.MLP_BIAS_HIDDEN: lambda b, d: b.mlp.c_fc.bias,
    W.MLP_TO_RESIDUAL: lambda b, d: b.mlp.c_proj.weight,
    W.MLP_BIAS_RESIDUAL: lambda b, d: b.mlp.c_proj.bias,
}


class GPT2Adapter(HookedAdapter):
    """Exposes a ``GPT2Model`` through the ``ModelAdapter`` protocol.

    Supports ``memory="low"`` (each block is checkpointed and recomputed in the backward pass).

    ``dtype`` (default: the model's) is applied to the model; use ``adapter.to(torch.float64)``
    for exactness tests.  The model is put in eval mode with parameters frozen, because the
    adapter only ever needs gradients with respect to activations.
    """

    def __init__(
        self,
        model: GPT2Model,
        *,
        name: str = "gpt2",
        tokenizer: WordTokenizer | None = None,
        dtype: torch.dtype | None = None,
        source: str | None = None,
    ) -> None:
        self._model = model
        model.eval()
        model.requires_grad_(False)
        if dtype is not None:
            model.to(dtype)
        cfg = model.config
        if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
            raise ModelInputError(
                f"tokenizer has {len(tokenizer)} words but the model's vocabulary has only "
                f"{cfg.vocab_size} entries"
            )
        dims = ModelDims(
            n_layers=cfg.n_layer,
            d_model=cfg.n_embd,
            n_heads=cfg.n_head,
            d_head=cfg.d_head,
            d_mlp=cfg.n_inner,
            n_vocab=cfg.vocab_size,
            n_ctx=cfg.n_positions,
            norm_eps=cfg.layer_norm_epsilon,
            norm_kind="layernorm",
        )
        super().__init__(name=name, dims=dims, tokenizer=tokenizer, source=source)

    recomputes_layers = True

    @property
    def model(self) -> GPT2Model:
        """The underlying ``torch.nn.Module`` (for reconstitution or custom experiments)."""
        return self._model

    @property
    def dtype(self) -> torch.dtype:
        return self._model.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._model.wte.weight.device

    def to(self, dtype_or_device: torch.dtype | torch.device | str) -> GPT2Adapter:
        """Move/cast the model in place (like ``nn.Module.to``) and return ``self``."""
        self._model.to(dtype_or_device)
        return self

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "architecture": "gpt2",
            "source": self._source,
            "dtype": str(self.dtype).removeprefix("torch."),
            **self._model.config.to_hf_dict(),
        }

    # --- weights --------------------------------------------------------------------------

    def final_norm(self, resid: torch.Tensor, *, detach_scale: bool = False) -> torch.Tensor:
        """``ln_f(resid)`` of residual vectors ``…×D``, differentiably (FinalResidualReadout)."""

        def scale_hook(name: str, layer: LayerIndex, scale: torch.Tensor) -> torch.Tensor:
            return scale.detach() if detach_scale else scale

        normed: torch.Tensor = self._model.ln_f(
            resid, scale_hook, ALT.RESID_FINAL_LAYER_NORM_SCALE.value, None
        )
        return normed

    # --- reconstitution (scalarlens.Reconstitutable) ------------------------------------

    def sublayer_input(
        self, resid: torch.Tensor, layer: int, sublayer: str, *, detach_scale: bool = False
    ) -> torch.Tensor:
        """``ln_1`` (attention) or ``ln_2`` (MLP) of ``resid``, differentiably."""
        block = self._model.block(layer)
        norm, name = (
            (block.ln_1, ALT.ATTN_INPUT_LAYER_NORM_SCALE)
            if sublayer == "attn"
            else (block.ln_2, ALT.MLP_INPUT_LAYER_NORM_SCALE)
        )

        def scale_hook(_: str, __: LayerIndex, scale: torch.Tensor) -> torch.Tensor:
            return scale.detach() if detach_scale else scale

        normed: torch.Tensor = norm(resid, scale_hook, name.value, layer)
        return normed

    def reconstitute_attention(
        self,
        resid_q: torch.Tensor,
        resid_k: torch.Tensor,
        resid_v: torch.Tensor,
        layer: int,
        *,
        detach_scale: bool = False,
    ) -> AttentionParts:
        """GPT-2 attention with q, k and v read from separate residuals (``T×D`` / ``S×D``)."""
        attn = self._model.block(layer).attn
        d, h, dk = self._dims.d_model, self._dims.n_heads, self._dims.d_head

        def project(resid: torch.Tensor, which: int) -> torch.Tensor:
            u = self.sublayer_input(resid, layer, "attn", detach_scale=detach_scale)
            w = attn.c_attn.weight[:, which * d : (which + 1) * d]
            out: torch.Tensor = u @ w + attn.c_attn.bias[which * d : (which + 1) * d]
            return out.reshape(resid.shape[0], h, dk)

        q, k, v = project(resid_q, 0), project(resid_k, 1), project(resid_v, 2)
        t, s = q.shape[0], k.shape[0]
        logits = torch.einsum("thd,shd->tsh", q, k) / math.sqrt(dk)
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        logits = logits.masked_fill(~allowed[..., None], float("-inf"))
        probs = torch.softmax(logits, dim=1)
        mixed = torch.einsum("tsh,shd->thd", probs, v)
        return AttentionParts(logits=logits, probs=probs, values=v, mixed=mixed)

    def reconstitute_mlp(
        self, resid: torch.Tensor, layer: int, *, detach_scale: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pre, post)`` of layer ``layer``'s MLP from ``resid.post_attn``."""
        mlp = self._model.block(layer).mlp
        x = self.sublayer_input(resid, layer, "mlp", detach_scale=detach_scale)
        pre: torch.Tensor = x @ mlp.c_fc.weight + mlp.c_fc.bias
        return pre, mlp.act(pre)

    def logits_from_final_residual(
        self,
        resid: torch.Tensor,
        *,
        detach_ln_scale: bool = False,
        columns: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``T×V`` logits from the residual entering the final LayerNorm, differentiably
        (``T×len(columns)``, those vocabulary ids only, when ``columns`` is given).

        Lets ``derive`` take the objective's gradient at the final residual locally — through
        ``ln_f`` and the unembedding only — when that is the only gradient a plan needs.
        """
        normed = self.final_norm(resid, detach_scale=detach_ln_scale)
        return normed @ self._model.unembedding(columns).T

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
        logits: torch.Tensor | None = self._model(
            tokens, attention_mask, hook=hook, unembed=unembed, rows=rows, checkpoint=checkpoint
        )
        return logits

    def resume_objectives(
        self,
        prefix: Mapping[tuple[Any, PassType], Mapping[LayerIndex, torch.Tensor]],
        start_layer: int,
        offset: int,
        n_rows: int,
        hook: HookFn,
        objective: LogitDiffObjective | LogProbObjective,
    ) -> list[float]:
        """``ResumableModel``: activation patching runs only what a patch can change."""
        fwd = PassType.FORWARD
        if start_layer == 0:
            resid = prefix[(ALT.RESID_POST_EMBEDDING, fwd)][None]
        else:
            resid = prefix[(ALT.RESID_POST_MLP, fwd)][start_layer - 1]
        row = resolve_position(objective.position, resid.shape[0]) - offset
        past = [
            (
                prefix[(ALT.ATTN_KEY, fwd)][i][:offset].to(self.dtype),
                prefix[(ALT.ATTN_VALUE, fwd)][i][:offset].to(self.dtype),
            )
            for i in range(start_layer, self._dims.n_layers)
        ]
        x = resid[offset:].to(self.dtype).unsqueeze(0).expand(n_rows, -1, -1)
        # A logit difference reads two unembedding rows, not all V of them.
        columns = (
            [objective.target, objective.distractor]
            if isinstance(objective, LogitDiffObjective)
            else None
        )
        with torch.no_grad():
            logits = self._model.resume(x, start_layer, past, hook, row, columns)
        logits = logits.to(self.accumulation_dtype)
        if columns is not None:
            return (logits[:, 0] - logits[:, 1]).tolist()
        at_zero = attrs.evolve(objective, position=0)
        return [float(logits_objective(at_zero, logits[b : b + 1])) for b in range(n_rows)]

    def _read_weight(self, location: WeightLocationType, layer: LayerIndex) -> torch.Tensor:
        if location.has_no_layers:
            return _MODEL_WEIGHTS[location](self._model)
        reader = _BLOCK_WEIGHTS.get(location)
        if reader is None:
            raise ModelInputError(
                f"weight {location.value!r}: {self._name} (GPT-2) has no such weight; it exists "
                "only on models with a gated MLP or post-norms"
            )
        assert layer is not None
        return reader(self._model.block(layer), self._dims)
