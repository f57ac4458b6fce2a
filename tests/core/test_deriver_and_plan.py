from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from scalarlens import (
    LAST_LAYER,
    NO_LAYERS,
    PREVIOUS_LAYER,
    ActivationLocationType,
    ConfigError,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    EvaluationCounter,
    MissingActivationError,
    NodeType,
    PassType,
    RawActivationStore,
    RawScalarSource,
    Registry,
    ScalarDeriver,
    ShapeError,
    UnsupportedPassError,
    derive_from_raw,
    make_plan,
)

ALT = ActivationLocationType
F, B = PassType.FORWARD, PassType.BACKWARD
N_LAYERS, T, D, FF = 3, 4, 5, 6
T_F = (Dimension.TOKENS, Dimension.MLP_ACTS)
T_1 = (Dimension.TOKENS, Dimension.SINGLETON)


def _raw_store() -> RawActivationStore:
    g = torch.Generator().manual_seed(0)

    def per_layer(width: int) -> dict[int | None, torch.Tensor]:
        return {layer: torch.randn(T, width, generator=g) for layer in range(N_LAYERS)}

    nested = {
        (ALT.MLP_POST_ACT, F): per_layer(FF),
        (ALT.MLP_POST_ACT, B): per_layer(FF),
        (ALT.RESID_POST_MLP, F): per_layer(D),
        (ALT.RESID_POST_MLP, B): per_layer(D),
        (ALT.RESID_POST_EMBEDDING, F): {None: torch.randn(T, D, generator=g)},
    }
    return RawActivationStore.from_nested_dict(nested)


@pytest.fixture
def reg() -> Registry:
    import scalarlens_builtins.plugin

    r = Registry(autoload=False)
    r.register(scalarlens_builtins.plugin, "builtins")
    return r


def _dst(name: str, shape=T_F, node=NodeType.MLP_NEURON, no_layers=False) -> DerivedScalarType:
    return DerivedScalarType(name, shape, node, description=f"test {name}", has_no_layers=no_layers)


def test_transform_helpers(reg: Registry) -> None:
    store = _raw_store()
    post_act = reg.get("mlp.post_act")
    doubled = post_act.apply_transform_fn_to_output(lambda t: 2 * t, F, _dst("t.double"))
    plus_layer = post_act.apply_layerwise_transform_fn_to_output(
        lambda t, layer, ctx: t + layer, F, _dst("t.plus_layer")
    )
    # act × grad of the last layer's gradient: exercises the other-tensor helper + static indexer
    times_last_grad = post_act.apply_layerwise_transform_fn_to_output_and_other_tensor(
        lambda t, other, layer, ctx: t * other,
        F,
        _dst("t.times_last_grad"),
        RawScalarSource(ALT.MLP_POST_ACT, B, LAST_LAYER),
    )
    out = derive_from_raw(
        [(doubled, F), (plus_layer, F), (times_last_grad, F)], store, n_layers=N_LAYERS
    )
    acts = store.get(ALT.MLP_POST_ACT, F)
    last_grad = store.get(ALT.MLP_POST_ACT, B)[N_LAYERS - 1]
    for layer in range(N_LAYERS):
        by_name = {k.dst.name: v for k, v in out.items()}
        assert torch.equal(by_name["t.double"][layer], 2 * acts[layer])
        assert torch.equal(by_name["t.plus_layer"][layer], acts[layer] + layer)
        assert torch.equal(by_name["t.times_last_grad"][layer], acts[layer] * last_grad)
    assert doubled.config == post_act.config  # transforms inherit the parent's config


