"""Gemma Scope files (``params.npz`` / ``params.safetensors``) and the local release index."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scalarlens
import torch
from sae_testlib import TOKENS
from safetensors.torch import save_file
from scalarlens import DstConfig

from scalarlens_sae import (
    TINY_INDUCTION_SAE,
    SaeLoadError,
    list_releases,
    load_sae,
    read_sae_config,
)
from scalarlens_sae._release import main

D_IN, A = 32, 10


def _gemma_scope_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.standard_normal((D_IN, A)) / 6,
        "W_dec": rng.standard_normal((A, D_IN)) / 3,
        "b_enc": rng.standard_normal(A) * 0.1,
        "b_dec": rng.standard_normal(D_IN) * 0.1,
        "threshold": np.abs(rng.standard_normal(A)) * 0.05,
    }


def _reference(arrays: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU: the encoder reads x itself (no b_dec subtracted)."""
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    return torch.where(pre > t["threshold"], torch.clamp(pre, min=0), torch.zeros_like(pre))


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_gemma_scope_params(tmp_path: Path, kind: str) -> None:
    arrays = _gemma_scope_arrays()
    directory = tmp_path / "layer_1" / "width_16k" / "average_l0_5"
    directory.mkdir(parents=True)
    if kind == "npz":
        np.savez(directory / "params.npz", **arrays)
    else:
        save_file(
            {k: torch.from_numpy(v) for k, v in arrays.items()},
            str(directory / "params.safetensors"),
        )
    cfg = read_sae_config(directory)
    assert (cfg["format"], cfg["base_architecture"], cfg["d_in"], cfg["d_sae"]) == (
        "gemma_scope",
        "jumprelu",
        D_IN,
        A,
    )
    sae = load_sae(directory)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = sae.encode(x)
    torch.testing.assert_close(z, _reference(arrays, x), rtol=0, atol=1e-10)
    recon = z @ torch.from_numpy(arrays["W_dec"]) + torch.from_numpy(arrays["b_dec"])
    torch.testing.assert_close(sae.decode(z), recon, rtol=0, atol=1e-10)
    assert 0 < int((z > 0).sum()) < z.numel()


def test_gemma_scope_npz_with_objects_is_never_unpickled(tmp_path: Path) -> None:
    """An ``.npz`` member holding Python objects is refused from its header, unread."""
    arrays = _gemma_scope_arrays()
    directory = tmp_path / "sae"
    directory.mkdir()
    np.savez(directory / "params.npz", **arrays, notes=np.array([{"a": 1}], dtype=object))
    with zipfile.ZipFile(directory / "params.npz") as archive:
        assert "notes.npy" in archive.namelist()
    with pytest.raises(SaeLoadError, match=r"array 'notes' holds Python objects; refusing"):
        load_sae(directory)


def test_gemma_scope_missing_threshold(tmp_path: Path) -> None:
    arrays = _gemma_scope_arrays()
    del arrays["threshold"]
    (tmp_path / "s").mkdir()
    np.savez(tmp_path / "s" / "params.npz", **arrays)
    with pytest.raises(
        SaeLoadError,
        match=r"params\.npz: a Gemma Scope \(JumpReLU\) SAE needs a per-latent 'threshold'",
    ):
        load_sae(tmp_path / "s")


def _releases(tmp_path: Path) -> Path:
    root = tmp_path / "releases"
    gemma = root / "gemma-scope-tiny-res" / "layer_1" / "width_16k" / "average_l0_5"
    gemma.mkdir(parents=True)
    np.savez(gemma / "params.npz", **_gemma_scope_arrays())
    ours = root / "tiny-induction-saes" / "blocks.1.mlp"
    ours.mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (ours / name).write_bytes((TINY_INDUCTION_SAE / name).read_bytes())
    (root / "empty-release").mkdir()
    return root


def test_release_index_lists_and_selects(model: scalarlens.ModelAdapter, tmp_path: Path) -> None:
    root = _releases(tmp_path)
    entries = {(e["release"], e["sae_id"]): e for e in list_releases(root)}
    assert set(entries) == {
        ("gemma-scope-tiny-res", "layer_1/width_16k/average_l0_5"),
        ("tiny-induction-saes", "blocks.1.mlp"),
    }
    gemma = entries[("gemma-scope-tiny-res", "layer_1/width_16k/average_l0_5")]
    assert (gemma["format"], gemma["architecture"], gemma["d_sae"]) == (
        "gemma_scope",
        "jumprelu",
        A,
    )
    by_release = {
        "release": "gemma-scope-tiny-res",
        "sae_id": "layer_1/width_16k/average_l0_5",
        "releases": str(root),
    }
    by_path = {"path": gemma["path"]}
    stores = [
        scalarlens.derive(
            model,
            TOKENS,
            "sae.latents",
            config=DstConfig(options={"sae": {**source, "location": "mlp.post_act", "layer": 1}}),
            layers=[1],
        )
        for source in (by_release, by_path)
    ]
    torch.testing.assert_close(stores[0].get("sae.latents", 1), stores[1].get("sae.latents", 1))
    assert stores[0].get("sae.latents", 1).abs().max() > 0


