"""``HFAdapter``: a ScalarLens ``ModelAdapter`` over an unmodified Hugging Face causal LM.

``scalarlens.models.HookedAdapter`` does everything model-independent (validation, capture
planning, interventions, objectives, padding, the backward pass); this class supplies the
dimensions, the hooked forward pass (:mod:`._hooks`, :mod:`._attention`) and the weights
(:mod:`._weights`), all driven by the family's row in :mod:`._families`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from scalarlens import ActivationLocationType as ALT
from scalarlens import AttentionParts, ModelDims, WeightLocationType
from scalarlens.models import HookedAdapter, HookFn

from ._attention import IMPLEMENTATION, register
from ._families import Family
from ._hooks import HookedRun, hooked_norm, norm_eps, resolve
from ._reconstitute import Reconstitution
from ._weights import read_weight

__all__ = ["HFAdapter", "dims_of"]


def _config_value(config: Any, *keys: str) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    raise AttributeError(f"config has none of {keys}")


def dims_of(family: Family, config: Any) -> ModelDims:
    """``ModelDims`` from a transformers config of ``family``."""
    d = int(_config_value(config, "hidden_size", "n_embd"))
    heads = int(_config_value(config, "num_attention_heads", "n_head"))
    head_dim = getattr(config, "head_dim", None) or d // heads
    return ModelDims(
        n_layers=int(_config_value(config, "num_hidden_layers", "n_layer")),
        d_model=d,
        n_heads=heads,
        d_head=int(head_dim),
        d_mlp=int(
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
        ),
        n_vocab=int(config.vocab_size),
        n_ctx=int(_config_value(config, "max_position_embeddings", "n_positions")),
        norm_eps=family.eps(config),
        norm_kind="layernorm" if family.norm == "layernorm" else "rmsnorm",
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        gated_mlp=family.gated,
        parallel_residual=family.parallel(config),
        post_norms=family.post_norms,
        logit_softcap=family.softcap(config),
    )


class HFAdapter(HookedAdapter):
    """A Hugging Face ``*ForCausalLM`` of a supported family, seen through ScalarLens.

    The model is put in eval mode with frozen parameters and switched to the ``"scalarlens"``
    attention implementation (fused SDPA unless a run reads attention internals).  Supports
    ``memory="low"``: each decoder layer is checkpointed and recomputed in the backward pass.
    Implements :class:`scalarlens.Reconstitutable` (:mod:`._reconstitute`).
    """

    recomputes_layers = True

    def __init__(
        self,
        model: Any,
        family: Family,
        *,
        name: str,
        tokenizer: Any = None,
        source: str | None = None,
    ) -> None:
        register()
        model.eval()
        model.requires_grad_(False)
        model.set_attn_implementation(IMPLEMENTATION)
        self._model, self.family = model, family
        super().__init__(
            name=name, dims=dims_of(family, model.config), tokenizer=tokenizer, source=source
        )
        self._final = resolve(resolve(model, family.base), family.final_norm)
        self._lm_head = resolve(model, family.lm_head)
        self._reconstitution = Reconstitution(
            model, family, eps=self.dims.norm_eps, out_dtype=self.accumulation_dtype
        )

    @property
    def model(self) -> Any:
        """The underlying Hugging Face module (unmodified)."""
        return self._model

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self._lm_head.weight.dtype
        return dtype

    @property
    def device(self) -> torch.device:
        embed = resolve(resolve(self._model, self.family.base), self.family.embed)
        device: torch.device = embed.weight.device
        return device

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.family.name,
            "source": self._source,
            "dtype": str(self.dtype).removeprefix("torch."),
            **self._model.config.to_diff_dict(),
        }

    # --- the forward pass -------------------------------------------------------------------

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.dims.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _session(
        self,
        hook: HookFn,
        wanted: Callable[[ALT, int | None], bool],
        checkpoint: Callable[..., Any] | None,
    ) -> contextlib.AbstractContextManager[None]:
        """Module hooks, norm and attention patches for one run, held through its backward."""
        run = HookedRun(
            self._model,
            self.family,
            hook,
            wanted,
            eps=self.dims.norm_eps,
            parallel=self.dims.parallel_residual,
            checkpoint=checkpoint,
        )
        return run.installed()

    def _forward_model(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        hook: HookFn,
        *,
        unembed: bool,
        wanted: Callable[[ALT, int | None], bool],
        rows: torch.Tensor | None = None,
        checkpoint: Callable[..., Any] | None = None,
    ) -> torch.Tensor | None:
        """The base model's forward (hooks installed by ``_session``), then the head."""
        base = resolve(self._model, self.family.base)
        out = base(input_ids=tokens, attention_mask=attention_mask.long(), use_cache=False)
        if not unembed:
            return None
        hidden = out.last_hidden_state
        if rows is not None:  # the objective reads one position per prompt: unembed that row
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), rows]
            return self._cap(self._lm_head(picked.unsqueeze(1)))
        logits = self._cap(self._lm_head(hidden))
        return hook(ALT.LOGITS.value, None, logits)

    # --- FinalResidualReadout -----------------------------------------------------------------

    def final_norm(self, resid: torch.Tensor, *, detach_scale: bool = False) -> torch.Tensor:
        """The model's final norm of residual vectors ``…×D``, differentiably."""
        detach = (lambda s: s.detach()) if detach_scale else (lambda s: s)
        forward = hooked_norm(
            self.family.norm, self._final, norm_eps(self._final, self.dims.norm_eps), detach
        )
        return forward(resid)

    def logits_from_final_residual(
        self,
        resid: torch.Tensor,
        *,
        detach_ln_scale: bool = False,
        columns: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (soft-capped where the model caps) from the residual entering the final norm;
        only the vocabulary ids in ``columns`` when given (a logit difference reads two)."""
        normed = self.final_norm(resid, detach_scale=detach_ln_scale)
        # Residuals arrive in the accumulation dtype (float32 for a bf16 model).
        if columns is None:
            logits = self._lm_head(normed.to(self.dtype))
        else:
            rows = list(columns)
            bias = self._lm_head.bias
            logits = torch.nn.functional.linear(
                normed.to(self.dtype),
                self._lm_head.weight[rows],
                None if bias is None else bias[rows],
            )
        return self._cap(logits.to(resid.dtype))

    # --- reconstitution (scalarlens.Reconstitutable) -----------------------------------------

    def sublayer_input(
        self, resid: torch.Tensor, layer: int, sublayer: str, *, detach_scale: bool = False
    ) -> torch.Tensor:
        """The pre-attention or pre-MLP norm of ``resid`` (``T×D``), differentiably."""
        rec = self._reconstitution
        return rec.out(rec.normed(resid, layer, sublayer, detach_scale=detach_scale))

    def reconstitute_attention(
        self,
        resid_q: torch.Tensor,
        resid_k: torch.Tensor,
        resid_v: torch.Tensor,
        layer: int,
        *,
        detach_scale: bool = False,
    ) -> AttentionParts:
        """The layer's attention module on the normed residuals (each ``T×D``)."""
        return self._reconstitution.attention(
            resid_q, resid_k, resid_v, layer, detach_scale=detach_scale
        )

    def reconstitute_mlp(
        self, resid: torch.Tensor, layer: int, *, detach_scale: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp.pre_act, mlp.post_act)`` of the layer's MLP module on the normed residual."""
        return self._reconstitution.mlp(resid, layer, detach_scale=detach_scale)

    # --- weights --------------------------------------------------------------------------

    def _read_weight(self, location: WeightLocationType, layer: int | None) -> torch.Tensor:
        return read_weight(self.family, self._model, location, layer, self.dims)
