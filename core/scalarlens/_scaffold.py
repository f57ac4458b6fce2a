"""``scalarlens new-plugin NAME``: write a plugin distribution that passes its own tests.

The generated package has the entry point, one example DST chaining onto a builtin by name, a
value test against an independent computation, the one-line conformance test, and a README —
the shortest path from nothing to a publishable plugin.
"""

from __future__ import annotations

import re
from pathlib import Path

from .exceptions import ConfigError

_NAME = re.compile(r"[a-z][a-z0-9_]*")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "scalarlens-{name}"
version = "0.1.0"
description = "A ScalarLens plugin: {name}"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["scalarlens"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# The registry finds the plugin through this entry point.
[project.entry-points.scalarlens]
{name} = "scalarlens_{name}.plugin"

[tool.setuptools.packages.find]
include = ["scalarlens_{name}*"]
"""

INIT = '''\
"""ScalarLens plugin ``{name}``."""

__version__ = "0.1.0"
'''

PLUGIN = '''\
"""Hook implementations of the ``{name}`` plugin (the whole contract: scalarlens.hookspecs)."""

from __future__ import annotations

from scalarlens import (
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    NodeType,
    PassType,
    ScalarDeriver,
    hookimpl,
)

SCALARLENS_PLUGIN_API = 1

POST_ACT_SQUARED = DerivedScalarType(
    "{name}.post_act_squared",
    (Dimension.TOKENS, Dimension.MLP_ACTS),
    NodeType.MLP_NEURON,
    description="square of each MLP activation (an example DST; replace it with yours)",
)


def build_post_act_squared(config: DstConfig) -> ScalarDeriver:
    """{name}.post_act_squared = mlp.post_act[t, n] ** 2

    Chains onto the builtin ``mlp.post_act`` by name: the registry resolves the reference.
    """
    return ScalarDeriver(
        POST_ACT_SQUARED,
        config,
        (DstReference("mlp.post_act", PassType.FORWARD),),
        lambda inputs, layer, ctx: inputs[0] ** 2,
    )


@hookimpl
def scalarlens_derivers():  # type: ignore[no-untyped-def]
    return {{POST_ACT_SQUARED: build_post_act_squared}}
'''

TEST_CONFORMANCE = '''\
"""Every DST of this plugin honours the ScalarLens contract."""

from scalarlens.testing import conformance_tests

test_contract = conformance_tests("{name}")
'''

TEST_VALUES = '''\
"""The example DST equals an independent computation on a tiny random model."""

import torch

import scalarlens
from scalarlens.testing import tiny_model


def test_post_act_squared_matches_the_raw_activation() -> None:
    model = tiny_model()
    tokens = [[1, 2, 3, 4]]
    store = scalarlens.derive(model, tokens, ["{name}.post_act_squared", "mlp.post_act"])
    for layer in range(model.dims.n_layers):
        post_act = store.get("mlp.post_act", layer)
        assert torch.allclose(store.get("{name}.post_act_squared", layer), post_act**2)
'''

README = """\
# scalarlens-{name}

A [ScalarLens](https://pypi.org/project/scalarlens/) plugin.

```console
pip install -e .            # then: scalarlens plugins / scalarlens dsts
pip install -e '.[test]' && pytest
```

## DSTs

| DST | shape | formula |
|---|---|---|
| `{name}.post_act_squared` | tokens × mlp_acts | `mlp.post_act ** 2` |

Add DSTs in `scalarlens_{name}/plugin.py`; `tests/test_conformance.py` checks each against the
ScalarLens contract automatically.
"""


PROJECT_PLUGINS = ("builtins", "sae")
"""Names of the plugins this project ships; taken even where they are not installed."""


def _canonical(distribution: str) -> str:
    """PEP 503 normal form: ``Scalarlens_SAE`` and ``scalarlens-sae`` are one distribution."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def name_taken_by(name: str) -> str | None:
    """What already holds plugin ``name``, or ``None`` when the name is free.

    Installing a second distribution with the same entry-point name, distribution name or
    package (``scalarlens_NAME``) replaces or shadows the first, so the generated plugin would
    silently take over another plugin's DSTs.
    """
    from importlib.metadata import distributions, entry_points
    from importlib.util import find_spec

    if name in PROJECT_PLUGINS:
        return f"ScalarLens's own {name!r} plugin"
    for entry in entry_points(group="scalarlens"):
        if entry.name == name:
            holder = entry.dist.name if entry.dist is not None else "an installed distribution"
            return f"the entry point {name!r} of {holder} ({entry.value})"
    wanted = _canonical(f"scalarlens-{name}")
    for dist in distributions():
        if _canonical(dist.metadata["Name"] or "") == wanted:
            return f"the installed distribution {dist.metadata['Name']} {dist.version}"
    if find_spec(f"scalarlens_{name}") is not None:
        return f"the installed package scalarlens_{name}"
    return None


def write_plugin(name: str, directory: str | Path) -> Path:
    """Create ``directory/scalarlens-NAME`` and return it."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"plugin name {name!r} must be a lowercase identifier such as 'probe' or 'my_probe'"
        )
    holder = name_taken_by(name)
    if holder is not None:
        raise ConfigError(
            f"plugin name {name!r} is already taken by {holder}; installing a second plugin "
            "under it would replace that one. Choose another name"
        )
    root = Path(directory) / f"scalarlens-{name}"
    if root.exists():
        raise ConfigError(f"{root} already exists; choose another name or directory")
    package = root / f"scalarlens_{name}"
    files = {
        root / "pyproject.toml": PYPROJECT,
        root / "README.md": README,
        package / "__init__.py": INIT,
        package / "plugin.py": PLUGIN,
        root / "tests" / "test_conformance.py": TEST_CONFORMANCE,
        root / "tests" / "test_values.py": TEST_VALUES,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name))
    return root
