"""Trace upstream (reference §5.2 item 12): a NodeObjective plus the matching direction option.

Every direct effect and act×grad of a node that does not strictly precede the traced node is
exactly 0; tracing a layer-0 head leaves only embedding quantities non-zero.
"""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
import torch
from scalarlens import ConfigError, DstConfig

from ._tiny import ALT, N_LAYERS, TOL, T, derive, max_err, tiny_adapter

DIRECT = [
    "mlp.write_to_final_residual_grad",
    "mlp.layer_write_to_final_residual_grad",
    "attn.write_to_final_residual_grad",
    "attn.write_to_final_residual_grad_per_token",
    "attn.layer_write_to_final_residual_grad",
    "resid.post_attn.proj_to_final_residual_grad",
    "resid.post_mlp.proj_to_final_residual_grad",
]
ACT_GRAD = ["mlp.act_times_grad", "attn.act_times_grad", "attn.act_times_grad_per_token"]
EMBEDDING = ["resid.post_emb.proj_to_final_residual_grad", "token.attribution"]


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


def _trace(adapter: Any, location: Any, layer: int, index: tuple[int, ...]) -> Any:
    objective = scalarlens.NodeObjective(location, layer, index)
    config = DstConfig(direction=scalarlens.Direction.trace_upstream(location, layer))
    return derive(
        adapter,
        [*DIRECT, *ACT_GRAD, *EMBEDDING, "resid.post_attn"],
        objective=objective,
        config=config,
    )


def test_trace_mlp_neuron(adapter: Any) -> None:
    lam, neuron = 1, 5
    store = _trace(adapter, ALT.MLP_POST_ACT, lam, (T - 1, neuron))
    for layer in range(N_LAYERS):
        for name in [*DIRECT, *ACT_GRAD]:
            value = store.get(name, layer)
            # strictly before g = ∇xa_λ: earlier layers, and layer λ's attention
            if layer < lam or (layer == lam and name.startswith("attn.")):
                assert value.abs().max() > 0, (name, layer)
            elif not (layer == lam and name == "mlp.act_times_grad"):
                assert (value == 0).all(), (name, layer)
    # act×grad of the traced layer: only the traced neuron itself (∇a = one-hot) is non-zero
    same = store.get("mlp.act_times_grad", lam)
    mask = torch.zeros_like(same, dtype=torch.bool)
    mask[T - 1, neuron] = True
    assert (same[~mask] == 0).all()
    # decomposition onto g = ∇xa_λ still closes: x_emb·g + Σ_{l<λ}(δa+δm)·g + δa_λ·g = xa_λ·g
    total = store.get("resid.post_emb.proj_to_final_residual_grad").sum()
    for layer in range(lam + 1):
        total = total + store.get("attn.layer_write_to_final_residual_grad", layer).sum()
        total = total + store.get("mlp.layer_write_to_final_residual_grad", layer).sum()
    g_store = derive(
        adapter,
        ["resid.post_attn"],
        objective=scalarlens.NodeObjective(ALT.MLP_POST_ACT, lam, (T - 1, neuron)),
        config=DstConfig(derive_gradients=True),
    )
    g = g_store.get("resid.post_attn", lam, scalarlens.PassType.BACKWARD)
    expected = float((store.get("resid.post_attn", lam) * g).sum())
    assert abs(float(total) - expected) <= TOL


def test_trace_layer0_head_leaves_only_embedding(adapter: Any) -> None:
    store = _trace(adapter, ALT.ATTN_QK_PROBS, 0, (T - 1, 2, 1))
    for layer in range(N_LAYERS):
        for name in DIRECT:
            assert (store.get(name, layer) == 0).all(), (name, layer)
        for name in ["mlp.act_times_grad"]:
            assert (store.get(name, layer) == 0).all(), (name, layer)
        if layer > 0:
            for name in ACT_GRAD:
                assert (store.get(name, layer) == 0).all(), (name, layer)
    for name in EMBEDDING:
        assert store.get(name).abs().max() > 0
    assert (
        max_err(
            store.get("resid.post_emb.proj_to_final_residual_grad"), store.get("token.attribution")
        )
        <= TOL
    )


def test_default_direction_zeroes_nothing_upstream(adapter: Any) -> None:
    store = derive(adapter, DIRECT)
    for name in DIRECT:
        for layer in range(N_LAYERS):
            if name == "resid.post_mlp.proj_to_final_residual_grad" and layer == N_LAYERS - 1:
                continue
            assert store.get(name, layer).abs().max() > 0, (name, layer)


def test_direction_validation_names_the_field() -> None:
    for bad, message in (
        ({"location": "mlp.post_act", "layer": 0}, "direction.location"),
        ({"location": "resid.post_emb", "layer": 1}, "direction.layer"),
        ({"layer": "x"}, "direction.layer"),
        ({"where": 1}, "unknown field"),
    ):
        with pytest.raises(ConfigError, match=message):
            DstConfig(direction=bad)
    with pytest.raises(ConfigError, match="outside the model's 3 layers"):
        derive(
            tiny_adapter(),
            "mlp.write_to_final_residual_grad",
            config=DstConfig(direction={"location": "resid.post_mlp", "layer": 7}),
        )


def test_trace_upstream_direction_mapping() -> None:
    trace = scalarlens.Direction.trace_upstream
    assert trace(ALT.MLP_POST_ACT, 2).to_dict() == {"location": "resid.post_attn", "layer": 2}
    assert trace(ALT.ATTN_QK_PROBS, 2).to_dict() == {"location": "resid.post_mlp", "layer": 1}
    assert trace(ALT.ATTN_VALUE, 0).to_dict() == {"location": "resid.post_emb", "layer": None}
