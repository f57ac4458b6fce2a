"""Reconstitution: a layer's activations recomputed as a function of the residual stream it reads.

Why: edge attributions, node "read" vectors and local gradients need ``∂activation/∂residual``
at one layer, with control over what is held fixed — the norm's scale ``σ`` (detached, so the
norm is a fixed linear map), and which of attention's query, key or value inputs stays attached.
A full backward pass through the model cannot give that; recomputing the layer from the
residual can.  The model owns the maths (rotary embeddings, grouped-query attention, q/k norms,
soft-caps, gated MLPs are its business), so it is an adapter capability, :class:`Reconstitutable`;
this module adds the model-independent services on top: local gradients, Jacobian-vector
products, and the choice of the attention path.

Conventions, per prompt (no batch axis): residuals are ``T×D``; attention parts are in the
capture layouts (``attn.qk_logits``/``attn.qk_probs`` ``T×S×H``, ``attn.v`` ``S×H×dv`` per query
head, ``attn.v_out`` ``T×H×dv``); MLP parts are ``T×F`` (``mlp.pre_act``, ``mlp.post_act``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import attrs

from ._vocab import ActivationLocationType as ALT

if TYPE_CHECKING:
    import torch

    from ._model import ModelDims

__all__ = [
    "AttentionParts",
    "AttentionPath",
    "Reconstitutable",
    "Sublayer",
    "attention_on_path",
    "reconstitute_gradient",
    "reconstitute_jvp",
    "residual_read_by",
]

Sublayer = Literal["attn", "mlp"]
AttentionPath = Literal["q", "k", "v"]


@attrs.frozen
class AttentionParts:
    """One layer's attention, recomputed: every tensor is differentiable in the residuals given.

    ``logits`` and ``probs`` are ``T×S×H`` (``−inf``/0 where a query may not attend),
    ``values`` is ``S×H×dv`` (per *query* head: grouped heads repeat their group's values),
    ``mixed`` is ``T×H×dv`` (``Σ_s probs·values``, the ``attn.v_out`` location).
    """

    logits: torch.Tensor = attrs.field(eq=False)
    probs: torch.Tensor = attrs.field(eq=False)
    values: torch.Tensor = attrs.field(eq=False)
    mixed: torch.Tensor = attrs.field(eq=False)


@runtime_checkable
class Reconstitutable(Protocol):
    """Optional adapter capability: recompute one layer's activations from a residual stream.

    Each method is differentiable in its residual arguments, for one prompt (``T×D``, tokens at
    positions ``0…T−1``), and must reproduce the captured activations of an ordinary run.
    ``detach_scale=True`` detaches the pre-sublayer norm's scale ``σ``, so the norm is a fixed
    affine map (the setting edge attributions and attribution graphs use).  Which residual each
    sublayer reads is :func:`residual_read_by`.
    """

    def sublayer_input(
        self, resid: torch.Tensor, layer: int, sublayer: Sublayer, *, detach_scale: bool = False
    ) -> torch.Tensor:
        """The normalised ``T×D`` input that ``sublayer`` (``"attn"`` or ``"mlp"``) reads."""
        ...

    def reconstitute_attention(
        self,
        resid_q: torch.Tensor,
        resid_k: torch.Tensor,
        resid_v: torch.Tensor,
        layer: int,
        *,
        detach_scale: bool = False,
    ) -> AttentionParts:
        """Attention at ``layer`` with queries, keys and values read from separate residuals.

        Passing the same tensor three times is the ordinary forward; passing detached copies for
        two of them leaves only one path attached (see :func:`attention_on_path`).
        """
        ...

    def reconstitute_mlp(
        self, resid: torch.Tensor, layer: int, *, detach_scale: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp.pre_act, mlp.post_act)``, each ``T×F``, from the residual the MLP reads.

        For a gated MLP, ``pre_act`` is the gate's pre-activation and ``post_act`` is
        ``act(gate)·up``, as captured.
        """
        ...


def residual_read_by(dims: ModelDims, sublayer: Sublayer, layer: int) -> tuple[ALT, int | None]:
    """The captured residual location (and its layer) that ``sublayer`` at ``layer`` reads.

    Attention reads the residual entering the layer; the MLP reads it after attention, except
    in a parallel-residual block (GPT-NeoX, Pythia), where it reads the layer's input too.
    """
    if sublayer == "mlp" and not dims.parallel_residual:
        return ALT.RESID_POST_ATTN, layer
    if layer == 0:
        return ALT.RESID_POST_EMBEDDING, None
    return ALT.RESID_POST_MLP, layer - 1


def attention_on_path(
    model: Reconstitutable,
    resid: torch.Tensor,
    layer: int,
    path: AttentionPath | None,
    *,
    detach_scale: bool = False,
) -> AttentionParts:
    """Attention at ``layer`` from ``resid`` with only the ``path`` input attached.

    ``path=None`` keeps all three attached (the ordinary forward).  Why a path: a head's query,
    key and value inputs read the same residual but play different roles; a key-path gradient
    answers "which earlier writes made this head attend where it did", a value-path one "what
    did it move".
    """
    if path is None:
        return model.reconstitute_attention(resid, resid, resid, layer, detach_scale=detach_scale)
    fixed = resid.detach()
    q, k, v = (resid if path == p else fixed for p in ("q", "k", "v"))
    return model.reconstitute_attention(q, k, v, layer, detach_scale=detach_scale)


def reconstitute_gradient(
    fn: Callable[[torch.Tensor], torch.Tensor],
    resid: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``∂ reduce(fn(r)) / ∂r`` at ``r = resid`` (``T×D``), through the recomputation only.

    ``reduce`` turns ``fn``'s output into a scalar (default: its sum).  The residual is
    detached first, so nothing upstream of it receives a gradient and the caller's graph is
    untouched.
    """
    import torch

    r = resid.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(r)
        scalar = out.sum() if reduce is None else reduce(out)
        (grad,) = torch.autograd.grad(scalar, r)
    return grad


def reconstitute_jvp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    resid: torch.Tensor,
    direction: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(resid), J_fn(resid)·direction)`` by forward-mode differentiation (``torch.func``).

    One call gives the first-order change of *every* output of ``fn`` along one residual write,
    e.g. what one upstream node's write does to all downstream neurons of a layer.
    """
    from torch.func import jvp

    out, tangent = jvp(fn, (resid.detach(),), (direction.to(resid.dtype),))[:2]
    return out, tangent
