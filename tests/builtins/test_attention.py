"""Attention family: hand formulas, pairs views, reference §5.2 items 7, 8, 9, 10, 15."""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
import torch
from scalarlens import DstConfig, WeightLocationType
from scalarlens_builtins._shared import flatten_lower_triangle, unflatten_lower_triangle

from ._tiny import BWD, N_LAYERS, TOL, T, derive, max_err, tiny_adapter

W = WeightLocationType
ATTN_DSTS = [
    "attn.v_out_direct_grad",
    "attn.qk_probs",
    "attn.v",
    "attn.v_out",
    "attn.q",
    "attn.k",
    "attn.qk_logits",
    "resid.delta_attn",
    "resid.post_mlp",
    "attn_ln.scale",
    "attn.weighted_value",
    "attn.write",
    "attn.write_norm",
    "attn.write_norm_per_token",
    "attn.act_times_grad",
    "attn.act_times_grad_per_token",
    "attn.write_to_final_residual_grad",
    "attn.write_to_final_residual_grad_per_token",
    "attn.layer_write_norm",
    "attn.layer_write_to_final_residual_grad",
    "attn.qk_probs.pairs",
    "attn.write_norm.pairs",
    "attn.act_times_grad.pairs",
    "attn.write_to_final_residual_grad.pairs",
]
PAIRS = {
    "attn.qk_probs.pairs": "attn.qk_probs",
    "attn.write_norm.pairs": "attn.write_norm",
    "attn.act_times_grad.pairs": "attn.act_times_grad",
    "attn.write_to_final_residual_grad.pairs": "attn.write_to_final_residual_grad",
}
UNFLATTENED = [
    "attn.qk_probs",
    "attn.write_norm",
    "attn.act_times_grad",
    "attn.write_to_final_residual_grad",
    "attn.weighted_value",
    "attn.write",
]


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


@pytest.fixture(scope="module")
def store(adapter: Any) -> scalarlens.DerivedScalarStore:
    return derive(adapter, ATTN_DSTS, config=DstConfig(derive_gradients=True))


def _g(store: scalarlens.DerivedScalarStore) -> torch.Tensor:
    return store.get("resid.post_mlp", N_LAYERS - 1, BWD)


def _head_write(adapter: Any, store: Any, layer: int) -> torch.Tensor:
    """``c[s,h,:] = Vv[s,h] W_O[h]`` by hand."""
    return torch.einsum(
        "shv,hvd->shd", store.get("attn.v", layer), adapter.weight(W.ATTN_TO_RESIDUAL, layer)
    )


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_hand_formulas(adapter: Any, store: Any, layer: int) -> None:
    p, c = store.get("attn.qk_probs", layer), _head_write(adapter, store, layer)
    write = p[..., None] * c[None]
    assert max_err(store.get("attn.write", layer), write) <= TOL
    assert (
        max_err(
            store.get("attn.weighted_value", layer), p[..., None] * store.get("attn.v", layer)[None]
        )
        <= TOL
    )
    assert max_err(store.get("attn.write_norm", layer), write.norm(dim=-1)) <= TOL  # item 8
    grad_p = store.get("attn.qk_probs", layer, BWD)
    assert max_err(store.get("attn.act_times_grad", layer), p * grad_p) <= TOL
    assert max_err(store.get("attn.act_times_grad_per_token", layer), (p * grad_p).sum(1)) <= TOL
    direct = torch.einsum("tshd,td->tsh", write, _g(store))
    assert max_err(store.get("attn.write_to_final_residual_grad", layer), direct) <= TOL
    # the shared sub-DST: g pulled back through W_O, W_O[h] g[t]
    pulled = torch.einsum("hvd,td->thv", adapter.weight(W.ATTN_TO_RESIDUAL, layer), _g(store))
    assert max_err(store.get("attn.v_out_direct_grad", layer), pulled) <= TOL


