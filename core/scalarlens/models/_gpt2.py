"""A GPT-2 architecture written so that every ``ActivationLocationType`` is a hook point.

Why our own module instead of ``transformers.GPT2LMHeadModel``: the derived-scalar maths needs
values HF never materialises (the LayerNorm scale ``σ``, unscaled Q/K split into heads, the
``T×S×H`` logits with ``-inf`` in masked slots, per-head mixed values), and it needs each of them
to be *replaceable* (interventions) and *differentiable at that exact tensor* (gradient capture).
A single ``hook(name, layer, tensor) -> tensor`` callback whose return value flows downstream
gives both with no monkey-patching.

Parameters are stored in the Hugging Face GPT-2 layout (``Conv1D`` weights are ``in × out``),
and the module's ``state_dict`` keys are HF's keys without the ``transformer.`` prefix, so
loading and saving a checkpoint is a rename-free copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .._vocab import ActivationLocationType as ALT

__all__ = ["SUPPORTED_ACTIVATIONS", "GPT2Config", "GPT2Model", "HookFn"]

HookFn = Callable[[str, "int | None", torch.Tensor], torch.Tensor]
"""``hook(name, layer, tensor) -> tensor``; ``name`` is an ``ActivationLocationType`` value."""

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


@attrs.frozen
class GPT2Config:
    """The subset of ``transformers.GPT2Config`` that determines the forward maths."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True

    def __attrs_post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"use one of {SUPPORTED_ACTIVATIONS}"
            )

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` body that ``transformers.GPT2Config`` reads back unchanged."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            # GPT2Config otherwise defaults these to 50256, outside a small vocabulary.
            "bos_token_id": None,
            "eos_token_id": None,
        }


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """HF's ``NewGELUActivation`` formula, written out so parity does not depend on kernels."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return _gelu_new
    if name == "gelu":
        return F.gelu
    return F.relu


def _identity_hook(name: str, layer: int | None, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Affine(nn.Module):
    """A ``weight``/``bias`` pair (HF ``Conv1D`` layout: ``in × out``, or a LayerNorm's ``D``)."""

    def __init__(self, weight_shape: tuple[int, ...], bias_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(bias_size))


class _LayerNorm(_Affine):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__((d,), d)
        self.eps = eps

    def forward(self, x: torch.Tensor, hook: HookFn, name: str, layer: int | None) -> torch.Tensor:
        """``(x - mean) / σ · γ + β`` with ``σ`` passed through the hook.

        Whatever the hook returns is the ``σ`` used, so returning ``σ.detach()`` makes the
        normalisation a constant rescaling for the backward pass.
        """
        centered = x - x.mean(dim=-1, keepdim=True)
        scale = torch.sqrt(centered.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        scale = hook(name, layer, scale)
        return centered / scale * self.weight + self.bias


class _Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.d_head = cfg.d_head
        self.c_attn = _Affine((d, 3 * d), 3 * d)
        self.c_proj = _Affine((d, d), d)

    def forward(
        self,
        u: torch.Tensor,
        allowed: torch.Tensor,
        hook: HookFn,
        layer: int,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``past`` (keys and values ``P×H×dk`` of ``P`` earlier tokens) lets ``u`` hold only
        the tokens after them (see ``GPT2Model.resume``); keys then span ``P + t``."""
        b, t, d = u.shape
        h, dk = self.n_head, self.d_head
        qkv = u @ self.c_attn.weight + self.c_attn.bias
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, h, dk) for i in range(3))
        q = hook(ALT.ATTN_QUERY.value, layer, q)
        k = hook(ALT.ATTN_KEY.value, layer, k)
        v = hook(ALT.ATTN_VALUE.value, layer, v)
        if past is not None:
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=1)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=1)
        # The maths runs in the B×H×T×S layout (batched matmuls, softmax over the last axis:
        # several times faster than einsums into B×T×S×H, forward and backward); each hook sees
        # a permuted view in the location's B×T×S×H layout and what it returns flows on.
        logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) / math.sqrt(dk)
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        logits = hook(ALT.ATTN_QK_LOGITS.value, layer, logits.permute(0, 2, 3, 1))
        probs = torch.softmax(logits.permute(0, 3, 1, 2), dim=-1)
        probs = hook(ALT.ATTN_QK_PROBS.value, layer, probs.permute(0, 2, 3, 1))
        v_out = (probs.permute(0, 3, 1, 2) @ v.transpose(1, 2)).transpose(1, 2)
        v_out = hook(ALT.ATTN_WEIGHTED_SUM_OF_VALUES.value, layer, v_out)
        return v_out.reshape(b, t, h * dk) @ self.c_proj.weight + self.c_proj.bias


class _MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = _Affine((cfg.n_embd, cfg.n_inner), cfg.n_inner)
        self.c_proj = _Affine((cfg.n_inner, cfg.n_embd), cfg.n_embd)
        self.act = _activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, hook: HookFn, layer: int) -> torch.Tensor:
        pre = hook(ALT.MLP_PRE_ACT.value, layer, x @ self.c_fc.weight + self.c_fc.bias)
        post = hook(ALT.MLP_POST_ACT.value, layer, self.act(pre))
        return post @ self.c_proj.weight + self.c_proj.bias


class _Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = _Attention(cfg)
        self.ln_2 = _LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = _MLP(cfg)

    def forward(
        self,
        resid: torch.Tensor,
        allowed: torch.Tensor,
        hook: HookFn,
        layer: int,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        u = self.ln_1(resid, hook, ALT.ATTN_INPUT_LAYER_NORM_SCALE.value, layer)
        delta = hook(ALT.RESID_DELTA_ATTN.value, layer, self.attn(u, allowed, hook, layer, past))
        resid = hook(ALT.RESID_POST_ATTN.value, layer, resid + delta)
        x = self.ln_2(resid, hook, ALT.MLP_INPUT_LAYER_NORM_SCALE.value, layer)
        delta = hook(ALT.RESID_DELTA_MLP.value, layer, self.mlp(x, hook, layer))
        return hook(ALT.RESID_POST_MLP.value, layer, resid + delta)


class GPT2Model(nn.Module):
    """GPT-2 (pre-LN, learned positions) with a hook at every ``ActivationLocationType``.

    ``state_dict`` keys: ``wte.weight``, ``wpe.weight``, ``h.{i}.ln_1.weight`` …,
    ``ln_f.weight``/``bias`` and, only when embeddings are untied, ``lm_head.weight`` (``V×D``,
    ``nn.Linear`` layout as in HF).
    """

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2's initialisation (normal(0, 0.02), residual projections scaled by depth)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if (
                    name.endswith("ln_1.weight")
                    or name.endswith("ln_2.weight")
                    or name == ("ln_f.weight")
                ):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif name.endswith("c_proj.weight"):
                    p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
                else:
                    p.normal_(0.0, std)

    def block(self, layer: int) -> _Block:
        """Layer ``layer``'s block, typed (``nn.ModuleList`` indexing is not)."""
        block = self.h[layer]
        assert isinstance(block, _Block)
        return block

    def unembedding(self, columns: Sequence[int] | None = None) -> torch.Tensor:
        """``V×D`` output matrix (``wte`` when tied, as in ``GPT2LMHeadModel``); only the rows
        of the vocabulary ids in ``columns`` when given (a logit difference reads two)."""
        matrix = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return matrix if columns is None else matrix[list(columns)]

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hook: HookFn | None = None,
        *,
        unembed: bool = True,
        rows: torch.Tensor | None = None,
        checkpoint: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Logits ``B×T×V`` for token ids ``B×T``.

        ``attention_mask`` (``B×T``, true/1 for real tokens) masks padded *keys*; prompts must
        be right-padded so real tokens keep positions ``0..len-1``.  ``rows`` (``B``) unembeds
        only position ``rows[b]`` of each prompt (``B×1×V``, the ``logits`` hook not called);
        ``checkpoint(block, *args)`` wraps each block call (per-layer recomputation).
        Padded query rows still see at least key 0, so no softmax row is all ``-inf``.
        """
        hook = hook or _identity_hook
        b, t = tokens.shape
        device = tokens.device
        allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril().expand(b, t, t)
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(torch.bool)[:, None, :]
        positions = torch.arange(t, device=device)
        resid = self.wte(tokens) + self.wpe(positions)[None]
        resid = hook(ALT.RESID_POST_EMBEDDING.value, None, resid)
        for i in range(self.config.n_layer):
            if checkpoint is None:
                resid = self.block(i)(resid, allowed, hook, i)
            else:  # low memory: the backward pass recomputes this block
                resid = checkpoint(self.block(i), resid, allowed, hook, i)
        x = self.ln_f(resid, hook, ALT.RESID_FINAL_LAYER_NORM_SCALE.value, None)
        if not unembed:  # nothing downstream needs the logits: skip the largest tensor
            return None
        if rows is not None:  # only position rows[b] of each prompt: B×1×V, not hooked
            picked = x[torch.arange(b, device=device), rows].unsqueeze(1)
            out: torch.Tensor = picked @ self.unembedding().T
            return out
        logits = x @ self.unembedding().T
        return hook(ALT.LOGITS.value, None, logits)

    def resume(
        self,
        resid: torch.Tensor,
        start_layer: int,
        past: Sequence[tuple[torch.Tensor, torch.Tensor]],
        hook: HookFn,
        row: int,
        columns: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits ``B×V`` at suffix position ``row`` (only ``columns`` of them if given),
        running only layers ``start_layer…`` on only the tokens after a prefix whose keys and
        values are known.

        ``resid`` (``B×T'×D``) is the residual entering ``start_layer`` at the last ``T'``
        tokens; ``past[i]`` holds the prefix's keys and values (``P×H×dk``) at layer
        ``start_layer + i``.  Why: a change at layer ``l`` and token ``t`` cannot reach an
        earlier layer or an earlier token, so patching one component needs only this part of
        the forward pass — about a quarter of it, averaged over layers and positions.
        """
        b, t, _ = resid.shape
        p = past[0][0].shape[0] if past else 0
        keys = torch.arange(p + t, device=resid.device)
        allowed = (keys[None, :] <= (p + torch.arange(t, device=resid.device))[:, None]).expand(
            b, t, p + t
        )
        if start_layer == 0:
            resid = hook(ALT.RESID_POST_EMBEDDING.value, None, resid)
        for i in range(start_layer, self.config.n_layer):
            resid = self.block(i)(resid, allowed, hook, i, past[i - start_layer] if p else None)
        x = self.ln_f(resid, hook, ALT.RESID_FINAL_LAYER_NORM_SCALE.value, None)
        out: torch.Tensor = x[:, row] @ self.unembedding(columns).T
        return out
