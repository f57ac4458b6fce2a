"""Hooking one forward pass of an unmodified Hugging Face model at every ScalarLens location.

``HookedRun`` installs, for the duration of one forward pass, PyTorch forward hooks on the
family's modules and replaces the ``forward`` of its norm modules with :func:`hooked_norm` (the
same maths, with the scale ``σ`` passed through the hook).  Every hook's return value flows
downstream, so interventions and gradient captures work at each location:

* ``resid.post_emb`` — the input of layer 0; ``resid.post_mlp`` — each layer's output;
* ``resid.delta_attn``/``resid.delta_mlp`` — the attention/MLP output (after its post-norm);
* ``resid.post_attn`` — the input of the pre-MLP norm (the same tensor the residual add
  uses, so its gradient is the total one).  An intervention there replaces the norm's input and
  adds the same change to the MLP's write, so the residual stream carries it too.  With a
  parallel residual (NeoX) the MLP does not read it: the layer output is rebuilt as
  ``(x + δa) + δm`` around the hooked ``x + δa``;
* ``mlp.pre_act``/``mlp.up`` — outputs of the gate/up (or fc-in) projections;
  ``mlp.post_act`` — the input of the down projection;
* attention internals — in ``_attention.scalarlens_attention``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from scalarlens import ActivationLocationType as ALT

from ._attention import ATTENTION_INTERNALS, LayerHooks, active
from ._families import Family

__all__ = ["HookedRun", "hooked_norm", "resolve"]

Hook = Callable[[str, "int | None", torch.Tensor], torch.Tensor]


def resolve(root: Any, path: str) -> Any:
    """``root.a.b`` for ``path == "a.b"``."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def norm_output(kind: str, module: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A norm's output from its input and scale ``σ``, with the module's weights and dtypes."""
    if kind == "layernorm":
        centred = x - x.mean(dim=-1, keepdim=True)
        out = centred / scale * module.weight
        return out + module.bias if module.bias is not None else out
    normed = x.float() / scale
    if kind == "rmsnorm_plus_one":  # Gemma: (x/σ)·(1 + w) in float32, then cast
        return (normed * (1.0 + module.weight.float())).type_as(x)
    return module.weight * normed.to(x.dtype)  # Llama: cast first, then scale