def test_logits_probs_and_queries(store: Any) -> None:
    """Raw twins agree with each other: softmax of logits, Q·K/sqrt(dk)."""
    q, k = store.get("attn.q", 1), store.get("attn.k", 1)
    logits = torch.einsum("thd,shd->tsh", q, k) / q.shape[-1] ** 0.5
    stored = store.get("attn.qk_logits", 1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert max_err(stored[causal], logits[causal]) <= TOL
    assert torch.isneginf(stored[~causal]).all()
    assert max_err(store.get("attn.qk_probs", 1), torch.softmax(stored, dim=1)) <= TOL
    assert (store.get("attn_ln.scale", 1) > 0).all()


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_write_decomposition_item7(adapter: Any, store: Any, layer: int) -> None:
    b_o = adapter.weight(W.ATTN_BIAS_RESIDUAL, layer)
    delta = store.get("resid.delta_attn", layer)
    assert max_err(store.get("attn.write", layer).sum(dim=(1, 2)) + b_o, delta) <= TOL
    assert (
        max_err(store.get("attn.weighted_value", layer).sum(dim=1), store.get("attn.v_out", layer))
        <= TOL
    )


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_write_norms_item8(store: Any, layer: int) -> None:
    per_token = store.get("attn.write", layer).sum(dim=1).norm(dim=-1)
    assert max_err(store.get("attn.write_norm_per_token", layer), per_token) <= TOL
    delta = store.get("resid.delta_attn", layer)
    assert (
        max_err(store.get("attn.layer_write_norm", layer), delta.norm(dim=-1, keepdim=True)) <= TOL
    )


@pytest.mark.parametrize("layer", range(N_LAYERS))
@pytest.mark.parametrize("pair_name", sorted(PAIRS))
def test_pairs_views_item9(store: Any, layer: int, pair_name: str) -> None:
    base = store.get(PAIRS[pair_name], layer)
    flat = store.get(pair_name, layer)
    assert flat.shape[0] == T * (T + 1) // 2
    assert max_err(flat, flatten_lower_triangle(base)) <= 0.0
    assert max_err(unflatten_lower_triangle(flat, T), base) <= 0.0  # causal ⇒ round trip
    for t in range(T):  # flat index t(t+1)/2 + s
        for s in range(t + 1):
            assert torch.equal(flat[t * (t + 1) // 2 + s], base[t, s])


def test_pairs_gradient_is_flattened_gradient(store: Any) -> None:
    assert torch.equal(
        store.get("attn.qk_probs.pairs", 2, BWD),
        flatten_lower_triangle(store.get("attn.qk_probs", 2, BWD)),
    )


@pytest.mark.parametrize("layer", range(N_LAYERS))
@pytest.mark.parametrize("name", UNFLATTENED)
def test_unflattened_upper_triangle_is_zero_item9(store: Any, layer: int, name: str) -> None:
    upper = ~torch.ones(T, T, dtype=torch.bool).tril()
    assert (store.get(name, layer)[upper] == 0).all()


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_per_layer_linearity_item10(adapter: Any, store: Any, layer: int) -> None:
    g = _g(store)
    b_o = adapter.weight(W.ATTN_BIAS_RESIDUAL, layer)
    pairs = store.get("attn.write_to_final_residual_grad", layer)
    total = store.get("attn.layer_write_to_final_residual_grad", layer)
    assert max_err(pairs.sum(dim=(1, 2)).unsqueeze(-1) + (g @ b_o).unsqueeze(-1), total) <= TOL
    assert (
        max_err(pairs.sum(dim=1), store.get("attn.write_to_final_residual_grad_per_token", layer))
        <= TOL
    )
    assert total.abs().max() > 1e-3


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_act_times_grad_sum_item15(adapter: Any, store: Any, layer: int) -> None:
    b_o = adapter.weight(W.ATTN_BIAS_RESIDUAL, layer)
    o, grad_o = store.get("attn.v_out", layer), store.get("attn.v_out", layer, BWD)
    lhs = store.get("attn.act_times_grad", layer).sum(dim=(1, 2))
    assert max_err(lhs, (o * grad_o).sum(dim=(1, 2))) <= TOL
    delta, grad_delta = (
        store.get("resid.delta_attn", layer),
        store.get("resid.delta_attn", layer, BWD),
    )
    assert max_err(lhs, ((delta - b_o) * grad_delta).sum(-1)) <= TOL
    assert lhs.abs().max() > 1e-4