def test_release_errors_list_what_is_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _releases(tmp_path)

    def build(sae: dict[str, object]) -> None:
        scalarlens.registry.get(
            "sae.latents",
            DstConfig(options={"sae": {**sae, "location": "mlp.post_act", "layer": 1}}),
        )

    with pytest.raises(SaeLoadError, match=r"release 'nope' is not in .*'gemma-scope-tiny-res'"):
        build({"release": "nope", "sae_id": "x", "releases": str(root)})
    with pytest.raises(SaeLoadError, match=r"has no SAE id 'layer_9'.*\['blocks.1.mlp'\]"):
        build({"release": "tiny-induction-saes", "sae_id": "layer_9", "releases": str(root)})
    with pytest.raises(SaeLoadError, match=r"has no SAE id '\.\./tiny-induction-saes"):
        build(
            {
                "release": "gemma-scope-tiny-res",
                "sae_id": "../tiny-induction-saes/blocks.1.mlp",
                "releases": str(root),
            }
        )
    monkeypatch.delenv("SCALARLENS_SAE_RELEASES", raising=False)
    with pytest.raises(SaeLoadError, match=r"set \$SCALARLENS_SAE_RELEASES"):
        build({"release": "tiny-induction-saes", "sae_id": "blocks.1.mlp"})
    monkeypatch.setenv("SCALARLENS_SAE_RELEASES", str(root))
    build({"release": "tiny-induction-saes", "sae_id": "blocks.1.mlp"})


def test_list_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _releases(tmp_path)
    assert main(["list", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == [
        "release",
        "sae_id",
        "format",
        "architecture",
        "d_in",
        "d_sae",
        "hook",
    ]
    rows = [line.split("\t") for line in lines[1:]]
    assert rows == [
        [
            "gemma-scope-tiny-res",
            "layer_1/width_16k/average_l0_5",
            "gemma_scope",
            "jumprelu",
            "32",
            "10",
            "",
        ],
        [
            "tiny-induction-saes",
            "blocks.1.mlp",
            "saelens",
            "standard",
            "256",
            "512",
            "mlp.post_act",
        ],
    ]
    assert main(["list", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert main(["list", str(tmp_path / "bare")]) == 1


def test_cfg_json_beside_gemma_scope_params_is_metadata(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    directory.mkdir()
    np.savez(directory / "params.npz", **_gemma_scope_arrays())
    (directory / "cfg.json").write_text(json.dumps({"hook_name": "blocks.1.hook_resid_post"}))
    cfg = read_sae_config(directory)
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["format"] == "gemma_scope"


def test_release_index_holds_transcoders_too(tmp_path: Path) -> None:
    from scalarlens_sae import TINY_INDUCTION_CLT

    root = tmp_path / "releases"
    clt = root / "tiny-induction-transcoders" / "clt"
    clt.mkdir(parents=True)
    for file in TINY_INDUCTION_CLT.iterdir():
        (clt / file.name).write_bytes(file.read_bytes())
    (entry,) = list_releases(root)
    assert (entry["format"], entry["architecture"], entry["d_in"], entry["d_sae"]) == (
        "circuit_tracer_clt",
        "cross_layer_transcoder",
        64,
        128,
    )
    assert entry["hook"] == "layers 0..1"
    induction = scalarlens.load_model("tiny-induction")
    options = {"release": "tiny-induction-transcoders", "sae_id": "clt", "releases": str(root)}
    by_release = scalarlens.derive(
        induction,
        "cat dog sun",
        "transcoder.latents",
        config=DstConfig(options={"transcoder": options}),
    )
    by_path = scalarlens.derive(
        induction,
        "cat dog sun",
        "transcoder.latents",
        config=DstConfig(options={"transcoder": {"path": str(TINY_INDUCTION_CLT)}}),
    )
    for layer in (0, 1):
        torch.testing.assert_close(
            by_release.get("transcoder.latents", layer), by_path.get("transcoder.latents", layer)
        )
    assert by_release.get("transcoder.latents", 1).abs().max() > 0
