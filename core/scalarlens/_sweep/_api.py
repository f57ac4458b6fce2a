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
from ..exceptions import ConfigError, ModelInputError
from ._corpus import Corpus, Prompt, Text, as_corpus, prompts, shards, summarize
from ._local import ShardInput, merge_shards, run_local
from ._progress import Progress
from ._shard import NEXT_TOKEN, ShardRunner, SweepSpec
from ._stats import N_BINS, QUANTILES, SweepSettings
from ._storage import FORMAT, prepare_directory, shard_path

if TYPE_CHECKING:
    from .._config import DstConfig
    from .._dst import DerivedScalarType
    from .._model import ModelAdapter, Objective
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
    from .._config import DstConfig
    from .._prepare import check_model_support, prepare
    from ..models._loading import load_model
    from ._results import load_sweep

    if registry is None:
        from .._registry import registry as default_registry

        registry = default_registry
    check_top_k(top_k, "sweep: top_k")
    for value, what in ((batch_size, "batch_size"), (shard_size, "shard_size")):
        _positive(value, f"sweep: {what}")
    for value, what in ((samples, "samples"), (bin_samples, "bin_samples"), (workers, "workers")):
        _positive(value, f"sweep: {what}")
    if engine not in ENGINES:
        raise ConfigError(f"sweep: engine must be one of {ENGINES}, got {engine!r}")
    before, after = window
    if min(before, after) < 0:
        raise ConfigError(f"sweep: window must be two non-negative counts, got {window!r}")
    requested = [dsts] if isinstance(dsts, str) or not isinstance(dsts, Sequence) else dsts
    names = [d if isinstance(d, str) else d.name for d in requested]
    prepared = prepare(names, config or DstConfig(), registry, layers=layers)
    if prepared.needs_objective and objective is None:
        raise ModelInputError(
            f"{', '.join(prepared.needs_objective)} need(s) an objective (a backward pass); "
            "sweep it with objective='next_token' (--objective next-token: each prompt's "
            "log-likelihood) or pass an Objective"
        )
    custom = objective if objective is not None and not isinstance(objective, str) else None
    if isinstance(objective, str) and objective != NEXT_TOKEN:
        raise ConfigError(f"sweep: objective must be {NEXT_TOKEN!r}, None or an Objective")
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
    settings = SweepSettings(top_k, samples, bin_samples, before, after)
    spec = SweepSpec(
        spec_name or adapter.name,
        tuple(names),
        prepared.config.to_dict(),
        settings,
        context,
        batch_size,
        shard_size,
        NEXT_TOKEN if prepared.needs_objective and custom is None else None,
    )
    source = as_corpus(corpus)
    summary = summarize(source, adapter, context)
    manifest = _manifest(adapter, summary, spec, custom)
    directory = Path(out)
    prepare_directory(directory, manifest, overwrite=overwrite)
    n_shards = -(-summary.n_prompts // shard_size)
    done = {i for i in range(n_shards) if shard_path(directory, i).is_file()}
    done_tokens = _tokens_in(directory, done)
    bar = Progress(summary.n_tokens, done_tokens, enabled=progress)
    todo = _todo(prompts(source, adapter, context), shard_size, done)
    infos: list[dict[str, int]] = []
    if engine == "local":
        runner = ShardRunner(spec, adapter, registry, custom)
        ran = run_local(runner, todo, directory, bar)
    else:
        from ._ray import run_ray

        infos = run_ray(spec, todo, directory, bar, address=ray_address, workers=workers)
        ran = sum(i["shards"] for i in infos)
    bar.close()
    merge_shards(directory, n_shards, settings)
    result = load_sweep(directory)
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
