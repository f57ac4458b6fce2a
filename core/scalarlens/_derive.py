"""``derive``: the one-call path from a prompt to ranked components.

``derive`` plans first (so errors about unknown DSTs, unsupported passes, bad layers or a
missing target surface before any model runs), captures exactly what the plan lists in one
forward pass (plus one backward only if a DST needs gradients), then derives every requested
DST once per prompt.

With a ``baseline`` (a corrupted prompt per main prompt), the baseline prompts get their own
batched run, capturing only what the plan reads from them (forward only unless something needs
their gradient), and the engine's extra runs (integrated gradients, activation patching) are
made per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._activations import RawActivationStore
from ._config import DstConfig
from ._dst import DerivedScalarType
from ._model import (
    LOGIT_OBJECTIVES,
    CaptureRequest,
    FinalResidualReadout,
    Intervention,
    LogitDiffObjective,
    LogProbObjective,
    ModelAdapter,
    Objective,
    PluginLocation,
    RunResult,
    logits_objective,
    resolve_position,
)
from ._plan import EvaluationCounter, Plan, execute_plan, make_plan
from ._prepare import (
    Preparation,
    check_model_support,
    prepare,
    prepare_baseline,
    prepare_objective,
    prepare_tokens,
)
from ._sources import PromptCombo
from ._store import DerivedScalarStore
from ._vocab import ActivationLocationType, PassType
from .exceptions import ModelInputError
from .models._loading import load_model

if TYPE_CHECKING:
    from ._contrast import Progress
    from ._eager import EagerEvaluation
    from ._registry import Registry


def derive(
    model: ModelAdapter | str | Path,
    prompts_or_tokens: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    *,
    target: str | int | None = None,
    distractor: str | int | None = None,
    objective: Objective | None = None,
    baseline: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | None = None,
    interventions: Sequence[Intervention] = (),
    layers: Sequence[int] | None = None,
    config: DstConfig | None = None,
    registry: Registry | None = None,
    counter: EvaluationCounter | None = None,
    progress: Progress | None = None,
) -> DerivedScalarStore:
    """Derive ``dsts`` for each prompt.

    ``baseline``: the corrupted prompt of each main prompt (one for all, or one per prompt,
    of the same token length so positions align) for DSTs that compare two prompts;
    ``progress(what, done, total)`` hears about the batched passes of their runs.

    A DST whose value needs gradients requires a backward objective: ``target`` and
    ``distractor`` give the logit difference at the last token (the direction of interest);
    ``objective=`` takes any ``Objective``.  ``interventions`` are spliced into the forward
    pass (ablations, patching); plugins' DSTs that read spliced locations (e.g. SAE latents)
    bring their own interventions.  When the only gradient needed is the one at the final
    residual stream, it is computed locally through the final norm and unembedding.
    """
    registry = _default_registry() if registry is None else registry
    prepared = prepare(dsts, config, registry, layers=layers)
    adapter = model if not isinstance(model, (str, Path)) else load_model(model, registry)
    check_model_support(prepared.requests, adapter)
    plan = make_plan(prepared.requests, adapter.dims.n_layers)
    tokens = prepare_tokens(adapter, prompts_or_tokens)
    baseline_tokens = prepare_baseline(adapter, tokens, baseline, prepared)
    objective = prepare_objective(adapter, target, distractor) if objective is None else objective
    _require_objective(prepared, objective)
    interventions = [*interventions, *plugin_interventions(plan, adapter, registry)]
    sink = _sink(plan, adapter, tokens, objective, interventions, counter)  # see _eager
    config = prepared.config
    runs = _run(adapter, plan, tokens, objective, interventions, config, sink=sink)
    base_runs = _run_baselines(adapter, plan, baseline_tokens, objective, interventions, config)
    bases: list[RunResult | None] = [*base_runs] if base_runs else [None] * len(runs)
    results = [
        execute_plan(
            plan,
            RawActivationStore.from_nested_dict(run.captured),
            model=adapter,
            counter=counter,
            objective=objective,
            runs=_other_runs(plan, adapter, run, base, objective, interventions, config, progress),
            **_evaluated_while_running(sink, b, len(run.tokens)),
        )
        for b, (run, base) in enumerate(zip(runs, bases, strict=True))
    ]
    return DerivedScalarStore(
        results, tokens, _metadata(adapter, config, objective, runs, base_runs)
    )


def _metadata(
    adapter: ModelAdapter,
    config: DstConfig,
    objective: Objective | None,
    runs: Sequence[RunResult],
    base_runs: Sequence[RunResult],
) -> dict[str, Any]:
    """What a store records about its derivation (model, config, objective values)."""
    metadata: dict[str, Any] = {
        "model": adapter.config_dict(),
        "config": config.to_dict(),
        "objective": None if objective is None else repr(objective),
        "objective_values": [run.objective_value for run in runs],
        "versions": _versions(),
    }
    if base_runs:
        metadata["baseline_tokens"] = [list(run.tokens) for run in base_runs]
        metadata["baseline_objective_values"] = [run.objective_value for run in base_runs]
    return metadata


def _default_registry() -> Registry:
    from ._registry import registry

    return registry


def _run_baselines(
    adapter: ModelAdapter,
    plan: Plan,
    tokens: list[list[int]] | None,
    objective: Objective | None,
    interventions: Sequence[Intervention],
    config: DstConfig,
) -> list[RunResult]:
    """The baseline prompts' batched run (none without baselines)."""
    if tokens is None:
        return []
    return _run(adapter, plan, tokens, objective, interventions, config, PromptCombo.BASELINE)


