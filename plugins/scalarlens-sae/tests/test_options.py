"""options["sae"] is validated when the deriver is built, and errors name the field."""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
from sae_testlib import sae_options
from scalarlens import ConfigError, DstConfig

from scalarlens_sae import SaeConfigError, SaeOptions


def _build(sae: Any, dst: str = "sae.latents") -> None:
    scalarlens.registry.get(dst, DstConfig(options={"sae": sae}))


def test_missing_namespace_explains_what_to_give() -> None:
    with pytest.raises(SaeConfigError, match=r"options\['sae'\] is missing"):
        scalarlens.registry.get("sae.latents", DstConfig())


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"layer": None}, r"layer is required"),
        ({"layer": -1}, r"layer must be a non-negative integer, got -1"),
        ({"layer": "1"}, r"layer must be a non-negative integer, got '1'"),
        ({"location": None}, r"location is required"),
        ({"location": "mlp.pre_act"}, r"location must be one of .*'mlp.pre_act'"),
        ({"random_init": {"n_latents": 0}}, r"random_init\.n_latents must be a positive"),
        ({"random_init": {"seed": 1}}, r"random_init\.n_latents is required"),
        ({"random_init": {"n_latents": 4, "size": 2}}, r"random_init: unknown field\(s\)"),
        ({"random_init": None}, r"exactly one of path .* got neither"),
        ({"path": "/some/sae"}, r"exactly one of path .* got both"),
        ({"path": ""}, r"path must be a non-empty string"),
        ({"direction": {"layer": 0}}, r"not an SAE option.*DstConfig\(direction"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ],
)
def test_bad_options_name_the_field(patch: dict[str, Any], field: str) -> None:
    # A None in the patch means "leave the field out".
    options = {k: v for k, v in {**sae_options(), **patch}.items() if v is not None}
    with pytest.raises(SaeConfigError, match=field) as info:
        _build(options)
    assert isinstance(info.value, ConfigError)  # also a scalarlens ConfigError / ValueError
    assert "options['sae']" in str(info.value)


def test_wrong_basis_error_dst_names_location_and_the_right_dst() -> None:
    with pytest.raises(
        SaeConfigError,
        match=r"location'\] is 'resid.delta_mlp'.*use "
        r"sae\.reconstruction_error_resid",
    ):
        _build(sae_options(location="resid.delta_mlp"), "sae.reconstruction_error_mlp")
    with pytest.raises(SaeConfigError, match=r"use sae\.online\.error_mlp"):
        _build(sae_options(), "sae.online.error_resid")


def test_direction_layer_outside_the_model_fails_at_planning(
    model: scalarlens.ModelAdapter,
) -> None:
    config = DstConfig(
        options={"sae": sae_options()}, direction={"location": "resid.post_mlp", "layer": 7}
    )
    with pytest.raises(ConfigError, match=r"direction.layer 7 is outside the model's 3 layers"):
        scalarlens.derive(
            model,
            [[1, 2]],
            "sae.write_to_final_residual_grad",
            config=config,
            target=1,
            distractor=2,
        )


def test_options_round_trip_and_serialisable_deriver() -> None:
    config = DstConfig(options={"sae": sae_options()})
    deriver = scalarlens.registry.get("sae.write_norm", config)
    rebuilt = scalarlens.registry.from_serializable_dict(deriver.to_serializable_dict())
    assert rebuilt.config == deriver.config
    assert rebuilt.parameter_sizes == {scalarlens.Dimension.AUTOENCODER_LATENTS: 24}
    opts = SaeOptions(**sae_options())
    assert opts.splice_params() == {
        "random_init": {"n_latents": 24, "seed": 0},
        "location": "mlp.post_act",
        "layer": 1,
    }
