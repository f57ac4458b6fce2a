"""``derive`` and ``load_model``: the one-call path from a prompt to ranked components.

``derive`` plans first (so errors about unknown DSTs, unsupported passes, bad layers or a
missing target surface before any model runs), captures exactly what the plan lists in one
forward pass (plus one backward only if a DST needs gradients), then derives every requested
DST once per prompt.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._activations import RawActivationStore
from ._config import DstConfig
from ._deriver import ScalarDeriver
from ._dst import DerivedScalarType
from ._model import (
    LOGIT_OBJECTIVES,
    CaptureRequest,
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
from ._store import DerivedScalarStore
from ._vocab import ActivationLocationType, PassType
from .exceptions import CheckpointError, ModelInputError, TokenizerError

if TYPE_CHECKING:
    from ._registry import Registry

DEFAULT_MODEL = "tiny-induction"


def load_model(spec: str | Path = DEFAULT_MODEL, registry: Registry | None = None) -> ModelAdapter:
    """Resolve a model spec: a bundled name, a checkpoint directory, or a plugin loader.

    Plugin loaders (hook ``scalarlens_model_loaders``) match a plain name exactly or a
    ``scheme:`` prefix; they are consulted before the builtin GPT-2 loader.
    """
    from . import models

    text = str(spec)
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    loader = registry.model_loader(text)  # a conflict with a bundled name raises here
    if loader is not None:
        return loader(text)
    loaders = registry.model_loaders()
    if text in models.BUNDLED_MODELS:
        return models.load_bundled_model(text)
    if Path(text).exists():
        return models.load_gpt2_checkpoint(text)
    known = [*models.BUNDLED_MODELS, *loaders]
    raise CheckpointError(
        f"cannot resolve model {text!r}: not a bundled model ({', '.join(known)}), not an "
        "existing checkpoint directory, and no plugin loader claims it"
    )


def _encode(model: ModelAdapter, item: str | int, role: str) -> int:
    """A target or distractor as a token id inside the model's vocabulary."""
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise ModelInputError(f"{role}: expected a word or a token id, got {item!r}")
    if isinstance(item, int):
        n_vocab = model.dims.n_vocab
        if not 0 <= item < n_vocab:
            raise ModelInputError(
                f"{role}: token id {item} is outside the vocabulary of {model.name!r} "
                f"(valid ids: 0..{n_vocab - 1})"
            )
        return item
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TokenizerError(f"model {model.name!r} has no tokenizer; pass token ids instead")
    ids: list[int] = tokenizer.encode(item)
    if len(ids) != 1:
        raise TokenizerError(f"{role}: {item!r} must be exactly one token, got {len(ids)}")
    return ids[0]


def prepare_objective(
    model: ModelAdapter, target: str | int | None, distractor: str | int | None
) -> LogitDiffObjective | None:
    """The logit difference ``target − distractor`` at the last token, or ``None``.

    Shared by ``derive`` and the CLI (which checks every prompt before deriving any).  Equal
    tokens are refused: their logit difference is identically zero, and so is every
    attribution of it, which would look like a result.
    """
    if target is None and distractor is None:
        return None
    if target is None or distractor is None:
        raise ModelInputError(
            "give both target= and distractor= (--target and --distractor), or an objective="
        )
    target_id = _encode(model, target, "target")
    distractor_id = _encode(model, distractor, "distractor")
    if target_id == distractor_id:
        raise ModelInputError(
            f"target {target!r} and distractor {distractor!r} are the same token (id "
            f"{target_id}); their logit difference is always zero. Choose a different "
            "distractor: the token the model might predict instead"
        )
    return LogitDiffObjective(target_id, distractor_id)


def prepare_tokens(model: ModelAdapter, prompts: Any) -> list[list[int]]:
    """Prompts (text, ids, or a list of either) as lists of token ids, checked for type.

    Sizes (empty prompts, ids outside the vocabulary, too long) are the adapter's to check.
    """
    if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]
    if isinstance(prompts, Sequence):
        return [_prompt_tokens(model, prompt, i) for i, prompt in enumerate(prompts)]
    raise ModelInputError(
        f"expected a prompt (text or token ids) or a list of prompts, got {prompts!r}"
    )


