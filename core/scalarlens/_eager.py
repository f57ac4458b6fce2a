"""Evaluating plan nodes while the model runs, so their inputs never pile up.

Without this, a run returns every capture of every layer and the plan is executed afterwards:
peak memory holds all captured activations *and* all their gradients at once.  For act×grad of
every attention head that is ``2 × L × T × S × H`` values (300 MB at 512 tokens on GPT-2
small) only to be reduced to ``L × T × H``.

``EagerEvaluation`` is handed to the adapter's ``run`` as its capture sink.  It takes the
captures that only *eager* nodes read — nodes of the main prompt whose inputs are this run's
captures or other eager nodes' outputs — and evaluates each (node, layer) as soon as its last
input arrives: a forward-only node during the forward pass, a gradient node in the backward
pass right after that layer's gradient.  Inputs are dropped once their last reader has run, so
a layer's activation and gradient live only until that layer is reduced.  Kernels run exactly
as ``execute_plan`` runs them (same guard, same output checks, same inputs), so results are
bit-identical; ``execute_plan`` then skips the nodes evaluated here.

While the model runs, its modules carry the run's hooks (and an adapter's per-run state), so a
kernel must not call into them: kernels see the model through ``_ModelWhileRunning``, which
answers weights and sizes and defers anything else (the final norm, reconstitution, the module
tree) — the (node, layer) is then evaluated after the run, with the real model, its inputs kept
until then.  Deferring is always correct; it only gives up the memory saving.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._deriver import DeriveContext
from ._guard import model_storages
from ._layers import NOT_NEEDED, LayerIndex
from ._output_check import OutputChecker
from ._plan import (
    MAIN,
    NodeEdge,
    NodeKey,
    Plan,
    PlanNode,
    RawEdge,
    RawKey,
    evaluate_layer,
    objective_info,
)

if TYPE_CHECKING:
    import torch

    from ._model import ModelAdapter, Objective
    from ._plan import EvaluationCounter

# An input of one (node, layer): a capture at a layer, or an eager node's output at a layer.
_Input = tuple[str, "RawKey | NodeKey", LayerIndex]
_Job = tuple[NodeKey, LayerIndex]


class _NeedsTheModel(BaseException):
    """A kernel reached past weights and sizes while the model runs: evaluate it afterwards.

    A ``BaseException`` so that neither a kernel's ``except Exception`` nor the guard swallows it.
    """


class _ModelWhileRunning:
    """What a kernel evaluated during the run sees as ``ctx.model`` (see the module docstring).

    The capability protocols' methods exist (so ``isinstance`` checks pass and the call, not the
    check, decides) and defer; so does every attribute not listed here.
    """

    def __init__(self, model: ModelAdapter) -> None:
        self._real = model

    @property
    def name(self) -> str:
        return self._real.name

    @property
    def dims(self) -> Any:
        return self._real.dims

    @property
    def capturable_locations(self) -> Any:
        return self._real.capturable_locations

    def weight(self, location: Any, layer: LayerIndex = None) -> torch.Tensor:
        return self._real.weight(location, layer)

    def config_dict(self) -> dict[str, Any]:
        return self._real.config_dict()

    def _defer(self, *args: Any, **kwargs: Any) -> Any:
        raise _NeedsTheModel

    run = final_norm = logits_from_final_residual = _defer
    sublayer_input = reconstitute_attention = reconstitute_mlp = _defer

    def __getattr__(self, name: str) -> Any:
        raise _NeedsTheModel


def eager_nodes(plan: Plan) -> tuple[frozenset[NodeKey], frozenset[RawKey]]:
    """The nodes evaluated during the run, and the captures only they read.

    A capture can be handed over only if every node reading it is eager, and a node is eager
    only if each capture it reads is handed over: start from the nodes whose inputs are all of
    the right kind and remove until both hold.  A plan comparing two prompts is executed after
    its runs (the engine's runs read the main run's captures).
    """
    if plan.uses_baseline:
        return frozenset(), frozenset()
    readers: dict[RawKey, set[NodeKey]] = {}
    for node in plan.nodes:
        for edge in node.edges:
            if isinstance(edge, RawEdge):
                readers.setdefault(edge.producer, set()).add(node.key)
    main_keys = set(plan.raw_by_run.get(MAIN, {}))
    eager = {node.key for node in plan.nodes if _eager_shaped(node, main_keys)}
    while True:
        handed = {key for key, nodes in readers.items() if key in main_keys and nodes <= eager}
        kept: set[NodeKey] = set()
        for node in plan.nodes:  # producers first
            if node.key in eager and all(
                edge.producer in handed if isinstance(edge, RawEdge) else edge.producers[0] in kept
                for edge in node.edges
            ):
                kept.add(node.key)
        if kept == eager:
            return frozenset(eager), frozenset(handed)
        eager = kept


def _eager_shaped(node: PlanNode, main_keys: set[RawKey]) -> bool:
    return (
        node.key[3] is MAIN
        and bool(node.edges)
        and all(
            (isinstance(edge, RawEdge) and edge.runs == (MAIN,) and edge.producer in main_keys)
            or (isinstance(edge, NodeEdge) and len(edge.producers) == 1)
            for edge in node.edges
        )
    )


class EagerEvaluation:
    """The capture sink of one run: evaluates eager nodes as their inputs arrive (see module).

    ``keys`` are the (location, pass) captures the adapter hands over through ``offer``
    instead of returning them; ``results(b)`` is prompt ``b``'s values of the eager nodes that
    outlive the run (requested, or read by a node evaluated afterwards).
    """

    def __init__(
        self,
        plan: Plan,
        lengths: Sequence[int],
        *,
        model: ModelAdapter,
        objective: Objective | None,
        counter: EvaluationCounter | None = None,
    ) -> None:
        self.nodes, self.keys = eager_nodes(plan)
        self._plan = plan
        self._lengths = list(lengths)
        self._lock = threading.RLock()
        self._holding = False
        self._held: list[list[_Job]] = [[] for _ in lengths]
        self._model: Any = _ModelWhileRunning(model)
        self._real_model = model
        self._deferred: list[list[_Job]] = [[] for _ in lengths]
        self._objective = objective
        self._counter = counter
        self._storages = model_storages(model)
        by_key = {node.key: node for node in plan.nodes}
        self._node = {key: by_key[key] for key in self.nodes}
        # Per job: its kernel's inputs in edge order (None: NOT_NEEDED), and the distinct ones.
        self._inputs: dict[_Job, tuple[_Input | None, ...]] = {}
        self._needed: dict[_Job, frozenset[_Input]] = {}
        self._waiting: dict[_Input, list[_Job]] = {}  # the jobs each input is needed by
        for key in self.nodes:
            for layer in by_key[key].layers:
                job = (key, layer)
                inputs = tuple(self._input_of(edge, layer) for edge in by_key[key].edges)
                self._inputs[job] = inputs
                self._needed[job] = frozenset(x for x in inputs if x is not None)
                for needed in self._needed[job]:
                    self._waiting.setdefault(needed, []).append(job)
        self._unstarted = [job for job, needed in self._needed.items() if not needed]
        requested = {key for key, _ in plan.requests}
        read_later = {
            producer
            for node in plan.nodes
            if node.key not in self.nodes
            for edge in node.edges
            if isinstance(edge, NodeEdge)
            for producer in edge.producers
        }
        self._outlives = (requested | read_later) & self.nodes
        n = len(self._lengths)
        self._available: list[dict[_Input, torch.Tensor]] = [{} for _ in range(n)]
        # Per prompt: how many jobs still need each input, how many inputs each job lacks.
        reads = {what: len(jobs) for what, jobs in self._waiting.items()}
        self._left: list[Counter[_Input]] = [Counter(reads) for _ in range(n)]
        self._missing: list[dict[_Job, int]] = [
            {job: len(needed) for job, needed in self._needed.items()} for _ in range(n)
        ]
        self._results: list[dict[NodeKey, dict[LayerIndex, torch.Tensor]]] = [{} for _ in range(n)]
        self._contexts: list[dict[NodeKey, tuple[DeriveContext, tuple[int | None, ...]]]] = [
            {} for _ in range(n)
        ]
        self._checkers = [OutputChecker(length, model.dims.sizes()) for length in self._lengths]

    def _input_of(self, edge: RawEdge | NodeEdge, layer: LayerIndex) -> _Input | None:
        source_layer = edge.source.layer_indexer.source_layer(layer, self._plan.n_layers)
        if source_layer is NOT_NEEDED:
            return None
        if isinstance(edge, RawEdge):
            return ("raw", edge.producer, source_layer)
        return ("node", edge.producers[0], source_layer)

    def offer(
        self,
        key: RawKey,
        layer: LayerIndex,
        values: Sequence[torch.Tensor],
        *,
        hold: bool = False,
    ) -> None:
        """Prompt by prompt, the capture ``key`` at ``layer`` (one tensor per prompt).

        ``hold``: the model is inside a layer it will recompute (checkpointed), where any
        autograd a kernel ran would be taken over by the checkpoint (and ``torch.func`` refuses
        to run at all): jobs that become ready wait for the next offer outside such a layer, or
        the end of the run.  Serialised: a model spread over several devices runs gradient hooks
        on one autograd thread per device.
        """
        with self._lock:
            self._holding = hold
            try:
                if not hold:
                    for b, held in enumerate(self._held):
                        self._held[b] = []
                        for job in held:
                            self._evaluate(b, job)
                for b, value in enumerate(values):
                    self._arrive(b, ("raw", key, layer), value)
            finally:
                self._holding = False

    def results(self, b: int) -> dict[NodeKey, dict[LayerIndex, torch.Tensor]]:
        """Prompt ``b``'s eager values that ``execute_plan`` needs, then forgets them.

        Called after the run: first evaluates what was deferred, now with the real model.
        """
        if self._model is not self._real_model:
            self._model = self._real_model
            for contexts in self._contexts:
                contexts.clear()
        # Jobs still held, jobs whose inputs are all NOT_NEEDED (a causal source before its
        # range: no input ever arrived to start them), then the jobs deferred during the run.
        deferred = [*self._held[b], *self._unstarted, *self._deferred[b]]
        self._held[b], self._deferred[b] = [], []
        for job in deferred:
            self._evaluate(b, job)
        unfinished = [job for job, missing in self._missing[b].items() if missing]
        if unfinished:  # the adapter offers every handed-over capture, so this is a bug
            names = sorted({f"{key[0].name} (layer {layer})" for key, layer in unfinished})
            raise RuntimeError(f"the run ended before these inputs arrived: {names}")
        out, self._results[b] = self._results[b], {}
        return out

    def _arrive(self, b: int, what: _Input, value: torch.Tensor) -> None:
        if not self._left[b][what]:
            return
        self._available[b][what] = value
        for job in self._waiting.get(what, ()):
            self._missing[b][job] -= 1
            if self._missing[b][job] == 0:
                if self._holding:
                    self._held[b].append(job)
                else:
                    self._evaluate(b, job)

    def _evaluate(self, b: int, job: _Job) -> None:
        import torch

        key, layer = job
        node = self._node[key]
        available = self._available[b]
        inputs = tuple(None if x is None else available[x] for x in self._inputs[job])
        ctx, expected = self._context(b, node)
        try:
            with torch.no_grad():
                value = evaluate_layer(
                    node,
                    ctx,
                    layer,
                    inputs,
                    self._checkers[b],
                    expected,
                    self._counter,
                    self._storages,
                    describe=functools.partial(_describe, node),
                )
        except _NeedsTheModel:  # keeps its inputs; ``results`` evaluates it after the run
            self._deferred[b].append(job)
            return
        for x in self._needed[job]:
            self._left[b][x] -= 1
            if not self._left[b][x]:
                del available[x]
        if key in self._outlives:
            self._results[b].setdefault(key, {})[layer] = value
        self._arrive(b, ("node", key, layer), value)

    def _context(self, b: int, node: PlanNode) -> tuple[DeriveContext, tuple[int | None, ...]]:
        made = self._contexts[b].get(node.key)
        if made is None:
            info = objective_info(self._plan, self._objective, self._lengths[b])
            ctx = DeriveContext(node.pass_type, node.deriver.config, node.dst, self._model, info)
            made = (ctx, self._checkers[b].expected(node.deriver))
            self._contexts[b][node.key] = made
        return made


def _describe(node: PlanNode, i: int) -> str:
    return str(node.edges[i].source.describe())
