"""A picture of a pruned attribution graph: tokens left to right, layers bottom to top.

Why a drawing as well as the JSON: the first question about a graph is its shape — which
tokens feed the prediction and through which layers — and that is seen faster than read.
Edge width is ``|weight|`` (relative to the largest kept edge), colour its sign; node colour
is its kind; the strongest nodes are labelled.
"""

from __future__ import annotations

from pathlib import Path

from ._graph import AttributionGraph

__all__ = ["draw"]

COLOURS = {
    "embedding": "#7f7f7f",
    "neuron": "#1f77b4",
    "feature": "#9467bd",
    "head": "#ff7f0e",
    "mlp_error": "#c7c7c7",
    "attn_error": "#dbdb8d",
    "objective": "#2ca02c",
}


def draw(
    graph: AttributionGraph, path: str | Path, *, labels: int = 12, max_edges: int = 400
) -> Path:
    """Write the pruned graph as a PNG (``prune`` must have run); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from scalarlens.exceptions import ConfigError

        raise ConfigError(
            "drawing a graph needs matplotlib: pip install 'scalarlens-circuits[plot]'"
        ) from exc
    if graph.kept_nodes is None or graph.kept_edges is None or graph.influence is None:
        from scalarlens.exceptions import ConfigError

        raise ConfigError("draw: prune the graph first (scalarlens_circuits.prune)")
    kept = graph.kept_nodes
    # Place each node at (token, stage); nodes sharing a cell spread out sideways.
    cells: dict[tuple[int, int], list[int]] = {}
    for i in kept:
        n = graph.nodes[i]
        cells.setdefault((n.position, n.stage), []).append(i)
    xy: dict[int, tuple[float, float]] = {}
    for (pos, stage), members in cells.items():
        width = min(0.8, 0.15 * (len(members) - 1))
        for j, i in enumerate(sorted(members, key=lambda i: -abs(float(graph.influence[i])))):
            offset = 0.0 if len(members) == 1 else -width / 2 + width * j / (len(members) - 1)
            xy[i] = (pos + offset, stage)
    n_tokens = len(graph.token_strings)
    fig, ax = plt.subplots(
        figsize=(max(6.0, 0.5 * n_tokens + 2), 1.0 + 0.45 * (2 * graph.n_layers + 2))
    )
    edges = graph.kept_edges.coalesce()
    pairs = list(zip(edges.indices().T.tolist(), edges.values().tolist(), strict=True))
    pairs.sort(key=lambda e: -abs(e[1]))
    pairs = pairs[:max_edges]
    biggest = max((abs(w) for _, w in pairs), default=1.0) or 1.0
    for (t, s), w in reversed(pairs):
        (x0, y0), (x1, y1) = xy[s], xy[t]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="#d62728" if w < 0 else "#1f77b4",
            linewidth=0.3 + 3.0 * abs(w) / biggest,
            alpha=0.25 + 0.6 * abs(w) / biggest,
            zorder=1,
        )
    for kind, colour in COLOURS.items():
        members = [i for i in kept if graph.nodes[i].kind == kind]
        if members:
            ax.scatter(
                [xy[i][0] for i in members],
                [xy[i][1] for i in members],
                s=40,
                color=colour,
                edgecolors="black",
                linewidths=0.4,
                zorder=2,
                label=kind.replace("_", " "),
            )
    strongest = sorted(
        (i for i in kept if graph.nodes[i].kind in ("neuron", "feature", "head", "objective")),
        key=lambda i: (
            -abs(float(graph.influence[i])) if graph.nodes[i].kind != "objective" else -1e9
        ),
    )[:labels]
    for i in strongest:
        n = graph.nodes[i]
        text = (
            "objective"
            if n.kind == "objective"
            else f"L{n.layer}{dict(head='H', feature='F').get(n.kind, 'N')}{n.index}"
        )
        ax.annotate(text, xy[i], xytext=(3, 3), textcoords="offset points", fontsize=7, zorder=3)
    ax.set_xticks(range(n_tokens))
    ax.set_xticklabels(graph.token_strings, rotation=60, ha="right", fontsize=7)
    stages = range(2 * graph.n_layers + 2)
    ax.set_yticks(list(stages))
    ax.set_yticklabels(
        ["embed"]
        + [
            f"L{(s - 1) // 2} {'attn' if s % 2 else 'mlp'}"
            for s in range(1, 2 * graph.n_layers + 1)
        ]
        + ["logit"],
        fontsize=7,
    )
    ax.set_xlim(-0.8, n_tokens - 0.2)
    ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=3)
    ax.set_title(f"{graph.model}: attribution graph ({len(kept)} nodes, {len(pairs)} edges)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