def test_shared_sub_deriver_is_evaluated_once(reg: Registry) -> None:
    calls: list[int | None] = []

    def shared_factory(config: DstConfig) -> ScalarDeriver:
        def kernel(inputs, layer, ctx):  # type: ignore[no-untyped-def]
            calls.append(layer)
            return inputs[0] * 3

        return ScalarDeriver(_dst("t.shared"), config, (DstReference("mlp.post_act", F),), kernel)

    reg.register_factory(_dst("t.shared"), shared_factory)
    n = 6
    for i in range(n):
        reg.register_factory(
            _dst(f"t.user{i}"),
            lambda config, i=i: ScalarDeriver(
                _dst(f"t.user{i}"),
                config,
                (DstReference("t.shared", F),),
                lambda inputs, layer, ctx: inputs[0] + i,
            ),
        )
    config = DstConfig()
    requests = [(reg.get(f"t.user{i}", config), F) for i in range(n)]
    counter = EvaluationCounter()
    out = derive_from_raw(requests, _raw_store(), n_layers=N_LAYERS, counter=counter)
    assert counter.by_dst["t.shared"] == N_LAYERS  # once per layer, not n × per layer
    assert sorted(calls) == list(range(N_LAYERS))
    assert counter.by_dst["mlp.post_act"] == N_LAYERS
    assert counter.total == N_LAYERS * (n + 2)
    acts = _raw_store().get(ALT.MLP_POST_ACT, F)
    for key, value in out.items():
        i = int(key.dst.name.removeprefix("t.user"))
        assert torch.equal(value[1], acts[1] * 3 + i)

    # Deriving each separately evaluates the shared node n times per layer.
    counter.reset()
    for request in requests:
        derive_from_raw([request], _raw_store(), n_layers=N_LAYERS, counter=counter)
    assert counter.by_dst["t.shared"] == n * N_LAYERS


def _prev_resid_factory(config: DstConfig) -> ScalarDeriver:
    def kernel(inputs, layer, ctx):  # type: ignore[no-untyped-def]
        prev, emb = inputs
        return emb if prev is None else prev  # explicit: None means "not needed", not zero

    return ScalarDeriver(
        _dst(
            "t.prev_resid",
            (Dimension.TOKENS, Dimension.RESIDUAL_STREAM_CHANNELS),
            NodeType.RESIDUAL_STREAM_CHANNEL,
        ),
        config,
        (
            RawScalarSource(ALT.RESID_POST_MLP, F, PREVIOUS_LAYER),
            RawScalarSource(ALT.RESID_POST_EMBEDDING, F, NO_LAYERS),
        ),
        kernel,
    )


def test_plan_prunes_to_requested_layers_and_reports_captures(reg: Registry) -> None:
    reg.register_factory(_prev_resid_factory(DstConfig()).dst, _prev_resid_factory)
    deriver = reg.get("t.prev_resid", DstConfig(layer_indices=[2]))
    plan = make_plan([(deriver, F)], N_LAYERS)
    assert dict(plan.raw_layers) == {
        (ALT.RESID_POST_MLP, F): frozenset({1}),
        (ALT.RESID_POST_EMBEDDING, F): frozenset({None}),
    }
    assert not plan.needs_backward
    out = derive_from_raw([(deriver, F)], _raw_store(), n_layers=N_LAYERS)
    (value,) = out.values()
    assert value.layer_indices == (2,)
    assert torch.equal(value[2], _raw_store().get(ALT.RESID_POST_MLP, F)[1])

    layer0 = reg.get("t.prev_resid", DstConfig(layer_indices=[0]))
    plan0 = make_plan([(layer0, F)], N_LAYERS)
    assert set(plan0.raw_layers) == {(ALT.RESID_POST_EMBEDDING, F)}
    (value0,) = derive_from_raw([(layer0, F)], _raw_store(), n_layers=N_LAYERS).values()
    assert torch.equal(value0[0], _raw_store().get(ALT.RESID_POST_EMBEDDING, F)[None])


def test_backward_need_is_known_before_running(reg: Registry) -> None:
    act_times_grad = DerivedScalarType("t.atg", T_F, NodeType.MLP_NEURON)
    deriver = ScalarDeriver(
        act_times_grad,
        DstConfig(),
        (RawScalarSource(ALT.MLP_POST_ACT, F), RawScalarSource(ALT.MLP_POST_ACT, B)),
        lambda inputs, layer, ctx: inputs[0] * inputs[1],
    )
    plan = make_plan([(deriver, F)], N_LAYERS)
    assert plan.needs_backward
    assert {(c.location, c.pass_type) for c in plan.captures} == {
        (ALT.MLP_POST_ACT, F),
        (ALT.MLP_POST_ACT, B),
    }
    assert deriver.raw_requirements() == {(ALT.MLP_POST_ACT, F), (ALT.MLP_POST_ACT, B)}
    with pytest.raises(UnsupportedPassError, match=r"t.atg cannot be derived for the backward"):
        make_plan([(deriver, B)], N_LAYERS)


