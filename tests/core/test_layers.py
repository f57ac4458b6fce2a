from __future__ import annotations

import pytest
from scalarlens import (
    NOT_NEEDED,
    ConfigError,
    IdentityLayerIndexer,
    LayerIndexer,
    NoLayersLayerIndexer,
    OffsetLayerIndexer,
    StaticLayerIndexer,
)


def test_identity() -> None:
    assert [IdentityLayerIndexer().source_layer(t, 4) for t in (0, 3, None)] == [0, 3, None]


def test_static_counts_negative_from_the_end() -> None:
    assert StaticLayerIndexer(-1).source_layer(0, 4) == 3
    assert StaticLayerIndexer(1).source_layer(3, 4) == 1
    with pytest.raises(ConfigError, match="outside the model's 4 layers"):
        StaticLayerIndexer(5).source_layer(0, 4)


def test_offset_is_judged_against_the_model_not_the_request() -> None:
    prev = OffsetLayerIndexer(-1)
    assert prev.source_layer(0, 4) is NOT_NEEDED
    assert prev.source_layer(3, 4) == 2
    assert OffsetLayerIndexer(1).source_layer(3, 4) is NOT_NEEDED
    with pytest.raises(ConfigError):
        prev.source_layer(None, 4)


def test_no_layers() -> None:
    assert NoLayersLayerIndexer().source_layer(2, 4) is None


def test_all_kinds_satisfy_the_protocol() -> None:
    for indexer in (
        IdentityLayerIndexer(),
        StaticLayerIndexer(0),
        OffsetLayerIndexer(-1),
        NoLayersLayerIndexer(),
    ):
        assert isinstance(indexer, LayerIndexer)
        assert indexer.describe()
