"""Planning and execution: one DAG for many requested DSTs.

``make_plan`` turns requested (deriver, pass) pairs into a DAG whose nodes are
(DST, config without layer selection, pass).  Shared sub-derivers therefore appear once and are
evaluated once, each node computes only the layers its consumers need (layer demands flow down
through the sources' layer indexers), and the plan states the exact raw (location, pass,
layers) to capture and whether a backward pass is needed — all before any model runs.

A plan may compare two prompts: every node is evaluated on the main prompt's run or on the
baseline's (its key says which), a source with ``prompt=MAIN_MINUS_BASELINE`` reads both and
subtracts, and raw sources may read the runs the engine derives from the pair (integrated
gradients, patched objectives; see ``PromptCombo``).  The plan lists, per run, what to capture.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from ._activations import ActivationsAndMetadata, RawActivationStore
from ._config import DstConfig
from ._deriver import DeriveContext, DerivedScalarSource, ScalarDeriver
from ._dst import DerivedScalarType, DstAndPass
from ._guard import model_storages, run_kernel
from ._layers import NOT_NEEDED, LayerIndex
from ._locations import PluginLocation
from ._model import CaptureRequest, Objective, ObjectiveInfo
from ._output_check import OutputChecker
from ._sources import ENGINE_RUNS, DstReference, PromptCombo, RawScalarSource
from ._vocab import ActivationLocationType, PassType
from .exceptions import ConfigError, MissingActivationError

if TYPE_CHECKING:
    import torch

    from ._model import ModelAdapter

NodeKey = tuple[DerivedScalarType, DstConfig, PassType, PromptCombo]
RawKey = tuple[ActivationLocationType | PluginLocation, PassType]
MAIN = PromptCombo.MAIN
BASELINE = PromptCombo.BASELINE


def node_key(deriver: ScalarDeriver, pass_type: PassType, prompt: PromptCombo = MAIN) -> NodeKey:
    """Derivers equal up to layer selection share a node: they compute the same thing."""
    return (deriver.dst, attrs.evolve(deriver.config, layer_indices=None), pass_type, prompt)


@attrs.frozen
class RawEdge:
    """An input read from the raw store: a captured (location, pass), through an indexer.

    ``runs`` names the run(s) it is read from; two runs (main, baseline) mean their difference.
    """

    source: RawScalarSource
    producer: RawKey
    runs: tuple[PromptCombo, ...] = (MAIN,)


@attrs.frozen
class NodeEdge:
    """An input produced by other nodes of the plan (two: main minus baseline), via an indexer."""

    source: DerivedScalarSource
    producers: tuple[NodeKey, ...]


Edge = RawEdge | NodeEdge


@attrs.define
class PlanNode:
    key: NodeKey
    deriver: ScalarDeriver
    pass_type: PassType
    edges: list[Edge]
    layers: set[LayerIndex] = attrs.field(factory=set)

    @property
    def dst(self) -> DerivedScalarType:
        return self.deriver.dst


@attrs.define
class EvaluationCounter:
    """Counts kernel calls (one per node and layer), in total and per DST name."""

    by_dst: Counter[str] = attrs.field(factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_dst.values())

    def reset(self) -> None:
        self.by_dst.clear()


@attrs.frozen
class Plan:
    """The DAG plus what it needs from a model run."""

    requests: tuple[tuple[NodeKey, tuple[LayerIndex, ...]], ...]
    nodes: tuple[PlanNode, ...]  # producers before consumers
    raw_by_run: Mapping[PromptCombo, Mapping[RawKey, frozenset[LayerIndex]]]
    n_layers: int

    @property
    def raw_layers(self) -> Mapping[RawKey, frozenset[LayerIndex]]:
        """What the main prompt's run captures."""
        return self.raw_by_run.get(MAIN, {})

    def run_needs_backward(self, run: PromptCombo) -> bool:
        return any(p is PassType.BACKWARD for _, p in self.raw_by_run.get(run, {}))

    @property
    def needs_backward(self) -> bool:
        """Whether the main prompt's run needs a backward pass."""
        return self.run_needs_backward(MAIN)

    @property
    def uses_baseline(self) -> bool:
        """Whether anything reads a baseline prompt (directly or through an engine run)."""
        return any(run is not MAIN for run in self.raw_by_run) or any(
            node.key[3] is BASELINE for node in self.nodes
        )

    @property
    def engine_runs(self) -> dict[PromptCombo, Mapping[RawKey, frozenset[LayerIndex]]]:
        """The integrated-gradient and patched runs the plan needs, with their locations."""
        return {run: keys for run, keys in self.raw_by_run.items() if run in ENGINE_RUNS}

    @property
    def needs_objective(self) -> bool:
        """A backward pass, an engine run, or a kernel that reads ``ctx.objective``."""
        return (
            any(self.run_needs_backward(run) for run in self.raw_by_run)
            or bool(self.engine_runs)
            or any(node.dst.needs_objective for node in self.nodes)
        )

    @property
    def captures(self) -> tuple[CaptureRequest, ...]:
        return self.captures_for(MAIN)

    def captures_for(self, run: PromptCombo) -> tuple[CaptureRequest, ...]:
        """What the main (or baseline) prompt's run must capture."""
        out = []
        for (location, pass_type), layers in sorted(
            self.raw_by_run.get(run, {}).items(),
            key=lambda kv: (str(kv[0][0].value), kv[0][1].value),
        ):
            ints = frozenset(layer for layer in layers if layer is not None)
            out.append(
                CaptureRequest(location, pass_type, None if location.has_no_layers else ints)
            )
        return tuple(out)

    def describe(self) -> str:
        lines = [f"{len(self.nodes)} derivation node(s); backward pass: {self.needs_backward}"]
        for node in self.nodes:
            layers = sorted(node.layers, key=lambda x: -1 if x is None else x)
            on = "" if node.key[3] is MAIN else f" @{node.key[3].value}"
            lines.append(f"  {node.dst.name}/{node.pass_type.value}{on} layers={layers}")
        for run in self.raw_by_run:
            lines.append("captures:" if run is MAIN else f"captures @{run.value}:")
            for c in self.captures_for(run):
                shown = "-" if c.layers is None else sorted(c.layers)
                lines.append(f"  {c.location.value}/{c.pass_type.value} layers={shown}")
        return "\n".join(lines)


