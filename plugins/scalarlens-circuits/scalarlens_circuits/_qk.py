"""Edges into attention heads' query and key paths: gradient attributions via reconstitution.

With the pattern frozen, a head's value-path edges are exact; but *where* it attends is decided
by its queries and keys.  For a head node (layer ``l``, head ``h``, query token ``t``) with value
``f = write·g``, the key-path edge from an earlier write ``w_U`` at token ``s`` is
``w_U · ∂f/∂r_s``, the gradient taken through the recomputed attention with only the key
input attached (values and queries held, the norm scale detached); likewise for the query path
(only ``s = t``).  These do not sum to ``f`` (softmax is not linear), so they are reported
beside the graph's edges, not in them.
"""

from __future__ import annotations

from typing import Any

import torch
from scalarlens import (
    PassType,
    WeightLocationType,
    attention_on_path,
    reconstitute_gradient,
    residual_read_by,
)

__all__ = ["trace_qk"]

CHUNK = 4096


def trace_qk(graph: Any, builder: Any, model: Any, n_heads: int) -> None:
    """Fill ``graph.qk_edges`` for the ``n_heads`` head nodes with the largest ``|value|``."""
    heads = [i for i, n in enumerate(graph.nodes) if n.kind == "head"]
    heads.sort(key=lambda i: -abs(graph.nodes[i].value))
    for node_id in heads[:n_heads]:
        node = graph.nodes[node_id]
        layer, h, t = node.layer, node.index, node.position
        location, at = residual_read_by(model.dims, "attn", layer)
        resid = builder.run.captured[(location, PassType.FORWARD)][at]  # the model's dtype
        w_o = builder.weight(WeightLocationType.ATTN_TO_RESIDUAL, layer)[h]  # dv×D
        g = builder.grad_attn[layer][t] * builder.post_factor(layer, "attn")[t]
        c = (w_o @ g).to(device=resid.device, dtype=resid.dtype)
        out: dict[str, dict[int, float]] = {}
        for path in ("q", "k"):

            def value(
                r: torch.Tensor,
                path: Any = path,
                layer: int = layer,
                t: int = t,
                h: int = h,
                c: torch.Tensor = c,
            ) -> torch.Tensor:
                parts = attention_on_path(model, r, layer, path, detach_scale=True)
                out: torch.Tensor = parts.mixed[t, h] @ c
                return out

            grad = reconstitute_gradient(value, resid).to(device="cpu", dtype=torch.float64)
            mask = builder.src_stage <= 2 * layer
            weights = (
                torch.cat(  # in chunks: never a second sources × D matrix
                    [
                        (builder.src_w[i : i + CHUNK] * grad[builder.src_pos[i : i + CHUNK]]).sum(
                            -1
                        )
                        for i in range(0, builder.src_w.shape[0], CHUNK)
                    ]
                )
                * mask
            )
            nonzero = torch.nonzero(weights)[:, 0]
            out[path] = dict(
                zip(builder.src_ids[nonzero].tolist(), weights[nonzero].tolist(), strict=True)
            )
        graph.qk_edges[node_id] = out
