"""Every registered DST derives on the tiny model with its declared shape, keys and labels.

Also enforces that each DST name appears in at least one dedicated test module, so adding a DST
without a test of its maths fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import scalarlens
from scalarlens import DstConfig, PassType

from ._tiny import N_LAYERS, REGISTRY, T, derive, tiny_adapter

# DSTs that need plugin options to be built at all: the options their plugins declare.
OPTIONS: dict[str, dict[str, Any]] = {
    name: config.options.to_dict() for name, config in scalarlens.Registry().dst_examples().items()
}
ALL = sorted(scalarlens.Registry().names())


@pytest.fixture(scope="module")
def adapter() -> Any:
    return tiny_adapter()


@pytest.mark.parametrize("name", ALL)
def test_dst_derives_with_declared_shape(adapter: Any, name: str) -> None:
    dst = REGISTRY.dst(name)
    assert dst.description.strip(), f"{name} has no description"
    passes = [PassType.FORWARD]
    config = DstConfig(options=OPTIONS.get(name, {}))
    if PassType.BACKWARD in dst.pass_types:
        config = DstConfig(derive_gradients=True, options=OPTIONS.get(name, {}))
        passes.append(PassType.BACKWARD)
    reason = scalarlens.unsupported_reason(REGISTRY.get(name, config), adapter)
    if reason is not None:  # e.g. mlp.up on GPT-2's non-gated MLP: refused before any run
        with pytest.raises(scalarlens.UnsupportedModelError, match=re.escape(name)):
            derive(adapter, name, config=config)
        assert name == "mlp.up", f"GPT-2 should derive {name}: {reason}"
        return
    store = derive(adapter, name, config=config)
    expected = scalarlens.resolve_shape(
        dst.shape,
        n_tokens=T,
        model_sizes=adapter.dims.sizes(),
        parameter_sizes=REGISTRY.get(name, config).parameter_sizes,
    )
    for pass_type in passes:
        entry = store.activations(name, pass_type)
        assert entry.dst == dst and entry.pass_type is pass_type
        wanted = {None} if dst.has_no_layers else set(range(N_LAYERS))
        assert set(entry.layer_indices) == wanted
        for layer in entry.layer_indices:
            tensor = entry[layer]
            assert tuple(tensor.shape) == expected, (name, layer, pass_type)
            assert tensor.grad_fn is None and not tensor.requires_grad


def test_factories_document_their_formula() -> None:
    from scalarlens_builtins import plugin

    for dst, factory in plugin.scalarlens_derivers().items():
        assert factory.__doc__ and dst.name in factory.__doc__


def test_every_dst_has_a_dedicated_test() -> None:
    here = Path(__file__).parent
    plugin_tests = here.parents[1] / "plugins"
    files = [*here.glob("test_*.py"), *plugin_tests.glob("*/tests/test_*.py")]
    text = "\n".join(p.read_text() for p in files if p.name != Path(__file__).name)
    missing = [name for name in ALL if f'"{name}"' not in text]
    assert not missing, f"DSTs without a dedicated test: {missing}"
