"""Against SAELens itself, loading the same files (runs only where sae-lens is installed).

sae-lens pulls about 100 packages (TransformerLens, transformers, datasets, …), so it is not a
test dependency.  Point ``SCALARLENS_SAELENS_PYTHON`` at a Python that has it (a throwaway
virtual environment with the same torch) and this test runs ``scripts/saelens_reference.py``
under it on every SAELens-loadable architecture of ``test_architectures``::

    python -m venv /tmp/saelens && /tmp/saelens/bin/pip install "sae-lens==6.54.*" torch==2.13.0
    SCALARLENS_SAELENS_PYTHON=/tmp/saelens/bin/python pytest tests/test_saelens.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_architectures import D_IN, VARIANTS, write_variant

from scalarlens_sae import load_sae

PYTHON = os.environ.get("SCALARLENS_SAELENS_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "saelens_reference.py"
# SAELens 6 has no inference class for these (it saves BatchTopK / Matryoshka as JumpReLU), and
# reads TopK's k only from "k", not from the pre-6 activation_fn_kwargs spelling.
NOT_IN_SAELENS = {
    "batchtopk_threshold",
    "batchtopk_by_count",
    "matryoshka_batchtopk",
    "topk_legacy_spelling",
}


def _transcoder(directory: Path) -> Path:
    """A SAELens transcoder reading 32 channels and writing 16."""
    g = torch.Generator().manual_seed(4)
    d_sae, d_out = 12, 16
    tensors = {
        "W_enc": torch.randn(D_IN, d_sae, generator=g, dtype=torch.float64) / 4,
        "b_enc": torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g, dtype=torch.float64) / 4,
        "b_dec": torch.randn(d_out, generator=g, dtype=torch.float64) * 0.1,
    }
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "sae_weights.safetensors"))
    cfg = {
        "architecture": "transcoder",
        "d_in": D_IN,
        "d_sae": d_sae,
        "d_out": d_out,
        "apply_b_dec_to_input": False,
        "dtype": "float64",
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.skipif(not PYTHON, reason="set SCALARLENS_SAELENS_PYTHON to a Python with sae-lens")
def test_latents_and_reconstruction_equal_saelens(tmp_path: Path) -> None:
    names = sorted(set(VARIANTS) - NOT_IN_SAELENS)
    directories = []
    for name in names:
        directory, _ = write_variant(tmp_path / name, name)
        cfg = json.loads((directory / "cfg.json").read_text())
        cfg.update(dtype="float64", apply_b_dec_to_input=True)
        if "norm_scaling_factor" in cfg:  # SAELens folds it at from_pretrained, not from disk
            cfg.pop("norm_scaling_factor")
            cfg["normalize_activations"] = "none"
        (directory / "cfg.json").write_text(json.dumps(cfg))
        directories.append(directory)
    directories.append(_transcoder(tmp_path / "transcoder"))
    names.append("transcoder")
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    assert PYTHON is not None
    done = subprocess.run(
        [
            PYTHON,
            str(SCRIPT),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "out.safetensors"),
            *map(str, directories),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    theirs = load_file(str(tmp_path / "out.safetensors"))
    refused = [names[i] for i in range(len(names)) if f"{i}.error" in theirs]
    assert not refused, f"SAELens could not load {refused}: {done.stderr}"
    for i, (name, directory) in enumerate(zip(names, directories, strict=True)):
        sae = load_sae(directory)
        z = sae.encode(x)
        err = float((z - theirs[f"{i}.latents"]).abs().max())
        assert err <= 1e-6, f"{name}: latents differ from SAELens by {err}"
        recon_err = float(
            (sae.decode(z, None if sae.transcoder else x) - theirs[f"{i}.reconstruction"])
            .abs()
            .max()
        )
        assert recon_err <= 1e-6, f"{name}: reconstruction differs from SAELens by {recon_err}"
        assert int((z > 0).sum()) > 0
        print(f"{name}: max |Δ| latents {err:.2e}, reconstruction {recon_err:.2e}")
