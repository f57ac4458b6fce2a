"""Transcoders and cross-layer transcoders spliced in place of the MLPs (float64, tiny GPT-2).

The reference in this file recomputes each layer's MLP input with ``torch.nn.functional.
layer_norm`` from the captured ``resid.post_attn`` and the model's own ``mlp_ln`` weights, and
the latents / reconstructions from the raw file tensors, independently of the plugin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import scalarlens
import torch
from sae_testlib import DISTRACTOR, TARGET, TOKENS
from safetensors.torch import save_file
from scalarlens import ActivationLocationType, DstConfig, PassType, WeightLocationType

from scalarlens_sae import SaeConfigError, SaeLoadError
from scalarlens_sae._transcoder_derivers import (
    TranscoderOptions,
    make_transcoder_interventions,
)

B = PassType.BACKWARD
ALT = ActivationLocationType
W = WeightLocationType
N_LAYERS, D, A = 3, 16, 12
ALL = [
    "transcoder.latents",
    "transcoder.error",
    "transcoder.act_times_grad",
    "transcoder.write",
    "transcoder.write_norm",
    "transcoder.write_to_final_residual_grad",
    "transcoder.error_write_to_final_residual_grad",
    "mlp.layer_write_to_final_residual_grad",
    "resid.delta_mlp",
    "resid.post_attn",
]


def _derive(
    model: scalarlens.ModelAdapter, options: dict[str, Any], dsts: list[str], tokens: Any = TOKENS
) -> scalarlens.DerivedScalarStore:
    config = DstConfig(options={"transcoder": options}, derive_gradients=True)
    return scalarlens.derive(
        model, tokens, dsts, config=config, target=TARGET, distractor=DISTRACTOR
    )


def _random_clt(seed: int = 3) -> dict[str, Any]:
    """Raw tensors of a CLT in circuit-tracer's layout (W_enc is d_transcoder × d_model)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    return {
        "W_enc": [randn(A, D) / 4 for _ in range(N_LAYERS)],
        "b_enc": [randn(A) * 0.1 for _ in range(N_LAYERS)],
        "b_dec": [randn(D) * 0.1 for _ in range(N_LAYERS)],
        "W_dec": [randn(A, N_LAYERS - i, D) / 4 for i in range(N_LAYERS)],
        "threshold": [randn(A).abs() * 0.05 for _ in range(N_LAYERS)],
    }


