"""Checking a derivation's inputs before any model runs, shared by ``derive`` and the CLI.

The CLI checks every prompt of a prompts file (and the DSTs, targets, outputs) before it loads
or runs the model; ``derive`` runs the same checks on its arguments.  One path, so the two can
never disagree about what is valid.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._config import DstConfig
from ._deriver import DerivedScalarSource, ScalarDeriver
from ._dst import DerivedScalarType
from ._locations import PluginLocation
from ._model import LogitDiffObjective, ModelAdapter
from ._sources import RawScalarSource
from ._vocab import PassType
from .exceptions import ModelInputError, TokenizerError, UnsupportedModelError

if TYPE_CHECKING:
    from ._locations import CaptureLocation
    from ._registry import Registry


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
    # A subword tokenizer encodes a prompt with its special tokens (BOS) but a word without.
    encode = getattr(tokenizer, "encode_word", tokenizer.encode)
    ids: list[int] = encode(item)
    if len(ids) != 1:
        pieces = tokenizer.decode_tokens(ids) if ids else []
        shown = " + ".join(f"{p!r} ({i})" for p, i in zip(pieces, ids, strict=True))
        raise TokenizerError(
            f"{role}: {item!r} must be exactly one token, but it tokenises as {len(ids)}"
            + (f": {shown}" if shown else "")
            + "; pick a word that is one token (often with a leading space, e.g. ' Paris') or "
            "pass a token id"
        )
    return ids[0]


def encode_token(model: ModelAdapter, item: str | int, role: str = "target") -> int:
    """A word or token id as one token id of ``model``'s vocabulary.

    For plugins that take a target token: the error names ``role`` and says how to fix a word
    that is several tokens or an id outside the vocabulary.
    """
    return _encode(model, item, role)


def encode_prompt(model: ModelAdapter, prompt: Any) -> list[int]:
    """One prompt (text or token ids) as token ids, checked as ``derive`` checks them."""
    (tokens,) = prepare_tokens(model, prompt)
    return tokens


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
    """Names of the requested DSTs that need an objective: a backward pass, or a kernel that
    reads ``ctx.objective`` somewhere in their tree (``needs_objective=True``)."""
    return list(dict.fromkeys(d.dst.name for d, p in requests if d.needs_objective(p)))


@attrs.frozen
class Preparation:
    """What a derivation asks for, known before any model is loaded."""

    config: DstConfig
    requests: tuple[Request, ...]
    needs_objective: tuple[str, ...]
    needs_baseline: tuple[str, ...] = ()


def prepare(
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    config: DstConfig | None = None,
    registry: Registry | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> Preparation:
    """Resolve the DSTs (unknown names, bad options and passes fail here) and what they need."""
    if registry is None:
        from ._registry import registry as default_registry

        registry = default_registry
    config = config or DstConfig()
    if layers is not None:
        config = attrs.evolve(config, layer_indices=layers)
    requests = build_requests(dsts, config, registry)
    baseline = tuple(dict.fromkeys(d.dst.name for d, _ in requests if d.reads_baseline()))
    return Preparation(config, tuple(requests), tuple(needing_objective(requests)), baseline)


def check_baseline_use(prepared: Preparation, has_baseline: bool) -> None:
    """A baseline exactly when some requested DST compares two prompts."""
    if has_baseline and not prepared.needs_baseline:
        names = ", ".join(d.dst.name for d, _ in prepared.requests)
        raise ModelInputError(
            f"a baseline prompt was given but none of the requested DSTs ({names}) compares two "
            "prompts, so it would be ignored; drop baseline= (--baseline), or request a DST "
            "that uses it, e.g. attn.attribution_patching, attn.integrated_gradients or "
            "attn.activation_patching (`scalarlens dsts` lists them)"
        )
    if prepared.needs_baseline and not has_baseline:
        raise ModelInputError(
            f"{', '.join(prepared.needs_baseline)} compare(s) the prompt with a baseline "
            "(corrupted) prompt, but none was given: pass baseline='...' (CLI: --baseline, or "
            'a "baseline" field per line of --prompts-file)'
        )


def prepare_baseline(
    model: ModelAdapter, tokens: Sequence[Sequence[int]], baseline: Any, prepared: Preparation
) -> list[list[int]] | None:
    """The baseline prompt of each main prompt, checked to align token by token.

    One baseline may serve every main prompt.  Positions must align because every comparison
    (a difference of activations, a patch) pairs token ``t`` of one run with token ``t`` of the
    other.
    """
    check_baseline_use(prepared, baseline is not None)
    if baseline is None:
        return None
    base = prepare_tokens(model, baseline)
    if len(base) == 1 and len(tokens) > 1:
        base = base * len(tokens)
    if len(base) != len(tokens):
        raise ModelInputError(
            f"{len(tokens)} prompt(s) but {len(base)} baseline prompt(s): give one baseline for "
            "all prompts or one per prompt"
        )
    for i, (main, other) in enumerate(zip(tokens, base, strict=True)):
        check_aligned(model, main, other, i if len(tokens) > 1 else None)
    return base


def check_aligned(
    model: ModelAdapter, main: Sequence[int], baseline: Sequence[int], i: int | None = None
) -> None:
    """Refuse a baseline whose tokens do not align with its prompt's (``i``: which prompt)."""
    if len(main) == len(baseline):
        return
    decode = getattr(getattr(model, "tokenizer", None), "decode_tokens", None)

    def show(ids: Sequence[int]) -> str:
        return " ".join(repr(p) for p in decode(list(ids))) if decode else str(list(ids))

    which = "the prompt" if i is None else f"prompt {i}"
    raise ModelInputError(
        f"{which} has {len(main)} tokens but its baseline has {len(baseline)}: positions "
        "must align, because each comparison pairs token t of the prompt with token t of the "
        "baseline. Change words for words of the same token count (the usual corruption swaps "
        "one name or word for another single-token one), or pad the shorter prompt. "
        f"Prompt: {show(main)}; baseline: {show(baseline)}"
    )


def raw_locations(deriver: ScalarDeriver) -> set[CaptureLocation]:
    """Every captured location in ``deriver``'s tree (model locations and plugin splices)."""
    found: set[CaptureLocation] = set()
    stack, seen = [deriver], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for source in current.sub_scalar_sources:
            if isinstance(source, RawScalarSource):
                found.add(source.location)
            elif isinstance(source, DerivedScalarSource):
                stack.append(source.scalar_deriver)
    return found


def unsupported_reason(deriver: ScalarDeriver, model: ModelAdapter) -> str | None:
    """Why ``model`` cannot derive ``deriver`` (a location it cannot capture), else ``None``."""
    missing = sorted(
        loc.value
        for loc in raw_locations(deriver)
        if not isinstance(loc, PluginLocation) and loc not in model.capturable_locations
    )
    if not missing:
        return None
    hint = " (it exists only on gated MLPs)" if missing == ["mlp.up"] else ""
    return f"model {model.name!r} cannot capture {', '.join(missing)}{hint}"


def check_model_support(requests: Sequence[Request], model: ModelAdapter) -> None:
    """Refuse, before the model runs, DSTs that read a location the model does not have."""
    problems = {
        d.dst.name: reason
        for d, _ in requests
        if (reason := unsupported_reason(d, model)) is not None
    }
    if problems:
        lines = "; ".join(f"{name}: {reason}" for name, reason in problems.items())
        raise UnsupportedModelError(
            f"{lines}. Drop these DSTs or use a model that has these locations "
            "(`scalarlens dsts` lists what each DST reads)"
        )