def _requested_layers(deriver: ScalarDeriver, n_layers: int) -> tuple[LayerIndex, ...]:
    if deriver.dst.has_no_layers:
        return (None,)
    layers = deriver.config.layer_indices
    if layers is None:
        return tuple(range(n_layers))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ConfigError(
            f"{deriver.dst.name}: layer index {bad[0]} is out of range; the model has "
            f"{n_layers} layers (valid: 0..{n_layers - 1})"
        )
    return layers


def make_plan(requests: Sequence[tuple[ScalarDeriver, PassType]], n_layers: int) -> Plan:
    """Build the deduplicated, layer-pruned DAG for ``requests`` on an ``n_layers`` model."""
    graph = _Graph()
    request_keys = []
    for deriver, pass_type in requests:
        key = graph.visit(deriver, pass_type, "")
        layers = _requested_layers(deriver, n_layers)
        graph.nodes[key].layers.update(layers)
        request_keys.append((key, layers))
    return Plan(
        requests=tuple(request_keys),
        nodes=tuple(graph.nodes[k] for k in graph.order),
        raw_by_run=_propagate_layers(graph, n_layers),
        n_layers=n_layers,
    )


class _Graph:
    """Plan nodes keyed by (DST, config sans layers, pass), in post-order (producers first)."""

    def __init__(self) -> None:
        self.nodes: dict[NodeKey, PlanNode] = {}
        self.order: list[NodeKey] = []

    def visit(
        self,
        deriver: ScalarDeriver,
        pass_type: PassType,
        needed_by: str,
        prompt: PromptCombo = MAIN,
    ) -> NodeKey:
        deriver.check_pass(pass_type, needed_by)
        key = node_key(deriver, pass_type, prompt)
        if key in self.nodes:
            return key
        edges: list[Edge] = []
        self.nodes[key] = PlanNode(key, deriver, pass_type, edges)
        for source in deriver.sub_scalar_sources:
            resolved = pass_type if source.pass_type is None else source.pass_type
            if isinstance(source, RawScalarSource):
                runs = _runs(source.prompt, prompt, deriver, source.describe())
                edges.append(RawEdge(source, (source.location, resolved), runs))
            elif isinstance(source, DerivedScalarSource):
                runs = _runs(source.prompt, prompt, deriver, source.describe())
                children = tuple(
                    self.visit(source.scalar_deriver, resolved, deriver.dst.name, run)
                    for run in runs
                )
                edges.append(NodeEdge(source, children))
            elif isinstance(source, DstReference):
                raise ConfigError(
                    f"{deriver.dst.name} holds an unresolved reference to {source.dst_name!r}; "
                    "build derivers with registry.get so references are resolved"
                )
            else:
                raise ConfigError(
                    f"{deriver.dst.name}: unknown source type {type(source).__name__}"
                )
        self.order.append(key)
        return key


