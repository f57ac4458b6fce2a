"""The conformance kit: check a plugin against the contract in one line.

Installed as a pytest plugin (``pytest11`` entry point), so its fixtures are available in any
test suite once scalarlens is installed.  A plugin author writes::

    from scalarlens.testing import conformance_tests

    test_contract = conformance_tests("myplugin")

and gets one test per DST the plugin registers, each checking: the deriver resolves (every DST
it references exists), a description is present, every declared pass derives, output shapes
match the declared spec on every layer, layer keys and pass labels are right, outputs carry no
autograd graph, derivation is deterministic and never mutates its inputs.

DSTs that need plugin options get them from the plugin's ``scalarlens_dst_examples`` hook.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch

from ._activations import ActivationsAndMetadata, RawActivationStore
from ._config import DstConfig
from ._derive import derive, plugin_interventions
from ._deriver import ScalarDeriver
from ._dst import DstAndPass
from ._model import Intervention, LogitDiffObjective, ModelAdapter, Objective, RunResult
from ._plan import Plan, execute_plan, make_plan
from ._prepare import unsupported_reason
from ._reconstitute_check import check_reconstitution
from ._registry import Registry
from ._sources import PromptCombo
from ._vocab import PassType, resolve_shape
from .exceptions import (
    ConfigError,
    KernelError,
    KernelMutationWarning,
    ShapeError,
    UnsupportedModelError,
)

TINY_TOKENS = ((3, 1, 4, 1, 5, 9), (2, 6, 5))
# The baseline (corrupted) prompt of each tiny prompt, for DSTs that compare two prompts.
TINY_BASELINES = ((3, 1, 7, 1, 5, 9), (2, 8, 5))


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> ModelAdapter:
    """A 3-layer random GPT-2 with random LayerNorm parameters and biases (nothing is zero)."""
    from .models import GPT2Adapter, GPT2Config, GPT2Model

    generator = torch.Generator().manual_seed(seed)
    cfg = GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=3, n_head=4, n_inner=32)
    model = GPT2Model(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return GPT2Adapter(model, name="tiny-random", dtype=dtype)


def isolated_registry(*plugins: str) -> Registry:
    """A fresh registry with every installed plugin, or only ``builtins`` plus ``plugins``."""
    reg = Registry()
    if plugins:
        keep = {"builtins", *plugins}
        for info in reg.plugins():
            if info.name not in keep:
                reg.unregister(info.name)
    return reg


def _clone_store(store: RawActivationStore) -> dict[Any, dict[Any, torch.Tensor]]:
    return {
        key: {layer: t.clone() for layer, t in aam.activations_by_layer_index.items()}
        for key, aam in store.entries.items()
    }


def check_dst(reg: Registry, name: str, model: ModelAdapter, config: DstConfig) -> None:
    """Every contract check for one DST; raises ``AssertionError`` naming what broke."""
    where = f"{name} (plugin {reg.provider(name).name})"
    dst = reg.dst(name)
    assert dst.description.strip(), f"{where}: DerivedScalarType.description is empty"
    try:
        deriver = reg.get(name, config)  # resolves every DstReference or raises
    except ConfigError as exc:
        raise AssertionError(
            f"{where}: cannot be built with {config!r}: {exc}. If it needs plugin options, "
            "return an example config for it from the plugin's scalarlens_dst_examples hook "
            "(or pass configs={name: DstConfig(...)} to conformance_tests)"
        ) from None
    reason = unsupported_reason(deriver, model)
    if reason is not None:  # a capability the model lacks (e.g. mlp.up on a non-gated MLP)
        with pytest.raises(UnsupportedModelError, match=re.escape(name)):
            derive(
                model,
                [list(TINY_TOKENS[0])],
                name,
                config=config,
                registry=reg,
                baseline=[list(TINY_BASELINES[0])] if deriver.reads_baseline() else None,
            )
        pytest.skip(f"{where}: {reason}")
    for pass_type in sorted(deriver.derivable_pass_types, key=lambda p: p.value):  # stable
        plan = make_plan([(deriver, pass_type)], model.dims.n_layers)
        objective = LogitDiffObjective(target=1, distractor=2) if plan.needs_objective else None
        # Splice plugin interventions exactly as derive() does, so online DSTs are checked too.
        spliced = plugin_interventions(plan, model, reg)
        runs = model.run(
            [list(t) for t in TINY_TOKENS],
            plan.captures,
            objective if plan.needs_backward or plan.uses_baseline else None,
            interventions=spliced,
        )
        others = _baseline_runs(plan, model, objective, spliced, config)
        for i, run in enumerate(runs):
            _check_run(
                run,
                plan,
                deriver,
                pass_type,
                model,
                objective,
                f"{where} ({pass_type.value})",
                others[i] if others else {},
            )


def _baseline_runs(
    plan: Plan,
    model: ModelAdapter,
    objective: Objective | None,
    spliced: list[Intervention],
    config: DstConfig,
) -> list[dict[PromptCombo, RawActivationStore]]:
    """Per tiny prompt: its baseline's captures and the engine's runs, as ``derive`` makes them."""
    if not plan.uses_baseline:
        return []
    from ._contrast import engine_runs

    assert objective is not None
    main = model.run(
        [list(t) for t in TINY_TOKENS], plan.captures, objective, interventions=spliced
    )
    base = model.run(
        [list(t) for t in TINY_BASELINES],
        plan.captures_for(PromptCombo.BASELINE),
        objective,
        interventions=spliced,
    )
    return [
        {
            PromptCombo.BASELINE: RawActivationStore.from_nested_dict(b.captured),
            **engine_runs(plan, model, m, b, objective, spliced, config),
        }
        for m, b in zip(main, base, strict=True)
    ]


def _check_run(
    run: RunResult,
    plan: Plan,
    deriver: ScalarDeriver,
    pass_type: PassType,
    model: ModelAdapter,
    objective: Objective | None,
    where: str,
    others: Mapping[PromptCombo, RawActivationStore],
) -> None:
    """One prompt's derivation: inputs untouched, labels, layers, shapes, no graph, repeatable."""
    dst = deriver.dst
    raw = RawActivationStore.from_nested_dict(run.captured)
    before = _clone_store(raw)
    first = _execute(plan, raw, model, objective, where, others)
    second = execute_plan(plan, raw, model=model, objective=objective, runs=others)
    after = _clone_store(raw)
    for key, by_layer in before.items():
        for layer, tensor in by_layer.items():
            assert torch.equal(tensor, after[key][layer]), (
                f"{where} mutated its input {key[0].value} layer {layer}"
            )
    ((label, out),) = first.items()
    assert label.dst == dst and label.pass_type is pass_type, (
        f"{where}: result labelled {label}, expected {dst.name}/{pass_type.value}"
    )
    n_layers = model.dims.n_layers
    expected_layers = (None,) if dst.has_no_layers else tuple(range(n_layers))
    assert out.layer_indices == expected_layers, (
        f"{where}: layers {out.layer_indices}, expected {expected_layers}"
    )
    want = resolve_shape(
        dst.shape,
        n_tokens=len(run.tokens),
        model_sizes=model.dims.sizes(),
        parameter_sizes=deriver.parameter_sizes,
    )
    for layer in out.layer_indices:
        tensor = out[layer]
        assert tuple(tensor.shape) == want, (
            f"{where} layer {layer}: shape {tuple(tensor.shape)}, "
            f"declared {[d.value for d in dst.shape]} = {want}"
        )
        assert tensor.grad_fn is None and not tensor.requires_grad, (
            f"{where} layer {layer}: output carries an autograd graph"
        )
        assert torch.equal(tensor.nan_to_num(), second[label][layer].nan_to_num()), (
            f"{where} layer {layer}: two derivations differ"
        )


