"""The oracle every :class:`Reconstitutable` adapter must pass (``scalarlens.testing``).

Two claims, checked against the adapter's own ordinary run rather than against a second
implementation: reconstituted activations equal the captured ones, and a gradient taken
through reconstitution equals the real backward pass with the same stop-gradients (applied in
the real run as interventions that detach the norm scale or the other attention inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._model import CaptureRequest, Intervention, NodeObjective
from ._reconstitute import (
    AttentionPath,
    Reconstitutable,
    Sublayer,
    attention_on_path,
    reconstitute_gradient,
    residual_read_by,
)
from ._vocab import ActivationLocationType as ALT
from ._vocab import PassType

__all__ = ["check_reconstitution"]

FWD, BWD = PassType.FORWARD, PassType.BACKWARD
_ATTN = (ALT.ATTN_QK_LOGITS, ALT.ATTN_QK_PROBS, ALT.ATTN_VALUE, ALT.ATTN_WEIGHTED_SUM_OF_VALUES)
_MLP = (ALT.MLP_PRE_ACT, ALT.MLP_POST_ACT)
_OTHER_PATHS: dict[str, tuple[ALT, ...]] = {
    "q": (ALT.ATTN_KEY, ALT.ATTN_VALUE),
    "k": (ALT.ATTN_QUERY, ALT.ATTN_VALUE),
    "v": (ALT.ATTN_QUERY, ALT.ATTN_KEY),
}


def _detach(value: torch.Tensor, layer: Any) -> torch.Tensor:
    return value.detach()


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, captured {tuple(want.shape)}")
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        raise AssertionError(f"{name}: masked (−inf) entries differ from the captured ones")
    err = (got[finite] - want[finite]).abs().max().item() if bool(finite.any()) else 0.0
    scale = max(1.0, want[finite].abs().max().item() if bool(finite.any()) else 1.0)
    if err > atol * scale:
        raise AssertionError(f"{name}: max |reconstituted − captured| = {err:.3g} > {atol:g}")


def _reading(model: Any, layer: int, sublayer: Sublayer, run: Any) -> torch.Tensor:
    location, at = residual_read_by(model.dims, sublayer, layer)
    captured: torch.Tensor = run.captured[(location, FWD)][at]
    return captured


def check_reconstitution(
    adapter: Any,
    tokens: Sequence[int],
    *,
    atol: float = 1e-9,
    layers: Sequence[int] | None = None,
) -> None:
    """Raise ``AssertionError`` unless ``adapter`` reconstitutes its own run (use float64).

    For each layer: attention logits, probabilities, values and mixed values, and MLP pre- and
    post-activations recomputed from the captured residual equal the captured tensors; the
    gradient of one MLP neuron and of one attention probability (all paths, and each of the Q,
    K and V paths alone, with and without the norm scale detached) with respect to the residual
    the sublayer reads equals the real backward pass run with matching detach interventions.
    """
    model: Any = adapter
    if not isinstance(model, Reconstitutable):
        raise AssertionError(f"{type(adapter).__name__} does not implement Reconstitutable")
    dims = adapter.dims
    layers = list(range(dims.n_layers)) if layers is None else list(layers)
    t_last = len(tokens) - 1
    every = list(range(dims.n_layers))
    captures = [CaptureRequest(loc, FWD, layers) for loc in (*_ATTN, *_MLP)]
    captures += [
        CaptureRequest(ALT.RESID_POST_EMBEDDING, FWD),
        CaptureRequest(ALT.RESID_POST_ATTN, FWD, every),
        CaptureRequest(ALT.RESID_POST_MLP, FWD, every),
    ]
    (run,) = adapter.run([list(tokens)], captures, return_logits=False)
    for layer in layers:
        resid = _reading(adapter, layer, "attn", run)
        parts = adapter.reconstitute_attention(resid, resid, resid, layer)
        got = {
            ALT.ATTN_QK_LOGITS: parts.logits,
            ALT.ATTN_QK_PROBS: parts.probs,
            ALT.ATTN_VALUE: parts.values,
            ALT.ATTN_WEIGHTED_SUM_OF_VALUES: parts.mixed,
        }
        for loc, value in got.items():
            _close(f"layer {layer} {loc.value}", value, run.captured[(loc, FWD)][layer], atol)
        pre, post = adapter.reconstitute_mlp(_reading(adapter, layer, "mlp", run), layer)
        _close(f"layer {layer} mlp.pre_act", pre, run.captured[(ALT.MLP_PRE_ACT, FWD)][layer], atol)
        _close(
            f"layer {layer} mlp.post_act", post, run.captured[(ALT.MLP_POST_ACT, FWD)][layer], atol
        )
        for detach in (False, True):
            _check_mlp_gradient(adapter, tokens, layer, (t_last, layer % dims.d_mlp), detach, atol)
            for path in (None, "q", "k", "v"):
                _check_attention_gradient(adapter, tokens, layer, t_last, path, detach, atol)


def _captured_residual(
    adapter: Any, tokens: Sequence[int], reading: tuple[ALT, int | None]
) -> torch.Tensor:
    """The residual from a run that captures only it, not the one above: capturing attention
    internals switches a Hugging Face layer from fused to eager attention (a float32 softmax),
    so that run's residuals differ in the last bits from those of the gradient runs."""
    location, at = reading
    capture = CaptureRequest(location, FWD, None if at is None else [at])
    (run,) = adapter.run([list(tokens)], [capture], return_logits=False)
    resid: torch.Tensor = run.captured[(location, FWD)][at]
    return resid


