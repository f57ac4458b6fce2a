"""Nodes evaluated while the model runs (``_eager``) give the after-the-run results bit for bit,
and each layer's captures are reduced as soon as they exist instead of piling up.

The reference is the same derivation on an adapter that declares ``accepts_capture_sink =
False``: the run then returns every capture and ``execute_plan`` evaluates every node afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import scalarlens
import torch
from scalarlens import DstConfig, KernelError, NodeObjective, PassType, Registry
from scalarlens._eager import EagerEvaluation, eager_nodes
from scalarlens._plan import make_plan

from tests.builtins._tiny import ALT, TOKENS, tiny_adapter
from tests.core.test_isolation import HOSTILE
from tests.engine.test_low_memory import _derive_everything

REGISTRY = scalarlens.registry
PROMPTS = [TOKENS, TOKENS[:4]]  # a padded batch: the second prompt is shorter


def _without_sink(adapter: scalarlens.ModelAdapter) -> scalarlens.ModelAdapter:
    adapter.accepts_capture_sink = False  # type: ignore[attr-defined]
    return adapter


def _derive_every_dst(adapter: object, memory: str, objective: object) -> dict:  # type: ignore[type-arg]
    # Two-prompt plans are executed after their runs (no sink), so they are left out.
    return _derive_everything(adapter, memory, objective, PROMPTS, two_prompt_dsts=False)


@pytest.mark.parametrize("memory", ["default", "low"])
@pytest.mark.parametrize(
    "objective",
    [scalarlens.LogitDiffObjective(4, 11), NodeObjective(ALT.MLP_POST_ACT, 1, (2, 7))],
    ids=["logit_diff", "node_in_layer_1"],  # the second leaves layer 2's gradients unreached
)
def test_eager_evaluation_is_bit_identical_for_every_dst(memory: str, objective: object) -> None:
    offers = 0
    original = EagerEvaluation.offer

    def counting(self: EagerEvaluation, *args: object, **kwargs: object) -> None:
        nonlocal offers
        offers += 1
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EagerEvaluation, "offer", counting)
        eager = _derive_every_dst(tiny_adapter(), memory, objective)
    after = _derive_every_dst(_without_sink(tiny_adapter()), memory, objective)
    assert offers > 100  # most DSTs were evaluated while the model ran
    assert eager.keys() == after.keys() and len(eager) > 200
    assert any("/backward" in key[0] and float(v.abs().max()) > 0 for key, v in eager.items())
    for key, value in eager.items():
        assert torch.equal(value, after[key]), key


def test_each_layer_gradient_is_reduced_before_the_next_arrives() -> None:
    """act×grad of every head and neuron never holds two layers' gradients at once, and the
    ``T×S×H`` pair intermediate never outlives its reduction."""
    adapter = tiny_adapter()
    dsts = ["attn.act_times_grad_per_token", "mlp.act_times_grad"]
    most_gradients = 0
    original = EagerEvaluation._evaluate

    def watching(self: EagerEvaluation, b: int, job: object) -> None:
        nonlocal most_gradients
        held = [x for x in self._available[b] if x[0] == "raw" and x[1][1] is PassType.BACKWARD]
        most_gradients = max(most_gradients, len({x[2] for x in held}))
        original(self, b, job)  # type: ignore[arg-type]

    for memory in ("default", "low"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(EagerEvaluation, "_evaluate", watching)
            store = scalarlens.derive(
                adapter, [TOKENS], dsts, target=4, distractor=11, config=DstConfig(memory=memory)
            )
        reference = scalarlens.derive(
            _without_sink(tiny_adapter()),
            [TOKENS],
            dsts,
            target=4,
            distractor=11,
            config=DstConfig(memory=memory),
        )
        adapter.accepts_capture_sink = True  # type: ignore[attr-defined]
        for name in dsts:
            for layer in range(3):
                assert torch.equal(store.get(name, layer), reference.get(name, layer))
    assert most_gradients == 1

    config = DstConfig()
    plan = make_plan([(REGISTRY.get(d, config), PassType.FORWARD) for d in dsts], 3)
    nodes, keys = eager_nodes(plan)
    assert {key[0].name for key in nodes} == {"attn.act_times_grad", *dsts}
    assert {(ALT.ATTN_QK_PROBS, PassType.BACKWARD), (ALT.MLP_POST_ACT, PassType.BACKWARD)} <= keys
    sink = EagerEvaluation(plan, [len(TOKENS)], model=adapter, objective=None)
    assert "attn.act_times_grad" not in {key[0].name for key in sink._outlives}


BACKWARD_NAN = """
from scalarlens import (DerivedScalarType, Dimension, DstReference, NodeType, PassType,
                        ScalarDeriver, hookimpl)

THE_DST = DerivedScalarType("evil.backward_nan", (Dimension.TOKENS, Dimension.MLP_ACTS),
                            NodeType.MLP_NEURON, description="NaN in the backward pass only",
                            pass_types=frozenset(PassType))