def _other_runs(
    plan: Plan,
    adapter: ModelAdapter,
    run: RunResult,
    base: RunResult | None,
    objective: Objective | None,
    interventions: Sequence[Intervention],
    config: DstConfig,
    progress: Progress | None = None,
) -> dict[PromptCombo, RawActivationStore]:
    """A prompt's baseline captures and the engine's runs for the pair (none without one)."""
    if base is None:
        return {}
    from ._contrast import engine_runs

    out = {PromptCombo.BASELINE: RawActivationStore.from_nested_dict(base.captured)}
    if plan.engine_runs:
        assert objective is not None
        out |= engine_runs(plan, adapter, run, base, objective, interventions, config, progress)
    return out


def _require_objective(prepared: Preparation, objective: Objective | None) -> None:
    if prepared.needs_objective and objective is None:
        raise ModelInputError(
            f"{', '.join(prepared.needs_objective)} need(s) an objective (a backward pass, or "
            "a kernel reading ctx.objective): pass target= and distractor= (e.g. "
            "derive(model, prompt, dsts, target='mat', distractor='cat')) or objective="
        )


def _sink(
    plan: Plan,
    adapter: ModelAdapter,
    tokens: list[list[int]],
    objective: Objective | None,
    interventions: Sequence[Intervention],
    counter: EvaluationCounter | None,
) -> EagerEvaluation | None:
    """What the main run evaluates while it runs (``_eager``); ``None`` where nothing can be,
    the adapter takes no sink, or the run computes its final gradient locally afterwards."""
    takes_sink = getattr(adapter, "accepts_capture_sink", False) and _has_parameter(
        type(adapter), "run", "sink"
    )
    if not takes_sink or _local_final_gradient(plan, objective, adapter, interventions):
        return None
    from ._eager import EagerEvaluation

    sink = EagerEvaluation(
        plan, [len(t) for t in tokens], model=adapter, objective=objective, counter=counter
    )
    return sink if sink.keys else None


def _evaluated_while_running(sink: EagerEvaluation | None, b: int, n_tokens: int) -> dict[str, Any]:
    """``execute_plan``'s arguments for prompt ``b``'s nodes the sink already evaluated."""
    if sink is None:
        return {"n_tokens": n_tokens}
    return {"evaluated": sink.results(b), "eager": sink.nodes, "n_tokens": n_tokens}


def _run(
    adapter: ModelAdapter,
    plan: Plan,
    tokens: list[list[int]],
    objective: Objective | None,
    interventions: Sequence[Intervention],
    config: DstConfig,
    prompt: PromptCombo = PromptCombo.MAIN,
    *,
    sink: EagerEvaluation | None = None,
) -> list[RunResult]:
    """Capture what the plan needs from the main (or baseline) prompts: one forward, plus a
    backward only where one is needed.  Comparing two prompts, the objective is evaluated on
    both (one unembedded row each), so results carry ``objective(main)`` and
    ``objective(baseline)``."""
    captures = plan.captures_for(prompt)
    backward = plan.run_needs_backward(prompt)
    if _local_final_gradient(plan, objective, adapter, interventions, prompt):
        # Only the gradient at the final residual is needed: one forward pass, then a local
        # backward through the final norm and unembedding (no graph through the network).
        assert objective is not None
        forward = [c for c in captures if c.pass_type is PassType.FORWARD]
        forward = _with_final_residual(forward, adapter.dims.n_layers)
        runs = adapter.run(tokens, forward, None, interventions=interventions, return_logits=False)
        return [_add_final_gradient(run, objective, adapter, config) for run in runs]
    # Only passed when asked for, so adapters written before memory modes keep working.
    low: dict[str, Any] = {"memory": config.memory} if config.memory != "default" else {}
    if sink is not None:
        low["sink"] = sink
    evaluate = backward or (plan.uses_baseline and objective is not None)
    return adapter.run(
        tokens,
        captures,
        objective if evaluate else None,
        interventions=interventions,
        detach_final_ln_scale=config.detach_final_ln_scale,
        return_logits=False,
        **low,
    )


