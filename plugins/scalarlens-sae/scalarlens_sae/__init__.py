"""scalarlens-sae: sparse-autoencoder latents as ScalarLens derived scalars.

Offline DSTs (``sae.latents``, ``sae.write``, …) compute an SAE from captured activations;
online DSTs (``sae.online.*``) splice it into the forward pass so latent gradients are real;
``transcoder.*`` DSTs splice a (cross-layer) transcoder in place of the MLPs.
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
from ._transcoder import Transcoder, load_transcoder, random_transcoder
from ._transcoder_derivers import (
    TRANSCODER_DSTS,
    TranscoderOptions,
    make_transcoder_interventions,
    transcoder_options,
)

__version__ = "0.1.0"

_DATA = Path(__file__).resolve().parent / "data"
TINY_INDUCTION_SAE = _DATA / "tiny-induction-l1-mlp"
"""A 512-latent ReLU SAE on layer 1 ``mlp.post_act`` of the bundled ``tiny-induction`` model."""
TINY_INDUCTION_JUMPRELU = _DATA / "tiny-induction-l1-jumprelu"
"""A 256-latent JumpReLU SAE on layer 1 ``mlp.post_act`` of ``tiny-induction``."""
TINY_INDUCTION_TOPK = _DATA / "tiny-induction-l1-topk"
"""A 256-latent TopK SAE (k = 16) on layer 1 ``mlp.post_act`` of ``tiny-induction``."""
TINY_INDUCTION_CLT = _DATA / "tiny-induction-clt"
"""A cross-layer transcoder (128 latents per layer) replacing both MLPs of ``tiny-induction``."""


def tiny_induction_options(**overrides: Any) -> dict[str, Any]:
    """``options["sae"]`` for a shipped SAE: the ReLU one by default (``path=`` picks another).

    ``scripts/train_tiny_sae.py`` and ``scripts/train_tiny_dictionaries.py`` made them.
    """
    return {"path": str(TINY_INDUCTION_SAE), "location": "mlp.post_act", "layer": 1, **overrides}


def tiny_induction_clt_options(**overrides: Any) -> dict[str, Any]:
    """``options["transcoder"]`` for the shipped cross-layer transcoder."""
    return {"path": str(TINY_INDUCTION_CLT), "input": "mlp.input", **overrides}


__all__ = [
    "ARCHITECTURES",
    "DSTS",
    "NORMALIZATIONS",
    "RELEASES_ENV",
    "TINY_INDUCTION_CLT",
    "TINY_INDUCTION_JUMPRELU",
    "TINY_INDUCTION_SAE",
    "TINY_INDUCTION_TOPK",
    "TRANSCODER_DSTS",
    "RandomInit",
    "SaeConfigError",
    "SaeError",
    "SaeLoadError",
    "SaeOptions",
    "SparseAutoencoder",
    "Transcoder",
    "TranscoderOptions",
    "clear_cache",
    "example_configs",
    "list_releases",
    "load_sae",
    "load_transcoder",
    "make_interventions",
    "make_transcoder_interventions",
    "online_locations",
    "random_sae",
    "random_transcoder",
    "read_sae_config",
    "resolve_release",
    "sae_options",
    "save_sae",
    "tiny_induction_clt_options",
    "tiny_induction_options",
    "transcoder_options",
    "__version__",
]
