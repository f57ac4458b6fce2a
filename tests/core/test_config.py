from __future__ import annotations

import attrs
import pytest
from scalarlens import ConfigError, DstConfig


def test_defaults_and_normalisation() -> None:
    config = DstConfig(layer_indices=[2, 0, 2])
    assert config.layer_indices == (0, 2)
    assert DstConfig(layer_indices=3).layer_indices == (3,)
    assert hash(config) == hash(DstConfig(layer_indices=(0, 2)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer_indices": [-1]}, "layer_indices"),
        ({"layer_indices": ["a"]}, "layer_indices"),
        ({"derive_gradients": "yes"}, "derive_gradients"),
        ({"device": "gpu0"}, "device"),
        ({"options": {"x": object()}}, "options"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DstConfig(**kwargs)  # type: ignore[arg-type]


@attrs.frozen
class _Opts:
    n_latents: int = attrs.field(validator=attrs.validators.gt(0))
    path: str = "x"


def test_plugin_options_are_validated_by_the_plugin_schema() -> None:
    config = DstConfig().with_options("sae", n_latents=4)
    assert config.plugin_options("sae", _Opts) == _Opts(4)
    with pytest.raises(ConfigError, match=r"options\['sae'\].*unknown field.*'bogus'"):
        DstConfig(options={"sae": {"n_latents": 1, "bogus": 2}}).plugin_options("sae", _Opts)
    with pytest.raises(ConfigError, match=r"options\['sae'\].*n_latents"):
        DstConfig(options={"sae": {"n_latents": 0}}).plugin_options("sae", _Opts)


def test_round_trip_through_a_dict() -> None:
    config = DstConfig(layer_indices=[1], derive_gradients=True, options={"p": {"k": [1, 2]}})
    assert DstConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field"):
        DstConfig.from_dict({"layers": [1]})
