"""Plugins cannot corrupt each other's numbers, and bad kernel outputs stop with a named error.

The hostile plugins are real throwaway distributions (``make_plugin_dist``), discovered through
entry points exactly as a pip-installed plugin would be.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import scalarlens
import torch
from scalarlens import (
    DstConfig,
    KernelError,
    KernelMutationWarning,
    Registry,
    ShapeError,
)

PROMPT = "the old king saw a red fox the old king saw a red"

HOSTILE = """
import numpy as np
import torch
from scalarlens import (DerivedScalarType, Dimension, DstReference, NodeType, ScalarDeriver,
                        WeightLocationType, hookimpl)

T_F = (Dimension.TOKENS, Dimension.MLP_ACTS)

def dst(name, **kw):
    return DerivedScalarType(name, T_F, NodeType.MLP_NEURON, description=name, **kw)

def mutate(inputs, layer, ctx):
    return inputs[0].mul_(100)

def zero_weight(inputs, layer, ctx):
    ctx.weight(WeightLocationType.MLP_TO_RESIDUAL, layer).zero_()
    ctx.weight(WeightLocationType.UNEMBEDDING).zero_()
    return inputs[0] * 1

def direct_param(inputs, layer, ctx):
    ctx.model.model.ln_f.weight.mul_(0)  # around ctx.weight, straight into the module
    return inputs[0] * 1


def weight_view(inputs, layer, ctx):
    return ctx.model.model.block(layer).mlp.c_fc.bias.expand(inputs[0].shape)


KERNELS = {
    "evil.direct_param": (direct_param, {}),
    "evil.weight_view": (weight_view, {}),
    "evil.mutating": (mutate, {}),
    "evil.zero_weight": (zero_weight, {}),
    "evil.wrong_size": (lambda inputs, layer, ctx: inputs[0][:, :5], {}),
    "evil.nan": (lambda inputs, layer, ctx: inputs[0] * float("nan"), {}),
    "evil.nan_declared": (lambda inputs, layer, ctx: inputs[0] * float("nan"),
                          {"allows_non_finite": True}),
    "evil.none": (lambda inputs, layer, ctx: None, {}),
    "evil.numpy": (lambda inputs, layer, ctx: inputs[0].numpy().copy(), {}),
    "evil.integer": (lambda inputs, layer, ctx: inputs[0].long(), {}),
}

def factory(name, kernel, kw):
    the_dst = dst(name, **kw)
    return the_dst, lambda config: ScalarDeriver(the_dst, config,
                                                 (DstReference("mlp.post_act"),), kernel)

@hookimpl
def scalarlens_derivers():
    return dict(factory(name, kernel, kw) for name, (kernel, kw) in KERNELS.items())
