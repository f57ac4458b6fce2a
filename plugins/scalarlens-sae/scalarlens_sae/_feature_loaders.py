"""Transcoders for other plugins, by spec (hook ``scalarlens_feature_loaders``).

``transcoder:PATH`` reads a transcoder or cross-layer transcoder from local disk (SAELens, or
circuit-tracer's per-layer or CLT layout; ``transcoder:PATH@LAYER`` picks one SAELens layer);
``transcoder-random:N_LATENTS[:SEED]`` builds a deterministic random cross-layer transcoder
sized to the model (examples, tests).  A consumer — ``scalarlens graph --transcoder SPEC`` —
asks the registry for the loader and never imports this plugin.
"""

from __future__ import annotations

from typing import Any

from ._errors import SaeConfigError

__all__ = ["FEATURE_LOADERS"]


def _from_disk(spec: str, model: Any) -> Any:
    from ._transcoder import load_transcoder

    path, _, layer = spec.removeprefix("transcoder:").partition("@")
    if not path:
        raise SaeConfigError(f"{spec!r}: give a directory, e.g. transcoder:/path/to/transcoders")
    if layer and not layer.isdigit():
        raise SaeConfigError(f"{spec!r}: the layer after '@' must be an integer, got {layer!r}")
    return load_transcoder(path, int(layer) if layer else None)


def _random(spec: str, model: Any) -> Any:
    from ._transcoder import random_transcoder

    fields = spec.removeprefix("transcoder-random:").split(":")
    if not 1 <= len(fields) <= 2 or not all(f.isdigit() for f in fields) or fields[0] == "0":
        raise SaeConfigError(
            f"{spec!r}: expected transcoder-random:N_LATENTS or transcoder-random:N_LATENTS:SEED "
            "with positive integers"
        )
    dims = model.dims
    seed = int(fields[1]) if len(fields) == 2 else 0
    return random_transcoder(int(fields[0]), dims.d_model, dims.n_layers, seed)


FEATURE_LOADERS = {"transcoder:": _from_disk, "transcoder-random:": _random}