def test_raw_twin_serves_both_passes(reg: Registry) -> None:
    twin = reg.get("mlp.post_act")
    out = derive_from_raw([(twin, F), (twin, B)], _raw_store(), n_layers=N_LAYERS)
    store = _raw_store()
    for key, value in out.items():
        assert torch.equal(value[0], store.get(ALT.MLP_POST_ACT, key.pass_type)[0])


def test_execution_errors_are_specific(reg: Registry) -> None:
    twin = reg.get("mlp.post_act", DstConfig(layer_indices=[1]))
    partial = RawActivationStore.from_nested_dict({(ALT.MLP_POST_ACT, F): {0: torch.zeros(T, FF)}})
    with pytest.raises(MissingActivationError, match="at layer 1, which was not captured"):
        derive_from_raw([(twin, F)], partial, n_layers=N_LAYERS)
    with pytest.raises(ConfigError, match="layer index 7 is out of range"):
        make_plan([(reg.get("mlp.post_act", DstConfig(layer_indices=[7])), F)], N_LAYERS)
    bad = ScalarDeriver(
        _dst("t.bad"),
        DstConfig(),
        (RawScalarSource(ALT.MLP_POST_ACT, F),),
        lambda inputs, layer, ctx: inputs[0].sum(),
    )
    with pytest.raises(
        ShapeError,
        match=r"t.bad \(forward pass at layer 0; .*\): the kernel returned shape \(\), "
        r"declared \(tokens=4",
    ):
        derive_from_raw([(bad, F)], _raw_store(), n_layers=N_LAYERS)
    unresolved = ScalarDeriver(
        _dst("t.unres"),
        DstConfig(),
        (DstReference("mlp.post_act"),),
        lambda inputs, layer, ctx: inputs[0],
    )
    with pytest.raises(ConfigError, match="unresolved reference"):
        make_plan([(unresolved, F)], N_LAYERS)


def test_outputs_carry_no_graph_and_weights_need_a_model(reg: Registry) -> None:
    leaf = torch.ones(T, FF, requires_grad=True)
    store = RawActivationStore.from_nested_dict({(ALT.MLP_POST_ACT, F): {0: leaf * 2}})
    (value,) = derive_from_raw(
        [(reg.get("mlp.post_act", DstConfig(layer_indices=[0])), F)], store, n_layers=1
    ).values()
    assert value[0].grad_fn is None and not value[0].requires_grad
    ctx = DeriveContext(F, DstConfig(), _dst("t.w"))
    from scalarlens import WeightLocationType

    with pytest.raises(ConfigError, match="no model was given"):
        ctx.weight(WeightLocationType.MLP_TO_RESIDUAL, 0)


def test_deriver_rebuilds_in_another_process(reg: Registry) -> None:
    deriver = reg.get("resid.post_emb", DstConfig(layer_indices=[1], derive_gradients=True))
    payload = json.dumps(deriver.to_serializable_dict())
    code = (
        "import json, sys; from scalarlens import registry;"
        "d = registry.from_serializable_dict(json.loads(sys.argv[1]));"
        "passes = sorted(p.value for p in d.derivable_pass_types);"
        "raw = sorted(f'{a.value}/{p.value}' for a, p in d.raw_requirements());"
        "print(json.dumps([d.to_serializable_dict(), passes, raw]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, payload], capture_output=True, text=True, check=True
    )
    rebuilt, passes, raw = json.loads(result.stdout)
    assert rebuilt == deriver.to_serializable_dict()
    assert passes == ["backward", "forward"]
    assert raw == ["resid.post_emb/forward"]