"""


@pytest.fixture
def hostile(make_plugin_dist: Callable[..., str]) -> Registry:
    make_plugin_dist(HOSTILE, dist="scalarlens-evil", version="6.6.6")
    return Registry()


def _builtin_names(reg: Registry) -> list[str]:
    # mlp.up exists only on gated MLPs; the tiny GPT-2 refuses it (tested in test_catalogue_meta).
    return sorted(
        name for name in reg.names() if reg.provider(name).name == "builtins" and name != "mlp.up"
    )


def _derive_all(reg: Registry, model: scalarlens.ModelAdapter, extra: list[str]) -> dict:  # type: ignore[type-arg]
    # The builtins' example options (a neuron for vocab.write_to_input_direction) are ignored
    # by every other DST, so one config derives the whole catalogue in one call.
    options = reg.dst_examples()["vocab.write_to_input_direction"].options
    store = scalarlens.derive(
        model,
        PROMPT,
        [*extra, *_builtin_names(reg)],
        target="fox",
        distractor="king",
        baseline="the old king saw a red cat the old king saw a red",  # for patching DSTs
        config=DstConfig(derive_gradients=True, options=options),
        registry=reg,
    )
    out = {}
    for key in store.keys():
        entry = store.activations(key.dst, key.pass_type)
        for layer, tensor in entry.activations_by_layer_index.items():
            out[(str(key), layer)] = tensor.clone()
    return out


def _weights(model: scalarlens.ModelAdapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}  # type: ignore[attr-defined]


def test_mutating_kernels_leave_every_builtin_bit_identical(hostile: Registry) -> None:
    model = scalarlens.load_model("tiny-induction")
    weights = _weights(model)
    reference = _derive_all(hostile, model, [])
    assert len({name for name, _ in reference}) >= 47  # every builtin DST, both passes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same_call = _derive_all(hostile, model, ["evil.mutating", "evil.zero_weight"])
    later = _derive_all(hostile, model, [])

    for key, value in reference.items():
        assert torch.equal(same_call[key], value), f"{key} changed in the same call"
        assert torch.equal(later[key], value), f"{key} changed in a later call"
    for name, value in _weights(model).items():
        assert torch.equal(value, weights[name]), f"weight {name} changed"
    # The hostile kernels' own results are what they computed on their private copies.
    post = same_call[("mlp.post_act/forward", 0)]
    assert torch.equal(same_call[("evil.mutating/forward", 0)], post * 100)
    messages = {str(w.message) for w in caught if issubclass(w.category, KernelMutationWarning)}
    assert any(
        "evil.mutating" in m and "plugin 'evil'" in m and "mlp.post_act" in m for m in messages
    )
    assert any("evil.zero_weight" in m and "a model weight" in m for m in messages)


@pytest.mark.parametrize(
    ("dst", "error", "message"),
    [
        (
            "evil.wrong_size",
            ShapeError,
            r"returned shape \(13, 5\), declared \(tokens=13, "
            r"mlp_acts=256\)",
        ),
        ("evil.nan", KernelError, r"non-finite value\(s\) \(NaN or inf\)"),
        ("evil.none", KernelError, "returned NoneType, expected a torch.Tensor"),
        ("evil.numpy", KernelError, "returned ndarray, expected a torch.Tensor"),
        ("evil.integer", KernelError, "torch.int64 tensor, expected a floating-point"),
    ],
)
def test_bad_kernel_outputs_name_dst_plugin_and_layer(
    hostile: Registry, dst: str, error: type[Exception], message: str
) -> None:
    model = scalarlens.load_model("tiny-induction")
    with pytest.raises(error, match=message) as err:
        scalarlens.derive(model, PROMPT, dst, registry=hostile)
    assert f"{dst} (forward pass at layer 0; plugin 'evil')" in str(err.value)


def test_declared_non_finite_values_pass(hostile: Registry) -> None:
    model = scalarlens.load_model("tiny-induction")
    store = scalarlens.derive(model, PROMPT, "evil.nan_declared", registry=hostile)
    assert torch.isnan(store.get("evil.nan_declared", 0)).any()
    # masked attention logits are -inf by design and declared so by their raw twin
    logits = scalarlens.derive(model, PROMPT, "attn.qk_logits", registry=hostile)
    assert torch.isinf(logits.get("attn.qk_logits", 0)).any()


def test_writes_into_the_model_module_are_refused_and_leave_it_intact(hostile: Registry) -> None:
    model = scalarlens.load_model("tiny-induction")
    weights = _weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelMutationWarning)
        with pytest.raises(KernelError, match=r"evil.direct_param .*modifies the model's param"):
            scalarlens.derive(model, PROMPT, "evil.direct_param", registry=hostile)
    for name, value in _weights(model).items():
        assert torch.equal(value, weights[name]), f"weight {name} changed"


def test_an_output_that_views_a_weight_is_copied(hostile: Registry) -> None:
    model = scalarlens.load_model("tiny-induction")
    store = scalarlens.derive(model, PROMPT, "evil.weight_view", registry=hostile)
    store.get("evil.weight_view", 0).zero_()  # the caller owns its results...
    assert model.model.block(0).mlp.c_fc.bias.abs().sum() > 0  # ...but not the model


def _run_guarded(kernel, inputs):  # type: ignore[no-untyped-def]
    from scalarlens._guard import run_kernel

    return run_kernel(kernel, inputs, 0, None, who=lambda: "K", describe_input=str)


def test_derive_under_inference_mode_still_works() -> None:
    from scalarlens.testing import tiny_model

    model = tiny_model()
    with torch.inference_mode():
        store = scalarlens.derive(model, [[3, 1, 4, 1, 5]], ["mlp.post_act", "mlp.write_norm"])
    assert store.get("mlp.write_norm", 0).shape == (5, 32)


def test_legitimate_kernels_are_not_flagged() -> None:
    x = torch.randn(4, 3)

    def autograd_inside(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        with torch.enable_grad():
            leaf = inputs[0].detach().requires_grad_()
            (grad,) = torch.autograd.grad(torch.tanh(leaf).sum(), leaf)
        return grad

    def functorch_inside(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        return torch.func.grad(lambda t: torch.tanh(t).sum())(inputs[0])

    def int_of_an_entry(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        return inputs[0] * int(inputs[0][0, 0] > 100)

    def empty_write(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        inputs[0][:0].fill_(1.0)  # an empty view: nothing is written
        return inputs[0] * 1

    def scratch(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        out = inputs[0] * 2
        out.mul_(3)  # writing into its own fresh tensor is fine
        torch.mul(out, 2, out=out)
        return out

    for kernel in (autograd_inside, functorch_inside, int_of_an_entry, empty_write, scratch):
        before = x.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelMutationWarning)
            _run_guarded(kernel, (x,))
        assert torch.equal(x, before), kernel.__name__


def test_inplace_keyword_functionals_are_blocked_and_rerun() -> None:
    x = torch.randn(4, 3)
    before = x.clone()
    with pytest.warns(KernelMutationWarning, match=r"relu"):
        out = _run_guarded(
            lambda inputs, layer, ctx: torch.nn.functional.relu(inputs[0], inplace=True), (x,)
        )
    assert torch.equal(x, before)
    assert torch.equal(out, before.relu())


def test_model_storage_cache_follows_replaced_modules() -> None:
    from scalarlens._guard import model_storages
    from scalarlens.testing import tiny_model

    adapter = tiny_model()
    first = model_storages(adapter)
    assert first == model_storages(adapter)  # cached
    adapter.model.ln_f.weight = torch.nn.Parameter(torch.ones(16, dtype=torch.float64))
    new_id = adapter.model.ln_f.weight.untyped_storage().data_ptr()
    assert new_id in model_storages(adapter)


def test_check_survives_concurrent_registration() -> None:
    import threading

    from scalarlens import DstConfig, ScalarDeriver

    reg = Registry()
    stop = threading.Event()

    def register_many() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            dst = scalarlens.DerivedScalarType(
                f"conc.x{i}", (scalarlens.Dimension.TOKENS,), scalarlens.NodeType.LAYER, "x"
            )
            reg.register_factory(dst, lambda c, d=dst: ScalarDeriver(d, c, (), lambda *a: None))
            i += 1

    thread = threading.Thread(target=register_many)
    thread.start()
    try:
        for _ in range(3):
            reg.check()
            reg.model_loaders()
            reg.dst_examples()
    finally:
        stop.set()
        thread.join()
    assert reg.get("mlp.post_act", DstConfig()).dst.name == "mlp.post_act"
