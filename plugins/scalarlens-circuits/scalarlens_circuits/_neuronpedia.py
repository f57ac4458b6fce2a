"""Neuronpedia's attribution-graph JSON (the format circuit-tracer writes and Neuronpedia reads).

Ids follow circuit-tracer's conventions: ``E_{token}_{pos}`` for embeddings, ``{layer}_{feature}_
{pos}`` for components and ``{n_layers+1}_{token}_{pos}`` for the target logit.  Heads and error
nodes are numbered as features after the MLP's neurons, so every id keeps the
``{layer}_{feature}_{pos}`` shape and no two collide (circuit-tracer's ``0_{layer}_{pos}`` error
ids would collide with layer-0 neurons here): with ``offset`` = the MLP width (or the
transcoder's latent count, if larger), head ``h`` is feature ``offset + h``, the attention error
node ``offset + n_heads``, the MLP error node ``offset + n_heads + 1``.
Query/key-path edges are exported beside the links, under ``qk_links`` (``{source, target,
weight, path}``), because they are not part of the linear graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._graph import AttributionGraph

__all__ = ["FEATURE_TYPES", "node_id", "to_neuronpedia", "write_neuronpedia"]

FEATURE_TYPES = {
    "embedding": "embedding",
    "neuron": "mlp neuron",
    "feature": "cross layer transcoder",
    "head": "attention head",
    "mlp_error": "mlp reconstruction error",
    "attn_error": "attention reconstruction error",
    "objective": "logit",
}


def node_id(graph: AttributionGraph, i: int) -> str:
    n = graph.nodes[i]
    if n.kind == "embedding":
        return f"E_{n.index}_{n.position}"
    offset = graph.feature_offset or graph.d_mlp
    if n.kind in ("neuron", "feature"):
        return f"{n.layer}_{n.index}_{n.position}"
    if n.kind == "head":
        return f"{n.layer}_{offset + n.index}_{n.position}"
    if n.kind == "attn_error":
        return f"{n.layer}_{offset + graph.n_heads}_{n.position}"
    if n.kind == "mlp_error":
        return f"{n.layer}_{offset + graph.n_heads + 1}_{n.position}"
    return f"{graph.n_layers + 1}_{n.index}_{n.position}"


def _layer(graph: AttributionGraph, i: int) -> str:
    n = graph.nodes[i]
    if n.kind == "embedding":
        return "E"
    if n.kind == "objective":
        return str(graph.n_layers + 1)
    return str(n.layer)


def _js_node_id(graph: AttributionGraph, i: int) -> str:
    """circuit-tracer's front-end id: ``E_{token}-{pos}``, ``L_{token}-{pos}``, and
    ``{layer}_{feature}-0`` for components and errors (shared by a feature's positions)."""
    n = graph.nodes[i]
    if n.kind == "embedding":
        return f"E_{n.index}-{n.position}"
    if n.kind == "objective":
        return f"L_{n.index}-{n.position}"
    return node_id(graph, i).rsplit("_", 1)[0] + "-0"


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _feature(graph: AttributionGraph, i: int) -> int:
    """circuit-tracer's ``feature`` field: an embedding's position, ``-1`` for an error node,
    the target token for the logit, ``cantor(layer, latent)`` for a transcoder feature (its id
    across layers); a neuron's index, a head's ``offset + h``."""
    n = graph.nodes[i]
    if n.kind == "embedding":
        return n.position
    if n.kind in ("attn_error", "mlp_error"):
        return -1
    if n.kind == "objective":
        return n.index
    if n.kind == "feature":
        return _cantor(int(n.layer or 0), n.index)
    if n.kind == "head":
        return (graph.feature_offset or graph.d_mlp) + n.index
    return n.index


def to_neuronpedia(
    graph: AttributionGraph, *, slug: str = "scalarlens-graph", prompt: str | None = None
) -> dict[str, Any]:
    """The pruned graph (``prune`` must have run) as Neuronpedia's graph JSON object."""
    if graph.kept_nodes is None or graph.kept_edges is None or graph.influence is None:
        from scalarlens.exceptions import ConfigError

        raise ConfigError("to_neuronpedia: prune the graph first (scalarlens_circuits.prune)")
    ids = {i: node_id(graph, i) for i in graph.kept_nodes}
    probabilities = dict(
        zip(graph.logit_nodes, graph.settings.get("logit_probs", []), strict=False)
    )
    cumulative = (
        graph.cumulative_influence if graph.cumulative_influence is not None else graph.influence
    )
    nodes = []
    for i in graph.kept_nodes:
        n = graph.nodes[i]
        nodes.append(
            {
                "node_id": ids[i],
                "feature": _feature(graph, i),
                "layer": _layer(graph, i),
                "ctx_idx": n.position,
                "feature_type": FEATURE_TYPES[n.kind],
                "jsNodeId": _js_node_id(graph, i),
                "clerp": graph.label(i),
                "influence": float(cumulative[i]),
                "activation": float(n.activation),
                "is_target_logit": i == graph.objective,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "token_prob": probabilities.get(i, 0.0),
                "value": n.value,
                "bias": n.bias,
            }
        )
    kept = graph.kept_edges.coalesce()
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for (t, s), w in zip(kept.indices().T.tolist(), kept.values().tolist(), strict=True)
    ]
    qk_links = [
        {"source": ids[s], "target": ids[t], "weight": w, "path": path}
        for t, paths in graph.qk_edges.items()
        if t in ids
        for path, edges in paths.items()
        for s, w in edges.items()
        if s in ids
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": graph.model,
            "prompt_tokens": list(graph.token_strings),
            "prompt": prompt if prompt is not None else " ".join(graph.token_strings),
            "transcoder_list": [],
            "node_threshold": graph.settings.get("node_threshold"),
            "schema_version": 1,
            "info": {"creator_name": "scalarlens-circuits", "generator": "scalarlens_circuits"},
            "generation_settings": {
                k: v for k, v in graph.settings.items() if isinstance(v, (int, float, str))
            },
            "pruning_settings": {
                "node_threshold": graph.settings.get("node_threshold"),
                "edge_threshold": graph.settings.get("edge_threshold"),
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
        "qk_links": qk_links,
    }


def write_neuronpedia(graph: AttributionGraph, path: str | Path, **kwargs: Any) -> Path:
    out = Path(path)
    out.write_text(json.dumps(to_neuronpedia(graph, **kwargs)))
    return out
