"""SAEs and transcoders on the Hugging Face families (when scalarlens-transformers is installed).

Sized from the adapter's dims only.  The transcoder reference reads each MLP's real input from
an independent copy of the Hugging Face model (a forward pre-hook on its MLP module), so the
plugin's pre-MLP norm (RMSNorm, Gemma's ``1 + w``, LayerNorm) is checked against the family's
own code.  Float32 models: "equal" is 1e-5.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from scalarlens import DstConfig

pytest.importorskip("transformers")
pytest.importorskip("scalarlens_transformers")
TESTS = Path(__file__).resolve().parents[2] / "scalarlens-transformers" / "tests"
if not (TESTS / "tiny_models.py").is_file():
    pytest.skip("scalarlens-transformers' tiny models are not here", allow_module_level=True)

import scalarlens  # noqa: E402

from scalarlens_sae import SaeConfigError, make_interventions, random_sae  # noqa: E402
from scalarlens_sae._options import SaeOptions  # noqa: E402
from scalarlens_sae._transcoder import random_transcoder  # noqa: E402
from scalarlens_sae._transcoder_derivers import (  # noqa: E402
    TranscoderOptions,
    make_transcoder_interventions,
)

TOKENS = [[1, 5, 9, 2, 6, 5, 9, 2], [1, 7, 3, 8]]
FAMILIES = ["llama", "gemma2", "gpt2"]
TOL = {"rtol": 0, "atol": 1e-5}


def _tiny_models() -> Any:
    spec = importlib.util.spec_from_file_location("_sae_tiny_models", TESTS / "tiny_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny = _tiny_models()
    root = tmp_path_factory.mktemp("families")
    return {name: tiny.save(name, root / name) for name in [*FAMILIES, "gpt_neox"]}


def _logits_unchanged(model: scalarlens.ModelAdapter, splice: Any) -> None:
    for plain, spliced in zip(
        model.run(TOKENS, []), model.run(TOKENS, [], interventions=splice), strict=True
    ):
        assert plain.logits is not None and spliced.logits is not None
        torch.testing.assert_close(plain.logits, spliced.logits, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_sae_on_a_family(families: dict[str, Path], family: str) -> None:
    model = scalarlens.load_model(f"hf:{families[family]}")
    options = {"random_init": {"n_latents": 24}, "location": "mlp.post_act", "layer": 1}
    store = scalarlens.derive(
        model,
        TOKENS,
        ["sae.online.latents", "mlp.post_act"],
        config=DstConfig(options={"sae": options}),
        layers=[1],
    )
    sae = random_sae(24, model.dims.d_mlp).cast(store.get("mlp.post_act", 1))
    for prompt in range(2):
        x = store.get("mlp.post_act", 1, prompt=prompt)
        want = torch.clamp((x - sae.b_dec) @ sae.W_enc + sae.b_enc, min=0)
        torch.testing.assert_close(store.get("sae.online.latents", 1, prompt=prompt), want, **TOL)
    _logits_unchanged(model, make_interventions(SaeOptions(**options).splice_params(), model))


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_layer_transcoder_on_a_family(families: dict[str, Path], family: str) -> None:
    from transformers import AutoModelForCausalLM

    model = scalarlens.load_model(f"hf:{families[family]}")
    options = {"random_init": {"n_latents": 16}}
    store = scalarlens.derive(
        model,
        TOKENS[:1],
        ["transcoder.latents", "transcoder.error", "resid.delta_mlp"],
        config=DstConfig(options={"transcoder": options}),
    )
    # the MLP inputs, from the family's own modules
    hf = AutoModelForCausalLM.from_pretrained(families[family], dtype=torch.float32).eval()
    blocks = hf.transformer.h if family == "gpt2" else hf.model.layers
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block.mlp.register_forward_pre_hook(
            lambda module, args, i=i: seen.__setitem__(i, args[0].detach())
        )
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        hf(torch.tensor(TOKENS[:1]))
    for hook in hooks:
        hook.remove()
    tc = random_transcoder(16, model.dims.d_model, model.dims.n_layers, 0)
    z = {}
    for layer in range(model.dims.n_layers):
        enc = tc.encoders[layer]
        x = seen[layer][0].to(torch.float64)
        z[layer] = torch.clamp(x @ enc.W_enc + enc.b_enc, min=0)
        got = store.get("transcoder.latents", layer).to(torch.float64)
        torch.testing.assert_close(got, z[layer], rtol=0, atol=1e-4)
    for t in range(model.dims.n_layers):
        recon = tc.b_dec[t] + sum(z[s] @ tc.decoders[(s, t)] for s in range(t + 1))
        y = store.get("resid.delta_mlp", t).to(torch.float64)
        error = store.get("transcoder.error", t).to(torch.float64)
        torch.testing.assert_close(error, y - recon, rtol=0, atol=1e-4)
    splice = make_transcoder_interventions(TranscoderOptions(**options).splice_params(), model)
    _logits_unchanged(model, splice)


def test_transcoders_refuse_a_parallel_residual(families: dict[str, Path]) -> None:
    model = scalarlens.load_model(f"hf:{families['gpt_neox']}")
    assert model.dims.parallel_residual
    with pytest.raises(SaeConfigError, match=r"parallel residual"):
        make_transcoder_interventions(
            TranscoderOptions(random_init={"n_latents": 4}).splice_params(), model
        )
