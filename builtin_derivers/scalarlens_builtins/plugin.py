"""Entry point of the builtin catalogue (``scalarlens = builtins``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from scalarlens import DerivedScalarType, DstConfig, ScalarDeriver, hookimpl

from . import raw

SCALARLENS_PLUGIN_API = 1


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Callable[[DstConfig], ScalarDeriver]]:
    return dict(raw.FACTORIES)
