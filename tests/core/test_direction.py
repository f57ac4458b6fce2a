"""The shared direction of interest g and its causal rule."""

from __future__ import annotations

import pytest
from scalarlens import (
    NOT_NEEDED,
    ActivationLocationType,
    CausalDirectionIndexer,
    ConfigError,
    Direction,
    DstConfig,
    LocationWithinLayer,
    PassType,
    direction_source,
    precedes,
)

ALT, LOC = ActivationLocationType, LocationWithinLayer


def test_default_is_the_residual_before_the_final_layer_norm() -> None:
    direction = DstConfig().direction
    assert direction == Direction(ALT.RESID_POST_MLP, -1)
    assert direction.resolved_layer(4) == 3
    assert DstConfig.from_dict(DstConfig(direction=direction).to_dict()).direction == direction


def test_precedes_is_strict_and_the_embedding_comes_first() -> None:
    assert precedes(None, None, 2, LOC.MLP)
    assert not precedes(0, LOC.ATTN, None, LOC.END_OF_PREV_LAYER)
    assert precedes(1, LOC.MLP, 2, LOC.ATTN)
    assert precedes(2, LOC.ATTN, 2, LOC.RESID_POST_ATTN)
    assert not precedes(2, LOC.MLP, 2, LOC.RESID_POST_ATTN)
    assert not precedes(2, LOC.RESID_POST_MLP, 2, LOC.RESID_POST_MLP)  # its own location
    assert not precedes(3, LOC.ATTN, 2, LOC.RESID_POST_MLP)


def test_causal_indexer_reads_g_only_for_preceding_layers() -> None:
    g = Direction(ALT.RESID_POST_ATTN, 1)
    mlp = CausalDirectionIndexer(g, LOC.MLP)
    attn = CausalDirectionIndexer(g, LOC.ATTN)
    assert [mlp.source_layer(t, 3) for t in range(3)] == [1, NOT_NEEDED, NOT_NEEDED]
    assert [attn.source_layer(t, 3) for t in range(3)] == [1, 1, NOT_NEEDED]
    source = direction_source(Direction(ALT.RESID_POST_EMBEDDING, None), LOC.MLP)
    assert source.pass_type is PassType.BACKWARD and source.location is ALT.RESID_POST_EMBEDDING
    assert source.layer_indexer.source_layer(None, 3) is None
    assert source.layer_indexer.source_layer(0, 3) is NOT_NEEDED


def test_trace_upstream_and_validation() -> None:
    assert Direction.trace_upstream(ALT.MLP_POST_ACT, 2) == Direction(ALT.RESID_POST_ATTN, 2)
    assert Direction.trace_upstream(ALT.ATTN_QK_PROBS, 0) == Direction(
        ALT.RESID_POST_EMBEDDING, None
    )
    with pytest.raises(ConfigError, match="no place inside a layer"):
        Direction.trace_upstream(ALT.LOGITS, 0)
    with pytest.raises(ConfigError, match="outside the model's 2 layers"):
        Direction(ALT.RESID_POST_MLP, 5).resolved_layer(2)