def _runs(
    prompt: PromptCombo | None, consumer: PromptCombo, deriver: ScalarDeriver, what: str
) -> tuple[PromptCombo, ...]:
    """The run(s) a source with ``prompt`` reads for a node evaluated on ``consumer``'s run."""
    if prompt is None:
        return (consumer,)
    if prompt in (MAIN, BASELINE):
        return (prompt,)
    if consumer is BASELINE:
        raise ConfigError(
            f"{deriver.dst.name} is evaluated on the baseline prompt but its source {what} "
            f"reads {prompt.value!r}, which is only defined relative to the main prompt"
        )
    if prompt is PromptCombo.MAIN_MINUS_BASELINE:
        return (MAIN, BASELINE)
    return (prompt,)


def _propagate_layers(
    graph: _Graph, n_layers: int
) -> dict[PromptCombo, dict[RawKey, frozenset[LayerIndex]]]:
    """Pass each node's layer demands down its edges; return what each run must capture.

    Consumers are visited before producers, so every demand on a node is known before it is
    passed on.  An engine run (integrated gradients, patching) at a location also needs the
    location's forward value on both prompts, to interpolate or to patch from.
    """
    raw_layers: dict[tuple[PromptCombo, RawKey], set[LayerIndex]] = {}
    for key in reversed(graph.order):
        node = graph.nodes[key]
        for edge in node.edges:
            demanded: set[LayerIndex] = set()
            for layer in node.layers:
                try:
                    wanted = edge.source.layer_indexer.source_layer(layer, n_layers)
                except ConfigError as exc:  # say which DST's input, and from which config
                    raise ConfigError(
                        f"{node.dst.name}: its input {edge.source.describe()} cannot be read: "
                        f"{exc} (check the layer options of its DstConfig)"
                    ) from exc
                if wanted is not NOT_NEEDED:
                    demanded.add(wanted)
            if not demanded:
                continue
            if isinstance(edge, NodeEdge):
                for producer in edge.producers:
                    graph.nodes[producer].layers.update(demanded)
                continue
            location = edge.producer[0]
            if location.has_no_layers and demanded != {None}:
                raise ConfigError(
                    f"{node.dst.name}: source {edge.source.describe()} asks the layer-less "
                    f"location {location.value} for layers {sorted(map(str, demanded))}"
                )
            for run in edge.runs:
                raw_layers.setdefault((run, edge.producer), set()).update(demanded)
                if run in ENGINE_RUNS:
                    forward = (location, PassType.FORWARD)
                    for prompt in (MAIN, BASELINE):
                        raw_layers.setdefault((prompt, forward), set()).update(demanded)
    out: dict[PromptCombo, dict[RawKey, frozenset[LayerIndex]]] = {}
    for run in PromptCombo:  # a stable order: main first
        for (r, raw_key), layers in raw_layers.items():
            if r is run:
                out.setdefault(run, {})[raw_key] = frozenset(layers)
    return out