def kernel(inputs, layer, ctx):
    return inputs[0] * (float("nan") if ctx.pass_type is PassType.BACKWARD else 1.0)

@hookimpl
def scalarlens_derivers():
    return {THE_DST: lambda config: ScalarDeriver(THE_DST, config,
                                                   (DstReference("mlp.post_act"),), kernel,
                                                   derivable_pass_types=frozenset(PassType))}
"""


@pytest.fixture
def hostile(make_plugin_dist: Callable[..., str]) -> Registry:
    make_plugin_dist(HOSTILE, dist="scalarlens-evil", version="6.6.6")
    return Registry()


def test_a_bad_kernel_in_the_backward_pass_is_named(make_plugin_dist: Callable[..., str]) -> None:
    """Evaluated inside the backward pass, a NaN still stops derive with the DST's name."""
    make_plugin_dist(BACKWARD_NAN, dist="scalarlens-evil", version="6.6.6")
    model = scalarlens.load_model("tiny-induction")
    with pytest.raises(KernelError, match="non-finite") as err:
        scalarlens.derive(
            model,
            "the old king saw a red fox",
            "evil.backward_nan",
            target="fox",
            distractor="king",
            config=DstConfig(derive_gradients=True),
            registry=Registry(),
        )
    assert "evil.backward_nan (backward pass at layer 0; plugin 'evil')" in str(err.value)


def test_a_mutating_kernel_evaluated_while_running_changes_nothing(hostile: Registry) -> None:
    model = scalarlens.load_model("tiny-induction")
    names = ["mlp.act_times_grad", "mlp.post_act", "attn.act_times_grad_per_token"]
    kwargs = {"target": "fox", "distractor": "king", "registry": hostile}
    prompt = "the old king saw a red fox"
    config = DstConfig(derive_gradients=True)
    reference = scalarlens.derive(model, prompt, names, config=config, **kwargs)
    with pytest.warns(scalarlens.KernelMutationWarning):
        hit = scalarlens.derive(model, prompt, ["evil.mutating", *names], config=config, **kwargs)
    assert len(reference.keys()) == 4  # mlp.post_act in both passes
    for key in reference.keys():
        for layer in range(2):
            assert torch.equal(
                hit.get(key.dst, layer, pass_type=key.pass_type),
                reference.get(key.dst, layer, pass_type=key.pass_type),
            ), (key, layer)


def test_kernels_that_call_into_the_model_wait_for_the_run_to_end() -> None:
    """While the model runs its modules carry the run's hooks, so a kernel reaching past weights
    (here the circuits plugin's reconstitution) is evaluated after the run, with the same bits."""
    pytest.importorskip("scalarlens_circuits")
    deferred = []
    original = EagerEvaluation.results

    def watching(self: EagerEvaluation, b: int) -> dict:  # type: ignore[type-arg]
        deferred.extend(key[0].name for key, _ in self._deferred[b])
        return original(self, b)

    name = "edge.node_attribution_grad"
    config = DstConfig(options=REGISTRY.dst_examples()[name].options.to_dict())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EagerEvaluation, "results", watching)
        store = scalarlens.derive(
            tiny_adapter(), [TOKENS], name, target=4, distractor=11, config=config
        )
    reference = scalarlens.derive(
        _without_sink(tiny_adapter()), [TOKENS], name, target=4, distractor=11, config=config
    )
    assert deferred == [name]
    assert torch.equal(store.get(name), reference.get(name))


def test_low_memory_captures_each_activation_when_its_layer_is_recomputed() -> None:
    """With ``memory="low"`` a layer's activations are captured when the backward pass
    recomputes that layer, next to their gradients, so no layer's activations wait from the
    forward pass (the default mode holds every layer's until its gradient arrives)."""
    dsts = ["attn.act_times_grad_per_token", "mlp.act_times_grad"]
    original = EagerEvaluation._evaluate
    most: dict[str, int] = {}

    for memory in ("default", "low"):

        def watching(self: EagerEvaluation, b: int, job: object, memory: str = memory) -> None:
            held = {x[2] for x in self._available[b] if x[1][1] is PassType.FORWARD}
            most[memory] = max(most.get(memory, 0), len(held))
            original(self, b, job)  # type: ignore[arg-type]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(EagerEvaluation, "_evaluate", watching)
            scalarlens.derive(
                tiny_adapter(),
                [TOKENS],
                dsts,
                target=4,
                distractor=11,
                config=DstConfig(memory=memory),
            )
    assert most == {"default": 3, "low": 1}


