"""The tiny trained dictionaries shipped with the plugin reconstruct ``tiny-induction`` well.

Made by ``scripts/train_tiny_dictionaries.py``; each test reads the shipped files and measures
reconstruction quality on prompts of the model's own kind (repeated random words), so a broken
loader, a wrong encoder or a retrained model fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import DstConfig

from scalarlens_sae import (
    TINY_INDUCTION_CLT,
    TINY_INDUCTION_JUMPRELU,
    TINY_INDUCTION_TOPK,
    load_sae,
    make_transcoder_interventions,
    read_sae_config,
    tiny_induction_clt_options,
    tiny_induction_options,
)
from scalarlens_sae._transcoder_derivers import TranscoderOptions

WORDS = [
    "cat dog sun red one bus cup the cat dog sun red one bus",
    "map old hat ten box pen map old hat ten box pen",
]


@pytest.fixture(scope="module")
def induction() -> scalarlens.ModelAdapter:
    return scalarlens.load_model("tiny-induction")


def _fvu(x: torch.Tensor, error: torch.Tensor) -> float:
    return float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _model_sha256() -> str:
    from scalarlens import models

    weights = Path(models.__file__).resolve().parent / "tiny_induction" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("directory", "architecture", "max_l0"),
    [(TINY_INDUCTION_JUMPRELU, "jumprelu", 40), (TINY_INDUCTION_TOPK, "topk", 16)],
)
def test_shipped_sae_reconstructs_tiny_induction(
    induction: scalarlens.ModelAdapter, directory: Path, architecture: str, max_l0: int
) -> None:
    cfg = read_sae_config(directory)
    assert cfg["architecture"] == architecture and cfg["base_architecture"] == architecture
    assert cfg["scalarlens"]["model_sha256"] == _model_sha256(), (
        "tiny-induction changed since the shipped SAEs were trained; rerun "
        "plugins/scalarlens-sae/scripts/train_tiny_dictionaries.py"
    )
    assert sum(p.stat().st_size for p in directory.iterdir()) <= 1024 * 1024
    config = DstConfig(options={"sae": tiny_induction_options(path=str(directory))})
    store = scalarlens.derive(
        induction,
        WORDS,
        ["sae.latents", "sae.reconstruction_error_mlp", "mlp.post_act"],
        config=config,
        layers=[1],
    )
    x = torch.cat([store.get("mlp.post_act", 1, prompt=p) for p in range(2)])
    error = torch.cat([store.get("sae.reconstruction_error_mlp", 1, prompt=p) for p in range(2)])
    z = torch.cat([store.get("sae.latents", 1, prompt=p) for p in range(2)])
    fvu, l0 = _fvu(x, error), float((z > 0).sum(-1).float().mean())
    assert fvu < 0.1, f"{architecture}: FVU {fvu:.4f}"
    assert 1 <= l0 <= max_l0, f"{architecture}: L0 {l0:.1f}"
    # the recorded held-out figures describe this file
    assert cfg["scalarlens"]["heldout"]["fvu"] < 0.1
    if architecture == "jumprelu":
        assert load_sae(directory).threshold is not None


def test_shipped_cross_layer_transcoder_replaces_both_mlps(
    induction: scalarlens.ModelAdapter,
) -> None:
    metrics = json.loads((TINY_INDUCTION_CLT / "metrics.json").read_text())
    assert metrics["model_sha256"] == _model_sha256()
    assert sum(p.stat().st_size for p in TINY_INDUCTION_CLT.iterdir()) <= 512 * 1024
    config = DstConfig(options={"transcoder": tiny_induction_clt_options()})
    store = scalarlens.derive(
        induction,
        WORDS,
        ["transcoder.latents", "transcoder.error", "resid.delta_mlp"],
        config=config,
    )
    for layer in range(induction.dims.n_layers):
        y = torch.cat([store.get("resid.delta_mlp", layer, prompt=p) for p in range(2)])
        e = torch.cat([store.get("transcoder.error", layer, prompt=p) for p in range(2)])
        z = torch.cat([store.get("transcoder.latents", layer, prompt=p) for p in range(2)])
        fvu, l0 = _fvu(y, e), float((z > 0).sum(-1).float().mean())
        assert fvu < 0.15, f"layer {layer}: FVU {fvu:.4f}"
        assert 1 <= l0 <= 64, f"layer {layer}: L0 {l0:.1f}"
    splice = make_transcoder_interventions(
        TranscoderOptions(**tiny_induction_clt_options()).splice_params(), induction
    )
    tokens = [[5, 9, 2, 6, 5, 9, 2, 6]]
    plain, spliced = induction.run(tokens, []), induction.run(tokens, [], interventions=splice)
    assert plain[0].logits is not None and spliced[0].logits is not None
    assert float((plain[0].logits - spliced[0].logits).abs().max()) <= 1e-5


def test_shipped_clt_direct_effects_close_on_the_bundled_model(
    induction: scalarlens.ModelAdapter,
) -> None:
    """tiny-induction with both MLPs replaced by the shipped CLT (float32, tolerance 1e-5):
    Σ features' + errors' direct effects + Σ_t b_dec[t]·g = Σ_t MLP direct effects."""
    from scalarlens_sae import load_transcoder

    tc = load_transcoder(TINY_INDUCTION_CLT)
    config = DstConfig(options={"transcoder": tiny_induction_clt_options()}, derive_gradients=True)
    store = scalarlens.derive(
        induction,
        WORDS[0],
        [
            "transcoder.write_to_final_residual_grad",
            "transcoder.error_write_to_final_residual_grad",
            "mlp.layer_write_to_final_residual_grad",
            "resid.post_mlp",
        ],
        config=config,
        target="one",
        distractor="cup",
    )
    last = induction.dims.n_layers - 1
    g = store.get("resid.post_mlp", last, scalarlens.PassType.BACKWARD)
    layers = range(induction.dims.n_layers)
    features = sum(store.get("transcoder.write_to_final_residual_grad", s).sum(-1) for s in layers)
    errors = sum(
        store.get("transcoder.error_write_to_final_residual_grad", t)[:, 0] for t in layers
    )
    biases = sum(g @ tc.b_dec[t] for t in layers)
    mlps = sum(store.get("mlp.layer_write_to_final_residual_grad", t)[:, 0] for t in layers)
    err = float((features + errors + biases - mlps).abs().max())
    assert err <= 1e-5, f"direct effects do not close: max |Δ| {err}"
    assert float(features.abs().max()) > 1e-3  # the features carry real effect
