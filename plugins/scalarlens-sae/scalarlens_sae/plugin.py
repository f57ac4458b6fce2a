"""Hook implementations of the ``sae`` plugin (the whole contract: ``scalarlens.hookspecs``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scalarlens import DerivedScalarType, DstConfig, Factory, hookimpl

from ._derivers import FACTORIES, PROVIDER, example_configs, make_interventions
from ._feature_loaders import FEATURE_LOADERS
from ._latent_gradients import LATENT_GRADIENT_FACTORIES, latent_gradient_example_configs
from ._transcoder_derivers import (
    TRANSCODER_FACTORIES,
    TRANSCODER_PROVIDER,
    make_transcoder_interventions,
    transcoder_example_configs,
)

if TYPE_CHECKING:
    from scalarlens import Intervention, ModelAdapter

SCALARLENS_PLUGIN_API = 1


@hookimpl
def scalarlens_derivers() -> Mapping[DerivedScalarType, Factory]:
    """Offline ``sae.*``, online ``sae.online.*``, latent-gradient and ``transcoder.*`` DSTs."""
    return {**FACTORIES, **LATENT_GRADIENT_FACTORIES, **TRANSCODER_FACTORIES}


@hookimpl
def scalarlens_dst_examples() -> Mapping[str, DstConfig]:
    """Every DST needs options: a random 8-latent SAE at layer 0, a random 8-latent CLT."""
    return {
        **example_configs(),
        **latent_gradient_example_configs(),
        **transcoder_example_configs(),
    }


@hookimpl
def scalarlens_interventions() -> Mapping[
    str, Callable[[Mapping[str, Any], ModelAdapter], Sequence[Intervention]]
]:
    """``sae``: splice an SAE; ``transcoder``: a transcoder in place of the MLPs (with errors)."""
    return {PROVIDER: make_interventions, TRANSCODER_PROVIDER: make_transcoder_interventions}


@hookimpl
def scalarlens_feature_loaders() -> Mapping[str, Callable[[str, ModelAdapter], Any]]:
    """``transcoder:PATH`` (from disk) and ``transcoder-random:N[:SEED]`` for other plugins."""
    return dict(FEATURE_LOADERS)
