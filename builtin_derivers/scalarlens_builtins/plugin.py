"""Entry point of the builtin catalogue (``scalarlens = builtins``)."""

from __future__ import annotations

from collections.abc import Mapping

from scalarlens import DerivedScalarType, DstConfig, Factory, hookimpl

from . import attention, mlp, patching, raw, residual, tokens

SCALARLENS_PLUGIN_API = 1

FAMILIES = (raw, residual, mlp, attention, tokens, patching)


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Factory]:
    out: dict[DerivedScalarType, Factory] = {}
    for family in FAMILIES:
        out.update(family.FACTORIES)
    return out


@hookimpl
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """``vocab.write_to_input_direction`` needs a neuron; layer 0 exists in every model."""
    return {
        "vocab.write_to_input_direction": DstConfig(
            options={"builtins": {"neuron": {"layer": 0, "index": 0}}}
        )
    }
