"""Reconstitution (``scalarlens.Reconstitutable``): one layer recomputed from the residual it reads.

Nothing here knows a family, and every step runs the code a run runs, so reconstituted values
and gradients equal captured ones to the last bit:

* norms — the module itself, or, with ``σ`` detached, the plugin's :func:`._hooks.hooked_norm`
  with a hook that detaches it (what a run that detaches ``σ`` installs);
* attention — the unmodified Hugging Face module (rotary embeddings, q/k norms, grouped-query
  heads and soft-caps stay its business), called with the arguments its decoder layer gave it
  in a real forward (rotary ``cos``/``sin``, the causal or sliding-window mask, recorded once
  per prompt length) and our attention implementation eager at that layer.  Keys and values
  read from their own residuals come from a call on those, stopped once ``attn.v`` is seen;
  the call on the query residual substitutes them at ``attn.k``/``attn.v`` and stops at
  ``attn.v_out``.  When the residuals are one tensor, that one call is all;
* MLP — the module is called and stopped at its down projection, reading ``mlp.pre_act`` (the
  ``mlp_in`` output) and ``mlp.post_act`` (the ``mlp_out`` input) as a run does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import torch
from scalarlens import ActivationLocationType as ALT
from scalarlens import AttentionParts
from scalarlens.exceptions import ModelInputError, UnsupportedModelError

from ._attention import LayerHooks, active
from ._families import Family
from ._hooks import hooked_norm, norm_eps, resolve

__all__ = ["Reconstitution"]

# How many prompt lengths keep their recorded attention arguments (masks are T×T per layer).
_CACHED_LENGTHS = 4


class _Stop(Exception):
    """Raised by a hook that has what it came for: the rest of the module need not run."""


@attrs.frozen
class _AttentionCall:
    """The arguments a decoder layer passes its attention module, less the hidden states."""

    positional: bool  # hidden states passed first positionally (GPT-2, NeoX) or by keyword
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, module: Any, hidden: torch.Tensor) -> None:
        try:
            if self.positional:
                module(hidden, *self.args, **self.kwargs)
            else:
                module(*self.args, hidden_states=hidden, **self.kwargs)
        except _Stop:
            pass


class Reconstitution:
    """The maths behind ``HFAdapter``'s :class:`scalarlens.Reconstitutable` methods.

    Inputs are ``T×D`` residuals (any float dtype: cast to the model's); outputs are in
    ``out_dtype`` (the adapter's accumulation dtype, that of its captures).
    """

    def __init__(self, model: Any, family: Family, *, eps: float, out_dtype: torch.dtype) -> None:
        self.family, self.eps, self.out_dtype = family, eps, out_dtype
        self.base = resolve(model, family.base)
        self.layers = list(resolve(self.base, family.layers))
        self._calls: OrderedDict[tuple[int, str, str], list[_AttentionCall]] = OrderedDict()

    # --- norms ----------------------------------------------------------------------------

    def _layer(self, layer: int) -> Any:
        if not 0 <= layer < len(self.layers):
            raise ModelInputError(f"layer {layer}: the model has layers 0…{len(self.layers) - 1}")
        return self.layers[layer]

    def normed(
        self, resid: torch.Tensor, layer: int, sublayer: str, *, detach_scale: bool
    ) -> torch.Tensor:
        """``T×D``: the pre-attention (``input_norm``) or pre-MLP norm of ``resid``."""
        if sublayer not in ("attn", "mlp"):
            raise ModelInputError(f"sublayer {sublayer!r}: expected 'attn' or 'mlp'")
        if resid.dim() != 2:
            raise ModelInputError(
                f"residual of shape {tuple(resid.shape)}: expected T×D (one prompt, no batch axis)"
            )
        fam = self.family
        module = resolve(
            self._layer(layer), fam.input_norm if sublayer == "attn" else fam.pre_mlp_norm
        )
        x = resid.to(device=module.weight.device, dtype=module.weight.dtype)
        if not detach_scale:  # the module itself, bit for bit what a run without σ hooks does
            normed: torch.Tensor = module(x)
            return normed
        # What a run that detaches σ does: the plugin's norm with the scale as a hook point.
        detach: Callable[[torch.Tensor], torch.Tensor] = lambda s: s.detach()  # noqa: E731
        normed = hooked_norm(fam.norm, module, norm_eps(module, self.eps), detach)(x)
        return normed

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.out_dtype)

    # --- MLP ------------------------------------------------------------------------------

    def mlp(
        self, resid: torch.Tensor, layer: int, *, detach_scale: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp.pre_act, mlp.post_act)``, each ``T×F``, read where a run captures them."""
        x = self.normed(resid, layer, "mlp", detach_scale=detach_scale)
        fam = self.family
        mlp = resolve(self._layer(layer), fam.mlp)
        seen: dict[str, torch.Tensor] = {}

        def pre_act(module: Any, args: Any, output: torch.Tensor) -> None:
            seen["pre"] = output

        def post_act(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            seen["post"] = args[0]
            raise _Stop

        handles = [
            resolve(mlp, fam.mlp_in).register_forward_hook(pre_act),
            resolve(mlp, fam.mlp_out).register_forward_pre_hook(post_act),
        ]
        try:
            mlp(x[None])
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return self.out(seen["pre"][0]), self.out(seen["post"][0])

    # --- attention ------------------------------------------------------------------------

    def attention(
        self,
        resid_q: torch.Tensor,
        resid_k: torch.Tensor,
        resid_v: torch.Tensor,
        layer: int,
        *,
        detach_scale: bool,
    ) -> AttentionParts:
        """Attention at ``layer`` with queries, keys and values read from their own residuals."""
        if not resid_q.shape == resid_k.shape == resid_v.shape:
            raise ModelInputError(
                f"residuals of shapes {tuple(resid_q.shape)}, {tuple(resid_k.shape)} and "
                f"{tuple(resid_v.shape)}: queries, keys and values must read the same T×D "
                "positions (one prompt)"
            )
        module = resolve(self._layer(layer), self.family.attn)
        call = self._attention_call(layer, resid_q.shape[0])

        def run(resid: torch.Tensor, swap: dict[str, torch.Tensor], stop: ALT) -> dict[str, Any]:
            seen: dict[str, torch.Tensor] = {}

            def hook(name: str, at: int | None, x: torch.Tensor) -> torch.Tensor:
                x = swap.get(name, x)
                seen[name] = x
                if name == stop.value:
                    raise _Stop
                return x

            normed = self.normed(resid, layer, "attn", detach_scale=detach_scale)
            token = active.set(LayerHooks(hook, frozenset({layer})))
            try:
                call(module, normed[None])
            finally:
                active.reset(token)
            if stop.value not in seen:
                raise UnsupportedModelError(
                    f"layer {layer}: the {self.family.name} attention module never reached the "
                    f"{stop.value!r} hook, so it cannot be reconstituted; load the model through "
                    "scalarlens (load_model / load_hf_model), which sets the 'scalarlens' "
                    "attention implementation"
                )
            return seen

        swap: dict[str, torch.Tensor] = {}
        key, value = ALT.ATTN_KEY.value, ALT.ATTN_VALUE.value
        if resid_k is not resid_q:
            seen = run(resid_k, {}, ALT.ATTN_VALUE)
            swap[key] = seen[key]
            if resid_v is resid_k:
                swap[value] = seen[value]
        if resid_v is not resid_q and value not in swap:
            swap[value] = run(resid_v, {}, ALT.ATTN_VALUE)[value]
        seen = run(resid_q, swap, ALT.ATTN_WEIGHTED_SUM_OF_VALUES)
        return AttentionParts(
            logits=self.out(seen[ALT.ATTN_QK_LOGITS.value][0]),
            probs=self.out(seen[ALT.ATTN_QK_PROBS.value][0]),
            values=self.out(seen[value][0]),
            mixed=self.out(seen[ALT.ATTN_WEIGHTED_SUM_OF_VALUES.value][0]),
        )

    def _attention_call(self, layer: int, t: int) -> _AttentionCall:
        """Layer ``layer``'s attention arguments for a ``t``-token prompt, from a real forward.

        The base model runs on ``t`` zero embeddings (positions and masks do not depend on the
        tokens) and stops at the last layer's attention; each layer's call is recorded on the way.
        """
        embed = resolve(self.base, self.family.embed)
        cache_key = (t, str(embed.weight.dtype), str(embed.weight.device))
        calls = self._calls.get(cache_key)
        if calls is None:
            calls = self._record_calls(t, embed.weight)
            self._calls[cache_key] = calls
            while len(self._calls) > _CACHED_LENGTHS:
                self._calls.popitem(last=False)
        self._calls.move_to_end(cache_key)
        return calls[layer]

    def _record_calls(self, t: int, like: torch.Tensor) -> list[_AttentionCall]:
        calls: list[_AttentionCall] = []
        last = len(self.layers) - 1

        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                calls.append(_AttentionCall(True, args[1:], dict(kwargs)))
            else:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls.append(_AttentionCall(False, (), rest))
            if len(calls) > last:
                raise _Stop

        modules = [resolve(layer, self.family.attn) for layer in self.layers]
        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
        embeds = torch.zeros(1, t, like.shape[1], dtype=like.dtype, device=like.device)
        mask = torch.ones(1, t, dtype=torch.long, device=like.device)
        token = active.set(None)
        try:
            with torch.no_grad():
                self.base(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            active.reset(token)
            for handle in handles:
                handle.remove()
        if len(calls) != len(self.layers):
            raise UnsupportedModelError(
                f"recorded {len(calls)} of {len(self.layers)} attention calls of the "
                f"{self.family.name} model, so its layers cannot be reconstituted; its decoder "
                "layers must each call their attention module once (report this family)"
            )
        return calls