def test_a_logit_difference_unembeds_two_columns_with_the_same_result() -> None:
    """The local gradient at the final residual reads two unembedding columns; an adapter whose
    ``logits_from_final_residual`` takes no ``columns=`` unembeds all V and agrees."""
    adapter = tiny_adapter()
    resid = torch.randn(5, adapter.dims.d_model, dtype=torch.float64)
    full = adapter.logits_from_final_residual(resid)
    assert torch.allclose(
        adapter.logits_from_final_residual(resid, columns=[4, 11]), full[:, [4, 11]], atol=1e-12
    )

    class AllColumns(type(adapter)):  # type: ignore[misc]
        def logits_from_final_residual(
            self, resid: torch.Tensor, *, detach_ln_scale: bool = False
        ) -> torch.Tensor:
            return super().logits_from_final_residual(resid, detach_ln_scale=detach_ln_scale)

    old = tiny_adapter()
    old.__class__ = AllColumns
    name = "mlp.write_to_final_residual_grad"
    new_way = scalarlens.derive(adapter, [TOKENS], name, target=4, distractor=11)
    old_way = scalarlens.derive(old, [TOKENS], name, target=4, distractor=11)
    for layer in range(3):
        assert torch.allclose(new_way.get(name, layer), old_way.get(name, layer), atol=1e-12)
        assert float(new_way.get(name, layer).abs().max()) > 0


PREVIOUS_LAYER_PLUGIN = """
import torch
from scalarlens import (PREVIOUS_LAYER, ActivationLocationType, DerivedScalarType, Dimension,
                        NodeType, PassType, RawScalarSource, ScalarDeriver, hookimpl)

THE_DST = DerivedScalarType("prev.resid", (Dimension.TOKENS, Dimension.RESIDUAL_STREAM_CHANNELS),
                            NodeType.RESIDUAL_STREAM_CHANNEL, description="previous layer's")

def kernel(inputs, layer, ctx):
    x = inputs[0]
    return torch.zeros(3, ctx.dims.d_model) if x is None else x * 2

@hookimpl
def scalarlens_derivers():
    source = RawScalarSource(ActivationLocationType.RESID_POST_MLP, PassType.FORWARD,
                             PREVIOUS_LAYER)
    return {THE_DST: lambda config: ScalarDeriver(THE_DST, config, (source,), kernel)}
"""


def test_a_layer_whose_only_input_is_not_needed_is_still_derived(
    make_plugin_dist: Callable[..., str],
) -> None:
    """Layer 0 of a previous-layer DST has no input at all: no capture starts it, so it is
    evaluated after the run (its kernel is called with ``None``, as without eager evaluation)."""
    make_plugin_dist(PREVIOUS_LAYER_PLUGIN, dist="scalarlens-prev", version="1.0")
    registry = Registry()
    model = scalarlens.load_model("tiny-induction")
    tokens = [1, 2, 3]
    store = scalarlens.derive(model, [tokens], "prev.resid", registry=registry)
    reference = scalarlens.derive(_without_sink(model), [tokens], "prev.resid", registry=registry)
    assert torch.equal(store.get("prev.resid", 0), torch.zeros(3, model.dims.d_model))
    for layer in range(model.dims.n_layers):
        assert torch.equal(store.get("prev.resid", layer), reference.get("prev.resid", layer))


def test_low_memory_with_a_kernel_that_runs_autograd_and_an_intervention() -> None:
    """Kernels taking their own gradients (autograd; ``torch.func`` for the Jacobian) never
    run inside a layer the backward pass recomputes, where the checkpoint would take over their
    saved tensors (or ``torch.func`` refuse to run), with or without interventions."""
    pytest.importorskip("scalarlens_sae")
    name = "sae.latent_input_grad_resid"
    options = REGISTRY.dst_examples()[name].options.to_dict()
    dsts = [name, "sae.input_jacobian_resid", "mlp.act_times_grad"]
    keep = scalarlens.Intervention(ALT.MLP_POST_ACT, lambda x, layer: x * 1.0, layers={2})
    for interventions in ([], [keep]):
        stores = [
            scalarlens.derive(
                adapter,
                [TOKENS],
                dsts,
                target=4,
                distractor=11,
                interventions=interventions,
                config=DstConfig(options=options, memory=memory),
            )
            for adapter, memory in (
                (tiny_adapter(), "low"),
                (_without_sink(tiny_adapter()), "default"),
            )
        ]
        for dst in dsts:
            entry = stores[1].activations(dst)
            for layer in entry.layer_indices:
                assert torch.equal(stores[0].get(dst, layer), stores[1].get(dst, layer)), dst


def test_low_memory_with_a_non_differentiable_objective_gives_zero_gradients() -> None:
    """A callable objective may not depend differentiably on anything: no backward pass
    reaches the layers, so low memory must not wait for their recomputation."""
    flat = scalarlens.CallableObjective(lambda logits: (logits[-1].argmax() == 4).to(logits.dtype))
    store = scalarlens.derive(
        tiny_adapter(),
        [TOKENS],
        "mlp.act_times_grad",
        objective=flat,
        config=DstConfig(memory="low"),
    )
    for layer in range(3):
        assert torch.equal(store.get("mlp.act_times_grad", layer), torch.zeros(len(TOKENS), 32))
