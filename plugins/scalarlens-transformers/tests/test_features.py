"""One test per architectural feature that would fail if the adapter ignored that feature:
Gemma's soft-capping and sandwich post-norms, grouped-query attention (8 query heads reading 2
key/value heads), and Pythia's parallel residual."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import scalarlens
import tiny_models as tm
import torch
from scalarlens import DstConfig, PassType
from scalarlens import WeightLocationType as W
from test_families import DISTRACTOR, PROMPT, TARGET, close

BWD = PassType.BACKWARD


def _load(tmp_path: Path, model_type: str, **overrides: Any) -> Any:
    directory = tmp_path / model_type
    if overrides:
        from transformers import AutoModelForCausalLM

        config = tm.CONFIGS[model_type]()
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.25) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.2)
        model.save_pretrained(directory, safe_serialization=True)
        tm.save_tokenizer(directory)
    else:
        tm.save(model_type, directory)
    return scalarlens.load_model(f"hf:{directory}")


def test_gemma_logits_are_soft_capped(tmp_path: Path) -> None:
    adapter = _load(tmp_path, "gemma2")
    cap = adapter.dims.logit_softcap
    assert cap == 3.0
    (run,) = adapter.run([PROMPT], [])
    readout = adapter.logits_from_final_residual  # the local-gradient path caps too
    store = scalarlens.derive(adapter, [PROMPT], ["resid.post_mlp"])
    resid = store.get("resid.post_mlp", adapter.dims.n_layers - 1)
    raw = adapter.final_norm(resid) @ adapter.weight(W.UNEMBEDDING)
    assert float(raw.abs().max()) > cap  # the cap is active on this model
    assert float(run.logits.abs().max()) < cap
    assert close(run.logits, torch.tanh(raw / cap) * cap)
    assert close(readout(resid), run.logits)


def test_gemma_head_writes_pass_through_the_post_norm(tmp_path: Path) -> None:
    """Σ_{s,h} attn.write + b_O, times γ/σ of the post-norm, is resid.delta_attn exactly;
    without the post-norm factor the sum is far off."""
    adapter = _load(tmp_path, "gemma2")
    assert adapter.dims.post_norms
    names = [
        "attn.write",
        "resid.delta_attn",
        "attn_post_ln.scale",
        "mlp.write",
        "resid.delta_mlp",
        "mlp_post_ln.scale",
    ]
    store = scalarlens.derive(adapter, [PROMPT], names)
    for layer in range(adapter.dims.n_layers):
        scale = store.get("attn_post_ln.scale", layer)
        assert not close(scale, torch.ones_like(scale))
        b_o = adapter.weight(W.ATTN_BIAS_RESIDUAL, layer) * adapter.weight(
            W.ATTN_POST_NORM_GAIN, layer
        )
        heads = store.get("attn.write", layer).sum(dim=(1, 2))
        assert close(heads + b_o / scale, store.get("resid.delta_attn", layer), 1e-4)
        neurons = store.get("mlp.write", layer).sum(dim=1)
        m_scale = store.get("mlp_post_ln.scale", layer)
        b_out = adapter.weight(W.MLP_BIAS_RESIDUAL, layer) * adapter.weight(
            W.MLP_POST_NORM_GAIN, layer
        )
        assert close(neurons + b_out / m_scale, store.get("resid.delta_mlp", layer), 1e-4)
        # Ignoring the post-norm (σ = 1, γ = 1) does not reconstruct the write.
        gain = adapter.weight(W.ATTN_POST_NORM_GAIN, layer)
        into_norm = heads * scale / gain + adapter.weight(W.ATTN_BIAS_RESIDUAL, layer)
        assert not close(into_norm, store.get("resid.delta_attn", layer), 1e-2)


def test_grouped_query_attention_8_query_heads_2_kv_heads(tmp_path: Path) -> None:
    adapter = _load(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    dims = adapter.dims
    assert (dims.n_heads, dims.n_kv_heads, dims.kv_group_size) == (8, 2, 4)
    assert adapter.weight(W.ATTN_TO_VALUE, 0).shape == (2, tm.D, 4)
    assert adapter.weight(W.ATTN_TO_QUERY, 0).shape == (8, tm.D, 4)
    store = scalarlens.derive(
        adapter, [PROMPT], ["attn.v", "attn.k", "attn.q", "attn_ln.scale", "resid.post_emb"]
    )
    x = store.get("resid.post_emb")
    u = x / store.get("attn_ln.scale", 0) * adapter.weight(W.LAYER_NORM_GAIN_PRE_ATTN, 0)
    values = store.get("attn.v", 0)  # T×8×dv: each query head's view of its KV group
    assert values.shape == (len(PROMPT), 8, 4)
    w_v = adapter.weight(W.ATTN_TO_VALUE, 0)
    for h in range(8):
        expected = u @ w_v[h // 4] + adapter.weight(W.ATTN_BIAS_VALUE, 0)[h // 4]
        assert close(values[:, h], expected), h
    assert torch.equal(values[:, 0], values[:, 3]) and not close(values[:, 3], values[:, 4])


def test_parallel_residual_mlp_reads_the_residual_before_attention(tmp_path: Path) -> None:
    adapter = _load(tmp_path, "gpt_neox")
    assert adapter.dims.parallel_residual
    names = [
        "resid.post_emb",
        "resid.post_attn",
        "resid.post_mlp",
        "mlp.pre_act",
        "mlp_ln.scale",
        "resid.delta_attn",
        "resid.delta_mlp",
    ]
    store = scalarlens.derive(
        adapter,
        [PROMPT],
        names,
        target=TARGET,
        distractor=DISTRACTOR,
        config=DstConfig(derive_gradients=True),
    )
    for layer in range(adapter.dims.n_layers):
        before = (
            store.get("resid.post_emb") if layer == 0 else store.get("resid.post_mlp", layer - 1)
        )
        centred = before - before.mean(-1, keepdim=True)
        normed = centred / store.get("mlp_ln.scale", layer) * adapter.weight(
            W.LAYER_NORM_GAIN_PRE_MLP, layer
        ) + adapter.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer)
        pre = normed @ adapter.weight(W.MLP_TO_HIDDEN, layer) + adapter.weight(
            W.MLP_BIAS_HIDDEN, layer
        )
        assert close(store.get("mlp.pre_act", layer), pre, 1e-4), layer
        # The post-attention residual is not what the MLP reads…
        post_attn = store.get("resid.post_attn", layer)
        assert close(post_attn, before + store.get("resid.delta_attn", layer))
        assert close(
            store.get("resid.post_mlp", layer), post_attn + store.get("resid.delta_mlp", layer)
        )
        # …so its gradient is the layer output's: nothing in the layer reads it.
        assert close(
            store.get("resid.post_attn", layer, BWD), store.get("resid.post_mlp", layer, BWD)
        )
        assert float(store.get("resid.post_mlp", layer, BWD).abs().max()) > 1e-4


def test_bfloat16_model_derives_in_float32_close_to_the_float32_model(tmp_path: Path) -> None:
    from scalarlens_transformers import load_hf_model

    directory = tm.save("llama", tmp_path / "llama")
    full, half = load_hf_model(directory), load_hf_model(directory, dtype="bfloat16")
    assert half.dtype is torch.bfloat16 and half.accumulation_dtype is torch.float32
    dsts = ["attn.act_times_grad_per_token", "mlp.write_to_final_residual_grad"]
    stores = [
        scalarlens.derive(a, [PROMPT], dsts, target=TARGET, distractor=DISTRACTOR)
        for a in (full, half)
    ]
    for name in dsts:
        for layer in range(full.dims.n_layers):
            exact, approx = (s.get(name, layer) for s in stores)
            assert approx.dtype is torch.float32
            # bf16 keeps 8 bits of mantissa through 2 layers and a backward: a few % of the scale.
            assert close(approx, exact, 1e-1), (name, layer)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt_neox"])
def test_an_edit_of_resid_post_attn_reaches_the_residual_stream(
    tmp_path: Path, model_type: str
) -> None:
    """HF computes ``x + δa`` inline; an intervention there must change what the MLP reads
    *and* what the residual stream carries on (sequential), or the rebuilt output (parallel)."""
    adapter = _load(tmp_path, model_type)
    names = ["resid.post_attn", "resid.delta_mlp", "resid.post_mlp", "logits"]
    plain = scalarlens.derive(adapter, [PROMPT], names)
    halve = scalarlens.Intervention(
        scalarlens.ActivationLocationType.RESID_POST_ATTN, lambda x, layer: x * 0.5, layers={0}
    )
    edited = scalarlens.derive(adapter, [PROMPT], names, interventions=[halve])
    assert close(edited.get("resid.post_attn", 0), plain.get("resid.post_attn", 0) * 0.5)
    assert close(
        edited.get("resid.post_mlp", 0),
        edited.get("resid.post_attn", 0) + edited.get("resid.delta_mlp", 0),
    )
    assert not close(edited.get("logits"), plain.get("logits"), 1e-3)
