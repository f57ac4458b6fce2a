"""``derive`` and ``load_model``: the one-call path from a prompt to ranked components.

``derive`` plans first (so errors about unknown DSTs, unsupported passes, bad layers or a
missing target surface before any model runs), captures exactly what the plan lists in one
forward pass (plus one backward only if a DST needs gradients), then derives every requested
DST once per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._activations import RawActivationStore
from ._config import DstConfig
from ._dst import DerivedScalarType
from ._model import LogitDiffObjective, ModelAdapter, Objective
from ._plan import EvaluationCounter, execute_plan, make_plan
from ._store import DerivedScalarStore
from ._vocab import PassType
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
    loaders = registry.model_loaders()
    if text in loaders:
        return loaders[text](text)
    for key, loader in loaders.items():
        if key.endswith(":") and text.startswith(key):
            return loader(text)
    if text in models.BUNDLED_MODELS:
        return models.load_bundled_model(text)
    if Path(text).exists():
        return models.load_gpt2_checkpoint(text)
    known = [*models.BUNDLED_MODELS, *loaders]
    raise CheckpointError(
        f"cannot resolve model {text!r}: not a bundled model ({', '.join(known)}), not an "
        "existing checkpoint directory, and no plugin loader claims it"
    )


def _encode(model: ModelAdapter, item: str | int) -> int:
    if isinstance(item, int):
        return item
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TokenizerError(f"model {model.name!r} has no tokenizer; pass token ids instead")
    ids: list[int] = tokenizer.encode(item)
    if len(ids) != 1:
        raise TokenizerError(f"{item!r} must be exactly one token, got {len(ids)}")
    return ids[0]


def _tokens(model: ModelAdapter, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    elif prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise TokenizerError(
                    f"model {model.name!r} has no tokenizer; pass token ids instead of text"
                )
            out.append(list(tokenizer.encode(prompt)))
        else:
            out.append([int(t) for t in prompt])
    return out


def derive(
    model: ModelAdapter | str | Path,
    prompts_or_tokens: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    *,
    target: str | int | None = None,
    distractor: str | int | None = None,
    objective: Objective | None = None,
    layers: Sequence[int] | None = None,
    config: DstConfig | None = None,
    registry: Registry | None = None,
    counter: EvaluationCounter | None = None,
) -> DerivedScalarStore:
    """Derive ``dsts`` for each prompt.

    A DST whose value needs gradients requires a backward objective: ``target`` and
    ``distractor`` give the logit difference at the last token (the direction of interest);
    ``objective=`` takes any ``Objective``.
    """
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    adapter = model if not isinstance(model, (str, Path)) else load_model(model, registry)
    config = config or DstConfig()
    if layers is not None:
        config = attrs.evolve(config, layer_indices=layers)
    names = [dsts] if isinstance(dsts, (str, DerivedScalarType)) else list(dsts)
    if not names:
        raise ModelInputError("no DSTs requested; name at least one (see `scalarlens dsts`)")

    requests = []
    for dst in names:
        deriver = registry.get(dst, config)
        requests.append((deriver, PassType.FORWARD))
        if config.derive_gradients and PassType.BACKWARD in deriver.derivable_pass_types:
            requests.append((deriver, PassType.BACKWARD))
    plan = make_plan(requests, adapter.dims.n_layers)

    tokens = _tokens(adapter, prompts_or_tokens)
    if objective is None and (target is not None or distractor is not None):
        if target is None or distractor is None:
            raise ModelInputError("give both target= and distractor= (or an objective=)")
        objective = LogitDiffObjective(_encode(adapter, target), _encode(adapter, distractor))
    if plan.needs_backward and objective is None:
        needing = [d.dst.name for d, p in requests if d.needs_backward(p)]
        raise ModelInputError(
            f"{', '.join(needing)} need(s) a backward pass: pass target= and distractor= (e.g. "
            "derive(model, prompt, dsts, target='mat', distractor='cat')) or objective="
        )
    runs = adapter.run(
        tokens,
        plan.captures,
        objective if plan.needs_backward else None,
        detach_final_ln_scale=config.detach_final_ln_scale,
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


def _versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {"scalarlens": __version__, "torch": torch.__version__}