def execute_plan(
    plan: Plan,
    raw_store: RawActivationStore,
    *,
    model: ModelAdapter | None = None,
    counter: EvaluationCounter | None = None,
    objective: Objective | None = None,
    runs: Mapping[PromptCombo, RawActivationStore] | None = None,
    evaluated: Mapping[NodeKey, Mapping[LayerIndex, torch.Tensor]] | None = None,
    eager: frozenset[NodeKey] = frozenset(),
    n_tokens: int | None = None,
) -> dict[DstAndPass, ActivationsAndMetadata]:
    """Evaluate every node once, layer by layer, and return the requested results.

    ``raw_store`` holds the main prompt's captures; ``runs`` the other runs a plan comparing
    two prompts reads (the baseline's captures, integrated gradients, patched objectives).
    ``objective`` is what ``ctx.objective`` shows kernels (resolved for this prompt); DSTs
    declared with ``needs_objective=True`` refuse to run without one.  ``eager`` nodes ran
    while the model ran (``_eager``; ``evaluated``: their values still needed); the captures
    only they read are not in ``raw_store``, so ``n_tokens`` gives the prompt's length.

    Intermediate results are dropped as soon as their last consumer has run, so peak memory is
    bounded by what is live, not by the whole DAG.  Kernels run isolated (``_guard``): none can
    change a captured activation, another node's output or a weight.  Every output is checked
    against its DST's declared shape, dtype and finiteness before anyone consumes it.
    """
    import torch

    stores = {MAIN: raw_store, **(runs or {})}
    _check_runs(plan, stores)
    remaining_uses: Counter[NodeKey] = Counter()
    for node in plan.nodes:
        for edge in node.edges:
            if isinstance(edge, NodeEdge):
                for producer in edge.producers:
                    remaining_uses[producer] += 1
    requested = {key for key, _ in plan.requests}
    checker = OutputChecker.for_store(raw_store, model, n_tokens)
    info = objective_info(plan, objective, checker.n_tokens)
    storages = model_storages(model)

    results: dict[NodeKey, dict[LayerIndex, torch.Tensor]] = {}
    with torch.no_grad():
        for node in plan.nodes:
            if node.key in eager:
                results[node.key] = dict((evaluated or {}).get(node.key, {}))
            else:
                ctx = DeriveContext(node.pass_type, node.deriver.config, node.dst, model, info)
                results[node.key] = _evaluate(
                    node, ctx, plan, stores, results, checker, counter, storages
                )
            for edge in node.edges:
                if isinstance(edge, NodeEdge):
                    for producer in edge.producers:
                        remaining_uses[producer] -= 1
                        if remaining_uses[producer] == 0 and producer not in requested:
                            del results[producer]

    return _requested(plan, results)


def _requested(
    plan: Plan, results: Mapping[NodeKey, Mapping[LayerIndex, torch.Tensor]]
) -> dict[DstAndPass, ActivationsAndMetadata]:
    """The requested DSTs' values, one entry per (DST, pass)."""
    final: dict[DstAndPass, ActivationsAndMetadata] = {}
    for key, layers in plan.requests:
        dst, _, pass_type, _ = key
        by_layer = {layer: results[key][layer] for layer in layers}
        name = DstAndPass(dst, pass_type)
        if name in final:  # same DST requested twice with different layers: merge
            by_layer = {**final[name].activations_by_layer_index, **by_layer}
        final[name] = ActivationsAndMetadata(dst, pass_type, by_layer)
    return final


def _check_runs(plan: Plan, stores: Mapping[PromptCombo, RawActivationStore]) -> None:
    missing = [run for run in plan.raw_by_run if run not in stores]
    if missing:
        users = sorted(
            {
                node.dst.name
                for node in plan.nodes
                for edge in node.edges
                if isinstance(edge, RawEdge) and any(run in missing for run in edge.runs)
            }
        )
        raise ConfigError(
            f"{', '.join(users) or 'the plan'} read(s) the {', '.join(r.value for r in missing)} "
            "run(s) but none was given: pass baseline= to scalarlens.derive (CLI: --baseline), "
            "or runs= to execute_plan"
        )


def objective_info(
    plan: Plan, objective: Objective | None, n_tokens: int | None
) -> ObjectiveInfo | None:
    """What ``ctx.objective`` shows kernels for a prompt of ``n_tokens`` tokens."""
    if objective is None:
        users = [n.dst.name for n in plan.nodes if n.dst.needs_objective]
        if users:
            raise ConfigError(
                f"{', '.join(users)} read(s) the objective (needs_objective=True) but none was "
                "given: pass target= and distractor= (CLI: --target/--distractor) or objective="
            )
        return None
    if n_tokens is None:
        return ObjectiveInfo("callable", objective)
    return ObjectiveInfo.of(objective, n_tokens)


