from __future__ import annotations

import pytest
import torch
from scalarlens import (
    ActivationLocationType,
    ActivationsAndMetadata,
    MissingActivationError,
    NoLayersLayerIndexer,
    OffsetLayerIndexer,
    PassType,
    RawActivationStore,
    StaticLayerIndexer,
    raw_dst,
)
from scalarlens.exceptions import ShapeError

ALT = ActivationLocationType


def _aam() -> ActivationsAndMetadata:
    data = {layer: torch.full((2, 3), float(layer)) for layer in range(3)}
    return ActivationsAndMetadata(raw_dst(ALT.MLP_POST_ACT, ""), PassType.FORWARD, data)


def test_store_is_read_only_and_copies_its_input() -> None:
    data = {0: torch.zeros(2)}
    aam = ActivationsAndMetadata(raw_dst(ALT.MLP_POST_ACT, ""), PassType.FORWARD, data)
    data[1] = torch.ones(2)  # the caller's dict changing must not change the store
    assert aam.layer_indices == (0,)
    with pytest.raises(TypeError):
        aam.activations_by_layer_index[5] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(AttributeError):
        aam.pass_type = PassType.BACKWARD  # type: ignore[misc]


def test_apply_layer_indexer_never_mutates_its_input() -> None:
    aam = _aam()
    before = dict(aam.activations_by_layer_index)
    shifted = aam.apply_layer_indexer(OffsetLayerIndexer(-1), (0, 1, 2), n_layers=3)
    assert dict(aam.activations_by_layer_index) == before
    # layer 0 needs nothing from the previous layer: absent, not a zero tensor
    assert shifted.layer_indices == (1, 2)
    assert torch.equal(shifted[2], before[1])


def test_static_and_missing_layers() -> None:
    aam = _aam().filter_layers(frozenset({0, 1}))
    assert aam.layer_indices == (0, 1)
    static = aam.apply_layer_indexer(StaticLayerIndexer(1), (0, 1, 2), n_layers=3)
    assert all(torch.equal(static[t], aam[1]) for t in (0, 1, 2))
    with pytest.raises(MissingActivationError, match="has no layer 2"):
        aam.apply_layer_indexer(StaticLayerIndexer(2), (0,), n_layers=3)


def test_no_layer_entry_broadcasts_through_its_indexer() -> None:
    emb = ActivationsAndMetadata(
        raw_dst(ALT.RESID_POST_EMBEDDING, ""), PassType.FORWARD, {None: torch.arange(4.0)}
    )
    out = emb.apply_layer_indexer(NoLayersLayerIndexer(), (0, 1), n_layers=2)
    assert out.layer_indices == (0, 1) and torch.equal(out[1], torch.arange(4.0))
    assert emb.layer_indices == (None,)


def test_transforms_relabel_and_do_not_touch_the_source() -> None:
    aam = _aam()
    dst = raw_dst(ALT.MLP_PRE_ACT, "")
    out = aam.apply_layerwise_transform_fn_to_activations(
        lambda t, layer: t * 0 + layer, dst, PassType.BACKWARD
    )
    assert out.dst == dst and out.pass_type is PassType.BACKWARD
    assert out.sum() == 6 * (0 + 1 + 2)
    assert aam.sum() == 6 * (0 + 1 + 2)
    assert out.allclose(aam)  # labels are ignored on purpose
    assert not out.allclose(aam.filter_layers(frozenset({0})))
    assert aam.numel() == 18


def test_raw_store_lookup_names_what_is_missing() -> None:
    store = RawActivationStore.from_nested_dict(
        {(ALT.MLP_POST_ACT, PassType.FORWARD): {0: torch.zeros(1)}}
    )
    assert store.get(ALT.MLP_POST_ACT, PassType.FORWARD).layer_indices == (0,)
    with pytest.raises(MissingActivationError, match=r"mlp.post_act \(backward\) was not captured"):
        store.get(ALT.MLP_POST_ACT, PassType.BACKWARD)
    with pytest.raises(ShapeError, match="use None"):
        RawActivationStore.from_nested_dict({(ALT.LOGITS, PassType.FORWARD): {0: torch.zeros(1)}})
