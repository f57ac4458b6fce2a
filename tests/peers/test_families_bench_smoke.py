"""The hand-written baseline of ``benchmarks/bench_families.py`` computes what it claims.

It is the reference every peer (and ScalarLens) is checked against before timing, so it is checked
here, on a tiny random Llama (2 layers, 4 heads / 2 KV heads), against independent computations:
autograd with respect to retained tensors and a fused-free DLA (``autograd_reference``), finite
differences for act×grad, and the exact decomposition of the frozen-scale logit difference into
the embedding's, heads' and neurons' direct effects.  Runs in the main venv, no peer needed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_families  # noqa: E402

N_TOKENS = 12
SHAPE = bench_families.SHAPES["tiny"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = bench_families.save_random_llama(tmp_path_factory.mktemp("llama-tiny"), "tiny")
    return bench_families.load_hf(directory)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return bench_families.random_tokens(N_TOKENS, SHAPE["vocab_size"])


def test_layouts(model: Any, ids: list[int]) -> None:
    layers, heads, d_mlp = (
        SHAPE["num_hidden_layers"],
        SHAPE["num_attention_heads"],
        SHAPE["intermediate_size"],
    )
    dla = bench_families.hand_dla(model, ids)
    atg = bench_families.hand_act_times_grad(model, ids)
    assert dla["heads"].shape == (layers, heads)
    assert dla["neurons"].shape == (layers, d_mlp)
    assert atg["heads"].shape == (layers, N_TOKENS, heads)
    assert atg["neurons"].shape == (layers, N_TOKENS, d_mlp)
    for result in (dla, atg):
        assert not result["heads"].requires_grad
        assert result["heads"].abs().max() > 0 and result["neurons"].abs().max() > 0
    # In the last layer only the last query row can affect the last token's logits.
    assert atg["heads"][-1, :-1].abs().max() == 0


def test_hand_written_matches_autograd(model: Any, ids: list[int]) -> None:
    dla_ref, atg_ref = bench_families.autograd_reference(model, ids)
    dla = bench_families.hand_dla(model, ids)
    atg = bench_families.hand_act_times_grad(model, ids)
    assert bench_families.worst_difference(dla, dla_ref) < 1e-5
    assert bench_families.worst_difference(atg, atg_ref) < 1e-5


def _objective(model: Any, ids: list[int], pre_hooks: list[tuple[Any, Any]]) -> float:
    bench_families._set_attn(model, "sdpa")  # eager's softmax runs in float32 even in float64
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    target, distractor = bench_families.TARGET, bench_families.DISTRACTOR
    return float(logits[0, -1, target] - logits[0, -1, distractor])


def _scaling(token: int, start: int, stop: int, factor: float) -> Any:
    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        scale = torch.ones_like(args[0])
        scale[0, token, start:stop] = factor
        return (args[0] * scale, *args[1:])

    return hook


def test_act_times_grad_matches_finite_differences(model: Any, ids: list[int]) -> None:
    """Σ_s p·∂p of head h at query t is the derivative of scaling o[t, h] (o = p·v), and a·∂a the
    derivative of scaling a[t, n]: central differences on a few entries.  HF's RMSNorm computes
    in float32 even in a float64 model, so the step is 1e-3 and the tolerance loose (a wrong
    tensor, sign or layout is off by far more)."""
    model64 = copy.deepcopy(model).double()
    atg = bench_families.hand_act_times_grad(model64, ids)
    d_head = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    eps = 1e-3
    scale = {k: float(v.abs().max()) for k, v in atg.items()}
    layers = model64.model.layers
    for layer, token, head in ((0, N_TOKENS - 1, 1), (0, 3, 2), (1, N_TOKENS - 1, 0)):
        module = layers[layer].self_attn.o_proj
        start, stop = head * d_head, (head + 1) * d_head
        up = _objective(model64, ids, [(module, _scaling(token, start, stop, 1 + eps))])
        down = _objective(model64, ids, [(module, _scaling(token, start, stop, 1 - eps))])
        expected = (up - down) / (2 * eps)
        got = float(atg["heads"][layer, token, head])
        assert abs(got - expected) < 1e-3 * scale["heads"] + 1e-2 * abs(expected)
    for layer, token, neuron in ((0, N_TOKENS - 1, 5), (0, 4, 100), (1, N_TOKENS - 1, 17)):
        module = layers[layer].mlp.down_proj
        up = _objective(model64, ids, [(module, _scaling(token, neuron, neuron + 1, 1 + eps))])
        down = _objective(model64, ids, [(module, _scaling(token, neuron, neuron + 1, 1 - eps))])
        expected = (up - down) / (2 * eps)
        got = float(atg["neurons"][layer, token, neuron])
        assert abs(got - expected) < 1e-3 * scale["neurons"] + 1e-2 * abs(expected)


def test_direct_effects_decompose_the_logit_difference(model: Any, ids: list[int]) -> None:
    """With the final scale frozen the logit difference is linear in the residual: the embedding's,
    every head's and every neuron's direct effects add up to it exactly (no biases in Llama)."""
    dla = bench_families.hand_dla(model, ids)
    kept: list[Any] = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: kept.append(a[0][0, -1]))
    try:
        logit_diff = _objective(model, ids, [])
    finally:
        handle.remove()
    direction = bench_families._final_direction(model, kept[0])
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight[ids[-1]] @ direction
        total = float(embedding + dla["heads"].sum() + dla["neurons"].sum())
    assert abs(total - logit_diff) < 1e-4 * max(1.0, abs(logit_diff))