def _execute(
    plan: Plan,
    raw: RawActivationStore,
    model: ModelAdapter,
    objective: Objective | None,
    where: str,
    others: Mapping[PromptCombo, RawActivationStore],
) -> dict[DstAndPass, ActivationsAndMetadata]:
    """``execute_plan`` with the engine's own errors turned into the kit's assertions.

    The engine blocks in-place writes (re-running the kernel on copies, with a warning); a
    conforming plugin never triggers that, so here the warning is a failure.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelMutationWarning)
        try:
            return execute_plan(plan, raw, model=model, objective=objective, runs=others)
        except KernelMutationWarning as exc:
            raise AssertionError(
                f"{where} mutated {exc.target or 'a tensor it does not own'} in place; use "
                "out-of-place operations"
            ) from None
        except (KernelError, ShapeError) as exc:
            raise AssertionError(f"{where}: {exc}") from None


def conformance_tests(
    plugin: str | None = None,
    *,
    model: Callable[[], ModelAdapter] = tiny_model,
    configs: Mapping[str, DstConfig] | None = None,
    with_plugins: tuple[str, ...] = (),
) -> Callable[[str], None]:
    """A pytest test, parametrised over every DST ``plugin`` registers (all plugins if None).

    The registry holds the builtins and ``plugin`` only, plus ``with_plugins``: the plugins
    whose DSTs ``plugin``'s DSTs read by name (e.g. ``("sae",)`` for edges into SAE latents).
    """
    reg = isolated_registry(*([plugin, *with_plugins] if plugin else []))
    names = sorted(
        name for info in reg.plugins() if plugin in (None, info.name) for name in info.dsts
    )
    if not names:
        raise AssertionError(
            f"plugin {plugin!r} registers no DSTs (is it installed? `scalarlens plugins`)"
        )
    examples = {**reg.dst_examples(), **(configs or {})}

    @pytest.mark.parametrize("dst_name", names)
    def test_dst_conforms(dst_name: str) -> None:
        check_dst(reg, dst_name, model(), examples.get(dst_name, DstConfig()))

    return test_dst_conforms


# --- pytest fixtures (this module is a pytest plugin) ---------------------------------------


@pytest.fixture
def scalarlens_registry() -> Iterator[Registry]:
    """A fresh, isolated registry with every installed plugin."""
    yield Registry()


@pytest.fixture
def scalarlens_tiny_model() -> ModelAdapter:
    """A 3-layer float64 random GPT-2 with non-zero biases (for exact identities)."""
    return tiny_model()


@pytest.fixture(scope="session")
def scalarlens_bundled_model() -> ModelAdapter:
    """The bundled ``tiny-induction`` model (no download)."""
    from .models._loading import load_model

    return load_model("tiny-induction")


__all__ = [
    "check_dst",
    "check_reconstitution",
    "conformance_tests",
    "isolated_registry",
    "scalarlens_bundled_model",
    "scalarlens_registry",
    "scalarlens_tiny_model",
    "tiny_model",
]
