"""Offline SAE DSTs on the tiny float64 random GPT-2: exact identities (tolerance 1e-10).

Notation: x = the SAE input at layer L (full activation, biases included), z = latents,
e = x − x̂ the error, W_write = W_dec (residual SAEs) or W_dec W_out (mlp.post_act SAEs).
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import scalarlens
import torch
from sae_testlib import DISTRACTOR, TARGET, TOKENS, sae_config
from scalarlens import DerivedScalarSource, DstConfig, PassType, WeightLocationType

import scalarlens_sae
from scalarlens_sae import TINY_INDUCTION_SAE, random_sae, tiny_induction_options

B = PassType.BACKWARD
LAYER = 1
TOL = {"rtol": 0, "atol": 1e-10}

OFFLINE = [
    "sae.latents",
    "sae.write",
    "sae.write_norm",
    "sae.act_times_grad",
    "sae.write_to_final_residual_grad",
]


def _derive(
    model: scalarlens.ModelAdapter, config: DstConfig, extra: list[str], error: str
) -> scalarlens.DerivedScalarStore:
    config = DstConfig(options=config.options, derive_gradients=True)
    return scalarlens.derive(
        model,
        TOKENS,
        [*OFFLINE, error, *extra],
        config=config,
        target=TARGET,
        distractor=DISTRACTOR,
    )


@pytest.fixture
def mlp_store(model: scalarlens.ModelAdapter) -> scalarlens.DerivedScalarStore:
    return _derive(
        model,
        sae_config(),
        [
            "mlp.post_act",
            "mlp.act_times_grad",
            "resid.delta_mlp",
            "mlp.layer_write_to_final_residual_grad",
            "resid.post_mlp",
        ],
        "sae.reconstruction_error_mlp",
    )


def test_latents_follow_the_saelens_bias_convention(
    mlp_store: scalarlens.DerivedScalarStore,
) -> None:
    """z = relu((x − b_dec) W_enc + b_enc) of the captured mlp.post_act; BACKWARD = ∇x W_decᵀ."""
    sae = random_sae(24, 32, seed=0)
    for prompt in range(2):
        x = mlp_store.get("mlp.post_act", LAYER, prompt=prompt)
        grad_x = mlp_store.get("mlp.post_act", LAYER, B, prompt=prompt)
        z = mlp_store.get("sae.latents", LAYER, prompt=prompt)
        torch.testing.assert_close(z, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc), **TOL)
        torch.testing.assert_close(
            mlp_store.get("sae.latents", LAYER, B, prompt=prompt), grad_x @ sae.W_dec.T, **TOL
        )
        assert 0 < int((z > 0).sum()) < z.numel()  # some latents fire, some do not
        error = mlp_store.get("sae.reconstruction_error_mlp", LAYER, prompt=prompt)
        torch.testing.assert_close(error, x - (z @ sae.W_dec + sae.b_dec), **TOL)
        torch.testing.assert_close(
            mlp_store.get("sae.reconstruction_error_mlp", LAYER, B, prompt=prompt), grad_x, **TOL
        )


def test_other_layers_are_zero_and_capture_nothing(
    model: scalarlens.ModelAdapter, mlp_store: scalarlens.DerivedScalarStore
) -> None:
    for name in [*OFFLINE, "sae.reconstruction_error_mlp"]:
        for layer in (0, 2):
            assert not mlp_store.get(name, layer).any(), (name, layer)
    deriver = scalarlens.registry.get("sae.write_norm", sae_config())
    plan = scalarlens.make_plan([(deriver, PassType.FORWARD)], model.dims.n_layers)
    assert [(c.location.value, sorted(c.layers or ())) for c in plan.captures] == [
        ("mlp.post_act", [LAYER])
    ]


def test_write_sums_to_the_mlp_write(
    model: scalarlens.ModelAdapter, mlp_store: scalarlens.DerivedScalarStore
) -> None:
    """Σ_j write[t,j] + b_dec W_out + e W_out = x W_out = resid.delta_mlp − b_out."""
    sae = random_sae(24, 32, seed=0)
    w_out = model.weight(WeightLocationType.MLP_TO_RESIDUAL, LAYER)
    b_out = model.weight(WeightLocationType.MLP_BIAS_RESIDUAL, LAYER)
    for prompt in range(2):
        write = mlp_store.get("sae.write", LAYER, prompt=prompt)
        error = mlp_store.get("sae.reconstruction_error_mlp", LAYER, prompt=prompt)
        total = write.sum(1) + sae.b_dec @ w_out + error @ w_out
        delta = mlp_store.get("resid.delta_mlp", LAYER, prompt=prompt)
        torch.testing.assert_close(total + b_out, delta, **TOL)
        norms = mlp_store.get("sae.write_norm", LAYER, prompt=prompt)
        torch.testing.assert_close(norms, write.norm(dim=-1), **TOL)


@pytest.mark.parametrize("location", ["resid.delta_attn", "resid.delta_mlp"])
def test_write_sums_to_the_residual_input(model: scalarlens.ModelAdapter, location: str) -> None:
    """Σ_j write[t,j] + b_dec + e = x (resid.delta_*, biases b_O / b_out included)."""
    store = _derive(
        model, sae_config(location=location), [location], "sae.reconstruction_error_resid"
    )
    sae = random_sae(24, 16, seed=0)
    for prompt in range(2):
        write = store.get("sae.write", LAYER, prompt=prompt)
        error = store.get("sae.reconstruction_error_resid", LAYER, prompt=prompt)
        x = store.get(location, LAYER, prompt=prompt)
        torch.testing.assert_close(write.sum(1) + sae.b_dec + error, x, **TOL)


def test_act_times_grad_identity(mlp_store: scalarlens.DerivedScalarStore) -> None:
    """Σ_j z·∇z + Σ_i e·∇e + b_dec·∇x = Σ_i x·∇x (= Σ_n mlp.act_times_grad), ∇z = ∇x W_decᵀ.

    Because x = z W_dec + b_dec + e: the latents carry (x̂ − b_dec)·∇x, the error e·∇x, and the
    decoder bias b_dec·∇x, which no latent owns.
    """
    sae = random_sae(24, 32, seed=0)
    for prompt in range(2):
        atg = mlp_store.get("sae.act_times_grad", LAYER, prompt=prompt)
        error = mlp_store.get("sae.reconstruction_error_mlp", LAYER, prompt=prompt)
        grad_error = mlp_store.get("sae.reconstruction_error_mlp", LAYER, B, prompt=prompt)
        grad_x = mlp_store.get("mlp.post_act", LAYER, B, prompt=prompt)
        lhs = atg.sum(-1) + (error * grad_error).sum(-1) + grad_x @ sae.b_dec
        rhs = mlp_store.get("mlp.act_times_grad", LAYER, prompt=prompt).sum(-1)
        torch.testing.assert_close(lhs, rhs, **TOL)
        assert atg.abs().max() > 1e-6


def test_write_to_final_residual_grad_closes(
    model: scalarlens.ModelAdapter, mlp_store: scalarlens.DerivedScalarStore
) -> None:
    """Σ_j z·(W_write[j]·g) + ((b_dec + e) W_out + b_out)·g = mlp.layer_write_to_final_…_grad.

    Also: each latent's value equals its ``sae.write`` projected onto g.
    """
    sae = random_sae(24, 32, seed=0)
    w_out = model.weight(WeightLocationType.MLP_TO_RESIDUAL, LAYER)
    b_out = model.weight(WeightLocationType.MLP_BIAS_RESIDUAL, LAYER)
    for prompt in range(2):
        g = mlp_store.get("resid.post_mlp", 2, B, prompt=prompt)
        direct = mlp_store.get("sae.write_to_final_residual_grad", LAYER, prompt=prompt)
        write = mlp_store.get("sae.write", LAYER, prompt=prompt)
        torch.testing.assert_close(direct, (write * g[:, None, :]).sum(-1), **TOL)
        error = mlp_store.get("sae.reconstruction_error_mlp", LAYER, prompt=prompt)
        rest = ((sae.b_dec + error) @ w_out + b_out) @ g.T
        layer_total = mlp_store.get("mlp.layer_write_to_final_residual_grad", LAYER, prompt=prompt)
        torch.testing.assert_close(direct.sum(-1) + rest.diagonal(), layer_total[:, 0], **TOL)


@pytest.mark.parametrize(
    ("location", "direction", "nonzero"),
    [
        ("mlp.post_act", {"location": "resid.post_mlp", "layer": 1}, True),
        ("mlp.post_act", {"location": "resid.post_attn", "layer": 1}, False),  # same layer, after
        ("mlp.post_act", {"location": "resid.post_mlp", "layer": 0}, False),
        ("mlp.post_act", {"location": "resid.post_emb", "layer": None}, False),
        ("resid.delta_attn", {"location": "resid.post_attn", "layer": 1}, True),
    ],
)
def test_causal_zeroing(
    model: scalarlens.ModelAdapter, location: str, direction: dict[str, object], nonzero: bool
) -> None:
    config = attrs.evolve(sae_config(location=location), direction=direction)
    store = scalarlens.derive(
        model,
        TOKENS,
        "sae.write_to_final_residual_grad",
        config=config,
        target=TARGET,
        distractor=DISTRACTOR,
    )
    assert bool(store.get("sae.write_to_final_residual_grad", LAYER).any()) is nonzero


def test_chains_onto_builtins_by_name_without_importing_them() -> None:
    deriver = scalarlens.registry.get("sae.act_times_grad", sae_config())

    def names(d: scalarlens.ScalarDeriver) -> set[str]:
        out = {d.dst.name}
        for source in d.sub_scalar_sources:
            if isinstance(source, DerivedScalarSource):
                out |= names(source.scalar_deriver)
        return out

    assert {"sae.latents", "mlp.post_act"} <= names(deriver)
    package = Path(scalarlens_sae.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+scalarlens_builtins", re.MULTILINE)
    offenders = [p.name for p in package.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"scalarlens_sae imports scalarlens_builtins in {offenders}"
    assert "scalarlens_builtins" not in "".join(p.read_text() for p in package.rglob("*.py"))


def test_shipped_sae_reconstructs_tiny_induction() -> None:
    model = scalarlens.load_model("tiny-induction")
    words = "cat dog sun red one bus cup the cat dog sun red one bus"
    config = DstConfig(options={"sae": tiny_induction_options()})
    store = scalarlens.derive(
        model,
        words,
        ["sae.latents", "sae.reconstruction_error_mlp", "mlp.post_act"],
        config=config,
        layers=[1],
    )
    x = store.get("mlp.post_act", 1)
    error = store.get("sae.reconstruction_error_mlp", 1)
    fvu = float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((store.get("sae.latents", 1) > 0).sum(-1).float().mean())
    assert fvu < 0.1 and 1 <= l0 <= 128, (fvu, l0)
    assert TINY_INDUCTION_SAE.is_dir()


def test_attribution_patching_of_latents_is_difference_times_gradient(
    model: scalarlens.ModelAdapter,
) -> None:
    """``sae.attribution_patching`` = (z[main] − z[baseline])·∇z, z from each prompt's run."""
    prompt = TOKENS[0]
    baseline = list(prompt)
    baseline[2] = (baseline[2] + 3) % model.dims.n_vocab
    config = DstConfig(options=sae_config().options)
    got = scalarlens.derive(
        model,
        [prompt],
        "sae.attribution_patching",
        baseline=baseline,
        config=config,
        target=TARGET,
        distractor=DISTRACTOR,
    ).get("sae.attribution_patching", LAYER)
    main = scalarlens.derive(
        model,
        [prompt],
        "sae.latents",
        config=DstConfig(options=config.options, derive_gradients=True),
        target=TARGET,
        distractor=DISTRACTOR,
    )
    base = scalarlens.derive(model, [baseline], "sae.latents", config=config)
    z, z_base = main.get("sae.latents", LAYER), base.get("sae.latents", LAYER)
    want = (z - z_base) * main.get("sae.latents", LAYER, B)
    assert (z - z_base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, **TOL)
