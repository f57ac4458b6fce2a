"""The plugin's exceptions: one base class, all of them ``scalarlens.ScalarLensError``."""

from __future__ import annotations

from scalarlens import ConfigError, ScalarLensError

__all__ = ["SaeConfigError", "SaeError", "SaeLoadError"]


class SaeError(ScalarLensError):
    """Base class of every error raised by ``scalarlens-sae``."""


class SaeLoadError(SaeError, ValueError):
    """An SAE on disk is missing, malformed or incompatible (names the file and tensor)."""


class SaeConfigError(SaeError, ConfigError):
    """``DstConfig.options["sae"]`` is invalid for the requested DST (names the field)."""
