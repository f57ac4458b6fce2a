"""Per family, on tiny random float32 models: fidelity to HF, the direct-effect decomposition,
act×grad against independent autograd through plain HF hooks, and the whole catalogue.

Every reference here is computed by Hugging Face's own unmodified modules (eager attention,
``output_attentions``, ``retain_grad`` on hook inputs), never by the adapter under test.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import scalarlens
import tiny_models as tm
import torch
from scalarlens import CaptureRequest, DstConfig, PassType
from scalarlens import WeightLocationType as W

from scalarlens_transformers import family_for

FWD, BWD = PassType.FORWARD, PassType.BACKWARD
PROMPT = [1, 5, 9, 13, 2, 7, 11, 3]
TARGET, DISTRACTOR = tm.VOCAB - 2, tm.VOCAB - 1
FAMILIES = pytest.mark.parametrize("model_type", tm.FAMILY_KEYS)


@cache
def _saved(model_type: str, root: str) -> Path:
    return tm.save(model_type, Path(root) / model_type)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("families"))


def adapter_for(model_type: str, root: str) -> Any:
    return scalarlens.load_model(f"hf:{_saved(model_type, root)}")


def close(a: torch.Tensor | float, b: torch.Tensor | float, tol: float = 1e-5) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64).detach()
    b = torch.as_tensor(b, dtype=torch.float64).detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def hf_logits(model_type: str, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return tm.build(model_type)(torch.tensor([prompt])).logits[0]


# --- fidelity --------------------------------------------------------------------------------


@FAMILIES
def test_logits_equal_hf_in_padded_batches(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    prompts = [PROMPT, PROMPT[:3], [1, 40, 41, 42, 43]]
    every = [CaptureRequest(a, FWD) for a in adapter.capturable_locations]
    for captures in ([], every):  # fused attention, and the hooked eager path
        runs = adapter.run(prompts, captures)
        for prompt, run in zip(prompts, runs, strict=True):
            assert run.logits.shape == (len(prompt), tm.VOCAB)
            assert close(run.logits, hf_logits(model_type, prompt)), model_type


@FAMILIES
def test_hooked_norms_equal_the_hf_modules(model_type: str, root: str) -> None:
    from scalarlens_transformers._hooks import hooked_norm, norm_eps, resolve

    adapter = adapter_for(model_type, root)
    fam, model = adapter.family, adapter.model
    layer = list(resolve(resolve(model, fam.base), fam.layers))[1]
    paths = [fam.input_norm, fam.pre_mlp_norm, fam.attn_post_norm, fam.mlp_post_norm]
    x = torch.randn(3, 5, tm.D) * 3 + 1
    for path in filter(None, paths):
        module = resolve(layer, path)
        ours = hooked_norm(fam.norm, module, norm_eps(module, 1e-5), lambda s: s)(x)
        with torch.no_grad():
            theirs = type(module).forward(module, x)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (model_type, path)


# --- the direct-effect decomposition -------------------------------------------------------

DECOMPOSITION_DSTS = [
    "resid.post_emb",
    "resid.post_mlp",
    "attn.write_to_final_residual_grad",
    "mlp.write_to_final_residual_grad",
    "attn.layer_write_to_final_residual_grad",
    "mlp.layer_write_to_final_residual_grad",
    "attn_post_ln.scale",
    "mlp_post_ln.scale",
]


def _bias_term(adapter: Any, store: Any, layer: int, sublayer: str, g: torch.Tensor) -> float:
    """``b·(g·γ/σ)`` summed over tokens: a bias's direct effect through its post-norm."""
    bias = adapter.weight(
        W.ATTN_BIAS_RESIDUAL if sublayer == "attn" else W.MLP_BIAS_RESIDUAL, layer
    )
    if adapter.dims.post_norms:
        gain = W.ATTN_POST_NORM_GAIN if sublayer == "attn" else W.MLP_POST_NORM_GAIN
        g = g * adapter.weight(gain, layer) / store.get(f"{sublayer}_post_ln.scale", layer)
    return float((g @ bias).sum())


