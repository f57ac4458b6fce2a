"""Latent gradients and attention→latent DSTs (reference §2.8), float64 on the kit's tiny model.

G_j against a central finite difference of the encoder; the batched forms against the
unbatched ones at every latent; the attention decomposition summed over heads and tokens
against ``(resid.delta_attn − b_O)·G_j``; the input Jacobian against G_j (also through a
per-token input normalisation); the errors; and a post-norm family (Gemma 2) through ``γ/σ``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import scalarlens
import torch
from sae_testlib import TOKENS
from scalarlens import DstConfig, WeightLocationType

from scalarlens_sae import SaeConfigError, SparseAutoencoder, random_sae, save_sae

LAYER, N_LATENTS = 1, 24
ATTN_DSTS = [
    "sae.latent_input_grad_resid",
    "sae.attn_write_to_latent",
    "sae.attn_write_to_latent_sum_heads",
    "sae.attn_write_to_latent_per_token",
    "sae.attn_write_to_latents_batched",
    "sae.attn_write_to_latents_per_token_batched",
    "sae.input_jacobian_resid",
    "resid.delta_attn",
]


def _config(location: str, latent: int | None = 0, **sae: Any) -> DstConfig:
    options: dict[str, Any] = {
        "sae": {
            "random_init": {"n_latents": N_LATENTS, "seed": 0},
            "location": location,
            "layer": LAYER,
            **sae,
        }
    }
    if sae.get("path"):
        del options["sae"]["random_init"]
    if latent is not None:
        options["sae_latent"] = {"index": latent}
    return DstConfig(options=options)


def _derive(model: Any, dsts: list[str], config: DstConfig) -> list[scalarlens.DerivedScalarStore]:
    return [
        scalarlens.derive(model, tokens, dsts, config=config, layers=[LAYER]) for tokens in TOKENS
    ]


@pytest.mark.parametrize("location", ["mlp.post_act", "resid.delta_mlp", "resid.delta_attn"])
def test_latent_input_grad_is_a_finite_difference(model: Any, location: str) -> None:
    name = (
        "sae.latent_input_grad_mlp"
        if location == "mlp.post_act"
        else ("sae.latent_input_grad_resid")
    )
    for j in (0, 5, 17):
        (store,) = _derive(model, [name, location], _config(location, j))[:1]
        x, grad = store.get(location, LAYER), store.get(name, LAYER)
        sae = random_sae(N_LATENTS, x.shape[1])
        eps = 1e-6
        for t, i in ((0, 0), (3, 2), (7, x.shape[1] - 1)):
            bump = torch.zeros_like(x)
            bump[t, i] = eps
            fd = (sae.encode(x + bump)[:, j].sum() - sae.encode(x - bump)[:, j].sum()) / (2 * eps)
            assert float(grad[t, i]) == pytest.approx(float(fd), abs=1e-8), (j, t, i)
        assert store.get(name, LAYER).abs().sum() > 0 or sae.encode(x)[:, j].max() == 0


def test_other_layers_are_zero(model: Any) -> None:
    config = _config("resid.delta_attn")
    store = scalarlens.derive(model, TOKENS[0], ATTN_DSTS[:-1], config=config)
    for name in ATTN_DSTS[:-1]:
        for layer in range(model.dims.n_layers):
            if layer != LAYER:
                assert store.get(name, layer).abs().max() == 0, (name, layer)


def test_attention_to_latent_sums_to_the_attention_write(model: Any) -> None:
    b_o = model.weight(WeightLocationType.ATTN_BIAS_RESIDUAL, LAYER)
    for j in (2, 9):
        for store in _derive(model, ATTN_DSTS, _config("resid.delta_attn", j)):
            g = store.get("sae.latent_input_grad_resid", LAYER)
            want = ((store.get("resid.delta_attn", LAYER) - b_o) * g).sum(-1)
            per_pair = store.get("sae.attn_write_to_latent", LAYER)
            assert torch.allclose(per_pair.sum((1, 2)), want, atol=1e-12)
            summed = store.get("sae.attn_write_to_latent_sum_heads", LAYER)
            assert torch.allclose(summed[..., 0], per_pair.sum(-1), atol=1e-13)
            per_token = store.get("sae.attn_write_to_latent_per_token", LAYER)
            assert torch.allclose(per_token, per_pair.sum(1), atol=1e-12)


def test_batched_forms_equal_the_unbatched_ones_at_every_latent(model: Any) -> None:
    for j in range(N_LATENTS):
        for store in _derive(model, ATTN_DSTS, _config("resid.delta_attn", j)):
            pairs = store.get("sae.attn_write_to_latents_batched", LAYER)[..., j]
            want = store.get("sae.attn_write_to_latent_sum_heads", LAYER)[..., 0]
            assert torch.allclose(pairs, want, atol=1e-12), j
            heads = store.get("sae.attn_write_to_latents_per_token_batched", LAYER)[..., j]
            want = store.get("sae.attn_write_to_latent_per_token", LAYER)
            assert torch.allclose(heads, want, atol=1e-12), j


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_input_jacobian_rows_are_the_latent_gradients(
    model: Any, tmp_path: Path, normalize: str
) -> None:
    """``G_j[t] = ∂z[t,j]/∂x[t]`` (the encoder is per token), with or without normalisation."""
    base = random_sae(N_LATENTS, model.dims.d_model, seed=3)
    sae = SparseAutoencoder(
        base.W_enc, base.b_enc, base.W_dec, base.b_dec, normalize=normalize, source="test"
    )
    path = str(save_sae(sae, tmp_path / normalize))
    for j in (1, 11):
        config = _config("resid.delta_mlp", j, path=path)
        for store in _derive(
            model, ["sae.input_jacobian_resid", "sae.latent_input_grad_resid"], config
        ):
            jac = store.get("sae.input_jacobian_resid", LAYER)
            assert torch.allclose(
                jac[:, j], store.get("sae.latent_input_grad_resid", LAYER), atol=1e-12
            )


def test_errors_name_the_fix(model: Any) -> None:
    with pytest.raises(SaeConfigError, match=r"index'\] = 24 is out of range.*valid 0\.\.23"):
        scalarlens.derive(
            model, TOKENS[0], ["sae.attn_write_to_latent"], config=_config("resid.delta_attn", 24)
        )
    with pytest.raises(SaeConfigError, match="options\\['sae_latent'\\] is missing"):
        scalarlens.derive(
            model,
            TOKENS[0],
            ["sae.latent_input_grad_mlp"],
            config=_config("mlp.post_act", None),
        )
    with pytest.raises(SaeConfigError, match="location'\\] = 'resid.delta_attn', got 'mlp.post"):
        scalarlens.derive(
            model, TOKENS[0], ["sae.attn_write_to_latent"], config=_config("mlp.post_act")
        )
    with pytest.raises(SaeConfigError, match="use sae.latent_input_grad_mlp instead"):
        scalarlens.derive(
            model,
            TOKENS[0],
            ["sae.latent_input_grad_resid"],
            config=_config("mlp.post_act"),
        )


def test_batched_forms_refuse_input_normalisation(model: Any, tmp_path: Path) -> None:
    base = random_sae(N_LATENTS, model.dims.d_model)
    sae = SparseAutoencoder(
        base.W_enc, base.b_enc, base.W_dec, base.b_dec, normalize="layer_norm", source="t"
    )
    path = str(save_sae(sae, tmp_path / "ln"))
    with pytest.raises(SaeConfigError, match="linear before its gate"):
        scalarlens.derive(
            model,
            TOKENS[0],
            ["sae.attn_write_to_latents_batched"],
            config=_config("resid.delta_attn", None, path=path),
        )


def _gemma2(tmp_path: Path) -> Any:
    pytest.importorskip("transformers")
    pytest.importorskip("scalarlens_transformers")
    tests = Path(__file__).resolve().parents[2] / "scalarlens-transformers" / "tests"
    if not (tests / "tiny_models.py").is_file():
        pytest.skip("scalarlens-transformers' tiny models are not here")
    spec = importlib.util.spec_from_file_location("_sae_tiny_models", tests / "tiny_models.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return scalarlens.load_model(f"hf:{module.save('gemma2', tmp_path / 'gemma2')}")


def test_post_norm_models_go_through_gamma_over_sigma(tmp_path: Path) -> None:
    """Gemma 2 (attention post-norm): Σ_{s,h} = (resid.delta_attn − b_O·γ/σ)·G_j (float32)."""
    model = _gemma2(tmp_path)
    assert model.dims.post_norms
    gain = model.weight(WeightLocationType.ATTN_POST_NORM_GAIN, LAYER)
    b_o = model.weight(WeightLocationType.ATTN_BIAS_RESIDUAL, LAYER)
    dsts = [*ATTN_DSTS, "attn_post_ln.scale"]
    for j in (0, 4):
        store = scalarlens.derive(
            model, TOKENS[0], dsts, config=_config("resid.delta_attn", j), layers=[LAYER]
        )
        g = store.get("sae.latent_input_grad_resid", LAYER)
        sigma = store.get("attn_post_ln.scale", LAYER)
        delta = store.get("resid.delta_attn", LAYER) - b_o * gain / sigma
        want = (delta * g).sum(-1)
        got = store.get("sae.attn_write_to_latent", LAYER).sum((1, 2))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got, want)
        batched = store.get("sae.attn_write_to_latents_batched", LAYER)[..., j]
        summed = store.get("sae.attn_write_to_latent_sum_heads", LAYER)[..., 0]
        assert torch.allclose(batched, summed, atol=1e-5, rtol=1e-4)


def test_mlp_input_jacobian_rows_are_the_latent_gradients(model: Any) -> None:
    """The same for an ``mlp.post_act`` SAE (the ``T×A×F`` form)."""
    dsts = ["sae.input_jacobian_mlp", "sae.latent_input_grad_mlp"]
    nonzero = 0
    for j in (0, 5, 17):
        config = _config("mlp.post_act", j)
        store = scalarlens.derive(model, TOKENS[0], dsts, config=config, layers=[LAYER])
        jac = store.get("sae.input_jacobian_mlp", LAYER)
        assert jac.shape[1:] == (N_LATENTS, model.dims.d_mlp)
        grad = store.get("sae.latent_input_grad_mlp", LAYER)
        assert torch.allclose(jac[:, j], grad, atol=1e-12)
        nonzero += int(grad.abs().max() > 0)
    assert nonzero > 0  # at least one of the latents is active somewhere
