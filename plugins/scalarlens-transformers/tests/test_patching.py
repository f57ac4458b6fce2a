"""Two-prompt DSTs (attribution patching, integrated gradients, activation patching) on the
Hugging Face families: the same identities as on GPT-2, through full patched forwards (these
adapters do not resume mid-model) and the families' own wiring (grouped-query attention,
post-norms, parallel residual, soft-capped logits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import DstConfig

PROMPT = "w3 w7 w2 w9 w5 w3 w7 w2"
BASELINE = "w3 w7 w4 w9 w5 w3 w7 w2"
FAMILIES = ["llama", "gemma2", "gpt_neox", "qwen3"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patching_identities(model_type: str, saved_models: Callable[[str], Path]) -> None:
    adapter = scalarlens.load_model(f"hf:{saved_models(model_type)}")
    names = [
        "resid.post_mlp.integrated_gradients",
        "resid.post_mlp.activation_patching",
        "attn.attribution_patching",
        "attn.activation_patching",
        "mlp.activation_patching",
    ]
    store = scalarlens.derive(
        adapter,
        PROMPT,
        names,
        baseline=BASELINE,
        target="Paris",
        distractor="Rome",
        config=DstConfig(
            batch_rows=16, steps=16
        ),  # random weights: a curvier path than GPT-2 tests
    )
    main = store.metadata["objective_values"][0]
    total = main - store.metadata["baseline_objective_values"][0]
    assert abs(total) > 1e-3
    last = adapter.dims.n_layers - 1
    # integrated gradients at a full residual cut is complete
    for layer in range(adapter.dims.n_layers):
        ig = float(store.get("resid.post_mlp.integrated_gradients", layer).sum())
        assert ig == pytest.approx(total, rel=1e-3), (model_type, layer)
    # patching the whole final residual at the read position gives the baseline's logits there
    patched = store.get("resid.post_mlp.activation_patching", last)
    assert float(patched[-1, 0]) == pytest.approx(total, abs=1e-4)
    # tokens before the corrupted one (BOS + 2 words) hold identical values: exactly 0
    for name in ("attn.activation_patching", "mlp.activation_patching"):
        for layer in range(adapter.dims.n_layers):
            assert torch.all(store.get(name, layer)[:3] == 0), (name, layer)
    # a head's exact effect and its first-order estimate agree in sign where it matters most
    exact = store.get("attn.activation_patching", last)
    estimate = store.get("attn.attribution_patching", last)
    t, h = divmod(int(exact.abs().argmax()), exact.shape[1])
    assert exact[t, h] * estimate[t, h] > 0
