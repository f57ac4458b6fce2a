"""The attention core as a Hugging Face attention implementation named ``"scalarlens"``.

Hugging Face attention modules project, apply rotary embeddings and q/k norms, then call the
implementation registered under ``config._attn_implementation`` with post-rotary ``q``
(``B×H×T×dk``), ``k``/``v`` (``B×KV×S×d``), the mask and the scale.  Ours computes exactly what
HF's eager implementation computes — ``softmax(q·kᵀ·scale [soft-capped] + mask)·v`` with the
softmax in float32 — but in ScalarLens's layouts and with a hook at each of ``attn.q``,
``attn.k``, ``attn.v`` (per query head: each reads its key/value group's vectors),
``attn.qk_logits`` (``−inf`` where masked), ``attn.qk_probs`` and ``attn.v_out``.

Outside a ScalarLens run, or at a layer where nothing reads q, k, v, the logits or the
probabilities, it defers to PyTorch's fused scaled-dot-product attention (still hooking
``attn.v_out``, its output), which is what makes a plain forward or a DLA run as fast as
Hugging Face's default.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import torch
from scalarlens import ActivationLocationType as ALT

__all__ = ["IMPLEMENTATION", "ATTENTION_INTERNALS", "LayerHooks", "active", "register"]

IMPLEMENTATION = "scalarlens"
# What only the eager path exposes; attn.v_out (the mixed values) is the fused kernel's output.
ATTENTION_INTERNALS = (
    ALT.ATTN_QUERY,
    ALT.ATTN_KEY,
    ALT.ATTN_VALUE,
    ALT.ATTN_QK_LOGITS,
    ALT.ATTN_QK_PROBS,
)

Hook = Callable[[str, "int | None", torch.Tensor], torch.Tensor]


class LayerHooks:
    """What the attention function needs from the running adapter: the hook, and which layers
    have a capture or intervention on an attention internal (the others use fused SDPA)."""

    def __init__(self, hook: Hook, eager_layers: frozenset[int]) -> None:
        self.hook = hook
        self.eager_layers = eager_layers


active: contextvars.ContextVar[LayerHooks | None] = contextvars.ContextVar(
    "scalarlens_attention_hooks", default=None
)


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``B×KV×S×d`` → ``B×H×S×d``: query head ``h`` reads key/value head ``h // groups``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _allowed(mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor:
    """``B|1 × T × S`` booleans, true where a query may attend (causal when HF passes none).

    A padding query row with no allowed key (right padding beyond a sliding window) may see
    key 0: otherwise its softmax is NaN, and ``0·NaN`` would leak into real tokens' mixes.
    """
    if mask is None:
        return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None]
    if mask.dtype is not torch.bool:  # an additive float mask: 0 where allowed
        mask = mask == 0
    allowed = mask[:, 0]
    empty = ~allowed.any(dim=-1)
    if bool(empty.any()):
        allowed = allowed.clone()
        allowed[..., 0] |= empty
    return allowed


def scalarlens_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention-interface signature; returns ``B×T×H×dv`` and no weights."""
    hooks, layer = active.get(), getattr(module, "layer_idx", None)
    groups = query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    t, s = query.shape[2], key.shape[2]
    allowed = _allowed(attention_mask, t, s, query.device)
    if hooks is None:
        return _fused(query, key, value, allowed, scale, softcap, groups), None
    if layer not in hooks.eager_layers:  # nobody reads q, k, v, logits or probs here
        mixed = _fused(query, key, value, allowed, scale, softcap, groups)
        return hooks.hook(ALT.ATTN_WEIGHTED_SUM_OF_VALUES.value, layer, mixed), None
    return _eager(hooks.hook, layer, query, key, value, allowed, scale, softcap, groups), None


def _eager(
    hook: Hook,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None,
    groups: int,
) -> torch.Tensor:
    """HF's eager maths in its own ``B×H×T×S`` layout (matmuls, softmax over the last axis);
    each hook sees a permuted *view* in ScalarLens's layout, and what it returns flows on."""
    q = hook(ALT.ATTN_QUERY.value, layer, query.transpose(1, 2)).transpose(1, 2)
    k = hook(ALT.ATTN_KEY.value, layer, _repeat_heads(key, groups).transpose(1, 2))
    v = hook(ALT.ATTN_VALUE.value, layer, _repeat_heads(value, groups).transpose(1, 2))
    logits = (q @ k.permute(0, 2, 3, 1)) * scale  # B×H×T×S
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    logits = hook(ALT.ATTN_QK_LOGITS.value, layer, logits.permute(0, 2, 3, 1))
    probs = torch.softmax(logits.permute(0, 3, 1, 2), dim=-1, dtype=torch.float32).to(q.dtype)
    probs = hook(ALT.ATTN_QK_PROBS.value, layer, probs.permute(0, 2, 3, 1))
    mixed = probs.permute(0, 3, 1, 2) @ v.transpose(1, 2)  # B×H×T×dv
    return hook(ALT.ATTN_WEIGHTED_SUM_OF_VALUES.value, layer, mixed.transpose(1, 2))


def _fused(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None,
    groups: int,
) -> torch.Tensor:
    """The same attention without hooks: fused SDPA, or plain maths where it soft-caps."""
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    mask = allowed.unsqueeze(1)
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale
        )
    else:
        logits = torch.tanh(query @ key.transpose(2, 3) * scale / softcap) * softcap
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        out = probs @ value
    return out.transpose(1, 2).contiguous()


def _boolean_mask(*args: Any, **kwargs: Any) -> Any:
    """HF's SDPA mask builder, always materialised (never "skip: use is_causal")."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> None:
    """Register the implementation and its mask builder with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, scalarlens_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _boolean_mask)
    _registered = True
