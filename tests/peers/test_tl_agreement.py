"""ScalarLens and TransformerLens 2.x give the same numbers (benchmark workloads 1 and 2).

Skipped unless ``transformer_lens`` is importable (it is an optional benchmark dependency; run
these in the venv ``benchmarks/setup_tl_venv.sh`` makes).  The functions under test are the
ones ``benchmarks/bench_peers.py`` times, on a random 2-layer GPT-2 loaded into both libraries
from one safetensors checkpoint, in float64 so that agreement is to rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformer_lens")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_peers

TOL = 1e-10
N_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[int]]:
    directory = bench_peers.save_random_gpt2(
        tmp_path_factory.mktemp("gpt2-2l"), bench_peers.SHAPES["2-layer"]
    )
    adapter = bench_peers.load_scalarlens(directory, torch.float64)
    tl = bench_peers.load_transformer_lens(directory, torch.float64)
    return adapter, tl, bench_peers.random_tokens(N_TOKENS)


def test_same_weights_same_logits(models: tuple[Any, Any, list[int]]) -> None:
    adapter, tl, ids = models
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert bench_peers.relative_difference(adapter.model(batch), tl(batch)) < TOL


def test_direct_logit_attribution_per_head_and_neuron(
    models: tuple[Any, Any, list[int]],
) -> None:
    adapter, tl, ids = models
    ours = bench_peers.scalarlens_dla(adapter, ids)
    theirs = bench_peers.transformer_lens_dla(tl, torch.tensor([ids]))
    n_layers, n_heads, d_mlp = tl.cfg.n_layers, tl.cfg.n_heads, tl.cfg.d_mlp
    assert ours[0].shape == theirs[0].shape == (n_layers, n_heads)
    assert ours[1].shape == theirs[1].shape == (n_layers, d_mlp)
    assert theirs[0].abs().max() > 0 and theirs[1].abs().max() > 0
    assert bench_peers.relative_difference(ours[0], theirs[0]) < TOL
    assert bench_peers.relative_difference(ours[1], theirs[1]) < TOL
    # The same from a cache filtered down to what neuron DLA reads.
    frugal = bench_peers.transformer_lens_dla(
        tl, torch.tensor([ids]), heads=False, names_filter=bench_peers.tl_neuron_filter
    )
    assert bench_peers.relative_difference(ours[1], frugal[1]) < TOL


def test_direct_effect_is_zero_before_the_last_token(models: tuple[Any, Any, list[int]]) -> None:
    """The logit difference is read at the last token, so g is zero at every other position."""
    import scalarlens

    adapter, _, ids = models
    store = scalarlens.derive(
        adapter,
        [ids],
        [bench_peers.HEAD_DE, bench_peers.NEURON_DE],
        target=bench_peers.TARGET,
        distractor=bench_peers.DISTRACTOR,
        config=scalarlens.DstConfig(detach_final_ln_scale=True),
    )
    for layer in range(adapter.dims.n_layers):
        for name in (bench_peers.HEAD_DE, bench_peers.NEURON_DE):
            value = store.get(name, layer)
            assert value.shape[0] == N_TOKENS
            assert torch.all(value[:-1] == 0)


def test_act_times_grad_per_head_and_neuron(models: tuple[Any, Any, list[int]]) -> None:
    adapter, tl, ids = models
    batch = torch.tensor([ids])
    ours = bench_peers.scalarlens_act_times_grad(adapter, ids)
    theirs = bench_peers.transformer_lens_act_times_grad(tl, batch)
    hand = bench_peers.hand_act_times_grad(adapter, batch)
    n_layers, n_heads, d_mlp = tl.cfg.n_layers, tl.cfg.n_heads, tl.cfg.d_mlp
    assert ours[0].shape == theirs[0].shape == hand[0].shape == (n_layers, N_TOKENS, n_heads)
    assert ours[1].shape == theirs[1].shape == hand[1].shape == (n_layers, N_TOKENS, d_mlp)
    for mine, other in ((ours, theirs), (ours, hand)):
        assert other[0].abs().max() > 0 and other[1].abs().max() > 0
        assert bench_peers.relative_difference(mine[0], other[0]) < TOL
        assert bench_peers.relative_difference(mine[1], other[1]) < TOL
