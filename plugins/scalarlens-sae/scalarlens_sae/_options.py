"""``DstConfig.options["sae"]``: which SAE and where it reads.

Validated by the attrs schema :class:`SaeOptions` through ``DstConfig.plugin_options``, so a
bad value fails when the deriver is built (before any model runs) with an error naming the
field.  Everything here is plain JSON, so derivers stay serialisable from their config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from scalarlens import ActivationLocationType, Direction, DstConfig, LocationWithinLayer

from ._errors import SaeConfigError

__all__ = ["LOCATIONS", "NAMESPACE", "RandomInit", "SaeOptions", "sae_options"]

NAMESPACE = "sae"
ALT = ActivationLocationType

LOCATIONS: dict[str, ActivationLocationType] = {
    ALT.MLP_POST_ACT.value: ALT.MLP_POST_ACT,
    ALT.RESID_DELTA_MLP.value: ALT.RESID_DELTA_MLP,
    ALT.RESID_DELTA_ATTN.value: ALT.RESID_DELTA_ATTN,
}
"""Where an SAE may read, by option value.  Inputs are the full activations (biases included)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"random_init.{attribute.name} must be a positive integer, got {value!r}")


def _int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not _is_int(value):
        raise ValueError(f"random_init.{attribute.name} must be an integer, got {value!r}")


@attrs.frozen(kw_only=True)
class RandomInit:
    """A deterministic random SAE instead of a file (tests, examples, the conformance kit).

    ``d_in`` is taken from the model at derive time (its width at ``location``), so the same
    option works on any model.
    """

    n_latents: int = attrs.field(validator=_positive_int)
    seed: int = attrs.field(default=0, validator=_int)

    def to_dict(self) -> dict[str, int]:
        return {"n_latents": self.n_latents, "seed": self.seed}


def _to_random_init(value: Any) -> RandomInit | None:
    if value is None or isinstance(value, RandomInit):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"random_init must be a mapping {{n_latents, seed}}, got {value!r}")
    unknown = sorted(set(value) - {"n_latents", "seed"})
    if unknown:
        raise ValueError(f"random_init: unknown field(s) {unknown}; valid: ['n_latents', 'seed']")
    if "n_latents" not in value:
        raise ValueError("random_init.n_latents is required (the number of latents A)")
    return RandomInit(**value)


def _check_path(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"path must be a non-empty string (an SAE directory), got {value!r}")


def _check_location(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        raise ValueError(f"location is required: one of {sorted(LOCATIONS)}")
    if value not in LOCATIONS:
        raise ValueError(f"location must be one of {sorted(LOCATIONS)}, got {value!r}")


def _check_layer(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        raise ValueError("layer is required: the (non-negative) layer the SAE was trained on")
    if not _is_int(value) or value < 0:
        raise ValueError(f"layer must be a non-negative integer, got {value!r}")


@attrs.frozen(kw_only=True)
class SaeOptions:
    """Schema of ``DstConfig.options["sae"]``.

    * ``path`` — an SAE directory in the SAELens layout (``cfg.json`` +
      ``sae_weights.safetensors``); or
    * ``random_init`` — ``{"n_latents": A, "seed": 0}``: a deterministic random SAE sized from
      the model at derive time (tests and examples).  Exactly one of the two.
    * ``location`` — what the SAE reads: ``mlp.post_act``, ``resid.delta_mlp`` or
      ``resid.delta_attn`` (full activations, biases included).
    * ``layer`` — the layer it reads (non-negative).

    The direction g of ``*write_to_final_residual_grad`` is not an SAE option: it is the shared
    ``DstConfig.direction``, copied into ``direction`` by :func:`sae_options`.
    """

    path: str | None = attrs.field(default=None, validator=_check_path)
    random_init: RandomInit | None = attrs.field(default=None, converter=_to_random_init)
    location: str = attrs.field(default=None, validator=_check_location)
    layer: int = attrs.field(default=None, validator=_check_layer)
    direction: Direction = attrs.field(factory=Direction)

    def __attrs_post_init__(self) -> None:
        if (self.path is None) == (self.random_init is None):
            got = f"got both path={self.path!r} and random_init" if self.path else "got neither"
            raise ValueError(
                "give exactly one of path (an SAE directory) or random_init "
                f"({{'n_latents': A, 'seed': 0}}); {got}"
            )

    @property
    def alt(self) -> ActivationLocationType:
        return LOCATIONS[self.location]

    @property
    def location_within_layer(self) -> LocationWithinLayer:
        loc = self.alt.location_within_layer
        assert loc is not None
        return loc

    @property
    def is_mlp_basis(self) -> bool:
        """The SAE reads MLP neurons (``F`` channels), not the residual basis (``D``)."""
        return self.alt is ALT.MLP_POST_ACT

    @property
    def resolved_path(self) -> str | None:
        return None if self.path is None else str(Path(self.path).expanduser().resolve())

    def splice_params(self) -> dict[str, Any]:
        """What identifies the spliced SAE (not the direction): the online locations' params."""
        source: dict[str, Any] = (
            {"path": self.resolved_path}
            if self.random_init is None
            else {"random_init": self.random_init.to_dict()}
        )
        return {**source, "location": self.location, "layer": self.layer}


def sae_options(config: DstConfig) -> SaeOptions:
    """Validate ``config.options["sae"]``; errors are ``SaeConfigError`` naming the field."""
    if NAMESPACE not in config.options:
        raise SaeConfigError(
            "SAE DSTs need DstConfig(options={'sae': {'path': <SAE directory> (or 'random_init': "
            "{'n_latents': A}), 'location': 'mlp.post_act' | 'resid.delta_mlp' | "
            "'resid.delta_attn', 'layer': <int>}}); options['sae'] is missing"
        )
    if isinstance(config.options[NAMESPACE], Mapping) and "direction" in config.options[NAMESPACE]:
        raise SaeConfigError(
            "options['sae']['direction'] is not an SAE option: the direction g is shared by every "
            "plugin, set it with DstConfig(direction={'location': ..., 'layer': ...})"
        )
    try:
        options = config.plugin_options(NAMESPACE, SaeOptions)
    except SaeConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise SaeConfigError(str(exc)) from exc
    return attrs.evolve(options, direction=config.direction)


def options_from_params(params: Mapping[str, Any]) -> SaeOptions:
    """Rebuild options from a spliced location's params (intervention factories get these)."""
    try:
        return SaeOptions(**dict(params))
    except (ValueError, TypeError) as exc:
        raise SaeConfigError(f"SAE splice params {dict(params)}: {exc}") from exc
