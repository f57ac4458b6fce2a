"""Residual family: item 5 bookkeeping, norms, projections, and item 11 (global decomposition)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scalarlens import DstConfig, WeightLocationType

from ._tiny import (
    BWD,
    DISTRACTOR,
    N_LAYERS,
    TARGET,
    TOKENS,
    TOL,
    derive,
    max_err,
    tiny_adapter,
)

W = WeightLocationType
RESID_DSTS = [
    "resid.post_emb",
    "resid.post_attn",
    "resid.post_mlp",
    "resid.delta_attn",
    "resid.delta_mlp",
    "resid.prev_layer_post_mlp",
    "resid.post_emb.norm",
    "resid.post_attn.norm",
    "resid.post_mlp.norm",
    "resid.post_emb.proj_to_final_residual_grad",
    "resid.post_attn.proj_to_final_residual_grad",
    "resid.post_mlp.proj_to_final_residual_grad",
    "attn.layer_write_to_final_residual_grad",
    "mlp.layer_write_to_final_residual_grad",
    "resid.ln_f.scale",
    "logits",
]


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


@pytest.fixture(scope="module")
def store(adapter: Any) -> Any:
    return derive(adapter, RESID_DSTS, config=DstConfig(derive_gradients=True))


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_bookkeeping_item5(store: Any, layer: int) -> None:
    prev = store.get("resid.prev_layer_post_mlp", layer)
    post_attn = store.get("resid.post_attn", layer)
    assert max_err(post_attn, prev + store.get("resid.delta_attn", layer)) <= TOL
    assert (
        max_err(store.get("resid.post_mlp", layer), post_attn + store.get("resid.delta_mlp", layer))
        <= TOL
    )
    if layer == 0:
        assert torch.equal(prev, store.get("resid.post_emb"))
    else:
        assert torch.equal(prev, store.get("resid.post_mlp", layer - 1))


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_previous_layer_backward_is_gradient_of_stream(store: Any, layer: int) -> None:
    grad = store.get("resid.prev_layer_post_mlp", layer, BWD)
    expected = (
        store.get("resid.post_emb", None, BWD)
        if layer == 0
        else store.get("resid.post_mlp", layer - 1, BWD)
    )
    assert torch.equal(grad, expected)
    assert grad.abs().max() > 0


def test_norms(store: Any) -> None:
    emb = store.get("resid.post_emb")
    assert max_err(store.get("resid.post_emb.norm"), emb.norm(dim=-1, keepdim=True)) <= TOL
    for layer in range(N_LAYERS):
        for name in ("resid.post_attn", "resid.post_mlp"):
            x = store.get(name, layer)
            assert max_err(store.get(f"{name}.norm", layer), x.norm(dim=-1, keepdim=True)) <= TOL


def test_projections_and_causal_zeroing(store: Any) -> None:
    g = store.get("resid.post_mlp", N_LAYERS - 1, BWD)
    emb_proj = (store.get("resid.post_emb") * g).sum(-1, keepdim=True)
    assert max_err(store.get("resid.post_emb.proj_to_final_residual_grad"), emb_proj) <= TOL
    for layer in range(N_LAYERS):
        xa = (store.get("resid.post_attn", layer) * g).sum(-1, keepdim=True)
        assert max_err(store.get("resid.post_attn.proj_to_final_residual_grad", layer), xa) <= TOL
        xm = store.get("resid.post_mlp.proj_to_final_residual_grad", layer)
        if layer == N_LAYERS - 1:  # at g's own location: strictly-before rule gives 0
            assert (xm == 0).all()
        else:
            expected = (store.get("resid.post_mlp", layer) * g).sum(-1, keepdim=True)
            assert max_err(xm, expected) <= TOL


def _global_sum(store: Any) -> float:
    """embedding projection + Σ_l (attention + MLP layer writes)·g, summed over tokens."""
    total = store.get("resid.post_emb.proj_to_final_residual_grad").sum()
    for layer in range(N_LAYERS):
        total = total + store.get("attn.layer_write_to_final_residual_grad", layer).sum()
        total = total + store.get("mlp.layer_write_to_final_residual_grad", layer).sum()
    return float(total)


def _j_minus_ln_bias(adapter: Any, store: Any) -> float:
    unembed = adapter.weight(W.UNEMBEDDING)
    d = unembed[:, TARGET] - unembed[:, DISTRACTOR]
    j = store.metadata["objective_values"][0]
    return float(j - d @ adapter.weight(W.LAYER_NORM_BIAS_FINAL))


def test_global_decomposition_detached_item11(adapter: Any) -> None:
    """Final-LN scale detached: Σ direct effects + embedding = J − d·β_f exactly."""
    store = derive(
        adapter, RESID_DSTS, config=DstConfig(detach_final_ln_scale=True, derive_gradients=True)
    )
    xm_proj = float(
        (
            store.get("resid.post_mlp", N_LAYERS - 1)
            * store.get("resid.post_mlp", N_LAYERS - 1, BWD)
        ).sum()
    )
    total = _global_sum(store)
    assert abs(total - xm_proj) <= TOL
    expected = _j_minus_ln_bias(adapter, store)
    assert abs(expected) > 1e-2
    assert abs(total - expected) <= TOL


def test_global_decomposition_not_detached_item11(adapter: Any) -> None:
    """Not detached: LN scale invariance gives (J − d·β_f)·ε/(var+ε)."""
    store = derive(adapter, RESID_DSTS, config=DstConfig(derive_gradients=True))
    eps = 1e-5
    sigma = float(store.get("resid.ln_f.scale")[len(TOKENS) - 1, 0])
    var = sigma**2 - eps
    expected = _j_minus_ln_bias(adapter, store) * eps / (var + eps)
    assert expected != 0.0
    # The right side is tiny (~1e-6 here), so an absolute 1e-6 would also accept 0: compare
    # relatively instead.
    assert abs(_global_sum(store) - expected) <= 1e-6 * abs(expected)


def test_logits_raw_twin(adapter: Any, store: Any) -> None:
    """LN_f(xm)·U from the captured residual and σ equals the logits twin."""
    xm = store.get("resid.post_mlp", N_LAYERS - 1)
    centred = xm - xm.mean(-1, keepdim=True)
    ln = centred / store.get("resid.ln_f.scale") * adapter.weight(W.LAYER_NORM_GAIN_FINAL)
    ln = ln + adapter.weight(W.LAYER_NORM_BIAS_FINAL)
    assert max_err(store.get("logits"), ln @ adapter.weight(W.UNEMBEDDING)) <= TOL