def _linearised_objective(model_type: str, adapter: Any) -> float:
    """``Σ_v ∂J/∂l_v · (l_v − (β_f U)_v)`` at the last token, from HF's own forward.

    ``l`` are the pre-cap logits; ``∂J/∂l`` is ±1 without soft-capping and ``±(1 − tanh²(l/c))``
    with it; ``β_f`` is the final LayerNorm bias (zero for RMSNorm).  With the final norm's
    scale frozen this is exactly what the direct effects must add up to.
    """
    model = tm.build(model_type)
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), output_hidden_states=True)
        normed = out.hidden_states[-1][0, -1]  # after the final norm
        pre_cap = model.get_output_embeddings()(normed)
    cap = adapter.dims.logit_softcap
    slope = torch.ones_like(pre_cap) if cap is None else 1 - torch.tanh(pre_cap / cap) ** 2
    beta_u = adapter.weight(W.LAYER_NORM_BIAS_FINAL) @ adapter.weight(W.UNEMBEDDING)
    centred = pre_cap - beta_u
    return float(slope[TARGET] * centred[TARGET] - slope[DISTRACTOR] * centred[DISTRACTOR])


@FAMILIES
def test_direct_effects_reconstruct_the_objective(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    config = DstConfig(detach_final_ln_scale=True, derive_gradients=True)
    store = scalarlens.derive(
        adapter, [PROMPT], DECOMPOSITION_DSTS, target=TARGET, distractor=DISTRACTOR, config=config
    )
    n = adapter.dims.n_layers
    g = store.get("resid.post_mlp", n - 1, BWD)
    total = float((store.get("resid.post_emb") * g).sum())
    for layer in range(n):
        heads = store.get("attn.write_to_final_residual_grad", layer).sum()
        neurons = store.get("mlp.write_to_final_residual_grad", layer).sum()
        b_o, b_out = (_bias_term(adapter, store, layer, s, g) for s in ("attn", "mlp"))
        # Per layer: every head + b_O is the whole layer's write (through its post-norm).
        assert close(
            heads + b_o, store.get("attn.layer_write_to_final_residual_grad", layer).sum(), 1e-4
        )
        assert close(
            neurons + b_out, store.get("mlp.layer_write_to_final_residual_grad", layer).sum(), 1e-4
        )
        total += float(heads + neurons) + b_o + b_out
    final_resid = float((store.get("resid.post_mlp", n - 1) * g).sum())
    assert close(total, final_resid, 1e-4), (model_type, total, final_resid)
    expected = _linearised_objective(model_type, adapter)
    assert abs(expected) > 1e-2
    assert close(total, expected, 1e-4), (model_type, total, expected)


# --- act×grad against plain HF hooks --------------------------------------------------------


def hf_act_times_grad(model_type: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, ``Σ_s p·∂J/∂p`` (``T×H``) and ``a·∂J/∂a`` (``T×F``) by autograd on HF."""
    from scalarlens_transformers._hooks import resolve

    fam, model = family_for(model_type), tm.build(model_type)
    assert fam is not None
    acts: list[torch.Tensor] = []

    def keep(module: Any, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        acts.append(args[0])

    for layer in resolve(resolve(model, fam.base), fam.layers):
        resolve(resolve(layer, fam.mlp), fam.mlp_out).register_forward_pre_hook(keep)
    out = model(torch.tensor([PROMPT]), output_attentions=True)
    for probs in out.attentions:
        probs.retain_grad()
    (out.logits[0, -1, TARGET] - out.logits[0, -1, DISTRACTOR]).backward()
    heads = [(p * p.grad)[0].sum(-1).T for p in out.attentions]  # H×T×S → T×H
    neurons = [(a * a.grad)[0] for a in acts]
    return heads, neurons


@FAMILIES
def test_act_times_grad_equals_autograd_through_hf(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    store = scalarlens.derive(
        adapter,
        [PROMPT],
        ["attn.act_times_grad_per_token", "mlp.act_times_grad"],
        target=TARGET,
        distractor=DISTRACTOR,
    )
    heads, neurons = hf_act_times_grad(model_type)
    for layer in range(adapter.dims.n_layers):
        assert close(store.get("attn.act_times_grad_per_token", layer), heads[layer]), layer
        assert close(store.get("mlp.act_times_grad", layer), neurons[layer]), layer
        assert float(heads[layer].detach().abs().max()) > 1e-4  # a real signal on both sides


# --- the whole catalogue --------------------------------------------------------------------


@FAMILIES
def test_every_registered_dst_derives_with_its_declared_shape(model_type: str, root: str) -> None:
    adapter = adapter_for(model_type, root)
    registry = scalarlens.registry
    examples = registry.dst_examples()
    refused, parallel = [], []
    for name in sorted(registry.names()):
        dst = registry.dst(name)
        options = examples[name].options.to_dict() if name in examples else {}
        config = DstConfig(derive_gradients=BWD in dst.pass_types, options=options)
        deriver = registry.get(name, config)
        if scalarlens.unsupported_reason(deriver, adapter) is not None:
            with pytest.raises(scalarlens.UnsupportedModelError, match=re.escape(name)):
                scalarlens.derive(adapter, [PROMPT], name, config=config)
            refused.append(name)
            continue
        # DSTs comparing two prompts get a baseline: PROMPT with its third token changed.
        baseline = [[*PROMPT[:2], PROMPT[2] + 1, *PROMPT[3:]]] if deriver.reads_baseline() else None
        try:
            store = scalarlens.derive(
                adapter,
                [PROMPT],
                name,
                target=TARGET,
                distractor=DISTRACTOR,
                config=config,
                baseline=baseline,
            )
        except scalarlens.ScalarLensError as exc:
            # The SAE plugin's transcoder splice refuses parallel-residual models by name.
            if adapter.dims.parallel_residual and "parallel residual" in str(exc):
                parallel.append(name)
                continue
            raise
        expected = scalarlens.resolve_shape(
            dst.shape,
            n_tokens=len(PROMPT),
            model_sizes=adapter.dims.sizes(),
            parameter_sizes=deriver.parameter_sizes,
        )
        for pass_type in [FWD, BWD] if config.derive_gradients else [FWD]:
            entry = store.activations(name, pass_type)
            wanted = {None} if dst.has_no_layers else set(range(adapter.dims.n_layers))
            assert set(entry.layer_indices) == wanted, (name, pass_type)
            for layer in entry.layer_indices:
                tensor = entry[layer]
                assert tuple(tensor.shape) == expected, (name, layer, pass_type)
                assert torch.isfinite(tensor).all() or dst.allows_non_finite, (name, layer)
    # Only the gated MLP's up projection is missing, and only where the MLP is not gated.
    assert refused == ([] if adapter.dims.gated_mlp else ["mlp.up"]), refused
    assert all(name.startswith("transcoder.") for name in parallel), parallel


def test_gated_mlp_neuron_is_act_of_gate_times_up(root: str) -> None:
    """``mlp.post_act`` = ``act(mlp.pre_act) · mlp.up``, the input of the down projection."""
    adapter = adapter_for("llama", root)
    store = scalarlens.derive(adapter, [PROMPT], ["mlp.pre_act", "mlp.up", "mlp.post_act"])
    for layer in range(adapter.dims.n_layers):
        gate, up = store.get("mlp.pre_act", layer), store.get("mlp.up", layer)
        expected = torch.nn.functional.silu(gate) * up
        assert close(store.get("mlp.post_act", layer), expected)
        assert not close(store.get("mlp.post_act", layer), torch.nn.functional.silu(gate))


@FAMILIES
def test_low_memory_mode_is_bit_identical(model_type: str, root: str) -> None:
    """``memory="low"`` checkpoints each decoder layer; the backward recomputes it exactly."""
    adapter = adapter_for(model_type, root)
    dsts = ["attn.act_times_grad_per_token", "mlp.act_times_grad", "resid.post_attn"]
    stores = [
        scalarlens.derive(
            adapter,
            [PROMPT, PROMPT[:5]],
            dsts,
            target=TARGET,
            distractor=DISTRACTOR,
            config=DstConfig(derive_gradients=True, memory=memory),
        )
        for memory in ("default", "low")
    ]
    for key in stores[0].keys():
        for layer in range(adapter.dims.n_layers):
            for p in range(2):
                a = stores[0].get(key.dst, layer, key.pass_type, prompt=p)
                b = stores[1].get(key.dst, layer, key.pass_type, prompt=p)
                assert torch.equal(a, b), (key, layer, p)


@FAMILIES
def test_logits_of_a_few_columns_equal_those_of_all(model_type: str, root: str) -> None:
    """``columns=`` (what a logit difference reads) gives the full logits' columns, soft-cap
    included."""
    adapter = adapter_for(model_type, root)
    resid = torch.randn(3, adapter.dims.d_model, generator=torch.Generator().manual_seed(0))
    full = adapter.logits_from_final_residual(resid)
    some = adapter.logits_from_final_residual(resid, columns=[TARGET, DISTRACTOR, 3])
    assert close(some, full[:, [TARGET, DISTRACTOR, 3]], tol=1e-6)
