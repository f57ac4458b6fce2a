"""scalarlens-sae: sparse-autoencoder latents as ScalarLens derived scalars.

Offline DSTs (``sae.latents``, ``sae.write``, …) compute an SAE from captured activations;
online DSTs (``sae.online.*``) splice it into the forward pass so latent gradients are real.
Attach an SAE through ``DstConfig(options={"sae": {...}})`` (see :class:`SaeOptions`)::

    import scalarlens
    from scalarlens_sae import tiny_induction_options

    config = scalarlens.DstConfig(options={"sae": tiny_induction_options()})
    store = scalarlens.derive("tiny-induction", "the cat sat on the mat", "sae.latents",
                              config=config, layers=[1])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._arch import ARCHITECTURES, NORMALIZATIONS
from ._derivers import DSTS, example_configs, make_interventions, online_locations
from ._errors import SaeConfigError, SaeError, SaeLoadError
from ._options import RandomInit, SaeOptions, sae_options
from ._release import RELEASES_ENV, list_releases, resolve_release
from ._sae import (
    SparseAutoencoder,
    clear_cache,
    load_sae,
    random_sae,
    read_sae_config,
    save_sae,
)

__version__ = "0.1.0"

TINY_INDUCTION_SAE = Path(__file__).resolve().parent / "data" / "tiny-induction-l1-mlp"
"""A 512-latent ReLU SAE on layer 1 ``mlp.post_act`` of the bundled ``tiny-induction`` model."""


def tiny_induction_options(**overrides: Any) -> dict[str, Any]:
    """``options["sae"]`` for the shipped SAE (``scripts/train_tiny_sae.py`` made it)."""
    return {"path": str(TINY_INDUCTION_SAE), "location": "mlp.post_act", "layer": 1, **overrides}


__all__ = [
    "ARCHITECTURES",
    "DSTS",
    "NORMALIZATIONS",
    "RELEASES_ENV",
    "TINY_INDUCTION_SAE",
    "RandomInit",
    "SaeConfigError",
    "SaeError",
    "SaeLoadError",
    "SaeOptions",
    "SparseAutoencoder",
    "__version__",
    "clear_cache",
    "example_configs",
    "list_releases",
    "load_sae",
    "make_interventions",
    "online_locations",
    "random_sae",
    "read_sae_config",
    "resolve_release",
    "sae_options",
    "save_sae",
    "tiny_induction_options",
]
