"""Token family: token.attribution (item 16) and vocab.write_to_input_direction."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scalarlens import ConfigError, DstConfig, WeightLocationType

from ._tiny import BWD, REGISTRY, TOKENS, TOL, derive, max_err, tiny_adapter

W = WeightLocationType


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


def test_token_attribution_item16(adapter: Any) -> None:
    store = derive(
        adapter, ["token.attribution", "resid.post_emb"], config=DstConfig(derive_gradients=True)
    )
    x, grad = store.get("resid.post_emb"), store.get("resid.post_emb", None, BWD)
    assert max_err(store.get("token.attribution"), (x * grad).sum(-1, keepdim=True)) <= TOL
    assert store.get("token.attribution").abs().max() > 1e-4


def test_embedding_is_token_plus_position(adapter: Any) -> None:
    store = derive(adapter, "resid.post_emb")
    expected = (
        adapter.weight(W.EMBEDDING)[TOKENS] + adapter.weight(W.POSITION_EMBEDDING)[: len(TOKENS)]
    )
    assert max_err(store.get("resid.post_emb"), expected) <= TOL


def test_vocab_write_to_input_direction_matches_model(adapter: Any) -> None:
    """Feeding a vocabulary row straight into layer λ's MLP gives the DST's value for it."""
    layer, neuron = 1, 3
    options = {"builtins": {"neuron": {"layer": layer, "index": neuron}}}
    store = derive(adapter, "vocab.write_to_input_direction", options=options)
    out = store.get("vocab.write_to_input_direction")
    assert out.shape == (len(TOKENS), adapter.dims.n_vocab)
    assert torch.equal(out[0], out[-1])  # broadcast over tokens
    block = adapter.model.block(layer)
    with torch.no_grad():
        emb = adapter.weight(W.EMBEDDING)
        ln = torch.nn.functional.layer_norm(
            emb, (emb.shape[-1],), block.ln_2.weight, block.ln_2.bias, eps=1e-5
        )
        expected = (ln @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)[:, neuron]
    assert max_err(out[0], expected) <= TOL


def test_vocab_write_needs_a_neuron() -> None:
    with pytest.raises(ConfigError, match="needs a neuron"):
        REGISTRY.get("vocab.write_to_input_direction", DstConfig())
    with pytest.raises(ConfigError, match="builtins"):
        REGISTRY.get(
            "vocab.write_to_input_direction",
            DstConfig(options={"builtins": {"neuron": {"layer": 1}}}),
        )
