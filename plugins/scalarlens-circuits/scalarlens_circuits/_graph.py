"""Attribution graphs: which components' writes drive which, for one prompt and one prediction.

The graph is the model *linearised* around the prompt, the way circuit-tracer and Neuronpedia
build theirs: every norm's scale ``σ`` and every attention pattern are frozen at their values
on the prompt, so the residual stream a component reads is a sum of earlier writes, and each
component's pre-activation is a linear function of that sum.  An edge ``U → N`` is U's write
times N's read vector; a node's incoming edges plus a constant (biases, norm offsets) equal its
pre-activation exactly.

Nodes
    * one **embedding** node per token (token plus position embedding);
    * **MLP neurons** (value: pre-activation; for a gated MLP, ``act(gate)`` is frozen too and
      the value is ``act(gate)·up``, the activation itself);
    * **attention heads** at a query token (value: the head's write at that token projected on
      the objective's gradient there — a head writes a vector, and the gradient is the
      direction that matters for this objective; its edges come through the value path, with
      the pattern frozen; edges into its query and key paths are gradient attributions kept
      apart in ``AttributionGraph.qk_edges``);
    * **error** nodes, one per (sublayer, layer, token): the summed write of the components not
      kept as nodes, so every residual stream is still decomposed exactly;
    * the **objective** (a logit difference, or a logit).
Neurons and heads become nodes by their attribution to the objective (``|activation × gradient|``)
up to ``max_nodes``; the rest are in the error nodes.  A dense ``nodes × nodes`` matrix is never
formed: edges are computed in blocks of targets sized by ``block_bytes`` and kept sparse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from scalarlens import (
    ActivationLocationType,
    CallableObjective,
    CaptureRequest,
    LogitDiffObjective,
    ModelAdapter,
    PassType,
    WeightLocationType,
    residual_read_by,
)
from scalarlens.exceptions import ModelInputError

from ._options import read_stage

ALT = ActivationLocationType
W = WeightLocationType
FWD, BWD = PassType.FORWARD, PassType.BACKWARD

__all__ = ["AttributionGraph", "Node", "attribution_graph", "estimate_memory"]

KINDS = ("embedding", "neuron", "feature", "head", "attn_error", "mlp_error", "objective")


@attrs.define
class Node:
    """One graph node.  ``stage`` orders writes: 0 embeddings, ``2l+1`` attention at layer
    ``layer``, ``2l+2`` its MLP, ``2L+1`` the objective.  ``index`` is the neuron, the head, the
    token id (embeddings) or the target token (objective).  ``value`` is what the incoming
    edges plus ``bias`` add up to; ``activation`` is what the node outputs (a neuron's
    post-activation; the value elsewhere)."""

    kind: str
    layer: int | None
    index: int
    position: int
    stage: int
    value: float
    bias: float
    activation: float


@attrs.define
class AttributionGraph:
    """Nodes, sparse edges ``A[target, source]`` and the prompt they describe.

    ``edges`` is a coalesced ``n×n`` sparse COO tensor (float64); ``qk_edges`` maps a head
    node to ``{"q": {source: weight}, "k": {...}}`` for the heads traced there.
    """

    model: str
    tokens: list[int]
    token_strings: list[str]
    nodes: list[Node]
    edges: torch.Tensor
    objective: int  # the target logit's node (the most probable one in top-logits mode)
    n_layers: int
    d_mlp: int
    settings: dict[str, Any]
    n_heads: int = 0
    feature_offset: int = 0  # heads and error nodes are numbered as features from here
    qk_edges: dict[int, dict[str, dict[int, float]]] = attrs.Factory(dict)
    # Logit nodes and the weight each carries into pruning (its probability in top-logits mode;
    # [objective] with weight 1 otherwise).
    logit_nodes: list[int] = attrs.Factory(list)
    logit_weights: list[float] = attrs.Factory(list)
    influence: torch.Tensor | None = None
    cumulative_influence: torch.Tensor | None = None
    kept_nodes: list[int] | None = None
    kept_edges: torch.Tensor | None = None

    def incoming(self, target: int) -> dict[int, float]:
        """``{source: weight}`` of every edge into ``target`` (the full graph, unpruned)."""
        a = self.edges
        rows = a.indices()[0] == target
        return dict(zip(a.indices()[1][rows].tolist(), a.values()[rows].tolist(), strict=True))

    def top_path(self, start: int | None = None) -> list[int]:
        """From ``start`` (default: the objective) down the strongest incoming edge each step,
        to a node with no incoming edges (an embedding or error node)."""
        path = [self.objective if start is None else start]
        while True:
            incoming = self.incoming(path[-1])
            if not incoming:
                return path
            path.append(max(incoming, key=lambda s: abs(incoming[s])))

    def find(self, kind: str, layer: int | None, index: int, position: int) -> int:
        """The node id of ``(kind, layer, index, position)``."""
        for i, n in enumerate(self.nodes):
            if (n.kind, n.layer, n.index, n.position) == (kind, layer, index, position):
                return i
        from scalarlens.exceptions import ConfigError

        raise ConfigError(
            f"the graph has no {kind} node at layer {layer}, index {index}, token {position}: "
            "it was not kept as a node (neurons and heads are kept by |activation × gradient| up "
            "to max_nodes; the others are inside the error nodes) — raise max_nodes"
        )

    def label(self, i: int) -> str:
        n = self.nodes[i]
        word = self.token_strings[n.position] if n.position < len(self.token_strings) else "?"
        what = {
            "embedding": f"emb {word!r}",
            "neuron": f"L{n.layer} N{n.index}",
            "feature": f"L{n.layer} F{n.index}",
            "head": f"L{n.layer} H{n.index}",
            "attn_error": f"L{n.layer} attn (other heads)",
            "mlp_error": f"L{n.layer} mlp (other neurons)",
            "objective": "objective",
        }[n.kind]
        return f"{what} @{n.position}"


HEADROOM = 1.15
"""The estimate's margin for allocator fragmentation and short-lived temporaries: the terms
below are what the graph holds, and measured peaks reach 0.87–0.99 of them."""


def estimate_memory(
    dims: Any,
    n_tokens: int,
    *,
    max_nodes: int,
    block_bytes: int,
    bytes_per_value: int = 8,
    model_bytes: int = 8,
) -> int:
    """Bytes the graph needs beyond the model, worst case.

    In the dtype captures are kept in (``model_bytes`` per value; 8, float64, is the worst
    case): the run's activations kept for its backward pass (attention scores and
    probabilities, MLP and residual vectors, the logits), most of which the allocator still
    holds afterwards, and its captures, attention patterns included.  In float64
    (``bytes_per_value``): the per-token captures again (the graph's working copies; patterns
    are converted one block of targets at a time), the attention weights, the sources (and the
    pieces they are concatenated from), one edge block, and the sparse edges (every source
    reading every target at earlier positions, with the copies made while they are assembled).
    """
    t, layers, d = n_tokens, dims.n_layers, dims.d_model
    heads, d_head, d_mlp = dims.n_heads, dims.d_head, dims.d_mlp
    captured = layers * t * (5 * d + heads * d_head + 3 * d_mlp) + t * d
    patterns = layers * t * heads * t  # attention probabilities, kept in the model's dtype
    activations = layers * t * (3 * heads * t + 2 * d_mlp + 6 * d) + t * dims.n_vocab
    weights = layers * 2 * heads * d_head * d
    n_src = t + max_nodes + 2 * layers * t
    sources = 2 * n_src * d
    avg_src_per_target = min(n_src, max(1, n_src // max(1, t)) * max(1, t // 2))
    sparse = (max_nodes + 1) * avg_src_per_target * 3  # values + two int64 indices
    in_float64 = captured + weights + sources + sparse
    in_model = captured + patterns + activations
    total = in_model * model_bytes + in_float64 * bytes_per_value + block_bytes
    return int(HEADROOM * total)


@attrs.frozen
class _Targets:
    """A block of same-kind targets: their read directions and how to place each edge."""

    ids: list[int]
    directions: torch.Tensor  # k×D
    factor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (src rows, ids) -> N×k
    read_stage: torch.Tensor  # k
    last_position: int  # no source after it can reach these targets
    only_position: int | None = None  # MLP neurons and logits read one token


def _center(v: torch.Tensor, layernorm: bool) -> torch.Tensor:
    return v - v.mean(dim=-1, keepdim=True) if layernorm else v


def attribution_graph(
    model: ModelAdapter,
    prompt: str | Sequence[int],
    *,
    target: str | int | None = None,
    distractor: str | int | None = None,
    top_logits: int = 10,
    logit_probability: float = 0.95,
    max_nodes: int = 2048,
    block_bytes: int = 256 * 2**20,
    qk_heads: int = 8,
    transcoder: Any = None,
    progress: Callable[[str], None] | None = None,
) -> AttributionGraph:
    """The attribution graph of ``target`` (minus ``distractor``) at the prompt's last token.

    Without a ``target``, the graph traces the model's own prediction, as circuit-tracer does:
    the most probable next tokens (at most ``top_logits``, until their probabilities add up to
    ``logit_probability``) are logit nodes, each ``logit − mean logit``, weighted by its
    probability when pruning.

    ``max_nodes`` neurons and heads are kept as nodes (by ``|activation × gradient|``), the
    rest go into error nodes.  ``qk_heads``: how many of the strongest head nodes also get
    their query- and key-path edges (gradient attributions through reconstitution; 0 for none,
    and only on models that implement ``scalarlens.Reconstitutable``).  ``transcoder``: a
    (cross-layer) transcoder whose features replace the neurons of the MLPs it writes (see
    ``_features``); the error nodes then hold what it does not reconstruct.  Prune with
    :func:`scalarlens_circuits.prune` and export with :func:`to_neuronpedia`.
    """
    from scalarlens import encode_prompt, encode_token

    say = progress or (lambda _: None)
    for name, value in (("max_nodes", max_nodes), ("qk_heads", qk_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelInputError(
                f"attribution_graph: {name} must be an integer ≥ 0, got {value!r}"
            )
    tokens = encode_prompt(model, prompt)
    objective: Any
    if target is None:
        if distractor is not None:
            raise ModelInputError(
                "attribution_graph: a distractor needs a target (target − distractor); without "
                "a target the graph traces the top logits"
            )
        logits = _top_logits(model, tokens, top_logits, logit_probability)
        say("tracing the top logits: " + ", ".join(f"{t} (p={p:.2f})" for t, p in logits))
        dst = None
        picked = torch.tensor([t for t, _ in logits])
        weights = torch.tensor([p for _, p in logits])

        def weighted(out: torch.Tensor) -> torch.Tensor:
            last = out[-1]
            centred = last[picked.to(last.device)] - last.mean()
            return (centred * weights.to(centred)).sum()

        objective = CallableObjective(weighted, name="top logits")
    else:
        tgt = encode_token(model, target, "target")
        dst = None if distractor is None else encode_token(model, distractor, "distractor")
        if dst == tgt:
            raise ModelInputError(
                f"target and distractor are the same token (id {tgt}); their logit difference "
                "is always zero — pick the token the model might predict instead"
            )
        logits = [(tgt, 1.0)]
        objective = (
            LogitDiffObjective(tgt, dst)
            if dst is not None
            else CallableObjective(lambda out: out[-1, tgt], name=f"logit[{tgt}]")
        )
    say(f"running the prompt ({len(tokens)} tokens) forward and backward")
    run = _capture(model, tokens, objective)
    builder = _Builder(model, tokens, run, logits, dst, max_nodes, block_bytes, say)
    builder.centred = target is None
    if transcoder is not None:
        from ._features import TranscoderFeatures

        builder.features = TranscoderFeatures(transcoder, builder)
    graph = builder.build()
    if qk_heads and not _reconstitutable(model):
        say(
            f"query/key paths not traced: model {model.name!r} does not implement "
            "scalarlens.Reconstitutable"
        )
        graph.settings["qk_heads"] = 0
    elif qk_heads:
        from ._qk import trace_qk

        say(f"tracing query and key paths of the {qk_heads} strongest heads")
        trace_qk(graph, builder, model, qk_heads)
        graph.settings["qk_heads"] = qk_heads
    return graph


def _top_logits(
    model: ModelAdapter, tokens: list[int], most: int, probability: float
) -> list[tuple[int, float]]:
    """The most probable next tokens, until their probabilities reach ``probability``."""
    if isinstance(most, bool) or not isinstance(most, int) or most < 1:
        raise ModelInputError(f"attribution_graph: top_logits must be an integer ≥ 1, got {most!r}")
    if not 0 < probability <= 1:
        raise ModelInputError(
            f"attribution_graph: logit_probability must be in (0, 1], got {probability!r}"
        )
    (run,) = model.run([tokens], [], None)
    probs = torch.softmax(run.logits[-1].to(torch.float64), dim=-1)
    top = torch.topk(probs, min(most, probs.numel()))
    out: list[tuple[int, float]] = []
    total = 0.0
    for token, p in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        out.append((token, p))
        total += p
        if total >= probability:
            break
    return out


def _reconstitutable(model: Any) -> bool:
    from scalarlens import Reconstitutable

    return isinstance(model, Reconstitutable)


_FORWARD = (
    ALT.RESID_POST_EMBEDDING,
    ALT.RESID_POST_ATTN,
    ALT.RESID_POST_MLP,
    ALT.RESID_DELTA_ATTN,
    ALT.RESID_DELTA_MLP,
    ALT.ATTN_QK_PROBS,
    ALT.ATTN_WEIGHTED_SUM_OF_VALUES,
    ALT.MLP_PRE_ACT,
    ALT.MLP_POST_ACT,
    ALT.ATTN_INPUT_LAYER_NORM_SCALE,
    ALT.MLP_INPUT_LAYER_NORM_SCALE,
    ALT.RESID_FINAL_LAYER_NORM_SCALE,
    ALT.ATTN_POST_NORM_SCALE,
    ALT.MLP_POST_NORM_SCALE,
)
_BACKWARD = (ALT.RESID_DELTA_ATTN, ALT.RESID_DELTA_MLP, ALT.MLP_POST_ACT)


def _capture(model: ModelAdapter, tokens: list[int], objective: Any) -> Any:
    every = frozenset(range(model.dims.n_layers))
    captures = [
        CaptureRequest(loc, FWD, None if loc.has_no_layers else every) for loc in _FORWARD
    ] + [CaptureRequest(loc, BWD, every) for loc in _BACKWARD]
    (run,) = model.run([tokens], captures, objective, return_logits=True)
    return run


class _Builder:
    """Turns one captured run into nodes and sparse edges (one instance per graph)."""

    def __init__(
        self,
        model: ModelAdapter,
        tokens: list[int],
        run: Any,
        logits: list[tuple[int, float]],
        dst: int | None,
        max_nodes: int,
        block_bytes: int,
        say: Callable[[str], None],
    ) -> None:
        self.model, self.dims, self.tokens, self.run = model, model.dims, tokens, run
        self.logits = logits
        self.centred = False  # top-logits mode: each logit node is logit − mean logit
        self.tgt, self.dst, self.max_nodes, self.block_bytes, self.say = (
            logits[0][0],
            dst,
            max_nodes,
            block_bytes,
            say,
        )
        self.t = len(tokens)
        self.layernorm = self.dims.norm_kind == "layernorm"
        self.dtype = torch.float64
        self._caps: dict[Any, torch.Tensor] = {}
        self._weights: dict[Any, torch.Tensor] = {}
        self._mlp_inputs: dict[int, torch.Tensor] = {}
        self.features: Any = None  # TranscoderFeatures, when a transcoder replaces MLPs

    # --- small accessors --------------------------------------------------------------------

    def cap(self, loc: ALT, layer: int | None = None, pass_type: PassType = FWD) -> torch.Tensor:
        """A captured tensor in float64 (converted once, then cached)."""
        key = (loc, layer, pass_type)
        if key not in self._caps:
            captured = self.run.captured[(loc, pass_type)][layer]
            self._caps[key] = captured.to(device="cpu", dtype=self.dtype)
        return self._caps[key]

    def weight(self, loc: W, layer: int | None = None) -> torch.Tensor:
        """A model weight in float64 (read once, then cached)."""
        key = (loc, layer)
        if key not in self._weights:
            self._weights[key] = self.model.weight(loc, layer).to(device="cpu", dtype=self.dtype)
        return self._weights[key]

    def weight_slice(
        self, loc: W, layer: int | None, index: torch.Tensor, dim: int
    ) -> torch.Tensor:
        """``weight(loc, layer)`` at ``index`` along ``dim``, converting only that slice to
        float64 (uncached): whole float64 copies of the unembedding and MLP matrices of a
        float32 model are most of the model again (GPT-2 small: 835 MiB)."""
        weight = self.model.weight(loc, layer)
        picked = weight.index_select(dim, index.to(weight.device))
        return picked.to(device="cpu", dtype=self.dtype)

    def post_factor(self, layer: int, sublayer: str) -> torch.Tensor:
        """``γ/σ`` of a sublayer's post-norm per token (``T×D``), or ones without post-norms."""
        if not self.dims.post_norms:
            return torch.ones(self.t, self.dims.d_model, dtype=self.dtype)
        scale = ALT.ATTN_POST_NORM_SCALE if sublayer == "attn" else ALT.MLP_POST_NORM_SCALE
        gain = W.ATTN_POST_NORM_GAIN if sublayer == "attn" else W.MLP_POST_NORM_GAIN
        return self.weight(gain, layer)[None, :] / self.cap(scale, layer)

    def head_rows(self, layer: int, heads: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The writes of heads ``heads`` at tokens ``pos`` (``k×D``, through any post-norm)."""
        mixed = self.cap(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, layer)[pos, heads]  # k×dv
        w_o = self.weight(W.ATTN_TO_RESIDUAL, layer)[heads]  # k×dv×D
        rows = torch.einsum("kv,kvd->kd", mixed, w_o)
        return rows * self.post_factor(layer, "attn")[pos]

    def values_weight(self, layer: int) -> torch.Tensor:
        """``W_V`` per query head, ``H×D×dv`` (grouped heads share their group's)."""
        return self._per_query_head(self.weight(W.ATTN_TO_VALUE, layer))

    def values_bias(self, layer: int) -> torch.Tensor:
        return self._per_query_head(self.weight(W.ATTN_BIAS_VALUE, layer))

    def _per_query_head(self, kv: torch.Tensor) -> torch.Tensor:
        """A key/value-head tensor repeated for each query head of its group (GQA)."""
        if kv.shape[0] == self.dims.n_heads:
            return kv
        return kv.repeat_interleave(self.dims.kv_group_size, dim=0)

    def mlp_read_stage(self, layer: int) -> int:
        return read_stage(self.dims, "mlp", layer)

    # --- nodes ------------------------------------------------------------------------------

    def build(self) -> AttributionGraph:
        dims, t = self.dims, self.t
        n_layers = dims.n_layers
        self.grad_attn = {
            layer: self.cap(ALT.RESID_DELTA_ATTN, layer, BWD) for layer in range(n_layers)
        }
        scores = []
        for layer in range(n_layers):
            # A head's value, write·g, as mixed·(W_O·(γ/σ ⊙ g)): T×H×dv, never T×H×D.
            mixed = self.cap(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, layer)  # T×H×dv
            w_o = self.weight(W.ATTN_TO_RESIDUAL, layer)  # H×dv×D
            g = self.grad_attn[layer] * self.post_factor(layer, "attn")
            head_value = (mixed * torch.einsum("td,hvd->thv", g, w_o)).sum(-1)
            scores.append(("head", layer, head_value.abs()))
            if self.features is not None and self.features.replaces(layer):
                continue
            post = self.cap(ALT.MLP_POST_ACT, layer)
            grad = self.cap(ALT.MLP_POST_ACT, layer, BWD)
            scores.append(("neuron", layer, (post * grad).abs()))
        if self.features is not None:
            scores += [("feature", s, self.features.scores(s)) for s in self.features.sources]
        nodes: list[Node] = []
        # Candidates: (score, kind, layer, index, position), every position up to the last.
        flat_scores = [score.reshape(-1) for _, _, score in scores]
        keys = [(kind, layer, score.shape) for kind, layer, score in scores]
        all_scores = torch.cat(flat_scores)
        k = min(self.max_nodes, all_scores.numel())
        chosen = (
            torch.topk(all_scores, k).indices.sort().values
            if k
            else torch.zeros(0, dtype=torch.long)
        )
        offsets, start = [], 0
        for chunk in flat_scores:
            offsets.append(start)
            start += chunk.numel()
        selected: list[tuple[str, int, int, int]] = []
        bounds = torch.tensor([*offsets, start])
        which = torch.searchsorted(bounds, chosen, right=True) - 1
        for c, idx in zip(which.tolist(), chosen.tolist(), strict=True):
            kind, layer, shape = keys[c]
            local = idx - offsets[c]
            position, index = divmod(local, shape[1])
            selected.append((kind, layer, index, position))
        self.say(f"{len(selected)} component nodes kept out of {all_scores.numel():,}")

        # Embeddings.
        emb = self.cap(ALT.RESID_POST_EMBEDDING)
        for p in range(t):
            nodes.append(Node("embedding", None, self.tokens[p], p, 0, 0.0, 0.0, 0.0))
        writes: list[torch.Tensor] = [emb]
        src_pos: list[torch.Tensor] = [torch.arange(t)]
        src_ids: list[torch.Tensor] = [torch.arange(t)]
        src_stage: list[torch.Tensor] = [torch.zeros(t, dtype=torch.long)]
        # Feature writes into each target layer's MLP output: (positions, k×D) per layer.
        feature_writes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Selected components.
        chosen_at: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        for kind, layer, index, p in selected:
            chosen_at.setdefault((kind, layer), []).append((index, p, len(nodes)))
            stage = 2 * layer + 1 if kind == "head" else 2 * layer + 2
            nodes.append(Node(kind, layer, index, p, stage, float("nan"), float("nan"), 0.0))
        comp_writes: dict[tuple[str, int], torch.Tensor] = {}
        for (kind, layer), members in chosen_at.items():
            index = torch.tensor([m[0] for m in members])
            pos = torch.tensor([m[1] for m in members])
            ids = torch.tensor([m[2] for m in members])
            if kind == "feature":  # a write at every target layer, the same node
                for node_id, a in zip(
                    ids.tolist(), self.features.latents[layer][pos, index].tolist(), strict=True
                ):
                    nodes[node_id].activation = a
                for target, rows in self.features.write_rows(layer, index, pos):
                    feature_writes.setdefault(target, []).append((pos, rows))
                    writes.append(rows)
                    src_pos.append(pos)
                    src_ids.append(ids)
                    src_stage.append(torch.full((len(members),), 2 * target + 2))
                continue
            if kind == "head":
                comp = self.head_rows(layer, index, pos)
                acts = (comp * self.grad_attn[layer][pos]).sum(-1)
            else:
                acts = self.cap(ALT.MLP_POST_ACT, layer)[pos, index]
                w_out = self.weight_slice(W.MLP_TO_RESIDUAL, layer, index, 0)
                comp = acts[:, None] * w_out * self.post_factor(layer, "mlp")[pos]
            comp_writes[(kind, layer)] = comp
            for (_, _, node_id), a in zip(members, acts.tolist(), strict=True):
                nodes[node_id].activation = a
            writes.append(comp)
            src_pos.append(pos)
            src_ids.append(ids)
            src_stage.append(torch.full((len(members),), 2 * layer + (1 if kind == "head" else 2)))
        # Error nodes: each sublayer's write minus its bias and its kept components.
        bias_rows, bias_pos, bias_stage = [], [], []
        for layer in range(n_layers):
            for sub, delta_loc, bias_loc, kind in (
                ("attn", ALT.RESID_DELTA_ATTN, W.ATTN_BIAS_RESIDUAL, "attn_error"),
                ("mlp", ALT.RESID_DELTA_MLP, W.MLP_BIAS_RESIDUAL, "mlp_error"),
            ):
                stage = 2 * layer + 1 if sub == "attn" else 2 * layer + 2
                replaced = (
                    sub == "mlp" and self.features is not None and self.features.replaces(layer)
                )
                if replaced:  # b_dec is part of resid.delta_mlp as written (after any post-norm)
                    bias = self.features.bias(layer)[None, :].expand(t, -1)
                else:
                    bias = self.weight(bias_loc, layer)[None, :] * self.post_factor(layer, sub)
                rest = self.cap(delta_loc, layer) - bias
                key = ("head" if sub == "attn" else "neuron", layer)
                if key in comp_writes:
                    pos = torch.tensor([m[1] for m in chosen_at[key]])
                    rest = rest.index_add(0, pos, comp_writes[key], alpha=-1.0)
                if replaced:
                    for pos, rows in feature_writes.get(layer, []):
                        rest = rest.index_add(0, pos, rows, alpha=-1.0)
                first = len(nodes)
                norms = rest.norm(dim=-1).tolist()
                nodes.extend(Node(kind, layer, 0, p, stage, 0.0, 0.0, norms[p]) for p in range(t))
                writes.append(rest)
                src_pos.append(torch.arange(t))
                src_ids.append(torch.arange(first, first + t))
                src_stage.append(torch.full((t,), stage))
                bias_rows.append(bias)
                bias_pos.append(torch.arange(t))
                bias_stage.append(torch.full((t,), stage))
        objective_id = len(nodes)
        self.logit_ids = list(range(objective_id, objective_id + len(self.logits)))
        for token, _ in self.logits:
            nodes.append(Node("objective", None, token, t - 1, 2 * n_layers + 1, 0.0, 0.0, 0.0))

        self.nodes = nodes
        self.src_w = torch.cat(writes)
        self.src_pos = torch.cat(src_pos)
        self.src_ids = torch.cat(src_ids)
        self.src_stage = torch.cat(src_stage)
        self.bias_w = torch.cat(bias_rows)
        self.bias_pos = torch.cat(bias_pos)
        self.bias_stage = torch.cat(bias_stage)
        self.objective_id = objective_id

        rows, cols, vals = [], [], []
        for block in self._target_blocks(chosen_at):
            r, c, v = self._edges(block)
            rows.append(r)
            cols.append(c)
            vals.append(v)
        probs = torch.softmax(self.run.logits.to(device="cpu", dtype=self.dtype)[-1], dim=-1)
        n = len(nodes)
        index = (
            torch.stack([torch.cat(rows), torch.cat(cols)])
            if rows
            else torch.zeros(2, 0, dtype=torch.long)
        )
        values = torch.cat(vals) if vals else torch.zeros(0, dtype=self.dtype)
        edges = torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()
        return AttributionGraph(
            model=self.model.name,
            tokens=list(self.tokens),
            token_strings=_token_strings(self.model, self.tokens),
            nodes=self.nodes,
            edges=edges,
            objective=objective_id,
            logit_nodes=list(self.logit_ids),
            logit_weights=[p for _, p in self.logits],
            n_layers=n_layers,
            d_mlp=self.dims.d_mlp,
            n_heads=self.dims.n_heads,
            feature_offset=max(
                self.dims.d_mlp, self.features.n_latents if self.features is not None else 0
            ),
            settings={
                "max_nodes": self.max_nodes,
                "target": self.tgt,
                "distractor": self.dst if self.dst is not None else "",
                "logits": "top" if self.centred else "target",
                "target_prob": float(probs[self.tgt]),
                "logit_probs": [float(probs[token]) for token, _ in self.logits],
            },
        )

    # --- targets ----------------------------------------------------------------------------

    def _target_blocks(self, chosen_at: dict[tuple[str, int], list[tuple[int, int, int]]]) -> Any:
        """Target blocks sized so one dense ``sources × block`` edge matrix fits the budget.

        Neurons are grouped by token (they read only their own token's residual), heads by
        layer; each block multiplies only the sources that can reach it.
        """
        per_target = max(1, self.src_w.shape[0]) * 8 * 6
        size = max(1, self.block_bytes // per_target)
        for (kind, layer), members in sorted(
            chosen_at.items(), key=lambda kv: (kv[0][1], kv[0][0])
        ):
            if kind == "head":
                members = sorted(members, key=lambda m: m[1])
                for i in range(0, len(members), size):
                    yield self._head_block(layer, members[i : i + size])
                continue
            block = self._feature_block if kind == "feature" else self._neuron_block
            by_position: dict[int, list[tuple[int, int, int]]] = {}
            for m in members:
                by_position.setdefault(m[1], []).append(m)
            for _, group in sorted(by_position.items()):
                for i in range(0, len(group), size):
                    yield block(layer, group[i : i + size])
        yield self._objective_block()

    def _neuron_block(self, layer: int, members: list[tuple[int, int, int]]) -> _Targets:
        gain = self.weight(W.LAYER_NORM_GAIN_PRE_MLP, layer)
        beta = self.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer)
        sigma = self.cap(ALT.MLP_INPUT_LAYER_NORM_SCALE, layer)[:, 0]
        index = torch.tensor([m[0] for m in members])
        pos = torch.tensor([m[1] for m in members])
        gated = self.dims.gated_mlp
        w_in = self.weight_slice(W.MLP_TO_UP if gated else W.MLP_TO_HIDDEN, layer, index, 1).T
        b_in = self.weight(W.MLP_BIAS_UP if gated else W.MLP_BIAS_HIDDEN, layer)[index]
        if gated:  # act(gate) frozen: post = a·up, a = post / up
            post = self.cap(ALT.MLP_POST_ACT, layer)[pos, index]
            resid = self.mlp_input(layer)[pos]  # k×D normalised input
            up = (resid * w_in).sum(-1) + b_in
            scale = torch.where(up.abs() > 1e-30, post / up, torch.zeros_like(up))
            value = post
        else:
            scale = torch.ones(len(members), dtype=self.dtype)
            value = self.cap(ALT.MLP_PRE_ACT, layer)[pos, index]
        directions = _center(gain * w_in, self.layernorm) * scale[:, None]
        constant = scale * ((beta * w_in).sum(-1) + b_in)

        def factor(src_pos: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            same = src_pos[:, None] == pos[None, :]
            return same.to(self.dtype) / sigma[pos][None, :]

        self._record(members, value, constant)
        stage = torch.full((len(members),), self.mlp_read_stage(layer))
        p0 = members[0][1]
        return _Targets([m[2] for m in members], directions, factor, stage, p0, p0)

    def _feature_block(self, layer: int, members: list[tuple[int, int, int]]) -> _Targets:
        """Transcoder features at one token: ``z = g·x + c`` with the gate frozen, ``x`` the
        normalised MLP input, so the read vector is ``centre(γ⊙g)/σ`` as for a neuron."""
        gain = self.weight(W.LAYER_NORM_GAIN_PRE_MLP, layer)
        beta = self.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer)
        sigma = self.cap(ALT.MLP_INPUT_LAYER_NORM_SCALE, layer)[:, 0]
        position = members[0][1]
        index = torch.tensor([m[0] for m in members])
        grads, constant, value = self.features.read(layer, index, position)
        directions = _center(gain * grads, self.layernorm)

        def factor(src_pos: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            same = src_pos[:, None] == position
            return same.to(self.dtype).expand(-1, len(members)) / sigma[position]

        self._record(members, value, constant + grads @ beta)
        stage = torch.full((len(members),), self.mlp_read_stage(layer))
        return _Targets([m[2] for m in members], directions, factor, stage, position, position)

    def mlp_input(self, layer: int) -> torch.Tensor:
        """The normalised input of ``layer``'s MLP (``T×D``, σ as captured), computed once."""
        if layer not in self._mlp_inputs:
            self._mlp_inputs[layer] = self._normalised_mlp_input(layer)
        return self._mlp_inputs[layer]

    def _normalised_mlp_input(self, layer: int) -> torch.Tensor:
        resid = self.cap(*residual_read_by(self.dims, "mlp", layer))
        gain = self.weight(W.LAYER_NORM_GAIN_PRE_MLP, layer)
        beta = self.weight(W.LAYER_NORM_BIAS_PRE_MLP, layer)
        sigma = self.cap(ALT.MLP_INPUT_LAYER_NORM_SCALE, layer)
        return _center(resid, self.layernorm) / sigma * gain + beta

    def _head_block(self, layer: int, members: list[tuple[int, int, int]]) -> _Targets:
        gain = self.weight(W.LAYER_NORM_GAIN_PRE_ATTN, layer)
        beta = self.weight(W.LAYER_NORM_BIAS_PRE_ATTN, layer)
        sigma = self.cap(ALT.ATTN_INPUT_LAYER_NORM_SCALE, layer)[:, 0]
        heads = torch.tensor([m[0] for m in members])
        pos = torch.tensor([m[1] for m in members])
        w_o = self.weight(W.ATTN_TO_RESIDUAL, layer)[heads]  # k×dv×D
        g = self.grad_attn[layer][pos] * self.post_factor(layer, "attn")[pos]  # k×D
        c = torch.einsum("kvd,kd->kv", w_o, g)  # k×dv
        w = torch.einsum("kdv,kv->kd", self.values_weight(layer)[heads], c)  # k×D
        directions = _center(gain * w, self.layernorm)
        # Each target's pattern (k×S), converted alone: no float64 copy of every layer's T×S×H.
        probs = self.run.captured[(ALT.ATTN_QK_PROBS, FWD)][layer]
        p_row = probs[pos.to(probs.device), :, heads.to(probs.device)].to("cpu", self.dtype)
        per_source = (beta * w).sum(-1) + (self.values_bias(layer)[heads] * c).sum(-1)  # k
        constant = p_row.sum(-1) * per_source
        mixed = self.cap(ALT.ATTN_WEIGHTED_SUM_OF_VALUES, layer)[pos, heads]  # k×dv
        value = (mixed * c).sum(-1)

        def factor(src_pos: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return p_row[:, src_pos].T / sigma[src_pos][:, None]

        self._record(members, value, constant)
        stage = torch.full((len(members),), read_stage(self.dims, "attn", layer))
        last = max(m[1] for m in members)
        return _Targets([m[2] for m in members], directions, factor, stage, last)

    def _objective_block(self) -> _Targets:
        """The logit nodes: the target (minus the distractor), or each top logit minus the mean
        logit; their value is the pre-soft-cap logit, their activation the model's output."""
        last = self.t - 1
        tokens = [token for token, _ in self.logits]
        columns = torch.tensor(tokens if self.dst is None else [*tokens, self.dst])
        unembed = self.weight_slice(W.UNEMBEDDING, None, columns, 1)  # D×k (+1)
        u = unembed[:, : len(tokens)].T  # k×D
        if self.dst is not None:
            u = u - unembed[:, -1][None, :]
        if self.centred:  # logit − mean logit: the mean unembedding column, read once
            u = u - self.model.weight(W.UNEMBEDDING).mean(dim=1).to("cpu", self.dtype)[None, :]
        gain, beta = self.weight(W.LAYER_NORM_GAIN_FINAL), self.weight(W.LAYER_NORM_BIAS_FINAL)
        sigma = self.cap(ALT.RESID_FINAL_LAYER_NORM_SCALE)[:, 0]
        directions = _center(gain * u, self.layernorm)
        constant = (beta * u).sum(-1)
        final = self.cap(ALT.RESID_POST_MLP, self.dims.n_layers - 1)[last]
        normed = _center(final, self.layernorm) / sigma[last] * gain + beta
        value = u @ normed
        logits = self.run.logits.to(device="cpu", dtype=self.dtype)[last]
        output = logits[tokens] - (logits[self.dst] if self.dst is not None else 0.0)
        if self.centred:
            output = output - logits.mean()
        members = [
            (token, last, node_id) for token, node_id in zip(tokens, self.logit_ids, strict=True)
        ]

        def factor(src_pos: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            same = (src_pos == last).to(self.dtype) / sigma[last]
            return same[:, None].expand(-1, len(tokens))

        self._record(members, value, constant)
        for node_id, out in zip(self.logit_ids, output.tolist(), strict=True):
            self.nodes[node_id].activation = out
        stage = torch.full((len(tokens),), 2 * self.dims.n_layers)
        return _Targets(list(self.logit_ids), directions, factor, stage, last, last)

    def _record(
        self, members: list[tuple[int, int, int]], value: torch.Tensor, constant: torch.Tensor
    ) -> None:
        """Store each target's value now; its bias is completed by ``_edges``."""
        for (_, _, node_id), v, c in zip(members, value.tolist(), constant.tolist(), strict=True):
            node = self.nodes[node_id]
            node.value, node.bias = v, c

    # --- edges ------------------------------------------------------------------------------

    def _edges(self, block: _Targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor(block.ids)
        stage = block.read_stage

        def reachable(pos: torch.Tensor, src_stage: torch.Tensor) -> torch.Tensor:
            ok = (src_stage <= int(stage.max())) & (pos <= block.last_position)
            if block.only_position is not None:
                ok &= pos == block.only_position
            return torch.nonzero(ok)[:, 0]

        rows = reachable(self.src_pos, self.src_stage)
        pos = self.src_pos[rows]
        e = (self.src_w[rows] @ block.directions.T) * block.factor(pos, ids)
        e = e * (self.src_stage[rows][:, None] <= stage[None, :])
        # Bias writes (b_O, b_out) are in the residual too: they join each target's constant.
        brows = reachable(self.bias_pos, self.bias_stage)
        b = (self.bias_w[brows] @ block.directions.T) * block.factor(self.bias_pos[brows], ids)
        b = (b * (self.bias_stage[brows][:, None] <= stage[None, :])).sum(0)
        for node_id, extra in zip(block.ids, b.tolist(), strict=True):
            self.nodes[node_id].bias += extra
        src, tgt = e.nonzero(as_tuple=True)
        return ids[tgt], self.src_ids[rows[src]], e[src, tgt]


def _token_strings(model: Any, tokens: list[int]) -> list[str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "decode_tokens"):
        try:
            return list(tokenizer.decode_tokens(tokens))
        except Exception:  # a tokenizer that cannot show a token: fall back to its id
            pass
    return [str(t) for t in tokens]
