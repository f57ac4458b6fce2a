"""``derive``, ``load_model`` and ``DerivedScalarStore`` on a tiny random GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import (
    ActivationLocationType,
    CaptureRequest,
    ConfigError,
    DerivedScalarStore,
    DstConfig,
    ModelInputError,
    PassType,
    Registry,
    UnknownDstError,
)
from scalarlens.exceptions import CheckpointError, MissingActivationError
from scalarlens.models import GPT2Adapter, GPT2Config, GPT2Model

ALT = ActivationLocationType
F, B = PassType.FORWARD, PassType.BACKWARD


class SpyAdapter(GPT2Adapter):
    """Records what each run was asked to capture."""

    calls: list[tuple[CaptureRequest, ...]]

    def run(self, tokens, captures, objective=None, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(tuple(captures))
        return super().run(tokens, captures, objective, **kw)


@pytest.fixture
def model() -> SpyAdapter:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=3, n_head=2, n_inner=32)
    adapter = SpyAdapter(GPT2Model(cfg), dtype=torch.float64)
    adapter.calls = []
    return adapter


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]


def test_derive_captures_only_what_the_dst_needs(model: SpyAdapter) -> None:
    store = scalarlens.derive(model, PROMPTS, "mlp.post_act", layers=[1])
    (captures,) = model.calls
    assert captures == (CaptureRequest(ALT.MLP_POST_ACT, F, {1}),)
    assert store.activations("mlp.post_act", prompt=1).layer_indices == (1,)
    full = model.run(PROMPTS, [CaptureRequest(ALT.MLP_POST_ACT, F, range(3))])
    for p in range(2):
        expected = full[p].captured[(ALT.MLP_POST_ACT, F)][1]
        assert torch.equal(store.get("mlp.post_act", 1, prompt=p), expected)
        assert store.get("mlp.post_act", 1, prompt=p).shape == (len(PROMPTS[p]), 32)


def test_backward_only_when_needed_and_target_required(model: SpyAdapter) -> None:
    config = DstConfig(derive_gradients=True)
    with pytest.raises(ModelInputError, match="need.*backward pass.*target="):
        scalarlens.derive(model, PROMPTS, "mlp.post_act", config=config)
    assert model.calls == []  # failed before any model run
    store = scalarlens.derive(
        model, PROMPTS, ["mlp.post_act", "resid.post_emb"], target=3, distractor=4, config=config
    )
    (captures,) = model.calls
    assert {(c.location, c.pass_type) for c in captures} == {
        (ALT.MLP_POST_ACT, F),
        (ALT.MLP_POST_ACT, B),
        (ALT.RESID_POST_EMBEDDING, F),
        (ALT.RESID_POST_EMBEDDING, B),
    }
    grad = store.get("mlp.post_act", 2, pass_type=B, prompt=0)
    assert grad.abs().sum() > 0
    # Forward-only request: no backward objective reaches the model.
    model.calls.clear()
    scalarlens.derive(model, PROMPTS, "mlp.post_act", target=3, distractor=4)
    assert all(c.pass_type is F for c in model.calls[0])


def test_errors_surface_before_running(model: SpyAdapter) -> None:
    with pytest.raises(ConfigError, match="layer index 5 is out of range.*3 layers"):
        scalarlens.derive(model, PROMPTS, "mlp.post_act", layers=[5])
    with pytest.raises(UnknownDstError, match="did you mean 'mlp.post_act'"):
        scalarlens.derive(model, PROMPTS, "mlp.post_actt")
    assert model.calls == []


def test_store_topk_semantics(model: SpyAdapter) -> None:
    store = scalarlens.derive(model, PROMPTS, ["mlp.pre_act", "mlp.post_act", "attn.qk_probs"])
    records = store.topk(5, dsts=["mlp.pre_act", "mlp.post_act"])
    assert len(records) == 5  # exactly k across DSTs, not k per DST
    values = [r.value for r in records]
    assert values == sorted(values, reverse=True)
    everything = torch.cat(
        [
            store.get(d, layer).reshape(-1)
            for d in ("mlp.pre_act", "mlp.post_act")
            for layer in range(3)
        ]
    )
    assert values == pytest.approx(torch.topk(everything, 5).values.tolist())
    lowest = store.topk(4, dsts=["mlp.post_act"], largest=False, layers=[2])
    assert [r.layer for r in lowest] == [2] * 4
    assert [r.value for r in lowest] == sorted(r.value for r in lowest)
    assert lowest[0].value == pytest.approx(float(store.get("mlp.post_act", 2).min()))
    for r in lowest:
        assert store.get("mlp.post_act", 2)[r.token, r.component[0]] == pytest.approx(r.value)
    probs = store.topk(3, dsts=["attn.qk_probs"], prompt=1)
    for r in probs:
        assert r.attended_token is not None and r.attended_token <= r.token
        tensor = store.get("attn.qk_probs", r.layer, prompt=1)
        assert tensor[r.token, r.attended_token, r.component[0]] == pytest.approx(r.value)


def test_save_and_load_round_trip(model: SpyAdapter, tmp_path: Path) -> None:
    store = scalarlens.derive(
        model,
        PROMPTS,
        ["attn.qk_probs", "logits", "mlp.post_act"],
        target=1,
        distractor=2,
        config=DstConfig(derive_gradients=True),
    )
    path = tmp_path / "store.safetensors"
    store.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("attn.qk_probs/forward/0").shape == (2, 6, 6, 2)  # prompt axis
    assert {"logits/forward/none", "logits/backward/none", "mlp.post_act/backward/2"} <= keys
    loaded = DerivedScalarStore.load(path)
    assert loaded.tokens == tuple(tuple(p) for p in PROMPTS)
    assert loaded.metadata["model"] == store.metadata["model"]
    for key in store.keys():
        for p in range(2):
            a = store.activations(key.dst, key.pass_type, p)
            b = loaded.activations(key.dst.name, key.pass_type, p)
            assert a.layer_indices == b.layer_indices
            assert all(torch.equal(a[layer], b[layer]) for layer in a.layer_indices)
    with pytest.raises(MissingActivationError, match="no resid.post_mlp/forward"):
        loaded.get("resid.post_mlp", 0)


def test_load_model_specs(tmp_path: Path) -> None:
    from scalarlens.models import save_gpt2_checkpoint

    with pytest.raises(CheckpointError, match="cannot resolve model 'nope'"):
        scalarlens.load_model("nope")
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=16)
    save_gpt2_checkpoint(GPT2Model(cfg), tmp_path / "ckpt")
    loaded = scalarlens.load_model(tmp_path / "ckpt")
    assert loaded.dims.n_layers == 1 and loaded.dims.n_vocab == 11

    import types

    plugin = types.ModuleType("loaders")
    exec(
        "from scalarlens import hookimpl\n"
        "@hookimpl\n"
        "def scalarlens_model_loaders():\n"
        f"    from scalarlens.models import load_gpt2_checkpoint\n"
        f"    return {{'mine:': lambda spec: load_gpt2_checkpoint({str(tmp_path / 'ckpt')!r},"
        " name=spec)}\n",
        plugin.__dict__,
    )
    reg = Registry(autoload=False)
    reg.register(plugin, "loaders")
    assert scalarlens.load_model("mine:anything", registry=reg).name == "mine:anything"


def test_direct_effects_use_a_local_final_gradient(model: SpyAdapter) -> None:
    """Only the final-residual gradient needed: one forward run, same numbers as a backward."""
    dsts = ["mlp.write_to_final_residual_grad", "attn.write_to_final_residual_grad_per_token"]
    for detach in (True, False):
        config = DstConfig(detach_final_ln_scale=detach)
        model.calls.clear()
        local = scalarlens.derive(model, PROMPTS, dsts, target=3, distractor=4, config=config)
        ((*captures,),) = model.calls
        assert all(c.pass_type is F for c in captures)  # no backward through the network
        # Reference: force a real backward by also asking for a gradient elsewhere.
        full = scalarlens.derive(
            model,
            PROMPTS,
            [*dsts, "resid.post_attn"],
            target=3,
            distractor=4,
            config=DstConfig(detach_final_ln_scale=detach, derive_gradients=True),
        )
        assert any(c.pass_type is B for c in model.calls[-1])
        for dst in dsts:
            for p in range(2):
                for layer in range(3):
                    torch.testing.assert_close(
                        local.get(dst, layer, prompt=p), full.get(dst, layer, prompt=p)
                    )
        assert local.metadata["objective_values"] == pytest.approx(
            full.metadata["objective_values"]
        )


def test_local_final_gradient_for_log_prob_and_callable_objectives(model: SpyAdapter) -> None:
    """Other logit objectives take the same local path and still match a real backward."""
    dst = "mlp.write_to_final_residual_grad"
    objectives = [
        scalarlens.LogProbObjective(target=5, position=-2),
        scalarlens.CallableObjective(lambda logits: logits[:, 3].sum(), name="sum of logit 3"),
    ]
    for objective in objectives:
        local = scalarlens.derive(model, PROMPTS, dst, objective=objective)
        full = scalarlens.derive(
            model,
            PROMPTS,
            [dst, "resid.post_attn"],
            objective=objective,
            config=DstConfig(derive_gradients=True),
        )
        for p in range(2):
            for layer in range(3):
                torch.testing.assert_close(
                    local.get(dst, layer, prompt=p), full.get(dst, layer, prompt=p)
                )
