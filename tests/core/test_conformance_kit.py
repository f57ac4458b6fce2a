"""The conformance kit catches each kind of contract violation, naming DST and plugin."""

from __future__ import annotations

import types

import pytest
import scalarlens_builtins.plugin
import torch
from scalarlens import (
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    NodeType,
    Registry,
    ScalarDeriver,
)
from scalarlens.testing import check_dst, tiny_model

T_F = (Dimension.TOKENS, Dimension.MLP_ACTS)


def _registry_with(kernel, *, description: str = "a test DST", shape=T_F) -> Registry:  # type: ignore[no-untyped-def]
    dst = DerivedScalarType("bad.dst", shape, NodeType.MLP_NEURON, description=description)
    module = types.ModuleType("badplugin")
    module.scalarlens_derivers = scalarlens_builtins.plugin.hookimpl(  # type: ignore[attr-defined]
        lambda: {
            dst: lambda config: ScalarDeriver(dst, config, (DstReference("mlp.post_act"),), kernel)
        }
    )
    reg = Registry(autoload=False)
    reg.register(scalarlens_builtins.plugin, "builtins")
    reg.register(module, "badplugin")
    return reg


def _check(reg: Registry) -> None:
    check_dst(reg, "bad.dst", tiny_model(), DstConfig())


def test_a_correct_dst_passes() -> None:
    _check(_registry_with(lambda inputs, layer, ctx: inputs[0] * 2))


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (lambda inputs, layer, ctx: inputs[0][:, :3], r"shape \(\d+, 3\), declared"),
        (lambda inputs, layer, ctx: inputs[0].mul_(2), "mutated its input mlp.post_act"),
        (lambda inputs, layer, ctx: inputs[0] + torch.rand(()), "two derivations differ"),
    ],
)
def test_violations_are_reported(kernel, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError, match=message) as err:
        _check(_registry_with(kernel))
    assert "bad.dst (plugin badplugin)" in str(err.value)


def test_a_kernel_returning_a_graph_is_detached_by_the_engine() -> None:
    # The executor runs kernels under no_grad and detaches, so this passes the graph check.
    _check(_registry_with(lambda inputs, layer, ctx: inputs[0].clone().requires_grad_()))


def test_missing_description_is_reported() -> None:
    with pytest.raises(AssertionError, match="description is empty"):
        _check(_registry_with(lambda inputs, layer, ctx: inputs[0], description=" "))