def _prompt_tokens(model: ModelAdapter, prompt: Any, index: int) -> list[int]:
    if isinstance(prompt, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TokenizerError(
                f"model {model.name!r} has no tokenizer; pass token ids instead of text"
            )
        return list(tokenizer.encode(prompt))
    try:
        if isinstance(prompt, bool) or any(isinstance(t, bool) for t in prompt):
            raise TypeError
        return [operator.index(t) for t in prompt]  # ints, numpy ints, integer tensors
    except TypeError:
        raise ModelInputError(
            f"prompt {index}: expected text or a sequence of integer token ids, got {prompt!r}"
        ) from None


Request = tuple[ScalarDeriver, PassType]


def build_requests(
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    config: DstConfig,
    registry: Registry,
) -> list[Request]:
    """Every (deriver, pass) the call asks for; unknown DSTs fail here, before any model."""
    names = [dsts] if isinstance(dsts, (str, DerivedScalarType)) else list(dsts)
    if not names:
        raise ModelInputError("no DSTs requested; name at least one (see `scalarlens dsts`)")
    requests: list[Request] = []
    for dst in names:
        deriver = registry.get(dst, config)
        requests.append((deriver, PassType.FORWARD))
        if config.derive_gradients and PassType.BACKWARD in deriver.derivable_pass_types:
            requests.append((deriver, PassType.BACKWARD))
    return requests


def needing_objective(requests: Sequence[Request]) -> list[str]:
    """Names of the requested DSTs that need a backward pass, hence an objective."""
    return list(dict.fromkeys(d.dst.name for d, p in requests if d.needs_backward(p)))


def derive(
    model: ModelAdapter | str | Path,
    prompts_or_tokens: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    *,
    target: str | int | None = None,
    distractor: str | int | None = None,
    objective: Objective | None = None,
    interventions: Sequence[Intervention] = (),
    layers: Sequence[int] | None = None,
    config: DstConfig | None = None,
    registry: Registry | None = None,
    counter: EvaluationCounter | None = None,
) -> DerivedScalarStore:
    """Derive ``dsts`` for each prompt.

    A DST whose value needs gradients requires a backward objective: ``target`` and
    ``distractor`` give the logit difference at the last token (the direction of interest);
    ``objective=`` takes any ``Objective``.  ``interventions`` are spliced into the forward
    pass (ablations, patching); plugins' DSTs that read spliced locations (e.g. SAE latents)
    bring their own interventions.

    When the only gradient needed is the one at the final residual stream (direct effects with
    a logit objective), it is computed locally from the captured final residual through the
    final LayerNorm and unembedding, so no backward pass through the network runs.
    """
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    adapter = model if not isinstance(model, (str, Path)) else load_model(model, registry)
    config = config or DstConfig()
    if layers is not None:
        config = attrs.evolve(config, layer_indices=layers)
    requests = build_requests(dsts, config, registry)
    plan = make_plan(requests, adapter.dims.n_layers)

    tokens = prepare_tokens(adapter, prompts_or_tokens)
    if objective is None:
        objective = prepare_objective(adapter, target, distractor)
    needing = needing_objective(requests)
    if needing and objective is None:
        raise ModelInputError(
            f"{', '.join(needing)} need(s) a backward pass: pass target= and distractor= (e.g. "
            "derive(model, prompt, dsts, target='mat', distractor='cat')) or objective="
        )
    all_interventions = [*interventions, *plugin_interventions(plan, adapter, registry)]
    local = _local_final_gradient(plan, objective, adapter, all_interventions)
    if local:
        # Only the gradient at the final residual is needed: one forward pass, then a local
        # backward through the final LayerNorm and unembedding (no graph through the network).
        captures = [c for c in plan.captures if c.pass_type is PassType.FORWARD]
        captures = _with_final_residual(captures, adapter.dims.n_layers)
        runs = adapter.run(
            tokens, captures, None, interventions=all_interventions, return_logits=False
        )
        assert objective is not None
        runs = [_add_final_gradient(run, objective, adapter, config) for run in runs]
    else:
        runs = adapter.run(
            tokens,
            plan.captures,
            objective if plan.needs_backward else None,
            interventions=all_interventions,
            detach_final_ln_scale=config.detach_final_ln_scale,
            return_logits=False,
        )
    results = [
        execute_plan(
            plan, RawActivationStore.from_nested_dict(run.captured), model=adapter, counter=counter
        )
        for run in runs
    ]
    metadata = {
        "model": adapter.config_dict(),
        "config": config.to_dict(),
        "objective": None if objective is None else repr(objective),
        "objective_values": [run.objective_value for run in runs],
        "versions": _versions(),
    }
    return DerivedScalarStore(results, tokens, metadata)


def plugin_interventions(
    plan: Plan, adapter: ModelAdapter, registry: Registry
) -> list[Intervention]:
    """Ask each plugin provider once per distinct params for the interventions it splices."""
    wanted: dict[tuple[str, Any], list[PluginLocation]] = {}
    for location, _ in plan.raw_layers:
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
) -> bool:
    """Whether the plan's only gradient is the objective's at the final residual."""
    backward = {
        key: layers for key, layers in plan.raw_layers.items() if key[1] is PassType.BACKWARD
    }
    last = adapter.dims.n_layers - 1
    return (
        backward == {(FINAL_RESIDUAL, PassType.BACKWARD): frozenset({last})}
        and isinstance(objective, LOGIT_OBJECTIVES)
        and hasattr(adapter, "logits_from_final_residual")
        and not any(iv.location in _HEAD_LOCATIONS for iv in interventions)
    )


_HEAD_LOCATIONS = (
    ActivationLocationType.RESID_FINAL_LAYER_NORM_SCALE,
    ActivationLocationType.LOGITS,
)


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
        logits = adapter.logits_from_final_residual(  # type: ignore[attr-defined]
            leaf, detach_ln_scale=config.detach_final_ln_scale
        )
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