def _evaluate(
    node: PlanNode,
    ctx: DeriveContext,
    plan: Plan,
    stores: Mapping[PromptCombo, RawActivationStore],
    results: Mapping[NodeKey, Mapping[LayerIndex, torch.Tensor]],
    checker: OutputChecker,
    counter: EvaluationCounter | None,
    storages: frozenset[int] = frozenset(),
) -> dict[LayerIndex, torch.Tensor]:
    """One node's value on every layer it is needed at."""
    expected = checker.expected(node.deriver)
    out: dict[LayerIndex, torch.Tensor] = {}
    for layer in sorted(node.layers, key=lambda x: -1 if x is None else x):
        inputs = tuple(
            _input(edge, layer, plan.n_layers, stores, results, node) for edge in node.edges
        )
        out[layer] = evaluate_layer(
            node,
            ctx,
            layer,
            inputs,
            checker,
            expected,
            counter,
            storages,
            describe=lambda i: str(node.edges[i].source.describe()),
        )
    return out


def evaluate_layer(
    node: PlanNode,
    ctx: DeriveContext,
    layer: LayerIndex,
    inputs: tuple[torch.Tensor | None, ...],
    checker: OutputChecker,
    expected: tuple[int | None, ...],
    counter: EvaluationCounter | None,
    storages: frozenset[int],
    *,
    describe: Callable[[int], str],
) -> torch.Tensor:
    """One kernel call, isolated and checked: the one way every node is evaluated, after the
    run here or while it runs (``_eager``), so both give the same bits."""
    value = run_kernel(
        node.deriver.tensor_calculate_derived_scalar_fn,
        inputs,
        layer,
        ctx,
        who=functools.partial(_who, node, layer),
        describe_input=describe,
        model_storages=storages,
    )
    if counter is not None:
        counter.by_dst[node.dst.name] += 1
    passed_through = any(value is tensor for tensor in inputs)
    checker.check(value, node.deriver, node.pass_type, layer, expected, finite=not passed_through)
    if node.deriver.config.device is not None:
        value = value.to(node.deriver.config.device)
    out: torch.Tensor = value.detach()
    return out


def _who(node: PlanNode, layer: LayerIndex) -> str:
    plugin = node.deriver.plugin or "not from a registry"
    at = "" if layer is None else f", layer {layer}"
    return f"the kernel of {node.dst.name} ({node.pass_type.value} pass{at}; plugin {plugin!r})"


def _input(
    edge: Edge,
    layer: LayerIndex,
    n_layers: int,
    stores: Mapping[PromptCombo, RawActivationStore],
    results: Mapping[NodeKey, Mapping[LayerIndex, torch.Tensor]],
    node: PlanNode,
) -> torch.Tensor | None:
    source_layer = edge.source.layer_indexer.source_layer(layer, n_layers)
    if source_layer is NOT_NEEDED:
        return None
    if isinstance(edge, NodeEdge):
        values = [results[producer][source_layer] for producer in edge.producers]
    else:
        values = [_raw(stores[run], edge, source_layer, layer, node) for run in edge.runs]
    if len(values) == 1:
        return values[0]
    main, baseline = values
    return main - baseline


def _raw(
    store: RawActivationStore,
    edge: RawEdge,
    source_layer: LayerIndex,
    layer: LayerIndex,
    node: PlanNode,
) -> torch.Tensor:
    location, pass_type = edge.producer
    entry = store.get(location, pass_type)
    try:
        return entry.activations_by_layer_index[source_layer]
    except KeyError:
        raise MissingActivationError(
            f"{node.dst.name} (layer {layer}) needs {location.value}/{pass_type.value} at "
            f"layer {source_layer}, which was not captured; captured layers: "
            f"{list(entry.layer_indices)}"
        ) from None


def derive_from_raw(
    requests: Sequence[tuple[ScalarDeriver, PassType]],
    raw_store: RawActivationStore,
    *,
    n_layers: int,
    model: ModelAdapter | None = None,
    counter: EvaluationCounter | None = None,
    objective: Objective | None = None,
) -> dict[DstAndPass, ActivationsAndMetadata]:
    """Plan and execute in one call (for stores captured elsewhere)."""
    plan = make_plan(requests, n_layers)
    return execute_plan(plan, raw_store, model=model, counter=counter, objective=objective)
