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
    ALT.RESID_POST_ATTN.value: ALT.RESID_POST_ATTN,
    ALT.RESID_POST_MLP.value: ALT.RESID_POST_MLP,
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


def _check_release_field(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _check_k(_: object, __: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"k must be a positive number (TopK / BatchTopK SAEs), got {value!r}")


def _check_bool(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, got {value!r}")


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
    * ``release`` + ``sae_id`` (+ ``releases``, the local directory of downloaded releases;
      default ``$SCALARLENS_SAE_RELEASES``) — instead of ``path``: select an SAE as in
      SAELens' pretrained table, from local disk (``scalarlens-sae list DIR`` shows them).
    * ``location`` — what the SAE reads: ``mlp.post_act``, ``resid.delta_mlp``,
      ``resid.delta_attn`` (full activations, biases included), ``resid.post_attn`` or
      ``resid.post_mlp`` (the residual stream).
    * ``layer`` — the layer it reads (non-negative).
    * ``k`` — an inference-time k for a TopK / BatchTopK SAE (BatchTopK then selects by
      count instead of its saved threshold); default: the SAE's own.
    * ``fold_decoder_norm`` — use the equivalent SAE with unit-norm decoder rows (latents
      scaled by ``‖W_dec[j]‖``, reconstruction unchanged).

    The direction g of ``*write_to_final_residual_grad`` is not an SAE option: it is the shared
    ``DstConfig.direction``, copied into ``direction`` by :func:`sae_options`.
    """

    path: str | None = attrs.field(default=None, validator=_check_path)
    random_init: RandomInit | None = attrs.field(default=None, converter=_to_random_init)
    release: str | None = attrs.field(default=None, validator=_check_release_field)
    sae_id: str | None = attrs.field(default=None, validator=_check_release_field)
    releases: str | None = attrs.field(default=None, validator=_check_release_field)
    location: str = attrs.field(default=None, validator=_check_location)
    layer: int = attrs.field(default=None, validator=_check_layer)
    k: float | None = attrs.field(default=None, validator=_check_k)
    fold_decoder_norm: bool = attrs.field(default=False, validator=_check_bool)
    direction: Direction = attrs.field(factory=Direction)

    def __attrs_post_init__(self) -> None:
        given = [
            name
            for name, value in (
                ("path", self.path),
                ("random_init", self.random_init),
                ("release", self.release),
            )
            if value is not None
        ]
        if len(given) != 1:
            got = f"got both {' and '.join(given)}" if given else "got neither"
            if self.path and self.random_init:
                got = f"got both path={self.path!r} and random_init"
            raise ValueError(
                "give exactly one of path (an SAE directory), random_init "
                f"({{'n_latents': A, 'seed': 0}}) or release + sae_id; {got}"
            )
        if (self.release is None) != (self.sae_id is None):
            raise ValueError("release and sae_id go together (as in SAELens' pretrained table)")
        if self.releases is not None and self.release is None:
            raise ValueError("releases (a directory of releases) is used only with release")
        if self.random_init is not None and (self.k is not None or self.fold_decoder_norm):
            raise ValueError("k and fold_decoder_norm apply to an SAE loaded from disk")

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
        if self.release is not None:
            from ._release import resolve_release

            assert self.sae_id is not None
            return str(resolve_release(self.releases, self.release, self.sae_id))
        return None if self.path is None else str(Path(self.path).expanduser().resolve())

    def splice_params(self) -> dict[str, Any]:
        """What identifies the spliced SAE (not the direction): the online locations' params."""
        source: dict[str, Any] = (
            {"path": self.resolved_path}
            if self.random_init is None
            else {"random_init": self.random_init.to_dict()}
        )
        variant: dict[str, Any] = {}
        if self.k is not None:
            variant["k"] = self.k
        if self.fold_decoder_norm:
            variant["fold_decoder_norm"] = True
        return {**source, "location": self.location, "layer": self.layer, **variant}


def sae_options(config: DstConfig) -> SaeOptions:
    """Validate ``config.options["sae"]``; errors are ``SaeConfigError`` naming the field."""
    if NAMESPACE not in config.options:
        raise SaeConfigError(
            "SAE DSTs need DstConfig(options={'sae': {'path': <SAE directory> (or 'random_init': "
            "{'n_latents': A}, or 'release' + 'sae_id'), 'location': 'mlp.post_act' | "
            "'resid.delta_mlp' | 'resid.delta_attn' | 'resid.post_attn' | 'resid.post_mlp', "
            "'layer': <int>}}); options['sae'] is missing"
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
