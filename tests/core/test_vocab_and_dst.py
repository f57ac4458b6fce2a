from __future__ import annotations

import pytest
from scalarlens import (
    ActivationLocationType,
    DerivedScalarType,
    Dimension,
    NodeType,
    PassType,
    RegistrationError,
    WeightLocationType,
    raw_dst,
    resolve_shape,
)
from scalarlens.exceptions import ShapeError


def test_every_location_has_a_raw_twin_with_its_name_and_shape() -> None:
    for location in ActivationLocationType:
        dst = raw_dst(location, "d")
        assert dst.name == location.value
        assert dst.shape == location.shape
        assert dst.has_no_layers == location.has_no_layers
        assert dst.pass_types == frozenset(PassType)


def test_weight_locations_include_every_bias() -> None:
    names = {w.value for w in WeightLocationType}
    for bias in (
        "mlp.b_in",
        "mlp.b_out",
        "attn.b_q",
        "attn.b_k",
        "attn.b_v",
        "attn.b_o",
        "attn_ln.bias",
        "mlp_ln.bias",
        "ln_f.bias",
    ):
        assert bias in names


@pytest.mark.parametrize("bad", ["MLP.write", "mlp..x", "mlp.", "1mlp", "mlp-write", ""])
def test_dst_names_must_be_dotted_lowercase(bad: str) -> None:
    with pytest.raises(RegistrationError, match="dotted lowercase"):
        DerivedScalarType(bad, (Dimension.TOKENS,), NodeType.LAYER)


def test_dst_shape_must_start_with_a_token_axis() -> None:
    with pytest.raises(RegistrationError, match="token axis"):
        DerivedScalarType("x.y", (Dimension.MLP_ACTS,), NodeType.MLP_NEURON)


def test_token_pairs_is_a_real_axis() -> None:
    dst = DerivedScalarType(
        "attn.pairs", (Dimension.TOKEN_PAIRS, Dimension.ATTN_HEADS), NodeType.ATTENTION_HEAD
    )
    assert dst.uses_token_pairs
    sizes = {Dimension.ATTN_HEADS: 4}
    assert resolve_shape(dst.shape, n_tokens=5, model_sizes=sizes) == (15, 4)


def test_parameterised_axis_needs_a_declared_size() -> None:
    spec = (Dimension.TOKENS, Dimension.AUTOENCODER_LATENTS)
    with pytest.raises(ShapeError, match="parameterised"):
        resolve_shape(spec, n_tokens=3, model_sizes={})
    assert resolve_shape(
        spec, n_tokens=3, model_sizes={}, parameter_sizes={Dimension.AUTOENCODER_LATENTS: 7}
    ) == (3, 7)


def test_dsts_are_hashable_values() -> None:
    a = DerivedScalarType("a.b", (Dimension.TOKENS,), NodeType.LAYER, description="x")
    b = DerivedScalarType("a.b", (Dimension.TOKENS,), NodeType.LAYER, description="x")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.name = "c"  # type: ignore[misc]
