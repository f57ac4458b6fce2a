"""MLP family: hand formulas and reference §5.2 items 6, 8, 10, 14, 16 (finite difference)."""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
import torch
from scalarlens import DstConfig, WeightLocationType

from ._tiny import ALT, BWD, N_LAYERS, TOKENS, TOL, derive, logit_diff, max_err, tiny_adapter

W = WeightLocationType
MLP_DSTS = [
    "mlp.post_act",
    "mlp.pre_act",
    "resid.delta_mlp",
    "resid.post_mlp",
    "mlp.resid_delta_from_post_act",
    "mlp.write",
    "mlp.write_norm",
    "mlp.act_times_grad",
    "mlp.write_to_final_residual_grad",
    "mlp.layer_write_norm",
    "mlp.layer_write_to_final_residual_grad",
]


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


@pytest.fixture(scope="module")
def store(adapter: Any) -> scalarlens.DerivedScalarStore:
    return derive(adapter, MLP_DSTS, config=DstConfig(derive_gradients=True))


def _g(store: scalarlens.DerivedScalarStore) -> torch.Tensor:
    return store.get("resid.post_mlp", N_LAYERS - 1, BWD)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_hand_formulas(adapter: Any, store: Any, layer: int) -> None:
    a = store.get("mlp.post_act", layer)
    w_out = adapter.weight(W.MLP_TO_RESIDUAL, layer)
    write = torch.einsum("tn,nd->tnd", a, w_out)
    assert max_err(store.get("mlp.write", layer), write) <= TOL
    assert max_err(store.get("mlp.write_norm", layer), a * w_out.norm(dim=1)) <= TOL
    assert (
        max_err(store.get("mlp.act_times_grad", layer), a * store.get("mlp.post_act", layer, BWD))
        <= TOL
    )
    expected = torch.einsum("tnd,td->tn", write, _g(store))
    assert max_err(store.get("mlp.write_to_final_residual_grad", layer), expected) <= TOL


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_write_decomposition_item6(adapter: Any, store: Any, layer: int) -> None:
    b_out = adapter.weight(W.MLP_BIAS_RESIDUAL, layer)
    delta = store.get("resid.delta_mlp", layer)
    assert max_err(store.get("mlp.write", layer).sum(dim=1) + b_out, delta) <= TOL
    assert max_err(store.get("mlp.resid_delta_from_post_act", layer) + b_out, delta) <= TOL


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_write_norms_item8(store: Any, layer: int) -> None:
    write = store.get("mlp.write", layer)
    assert max_err(write.norm(dim=-1), store.get("mlp.write_norm", layer).abs()) <= TOL
    assert (store.get("mlp.write_norm", layer) < 0).any()  # signed: gelu goes negative
    delta = store.get("resid.delta_mlp", layer)
    layer_norm = store.get("mlp.layer_write_norm", layer)
    assert max_err(layer_norm, delta.norm(dim=-1, keepdim=True)) <= TOL


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_per_layer_linearity_item10(adapter: Any, store: Any, layer: int) -> None:
    g = _g(store)
    b_out = adapter.weight(W.MLP_BIAS_RESIDUAL, layer)
    per_neuron = store.get("mlp.write_to_final_residual_grad", layer).sum(dim=1, keepdim=True)
    layer_total = store.get("mlp.layer_write_to_final_residual_grad", layer)
    assert max_err(per_neuron + (g @ b_out).unsqueeze(-1), layer_total) <= TOL
    assert layer_total.abs().max() > 1e-3  # non-trivial at the objective's token


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_act_times_grad_sum_item14(adapter: Any, store: Any, layer: int) -> None:
    b_out = adapter.weight(W.MLP_BIAS_RESIDUAL, layer)
    grad_delta = store.get("resid.delta_mlp", layer, BWD)
    assert max_err(grad_delta, store.get("resid.post_mlp", layer, BWD)) <= TOL
    expected = ((store.get("resid.delta_mlp", layer) - b_out) * grad_delta).sum(-1)
    assert max_err(store.get("mlp.act_times_grad", layer).sum(dim=1), expected) <= TOL


def test_pre_act_is_gelu_input(store: Any) -> None:
    pre, post = store.get("mlp.pre_act", 0), store.get("mlp.post_act", 0)
    gelu = 0.5 * pre * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre**3)))
    assert max_err(post, gelu) <= TOL


@pytest.mark.parametrize(("layer", "token", "neuron"), [(0, 5, 3), (1, 2, 7), (2, 5, 30)])
def test_finite_difference_item16(
    adapter: Any, store: Any, layer: int, token: int, neuron: int
) -> None:
    """Scaling one activation by (1±η) changes J by ±η·act·grad (central difference, O(η³))."""
    eta = 1e-4

    def objective_with_scale(scale: float) -> float:
        def fn(value: torch.Tensor, _layer: int | None) -> torch.Tensor:
            factor = torch.ones_like(value)
            factor[:, token, neuron] = scale
            return value * factor

        iv = scalarlens.Intervention(ALT.MLP_POST_ACT, fn, layers={layer})
        (run,) = adapter.run([TOKENS], [], logit_diff(), interventions=[iv])
        assert run.objective_value is not None
        return run.objective_value

    delta = (objective_with_scale(1 + eta) - objective_with_scale(1 - eta)) / 2
    predicted = eta * float(store.get("mlp.act_times_grad", layer)[token, neuron])
    assert abs(predicted) > 1e-8  # a neuron that matters
    assert abs(delta - predicted) <= 1e-6 * abs(predicted)