def norm_scale(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``σ`` (``…×1``): the standard deviation (LayerNorm) or root mean square (RMSNorm)."""
    if kind == "layernorm":
        var = (x - x.mean(dim=-1, keepdim=True)).pow(2).mean(dim=-1, keepdim=True)
        return torch.sqrt(var + eps)
    return torch.sqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)


def norm_eps(module: Any, default: float) -> float:
    for name in ("eps", "variance_epsilon"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    return default


def hooked_norm(
    kind: str, module: Any, eps: float, scale_hook: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A replacement ``forward`` for a norm module whose scale passes through ``scale_hook``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return norm_output(kind, module, x, scale_hook(norm_scale(kind, x, eps)))

    return forward


class HookedRun:
    """Installs the hooks of one forward pass (a context manager; everything is removed after)."""

    def __init__(
        self,
        model: Any,
        family: Family,
        hook: Hook,
        wanted: Callable[[ALT, int], bool],
        *,
        eps: float,
        parallel: bool,
        checkpoint: Callable[..., Any] | None = None,
    ) -> None:
        self.model, self.family, self.hook, self.eps = model, family, hook, eps
        self.parallel = parallel
        self.checkpoint = checkpoint
        self.wanted = wanted
        self.base = resolve(model, family.base)
        self.layers = list(resolve(self.base, family.layers))
        # Per layer: the change an intervention made at resid.post_attn (added to δm), the
        # layer input and attention write (parallel residual).
        self._post_attn_change: dict[int, torch.Tensor] = {}
        self._layer_input: dict[int, torch.Tensor] = {}
        self._delta_attn: dict[int, torch.Tensor] = {}
        self._delta_mlp: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles: list[Any] = []
        patched: list[Any] = []
        eager = frozenset(
            i
            for i in range(len(self.layers))
            if any(self.wanted(alt, i) for alt in ATTENTION_INTERNALS)
        )
        token = active.set(LayerHooks(self.hook, eager))
        try:
            self._install_model(handles, patched)
            for i, layer in enumerate(self.layers):
                self._install_layer(i, layer, handles, patched)
                if self.checkpoint is not None:
                    self._recompute_in_backward(layer, patched)
            yield
        finally:
            active.reset(token)
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward
            self._post_attn_change.clear()
            self._layer_input.clear()
            self._delta_attn.clear()
            self._delta_mlp.clear()

    # --- installation ---------------------------------------------------------------------

    def _recompute_in_backward(self, layer: Any, patched: list[Any]) -> None:
        """Low memory: the layer's forward runs through the engine's checkpoint, so the
        backward pass recomputes it instead of keeping its intermediates (its own forward hooks
        — layer input and output — stay outside and run once)."""
        checkpoint, forward = self.checkpoint, layer.forward
        assert checkpoint is not None
        layer.forward = lambda *args, **kwargs: checkpoint(forward, *args, **kwargs)
        patched.append(layer)

    def _patch_norm(self, module: Any, patched: list[Any], scale_hook: Callable[..., Any]) -> None:
        eps = norm_eps(module, self.eps)
        module.forward = hooked_norm(self.family.norm, module, eps, scale_hook)
        patched.append(module)

    def _scale(self, alt: ALT, layer: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda scale: self.hook(alt.value, layer, scale)

    def _install_model(self, handles: list[Any], patched: list[Any]) -> None:
        if self.wanted(ALT.RESID_FINAL_LAYER_NORM_SCALE, None):  # captured, detached or edited
            final = resolve(self.base, self.family.final_norm)
            self._patch_norm(final, patched, self._scale(ALT.RESID_FINAL_LAYER_NORM_SCALE, None))

        def embedding_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (self.hook(ALT.RESID_POST_EMBEDDING.value, None, args[0]), *args[1:]), kwargs
            x = self.hook(ALT.RESID_POST_EMBEDDING.value, None, kwargs["hidden_states"])
            return args, {**kwargs, "hidden_states": x}

        handles.append(self.layers[0].register_forward_pre_hook(embedding_hook, with_kwargs=True))

    def _install_layer(self, i: int, layer: Any, handles: list[Any], patched: list[Any]) -> None:
        """Hooks for what this run reads or edits at layer ``i`` only: a location nobody wants
        keeps Hugging Face's own code path (and its speed)."""
        fam, wanted = self.family, self.wanted
        if wanted(ALT.ATTN_INPUT_LAYER_NORM_SCALE, i):
            scale = self._scale(ALT.ATTN_INPUT_LAYER_NORM_SCALE, i)
            self._patch_norm(resolve(layer, fam.input_norm), patched, scale)
        post_attn = wanted(ALT.RESID_POST_ATTN, i)
        self._install_writes(i, layer, handles, patched, post_attn)
        mlp_scale = wanted(ALT.MLP_INPUT_LAYER_NORM_SCALE, i)
        if mlp_scale or (post_attn and not self.parallel):
            self._install_pre_mlp_norm(i, layer, patched, hook_scale=mlp_scale)
        mlp = resolve(layer, fam.mlp)
        if wanted(ALT.MLP_PRE_ACT, i):
            hook = self._output(ALT.MLP_PRE_ACT, i)
            handles.append(resolve(mlp, fam.mlp_in).register_forward_hook(hook))
        if fam.mlp_up is not None and wanted(ALT.MLP_UP, i):
            hook = self._output(ALT.MLP_UP, i)
            handles.append(resolve(mlp, fam.mlp_up).register_forward_hook(hook))
        if wanted(ALT.MLP_POST_ACT, i):
            handles.append(resolve(mlp, fam.mlp_out).register_forward_pre_hook(self._post_act(i)))
        if self.parallel and post_attn:
            handles.append(
                layer.register_forward_pre_hook(self._remember_input(i), with_kwargs=True)
            )
        if wanted(ALT.RESID_POST_MLP, i) or (self.parallel and post_attn):
            handles.append(layer.register_forward_hook(self._layer_output(i)))

    def _install_writes(
        self, i: int, layer: Any, handles: list[Any], patched: list[Any], post_attn: bool
    ) -> None:
        """``resid.delta_attn``/``resid.delta_mlp``: sublayer outputs, through post-norms.

        Also where ``resid.post_attn`` needs them: an edit there is carried into the MLP's
        write, and a parallel block's output is rebuilt from both writes.
        """
        fam, wanted = self.family, self.wanted
        for post_path, module_path, scale_alt, delta_alt, write in (
            (
                fam.attn_post_norm,
                fam.attn,
                ALT.ATTN_POST_NORM_SCALE,
                ALT.RESID_DELTA_ATTN,
                self._attn_write(i),
            ),
            (
                fam.mlp_post_norm,
                fam.mlp,
                ALT.MLP_POST_NORM_SCALE,
                ALT.RESID_DELTA_MLP,
                self._mlp_write(i),
            ),
        ):
            if post_path is not None and wanted(scale_alt, i):
                self._patch_norm(resolve(layer, post_path), patched, self._scale(scale_alt, i))
            if wanted(delta_alt, i) or post_attn:
                target = resolve(layer, module_path if post_path is None else post_path)
                handles.append(target.register_forward_hook(write))

    def _install_pre_mlp_norm(
        self, i: int, layer: Any, patched: list[Any], *, hook_scale: bool
    ) -> None:
        """Hooks ``resid.post_attn`` (the norm's input) and, if ``hook_scale``, the norm's ``σ``.

        Without ``σ`` the module's own forward runs, so capturing ``resid.post_attn`` leaves the
        numbers bit for bit as Hugging Face's (an RMSNorm rounds in float32 even in a float64
        model; ours and theirs differ in the last bit) — which reconstitution relies on.
        """
        module = resolve(layer, self.family.pre_mlp_norm)
        eps = norm_eps(module, self.eps)
        kind, scale_hook = self.family.norm, self._scale(ALT.MLP_INPUT_LAYER_NORM_SCALE, i)
        own_forward = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.parallel:  # its input is resid.post_attn, the residual stream itself
                seen = self.hook(ALT.RESID_POST_ATTN.value, i, x)
                if seen is not x:  # an intervention: carry the change into the residual too
                    self._post_attn_change[i] = seen - x
                x = seen
            if not hook_scale:
                normed: torch.Tensor = own_forward(x)
                return normed
            return norm_output(kind, module, x, scale_hook(norm_scale(kind, x, eps)))

        module.forward = forward
        patched.append(module)

    # --- the hooks themselves ---------------------------------------------------------------

    def _output(self, alt: ALT, i: int) -> Callable[..., torch.Tensor]:
        return lambda module, args, output: self.hook(alt.value, i, output)

    def _post_act(self, i: int) -> Callable[..., tuple[torch.Tensor, ...]]:
        def pre_hook(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (self.hook(ALT.MLP_POST_ACT.value, i, args[0]), *args[1:])

        return pre_hook

    def _attn_write(self, i: int) -> Callable[..., Any]:
        def hook(module: Any, args: Any, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output
            delta = self.hook(ALT.RESID_DELTA_ATTN.value, i, tensor)
            if i in self._layer_input:  # parallel, first forward: _layer_output rebuilds it
                self._delta_attn[i] = delta
            return (delta, *output[1:]) if isinstance(output, tuple) else delta

        return hook

    def _mlp_write(self, i: int) -> Callable[..., torch.Tensor]:
        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            delta = self.hook(ALT.RESID_DELTA_MLP.value, i, output)
            if i in self._layer_input:  # (not when the backward pass recomputes the layer)
                self._delta_mlp[i] = delta
            change = self._post_attn_change.pop(i, None)
            return delta if change is None else delta + change

        return hook

    def _remember_input(self, i: int) -> Callable[..., None]:
        def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._layer_input[i] = args[0] if args else kwargs["hidden_states"]

        return pre_hook

    def _layer_output(self, i: int) -> Callable[..., torch.Tensor]:
        def hook(module: Any, args: Any, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output
            if i in self._layer_input:  # parallel: rebuild (x + δa) + δm around resid.post_attn
                x, delta_attn = self._layer_input.pop(i), self._delta_attn.pop(i)
                post_attn = self.hook(ALT.RESID_POST_ATTN.value, i, x + delta_attn)
                tensor = post_attn + self._delta_mlp.pop(i)
            out = self.hook(ALT.RESID_POST_MLP.value, i, tensor)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook
