"""Online SAE DSTs: the SAE spliced into the forward pass (reference §5.2 item 17).

The splice returns ``dec(z) + e`` with ``z = emit(enc(x))`` and ``e = emit(x − dec(enc(x)))``
from a second encode, so the model computes the same function (logits and upstream gradients
unchanged) while ``∂J/∂z = ∇x W_decᵀ`` and ``∂J/∂e = ∇x`` become real, capturable gradients.
Input convention shared with the offline DSTs: x is the full activation (biases included), so
offline == online with no bias correction.
"""

from __future__ import annotations

import pytest
import scalarlens
import torch
from sae_testlib import DISTRACTOR, TARGET, TOKENS, grad_at, sae_config
from scalarlens import ActivationLocationType, DstConfig, PassType, WeightLocationType

from scalarlens_sae import SaeOptions, make_interventions, random_sae

B = PassType.BACKWARD
LAYER = 1
TOL = {"rtol": 0, "atol": 1e-10}
PAIRS = [
    ("sae.latents", "sae.online.latents"),
    ("sae.write", "sae.online.write"),
    ("sae.write_norm", "sae.online.write_norm"),
    ("sae.act_times_grad", "sae.online.act_times_grad"),
    ("sae.write_to_final_residual_grad", "sae.online.write_to_final_residual_grad"),
]


def _derive(
    model: scalarlens.ModelAdapter, config: DstConfig, dsts: list[str]
) -> scalarlens.DerivedScalarStore:
    config = DstConfig(options=config.options, derive_gradients=True)
    return scalarlens.derive(
        model, TOKENS, dsts, config=config, target=TARGET, distractor=DISTRACTOR
    )


@pytest.mark.parametrize(
    "location",
    ["mlp.post_act", "resid.delta_mlp", "resid.delta_attn", "resid.post_attn", "resid.post_mlp"],
)
def test_offline_equals_online(model: scalarlens.ModelAdapter, location: str) -> None:
    """Same input convention (full activation, b_out / b_O included): no bias correction."""
    basis = "mlp" if location == "mlp.post_act" else "resid"
    config = sae_config(location=location)
    # Separate runs: offline reads the unspliced model, online the spliced one.
    offline = _derive(model, config, [a for a, _ in PAIRS] + [f"sae.reconstruction_error_{basis}"])
    online = _derive(model, config, [b for _, b in PAIRS] + [f"sae.online.error_{basis}"])
    pairs = [*PAIRS, (f"sae.reconstruction_error_{basis}", f"sae.online.error_{basis}")]
    for off, on in pairs:
        two_passes = off == "sae.latents" or "error" in off
        for pass_type in [PassType.FORWARD, B] if two_passes else [PassType.FORWARD]:
            for prompt in range(2):
                for layer in range(model.dims.n_layers):
                    got = online.get(on, layer, pass_type, prompt)
                    want = offline.get(off, layer, pass_type, prompt)
                    err = float((got - want).abs().max())
                    assert err <= 1e-10, f"{on}/{pass_type.value} layer {layer}: max |Δ| {err}"
    assert online.get("sae.online.latents", LAYER, B).abs().max() > 1e-6


def test_splice_leaves_logits_and_gradients_unchanged(model: scalarlens.ModelAdapter) -> None:
    opts = SaeOptions(**sae_config().options["sae"])
    splice = make_interventions(opts.splice_params(), model)
    for location, layer in [
        (ActivationLocationType.RESID_POST_ATTN, 0),
        (ActivationLocationType.MLP_POST_ACT, LAYER),
        (ActivationLocationType.RESID_POST_MLP, 2),
    ]:
        plain = grad_at(model, location, layer)
        spliced = grad_at(model, location, layer, splice)
        for a, b in zip(plain, spliced, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    plain_runs = model.run(TOKENS, [])
    spliced_runs = model.run(TOKENS, [], interventions=splice)
    for a, b in zip(plain_runs, spliced_runs, strict=True):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-12)


def test_online_act_times_grad_identity(model: scalarlens.ModelAdapter) -> None:
    """Σ_j z·∇z + Σ_i e·∇e + b_dec·∇x = Σ_i x·∇x at the spliced location.

    x = z W_dec + b_dec + e (numerically), ∇z = ∇x W_decᵀ and ∇e = ∇x, so the latents carry
    (x − e − b_dec)·∇x, the error e·∇x, and the decoder bias b_dec·∇x (owned by no latent).
    """
    sae = random_sae(24, 32, seed=0)
    store = _derive(
        model, sae_config(), ["sae.online.act_times_grad", "sae.online.error_mlp", "mlp.post_act"]
    )
    for prompt in range(2):
        atg = store.get("sae.online.act_times_grad", LAYER, prompt=prompt)
        e = store.get("sae.online.error_mlp", LAYER, prompt=prompt)
        grad_e = store.get("sae.online.error_mlp", LAYER, B, prompt=prompt)
        x = store.get("mlp.post_act", LAYER, prompt=prompt)
        grad_x = store.get("mlp.post_act", LAYER, B, prompt=prompt)
        lhs = atg.sum(-1) + (e * grad_e).sum(-1) + grad_x @ sae.b_dec
        torch.testing.assert_close(lhs, (x * grad_x).sum(-1), **TOL)
        torch.testing.assert_close(grad_e, grad_x, **TOL)


def test_online_write_decomposition(model: scalarlens.ModelAdapter) -> None:
    """Σ_j online.write + b_dec W_out + e W_out + b_out = resid.delta_mlp (spliced run)."""
    sae = random_sae(24, 32, seed=0)
    w_out = model.weight(WeightLocationType.MLP_TO_RESIDUAL, LAYER)
    b_out = model.weight(WeightLocationType.MLP_BIAS_RESIDUAL, LAYER)
    store = _derive(
        model, sae_config(), ["sae.online.write", "sae.online.error_mlp", "resid.delta_mlp"]
    )
    for prompt in range(2):
        write = store.get("sae.online.write", LAYER, prompt=prompt)
        e = store.get("sae.online.error_mlp", LAYER, prompt=prompt)
        total = write.sum(1) + (sae.b_dec + e) @ w_out + b_out
        torch.testing.assert_close(total, store.get("resid.delta_mlp", LAYER, prompt=prompt), **TOL)


def test_online_captures_only_the_sae_layer(model: scalarlens.ModelAdapter) -> None:
    deriver = scalarlens.registry.get("sae.online.act_times_grad", sae_config())
    plan = scalarlens.make_plan([(deriver, PassType.FORWARD)], model.dims.n_layers)
    assert {(c.location.value, c.pass_type, frozenset(c.layers or ())) for c in plan.captures} == {
        ("sae.online.latents", PassType.FORWARD, frozenset({LAYER})),
        ("sae.online.latents", B, frozenset({LAYER})),
    }
