"""Loading SAEs in the SAELens layout, the cache, and error messages that name the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import scalarlens
import torch
from sae_testlib import TOKENS
from safetensors.torch import save_file

from scalarlens_sae import (
    TINY_INDUCTION_SAE,
    SaeError,
    SaeLoadError,
    SparseAutoencoder,
    load_sae,
    random_sae,
    read_sae_config,
    save_sae,
)


def _write(directory: Path, tensors: dict[str, torch.Tensor], cfg: object = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    cfg = {"d_in": 4, "d_sae": 3} if cfg is None else cfg
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def _tensors(d_in: int = 4, d_sae: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }


def test_round_trip_and_bias_convention(tmp_path: Path) -> None:
    """SAELens convention: latents = relu((x − b_dec) W_enc + b_enc); x̂ = latents W_dec + b_dec."""
    sae = random_sae(5, 6, seed=3)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.d_in == 6 and loaded.n_latents == 5 and loaded.apply_b_dec_to_input
    x = torch.randn(7, 6, dtype=torch.float64)
    expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(loaded.encode(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(loaded.decode(expected), expected @ sae.W_dec + sae.b_dec)
    cfg = read_sae_config(tmp_path / "sae")
    assert cfg["d_in"] == 6 and cfg["d_sae"] == 5 and cfg["architecture"] == "standard"


def test_apply_b_dec_to_input_false_is_honoured(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path / "s", tensors, {"apply_b_dec_to_input": False})
    sae = load_sae(tmp_path / "s")
    x = torch.randn(2, 4)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ tensors["W_enc"] + tensors["b_enc"]))


def test_cache_per_path_and_reload_on_change(tmp_path: Path) -> None:
    _write(tmp_path / "s", _tensors())
    first = load_sae(tmp_path / "s")
    assert load_sae(str(tmp_path / "s")) is first
    assert load_sae(tmp_path / "s" / ".." / "s") is first  # resolved path is the key
    weights = tmp_path / "s" / "sae_weights.safetensors"
    save_file(_tensors(), str(weights))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_sae(tmp_path / "s") is not first


def test_cast_is_memoised_and_leaves_the_original(tmp_path: Path) -> None:
    sae = random_sae(3, 4)
    like = torch.zeros(1, dtype=torch.float32)
    cast = sae.cast(like)
    assert cast.W_enc.dtype == torch.float32 and sae.W_enc.dtype == torch.float64
    assert sae.cast(like) is cast and sae.cast(torch.zeros(1, dtype=torch.float64)) is sae


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "nope", r"does not exist"),
        (lambda p: _write(p / "s", _tensors()) / "cfg.json", r"is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"has no cfg\.json"),
        (
            lambda p: (_write(p / "s", _tensors()) / "sae_weights.safetensors").unlink() or p / "s",
            r"has no sae_weights\.safetensors",
        ),
        (
            lambda p: _write(p / "s", {k: v for k, v in _tensors().items() if k != "b_dec"}),
            r"missing tensor\(s\) \['b_dec'\]",
        ),
        (
            lambda p: _write(p / "s", {**_tensors(), "W_dec": torch.zeros(4, 3)}),
            r"W_dec has shape \[4, 3\], expected \[3, 4\]",
        ),
        (
            lambda p: _write(p / "s", {**_tensors(), "b_enc": torch.zeros(5)}),
            r"b_enc has shape \[5\], expected \[3\]",
        ),
        (lambda p: _write(p / "s", _tensors(), {"d_sae": 7}), r"d_sae=7 but .* \[4, 3\]"),
        (
            lambda p: _write(p / "s", _tensors(), {"architecture": "sparsemax"}),
            r"architecture='sparsemax' is not supported by scalarlens-sae; supported: "
            r"\['batchtopk', 'gated', 'jumprelu', 'jumprelu_transcoder', 'matryoshka_batchtopk', "
            r"'standard', 'topk', 'transcoder'\]",
        ),
        (
            lambda p: _write(p / "s", _tensors(), {"normalize_activations": "constant_norm"}),
            r"normalize_activations='constant_norm' is not supported.*'constant_norm_rescale'",
        ),
    ],
)
def test_load_errors_name_the_problem(tmp_path: Path, setup: object, message: str) -> None:
    path = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(SaeLoadError, match=message) as info:
        load_sae(path)
    assert isinstance(info.value, SaeError) and isinstance(info.value, scalarlens.ScalarLensError)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    directory = _write(tmp_path / "s", _tensors())
    (directory / "cfg.json").write_text("{not json")
    with pytest.raises(SaeLoadError, match=r"cfg\.json: not valid JSON"):
        load_sae(directory)


def test_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    directory = _write(tmp_path / "s", _tensors())
    (directory / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaeLoadError, match=r"sae_weights\.safetensors: cannot read"):
        load_sae(directory)


def test_in_memory_shape_check() -> None:
    t = _tensors()
    with pytest.raises(SaeLoadError, match=r"b_dec has shape \[3\], expected \[4\]"):
        SparseAutoencoder(t["W_enc"], t["b_enc"], t["W_dec"], torch.zeros(3))


def test_bad_path_fails_when_the_deriver_is_built(tmp_path: Path) -> None:
    config = scalarlens.DstConfig(
        options={"sae": {"path": str(tmp_path / "nope"), "location": "mlp.post_act", "layer": 0}}
    )
    with pytest.raises(SaeLoadError, match="does not exist"):
        scalarlens.registry.get("sae.latents", config)


def test_width_mismatch_with_the_model_is_explained(model: scalarlens.ModelAdapter) -> None:
    """The shipped SAE reads 256 MLP neurons; the tiny random model has 32."""
    config = scalarlens.DstConfig(
        options={"sae": {"path": str(TINY_INDUCTION_SAE), "location": "mlp.post_act", "layer": 1}}
    )
    with pytest.raises(SaeLoadError, match=r"d_in=256, but mlp\.post_act at layer 1 has 32"):
        scalarlens.derive(model, TOKENS, "sae.latents", config=config, layers=[1])


def test_shipped_sae_is_small_and_well_formed() -> None:
    files = {p.name: p.stat().st_size for p in TINY_INDUCTION_SAE.iterdir()}
    assert set(files) == {"cfg.json", "sae_weights.safetensors"}
    assert sum(files.values()) <= 2 * 1024 * 1024
    cfg = read_sae_config(TINY_INDUCTION_SAE)
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_layer"]) == (256, 512, 1)
    assert cfg["scalarlens"]["heldout"]["fvu"] < 0.05


def test_shipped_sae_was_trained_on_the_bundled_model() -> None:
    """If tiny-induction is retrained, the SAE must be too (its latents would be meaningless)."""
    import hashlib

    from scalarlens import models

    weights = Path(models.__file__).resolve().parent / "tiny_induction" / "model.safetensors"
    recorded = read_sae_config(TINY_INDUCTION_SAE)["scalarlens"]["model_sha256"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded, (
        "the bundled tiny-induction model changed since the shipped SAE was trained; rerun "
        "`.venv/bin/python plugins/scalarlens-sae/scripts/train_tiny_sae.py`"
    )
