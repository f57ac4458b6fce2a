"""Error text reads as prose: "field: expected X, got Y", full stops, and a hint for the kit."""

from __future__ import annotations

import types

import attrs
import pytest
import scalarlens_builtins.plugin
from scalarlens import (
    ConfigError,
    DerivedScalarType,
    Dimension,
    DstConfig,
    NodeType,
    Registry,
    ScalarDeriver,
    UnknownDstError,
    registry,
)
from scalarlens.testing import check_dst, tiny_model


@attrs.frozen
class _Options:
    target: int = attrs.field(validator=attrs.validators.instance_of(int))
    scale: float = attrs.field(default=1.0, validator=attrs.validators.instance_of((int, float)))


def test_attrs_validation_errors_name_field_expected_and_got() -> None:
    with pytest.raises(ConfigError) as err:
        DstConfig(options={"lens": {"target": "fox"}}).plugin_options("lens", _Options)
    assert str(err.value) == "DstConfig.options['lens']: target: expected int, got 'fox'"
    assert "Attribute(" not in str(err.value)
    with pytest.raises(ConfigError, match="scale: expected int or float, got 'big'"):
        DstConfig(options={"lens": {"target": 1, "scale": "big"}}).plugin_options("lens", _Options)


def test_unknown_dst_message_is_a_sentence() -> None:
    with pytest.raises(UnknownDstError) as err:
        registry.get("zzz.nothing_like_this")
    assert str(err.value).startswith("unknown derived scalar type 'zzz.nothing_like_this'. Run")


def test_the_kit_hints_at_the_examples_hook_when_options_are_missing() -> None:
    dst = DerivedScalarType("needy.dst", (Dimension.TOKENS,), NodeType.LAYER, "needs options")

    def build(config: DstConfig) -> ScalarDeriver:
        config.plugin_options("needy", _Options)  # no "needy" options given: target is missing
        raise AssertionError("unreachable")

    def strict_build(config: DstConfig) -> ScalarDeriver:
        if "needy" not in config.options:
            raise ConfigError("needy.dst needs options['needy']['target']")
        return build(config)

    module = types.ModuleType("needy")
    module.scalarlens_derivers = scalarlens_builtins.plugin.hookimpl(  # type: ignore[attr-defined]
        lambda: {dst: strict_build}
    )
    reg = Registry(autoload=False)
    reg.register(scalarlens_builtins.plugin, "builtins")
    reg.register(module, "needy")
    with pytest.raises(AssertionError, match="scalarlens_dst_examples") as err:
        check_dst(reg, "needy.dst", tiny_model(), DstConfig())
    assert "needy.dst (plugin needy)" in str(err.value)


def test_loading_a_missing_or_foreign_store_file_is_a_store_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from safetensors.torch import save_file
    from scalarlens import DerivedScalarStore, StoreError

    with pytest.raises(StoreError, match="no such store file"):
        DerivedScalarStore.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        DerivedScalarStore.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(StoreError, match="without ScalarLens metadata"):
        DerivedScalarStore.load(foreign)