def _write_clt(directory: Path, raw: dict[str, Any], jumprelu: bool) -> Path:
    directory.mkdir(parents=True)
    for i in range(N_LAYERS):
        enc = {f"W_enc_{i}": raw["W_enc"][i], f"b_enc_{i}": raw["b_enc"][i]}
        enc[f"b_dec_{i}"] = raw["b_dec"][i]
        if jumprelu:
            enc[f"threshold_{i}"] = raw["threshold"][i]
        save_file(enc, str(directory / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": raw["W_dec"][i]}, str(directory / f"W_dec_{i}.safetensors"))
    return directory


def _mlp_input(model: scalarlens.ModelAdapter, layer: int, resid: torch.Tensor) -> torch.Tensor:
    gain = model.weight(W.LAYER_NORM_GAIN_PRE_MLP, layer)
    bias = model.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer)
    return torch.nn.functional.layer_norm(resid, (D,), gain, bias, model.dims.norm_eps)


def _reference_clt(
    model: scalarlens.ModelAdapter, raw: dict[str, Any], resid: list[torch.Tensor], jumprelu: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Latents per source layer and reconstructions per target layer."""
    z = []
    for s in range(N_LAYERS):
        pre = _mlp_input(model, s, resid[s]) @ raw["W_enc"][s].T + raw["b_enc"][s]
        if jumprelu:
            z.append(torch.where(pre > raw["threshold"][s], pre, torch.zeros_like(pre)))
        else:
            z.append(torch.clamp(pre, min=0))
    recon = [
        raw["b_dec"][t] + sum(z[s] @ raw["W_dec"][s][:, t - s] for s in range(t + 1))
        for t in range(N_LAYERS)
    ]
    return z, recon


def test_splice_leaves_logits_and_upstream_gradients_unchanged(
    model: scalarlens.ModelAdapter,
) -> None:
    opts = TranscoderOptions(random_init={"n_latents": A})
    splice = make_transcoder_interventions(opts.splice_params(), model)
    assert {iv.location for iv in splice} == {ALT.RESID_POST_ATTN, ALT.RESID_DELTA_MLP}
    for plain, spliced in zip(
        model.run(TOKENS, []), model.run(TOKENS, [], interventions=splice), strict=True
    ):
        assert plain.logits is not None and spliced.logits is not None
        assert float((plain.logits - spliced.logits).abs().max()) <= 1e-5
        torch.testing.assert_close(plain.logits, spliced.logits, rtol=0, atol=1e-12)
    requests = [
        scalarlens.CaptureRequest(ALT.RESID_POST_EMBEDDING, B, None),
        scalarlens.CaptureRequest(ALT.RESID_POST_ATTN, B, {0, 1, 2}),
    ]
    objective = scalarlens.LogitDiffObjective(TARGET, DISTRACTOR)
    plain = model.run(TOKENS, requests, objective)
    spliced = model.run(TOKENS, requests, objective, interventions=splice)
    for a, b in zip(plain, spliced, strict=True):
        for key, layers in a.captured.items():
            for layer, tensor in layers.items():
                torch.testing.assert_close(tensor, b.captured[key][layer], rtol=0, atol=1e-12)


def test_cross_layer_transcoder_identities(model: scalarlens.ModelAdapter) -> None:
    """Replacing every MLP with a CLT (errors included) on the bundled GPT-2-architecture model.

    * direct effects: Σ_l Σ_j latent DE + Σ_t (error DE + b_dec[t]·g) = Σ_t MLP DE;
    * act × grad: Σ z·∇z + Σ_t (e_t·∇e_t + b_dec[t]·∇y_t) = Σ_t y_t·∇y_t;
    * latents and errors equal the reference from the captured residual stream.
    """
    from scalarlens_sae._transcoder import random_transcoder

    store = _derive(model, {"random_init": {"n_latents": A}}, ALL)
    tc = random_transcoder(A, D, N_LAYERS, 0)
    for prompt in range(2):
        g = store.get("mlp.layer_write_to_final_residual_grad", 0, prompt=prompt)
        latents_de = sum(
            store.get("transcoder.write_to_final_residual_grad", s, prompt=prompt).sum(-1)
            for s in range(N_LAYERS)
        )
        errors_de = sum(
            store.get("transcoder.error_write_to_final_residual_grad", t, prompt=prompt)[:, 0]
            for t in range(N_LAYERS)
        )
        # g: the gradient at the final residual, the default direction
        grad_final = _final_gradient(model, prompt)
        bias_de = sum(grad_final @ tc.b_dec[t] for t in range(N_LAYERS))
        mlp_de = sum(
            store.get("mlp.layer_write_to_final_residual_grad", t, prompt=prompt)[:, 0]
            for t in range(N_LAYERS)
        )
        assert g.shape[-1] == 1
        err = float((latents_de + errors_de + bias_de - mlp_de).abs().max())
        assert err <= 1e-5, f"direct effects do not close: max |Δ| {err}"
        assert err <= 1e-10
        atg = sum(
            store.get("transcoder.act_times_grad", s, prompt=prompt).sum(-1)
            for s in range(N_LAYERS)
        )
        rest = sum(
            (
                store.get("transcoder.error", t, prompt=prompt)
                * store.get("transcoder.error", t, B, prompt=prompt)
            ).sum(-1)
            + store.get("resid.delta_mlp", t, B, prompt=prompt) @ tc.b_dec[t]
            for t in range(N_LAYERS)
        )
        total = sum(
            (
                store.get("resid.delta_mlp", t, prompt=prompt)
                * store.get("resid.delta_mlp", t, B, prompt=prompt)
            ).sum(-1)
            for t in range(N_LAYERS)
        )
        torch.testing.assert_close(atg + rest, total, rtol=0, atol=1e-10)
        # write sums to the reconstruction it adds to the residual stream
        writes = sum(
            store.get("transcoder.write", s, prompt=prompt).sum(1) for s in range(N_LAYERS)
        )
        recon = sum(
            store.get("resid.delta_mlp", t, prompt=prompt)
            - store.get("transcoder.error", t, prompt=prompt)
            - tc.b_dec[t]
            for t in range(N_LAYERS)
        )
        torch.testing.assert_close(writes, recon, rtol=0, atol=1e-10)
        # the norm of each latent's total write vector
        for s in range(N_LAYERS):
            torch.testing.assert_close(
                store.get("transcoder.write_norm", s, prompt=prompt),
                store.get("transcoder.write", s, prompt=prompt).norm(dim=-1),
                rtol=0,
                atol=1e-10,
            )


def _final_gradient(model: scalarlens.ModelAdapter, prompt: int) -> torch.Tensor:
    last = model.dims.n_layers - 1
    runs = model.run(
        TOKENS,
        [scalarlens.CaptureRequest(ALT.RESID_POST_MLP, B, {last})],
        scalarlens.LogitDiffObjective(TARGET, DISTRACTOR),
    )
    return runs[prompt].captured[(ALT.RESID_POST_MLP, B)][last]


@pytest.mark.parametrize("jumprelu", [False, True])
def test_circuit_tracer_clt_files_match_the_reference(
    model: scalarlens.ModelAdapter, tmp_path: Path, jumprelu: bool
) -> None:
    raw = _random_clt()
    directory = _write_clt(tmp_path / "clt", raw, jumprelu)
    store = _derive(
        model,
        {"path": str(directory)},
        ["transcoder.latents", "transcoder.error", "resid.post_attn", "resid.delta_mlp"],
    )
    for prompt in range(2):
        resid = [store.get("resid.post_attn", s, prompt=prompt) for s in range(N_LAYERS)]
        z, recon = _reference_clt(model, raw, resid, jumprelu)
        for layer in range(N_LAYERS):
            got = store.get("transcoder.latents", layer, prompt=prompt)
            torch.testing.assert_close(got, z[layer], rtol=0, atol=1e-10)
            y = store.get("resid.delta_mlp", layer, prompt=prompt)
            error = store.get("transcoder.error", layer, prompt=prompt)
            torch.testing.assert_close(error, y - recon[layer], rtol=0, atol=1e-10)
        assert 0 < int((z[1] > 0).sum()) < z[1].numel()


def test_circuit_tracer_per_layer_files_and_resid_mid_input(
    model: scalarlens.ModelAdapter, tmp_path: Path
) -> None:
    """``layer_{i}.safetensors`` (PLT set) reading ``resid.post_attn`` itself (hook_resid_mid)."""
    raw = _random_clt()
    directory = tmp_path / "plt"
    directory.mkdir()
    for i in range(N_LAYERS):
        save_file(
            {
                "W_enc": raw["W_enc"][i],
                "b_enc": raw["b_enc"][i],
                "W_dec": raw["W_dec"][i][:, 0].contiguous(),
                "b_dec": raw["b_dec"][i],
            },
            str(directory / f"layer_{i}.safetensors"),
        )
    options = {"path": str(directory), "input": "resid.post_attn"}
    store = _derive(
        model,
        options,
        ["transcoder.latents", "transcoder.error", "resid.post_attn", "resid.delta_mlp"],
    )
    for layer in range(N_LAYERS):
        resid = store.get("resid.post_attn", layer)
        z = torch.clamp(resid @ raw["W_enc"][layer].T + raw["b_enc"][layer], min=0)
        torch.testing.assert_close(store.get("transcoder.latents", layer), z, rtol=0, atol=1e-10)
        recon = z @ raw["W_dec"][layer][:, 0] + raw["b_dec"][layer]
        y = store.get("resid.delta_mlp", layer)
        torch.testing.assert_close(
            store.get("transcoder.error", layer), y - recon, rtol=0, atol=1e-10
        )


def _saelens_transcoder(directory: Path, d_in: int = D, d_out: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    tensors = {
        "W_enc": torch.randn(d_in, A, generator=g, dtype=torch.float64) / 4,
        "b_enc": torch.randn(A, generator=g, dtype=torch.float64) * 0.1,
        "W_dec": torch.randn(A, d_out, generator=g, dtype=torch.float64) / 4,
        "b_dec": torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1,
    }
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    cfg = {
        "architecture": "transcoder",
        "d_in": d_in,
        "d_sae": A,
        "d_out": d_out,
        "apply_b_dec_to_input": False,
        "hook_name": "blocks.1.ln2.hook_normalized",
        "hook_name_out": "blocks.1.hook_mlp_out",
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def test_saelens_transcoder_at_one_layer(model: scalarlens.ModelAdapter, tmp_path: Path) -> None:
    tensors = _saelens_transcoder(tmp_path / "tc")
    options = {"path": str(tmp_path / "tc"), "layer": 1}
    store = _derive(
        model,
        options,
        ["transcoder.latents", "transcoder.error", "resid.post_attn", "resid.delta_mlp"],
    )
    x = _mlp_input(model, 1, store.get("resid.post_attn", 1))
    z = torch.clamp(x @ tensors["W_enc"] + tensors["b_enc"], min=0)
    torch.testing.assert_close(store.get("transcoder.latents", 1), z, rtol=0, atol=1e-10)
    recon = z @ tensors["W_dec"] + tensors["b_dec"]
    y = store.get("resid.delta_mlp", 1)
    torch.testing.assert_close(store.get("transcoder.error", 1), y - recon, rtol=0, atol=1e-10)
    for layer in (0, 2):  # no transcoder there: exact zeros
        assert not store.get("transcoder.latents", layer).any()
        assert not store.get("transcoder.error", layer).any()


def test_transcoder_widths_must_match_the_model(
    model: scalarlens.ModelAdapter, tmp_path: Path
) -> None:
    _saelens_transcoder(tmp_path / "in", d_in=5)
    with pytest.raises(SaeLoadError, match=r"input width 5, but mlp\.input .* has 16 channels"):
        _derive(model, {"path": str(tmp_path / "in"), "layer": 1}, ["transcoder.latents"])
    _saelens_transcoder(tmp_path / "out", d_out=7)
    with pytest.raises(SaeLoadError, match=r"output width 7, but resid\.delta_mlp .* has 16"):
        _derive(model, {"path": str(tmp_path / "out"), "layer": 1}, ["transcoder.latents"])


def test_transcoder_options_and_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SaeConfigError, match=r"options\['transcoder'\] is missing"):
        scalarlens.registry.get("transcoder.latents", DstConfig())
    with pytest.raises(
        SaeConfigError, match=r"input must be one of \['mlp.input', 'resid.post_attn'\]"
    ):
        scalarlens.registry.get(
            "transcoder.latents",
            DstConfig(options={"transcoder": {"random_init": {"n_latents": 2}, "input": "x"}}),
        )
    _saelens_transcoder(tmp_path / "tc")
    with pytest.raises(SaeLoadError, match=r"single SAELens transcoder: give options"):
        scalarlens.registry.get(
            "transcoder.latents", DstConfig(options={"transcoder": {"path": str(tmp_path / "tc")}})
        )
    (tmp_path / "skip").mkdir()
    save_file(
        {"W_enc": torch.zeros(2, 3), "W_skip": torch.zeros(3, 3)},
        str(tmp_path / "skip" / "layer_0.safetensors"),
    )
    from scalarlens_sae._transcoder import load_transcoder

    with pytest.raises(SaeLoadError, match=r"skip transcoders \(W_skip\) are not supported"):
        load_transcoder(tmp_path / "skip")


@pytest.mark.parametrize("cross_layer", [True, False])
def test_low_memory_recomputation_is_bit_identical(
    model: scalarlens.ModelAdapter, cross_layer: bool
) -> None:
    """memory='low' recomputes one layer at a time; a CLT layer reads earlier layers' latents."""
    names = ["transcoder.latents", "transcoder.error", "transcoder.act_times_grad"]
    out = {}
    for memory in ("default", "low"):
        config = DstConfig(
            options={"transcoder": {"random_init": {"n_latents": A, "cross_layer": cross_layer}}},
            derive_gradients=True,
            memory=memory,
        )
        store = scalarlens.derive(
            model, TOKENS[:1], names, config=config, target=TARGET, distractor=DISTRACTOR
        )
        out[memory] = {
            (name, layer, p): store.get(name, layer, p)
            for name in names
            for layer in range(N_LAYERS)
            for p in (
                [PassType.FORWARD, B] if name != "transcoder.act_times_grad" else [PassType.FORWARD]
            )
        }
    for key, value in out["default"].items():
        assert torch.equal(value, out["low"][key]), key
    assert float(out["default"][("transcoder.latents", 0, B)].abs().max()) > 0


def test_feature_loader_specs() -> None:
    """``scalarlens_feature_loaders``: transcoders for other plugins, by spec."""
    import scalarlens
    from scalarlens.testing import tiny_model

    model = tiny_model()
    reg = scalarlens.Registry()
    tc = reg.feature_loader("transcoder-random:16:2")("transcoder-random:16:2", model)
    assert tc.n_latents == 16 and tc.layers == tuple(range(model.dims.n_layers))
    assert tc.d_in == model.dims.d_model
    for bad in ("transcoder-random:0", "transcoder-random:x", "transcoder-random:4:5:6"):
        with pytest.raises(scalarlens.ConfigError, match="expected transcoder-random:N_LATENTS"):
            reg.feature_loader(bad)(bad, model)
    with pytest.raises(scalarlens.ConfigError, match="give a directory"):
        reg.feature_loader("transcoder:")("transcoder:", model)