def _real_gradient(
    adapter: Any,
    tokens: Sequence[int],
    objective: NodeObjective,
    reading: tuple[ALT, int | None],
    detached: Sequence[ALT],
    layer: int,
) -> torch.Tensor:
    location, at = reading
    interventions = [
        Intervention(loc, _detach, [layer], name=f"detach {loc.value}") for loc in detached
    ]
    capture = CaptureRequest(location, BWD, None if at is None else [at])
    (run,) = adapter.run(
        [list(tokens)], [capture], objective, interventions=interventions, return_logits=False
    )
    grad: torch.Tensor = run.captured[(location, BWD)][at]
    return grad


def _check_mlp_gradient(
    adapter: Any,
    tokens: Sequence[int],
    layer: int,
    index: tuple[int, int],
    detach: bool,
    atol: float,
) -> None:
    model: Reconstitutable = adapter
    reading = residual_read_by(adapter.dims, "mlp", layer)
    resid = _captured_residual(adapter, tokens, reading)
    t, n = index
    got = reconstitute_gradient(
        lambda r: model.reconstitute_mlp(r, layer, detach_scale=detach)[1][t, n], resid
    )
    detached = [ALT.MLP_INPUT_LAYER_NORM_SCALE] if detach else []
    want = _real_gradient(
        adapter, tokens, NodeObjective(ALT.MLP_POST_ACT, layer, index), reading, detached, layer
    )
    _close(f"layer {layer} ∂mlp.post_act{index}/∂residual (detach σ: {detach})", got, want, atol)


def _check_attention_gradient(
    adapter: Any,
    tokens: Sequence[int],
    layer: int,
    t: int,
    path: AttentionPath | None,
    detach: bool,
    atol: float,
) -> None:
    model: Reconstitutable = adapter
    reading = residual_read_by(adapter.dims, "attn", layer)
    resid = _captured_residual(adapter, tokens, reading)
    head = layer % adapter.dims.n_heads
    if path == "v":  # probabilities do not depend on values: read a mixed value instead
        location, index = ALT.ATTN_WEIGHTED_SUM_OF_VALUES, (t, head, 0)

        def pick(r: torch.Tensor) -> torch.Tensor:
            return attention_on_path(model, r, layer, path, detach_scale=detach).mixed[t, head, 0]
    else:
        # The token's weight on itself: a key no causal or sliding-window mask ever hides.
        location, index = ALT.ATTN_QK_PROBS, (t, t, head)

        def pick(r: torch.Tensor) -> torch.Tensor:
            return attention_on_path(model, r, layer, path, detach_scale=detach).probs[t, t, head]

    got = reconstitute_gradient(pick, resid)
    detached = list(_OTHER_PATHS[path]) if path else []
    if detach:
        detached.append(ALT.ATTN_INPUT_LAYER_NORM_SCALE)
    want = _real_gradient(
        adapter, tokens, NodeObjective(location, layer, index), reading, detached, layer
    )
    what = f"layer {layer} ∂{location.value}{index}/∂residual, path {path or 'q+k+v'}"
    _close(f"{what}, detach σ: {detach}", got, want, atol)
