"""``scalarlens.sweep``: every component's top examples and statistics over a corpus.

Order of work: everything that can be wrong is checked before the first shard runs (DST names
and the objective before the model loads; then the context, the corpus — read once to count
and hash it — and the output directory).  Shards already in the directory from an interrupted
run of the same sweep are kept; the rest run (locally or on Ray); then all are merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .._inputs import check_top_k
from .._progress import Progress
from ..exceptions import ConfigError, ModelInputError
from ._corpus import Corpus, Prompt, Text, as_corpus, prompts, shards, summarize
from ._local import ShardFold, ShardInput, merge_shards, run_local
from ._shard import NEXT_TOKEN, ShardRunner, SweepSpec
from ._stats import N_BINS, QUANTILES, SweepSettings
from ._storage import FORMAT, prepare_directory, shard_path

if TYPE_CHECKING:
    from .._config import DstConfig
    from .._dst import DerivedScalarType
    from .._model import ModelAdapter, Objective
    from .._prepare import Preparation
    from .._registry import Registry
    from ._results import SweepResult

ENGINES = ("local", "ray")


@attrs.frozen
class RunInfo:
    """What this call did (not part of the output: a resumed run differs only here)."""

    engine: str
    shards_total: int
    shards_run: int
    workers: tuple[dict[str, int], ...] = ()


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}")
    return value


def sweep(
    model: ModelAdapter | str | Path,
    corpus: Corpus | str | Path | Sequence[Text],
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    *,
    out: str | Path,
    top_k: int = 20,
    context: int | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    engine: str = "local",
    objective: str | Objective | None = NEXT_TOKEN,
    config: DstConfig | None = None,
    layers: Sequence[int] | None = None,
    samples: int = 32,
    bin_samples: int = 4,
    window: tuple[int, int] = (8, 4),
    overwrite: bool = False,
    ray_address: str | None = None,
    workers: int = 2,
    progress: bool = False,
    registry: Registry | None = None,
) -> SweepResult:
    """Sweep ``dsts`` over ``corpus`` into directory ``out``; returns the loaded result.

    For every component (neuron, head, latent, ...) of every requested DST and layer: the
    ``top_k`` largest values with their example and a token window, a uniform sample of
    ``samples`` examples, ``bin_samples`` examples per quantile bin, and running statistics.
    ``context`` (default: the model's) caps each prompt's length; longer prompts are truncated
    with a ``TruncationWarning``.  Gradient DSTs use ``objective``: ``"next_token"`` (each
    prompt's log-likelihood), an ``Objective`` (local engine only), or ``None`` (refused for
    DSTs that need one).  A rerun into the same ``out`` resumes; a different sweep there is
    refused unless ``overwrite=True``.  ``engine="ray"`` needs ``scalarlens[ray]``.
    """
    if registry is None:
        from .._registry import registry as default_registry

        registry = default_registry
    _check_sizes(top_k, batch_size, shard_size, samples, bin_samples, workers, window)
    if engine not in ENGINES:
        raise ConfigError(f"sweep: engine must be one of {ENGINES}, got {engine!r}")
    prepared, custom = _prepare_dsts(dsts, objective, config, layers, registry)
    adapter, spec = _model_and_spec(
        model, _names(dsts), prepared, custom, engine, context, registry,
        SweepSettings(top_k, samples, bin_samples, *window), batch_size, shard_size,
    )  # fmt: skip
    runner = ShardRunner(spec, adapter, registry, custom) if engine == "local" else None
    return _run(
        spec,
        adapter,
        as_corpus(corpus),
        Path(out),
        runner,
        custom,
        overwrite,
        progress,
        ray_address,
        workers,
    )


def _model_and_spec(
    model: ModelAdapter | str | Path,
    names: tuple[str, ...],
    prepared: Preparation,
    custom: Objective | None,
    engine: str,
    context: int | None,
    registry: Registry,
    settings: SweepSettings,
    batch_size: int,
    shard_size: int,
) -> tuple[ModelAdapter, SweepSpec]:
    """The loaded model (checked against the DSTs) and the spec shipped to workers."""
    from .._prepare import check_model_support
    from ..models._loading import load_model

    spec_name = str(model) if isinstance(model, (str, Path)) else None
    if engine == "ray" and (spec_name is None or custom is not None):
        raise ConfigError(
            "engine='ray' ships a model *spec* and the 'next_token' objective to its workers: "
            "pass the model as a name or checkpoint path every worker can load, and no custom "
            "Objective (or use engine='local')"
        )
    adapter = model if not isinstance(model, (str, Path)) else load_model(model, registry)
    check_model_support(prepared.requests, adapter)
    n_ctx = adapter.dims.n_ctx
    context = n_ctx if context is None else _positive(context, "sweep: context")
    if context > n_ctx:
        raise ConfigError(f"sweep: context {context} exceeds the model's {n_ctx} positions")
    return adapter, SweepSpec(
        spec_name or adapter.name,
        names,
        prepared.config.to_dict(),
        settings,
        context,
        batch_size,
        shard_size,
        NEXT_TOKEN if prepared.needs_objective and custom is None else None,
    )


def _check_sizes(
    top_k: int,
    batch_size: int,
    shard_size: int,
    samples: int,
    bin_samples: int,
    workers: int,
    window: tuple[int, int],
) -> None:
    check_top_k(top_k, "sweep: top_k")
    for value, what in (
        (batch_size, "batch_size"),
        (shard_size, "shard_size"),
        (samples, "samples"),
        (bin_samples, "bin_samples"),
        (workers, "workers"),
    ):
        _positive(value, f"sweep: {what}")
    if len(window) != 2 or min(window) < 0:
        raise ConfigError(f"sweep: window must be two non-negative counts, got {window!r}")


def _names(dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType]) -> tuple[str, ...]:
    requested = [dsts] if isinstance(dsts, str) or not isinstance(dsts, Sequence) else dsts
    return tuple(d if isinstance(d, str) else d.name for d in requested)


def _prepare_dsts(
    dsts: str | DerivedScalarType | Sequence[str | DerivedScalarType],
    objective: str | Objective | None,
    config: DstConfig | None,
    layers: Sequence[int] | None,
    registry: Registry,
) -> tuple[Preparation, Objective | None]:
    """Resolve the DSTs (unknown names fail here, before the model loads) and the objective."""
    from .._config import DstConfig
    from .._prepare import prepare

    prepared = prepare(list(_names(dsts)), config or DstConfig(), registry, layers=layers)
    if prepared.needs_objective and objective is None:
        raise ModelInputError(
            f"{', '.join(prepared.needs_objective)} need(s) an objective (a backward pass); "
            "sweep it with objective='next_token' (--objective next-token: each prompt's "
            "log-likelihood) or pass an Objective"
        )
    if isinstance(objective, str) and objective != NEXT_TOKEN:
        raise ConfigError(f"sweep: objective must be {NEXT_TOKEN!r}, None or an Objective")
    custom = objective if objective is not None and not isinstance(objective, str) else None
    return prepared, custom


def _run(
    spec: SweepSpec,
    adapter: ModelAdapter,
    source: Corpus,
    directory: Path,
    runner: ShardRunner | None,
    custom: Objective | None,
    overwrite: bool,
    progress: bool,
    ray_address: str | None,
    workers: int,
) -> SweepResult:
    """Summarise the corpus, prepare the directory, run the missing shards, merge."""
    from ._results import load_sweep

    summary = summarize(source, adapter, spec.context)
    prepare_directory(directory, _manifest(adapter, summary, spec, custom), overwrite=overwrite)
    n_shards = -(-summary.n_prompts // spec.shard_size)
    done = {i for i in range(n_shards) if shard_path(directory, i).is_file()}
    bar = Progress(summary.n_tokens, _tokens_in(directory, done), enabled=progress)
    todo = _todo(prompts(source, adapter, spec.context), spec.shard_size, done)
    infos: list[dict[str, int]] = []
    fold = ShardFold(directory, spec.settings)
    if runner is not None:
        ran = run_local(runner, todo, directory, bar, fold)
    else:
        from ._ray import run_ray

        infos = run_ray(spec, todo, directory, bar, address=ray_address, workers=workers)
        ran = sum(i["shards"] for i in infos)
    bar.close()
    merge_shards(directory, n_shards, spec.settings, fold)
    result = load_sweep(directory)
    engine = "local" if runner is not None else "ray"
    return attrs.evolve(result, run=RunInfo(engine, n_shards, ran, tuple(infos)))


def _todo(stream: Iterator[Prompt], size: int, done: set[int]) -> Iterator[ShardInput]:
    for index, group in enumerate(shards(stream, size)):
        if index not in done:
            yield index, [(p.id, p.tokens) for p in group]


def _tokens_in(directory: Path, done: set[int]) -> int:
    from ._storage import load_tensors

    return sum(int(load_tensors(shard_path(directory, i))[0]["n_tokens"]) for i in done)


def _manifest(
    adapter: ModelAdapter, summary: Any, spec: SweepSpec, custom: Objective | None
) -> dict[str, Any]:
    import torch

    from .. import __version__

    return {
        "format": FORMAT,
        "model_spec": spec.model,
        "model": adapter.config_dict(),
        "corpus": attrs.asdict(summary),
        "dsts": list(spec.dsts),
        "config": {
            **attrs.asdict(spec.settings),
            "context": spec.context,
            "batch_size": spec.batch_size,
            "shard_size": spec.shard_size,
            "objective": repr(custom) if custom is not None else spec.objective,
            "dst_config": spec.dst_config,
            "quantiles": list(QUANTILES),
            "histogram_bins": N_BINS,
        },
        "versions": {"scalarlens": __version__, "torch": torch.__version__},
    }