def plugin_interventions(
    plan: Plan, adapter: ModelAdapter, registry: Registry
) -> list[Intervention]:
    """Ask each plugin provider once per distinct params for the interventions it splices."""
    wanted: dict[tuple[str, Any], list[PluginLocation]] = {}
    every_run = {key for keys in plan.raw_by_run.values() for key in keys}
    for location, _ in every_run:
        if isinstance(location, PluginLocation):
            wanted.setdefault((location.provider, location.params), []).append(location)
    out: list[Intervention] = []
    for (provider, params), locations in wanted.items():
        made = list(registry.intervention_factory(provider)(params, adapter))
        emitted = {loc for iv in made for loc in iv.emits}
        missing = [loc.name for loc in locations if loc not in emitted]
        if missing:
            raise ModelInputError(
                f"intervention provider {provider!r} did not emit {missing} for params "
                f"{dict(params)}; the plugin's DST and its intervention disagree"
            )
        out += made
    return out


FINAL_RESIDUAL = ActivationLocationType.RESID_POST_MLP


def _local_final_gradient(
    plan: Plan,
    objective: Objective | None,
    adapter: ModelAdapter,
    interventions: Sequence[Intervention],
    prompt: PromptCombo = PromptCombo.MAIN,
) -> bool:
    """Whether the run's only gradient is the objective's at the final residual."""
    backward = {
        key: layers
        for key, layers in plan.raw_by_run.get(prompt, {}).items()
        if key[1] is PassType.BACKWARD
    }
    last = adapter.dims.n_layers - 1
    return (
        backward == {(FINAL_RESIDUAL, PassType.BACKWARD): frozenset({last})}
        and isinstance(objective, LOGIT_OBJECTIVES)
        and isinstance(adapter, FinalResidualReadout)
        and not any(iv.location in _HEAD_LOCATIONS for iv in interventions)
    )


_HEAD_LOCATIONS = (
    ActivationLocationType.RESID_FINAL_LAYER_NORM_SCALE,
    ActivationLocationType.LOGITS,
)


_PARAMETERS: dict[tuple[type, str, str], bool] = {}


def _has_parameter(adapter_type: type, method_name: str, parameter: str) -> bool:
    """Whether an adapter's method takes an optional keyword added after adapters were
    written (``run(sink=)``, ``logits_from_final_residual(columns=)``); a subclass that
    overrides the method with the older signature keeps working."""
    key = (adapter_type, method_name, parameter)
    known = _PARAMETERS.get(key)
    if known is None:
        import inspect

        method = getattr(adapter_type, method_name, None)
        try:
            known = method is not None and parameter in inspect.signature(method).parameters
        except (TypeError, ValueError):  # a C-level callable: assume the old signature
            known = False
        _PARAMETERS[key] = known
    return known


def _unembeds_columns(adapter_type: type) -> bool:
    return _has_parameter(adapter_type, "logits_from_final_residual", "columns")


def _with_final_residual(captures: list[CaptureRequest], n_layers: int) -> list[CaptureRequest]:
    last = frozenset({n_layers - 1})
    for i, capture in enumerate(captures):
        if capture.location is FINAL_RESIDUAL:
            captures[i] = CaptureRequest(
                FINAL_RESIDUAL, PassType.FORWARD, (capture.layers or frozenset()) | last
            )
            return captures
    return [*captures, CaptureRequest(FINAL_RESIDUAL, PassType.FORWARD, last)]


def _add_final_gradient(
    run: RunResult, objective: Objective, adapter: ModelAdapter, config: DstConfig
) -> RunResult:
    import torch

    assert isinstance(adapter, FinalResidualReadout)

    last = adapter.dims.n_layers - 1
    resid = run.captured[(FINAL_RESIDUAL, PassType.FORWARD)][last]
    rows = slice(None)
    if isinstance(objective, (LogitDiffObjective, LogProbObjective)):
        # LayerNorm and unembedding act per token, so the gradient is zero except at the
        # objective's position: unembed that one row instead of a T×V matrix.
        t = resolve_position(objective.position, resid.shape[0])
        rows = slice(t, t + 1)
        objective = attrs.evolve(objective, position=0)
    with torch.enable_grad():
        leaf = resid[rows].detach().requires_grad_()
        detach = config.detach_final_ln_scale
        readout: Any = adapter  # the optional ``columns=`` is not in the protocol
        if isinstance(objective, LogitDiffObjective) and _unembeds_columns(type(readout)):
            # ... and of that row's V logits the difference reads two.
            pair = [objective.target, objective.distractor]
            two = readout.logits_from_final_residual(leaf, detach_ln_scale=detach, columns=pair)
            value = two[0, 0] - two[0, 1]
        else:
            logits = adapter.logits_from_final_residual(leaf, detach_ln_scale=detach)
            value = logits_objective(objective, logits)
        (row_grad,) = torch.autograd.grad(value, leaf)
    grad = torch.zeros_like(resid)
    grad[rows] = row_grad
    captured = dict(run.captured)
    captured[(FINAL_RESIDUAL, PassType.BACKWARD)] = {last: grad}
    return attrs.evolve(run, captured=captured, objective_value=float(value.detach()))


def _versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {"scalarlens": __version__, "torch": torch.__version__}
