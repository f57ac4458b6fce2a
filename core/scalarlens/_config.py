"""``DstConfig``: the few settings every deriver shares, plus a typed slot per plugin.

The reference's config is a grab-bag of DST-specific fields validated loosely.  Here the shared
fields are few and validated on construction, and each plugin keeps its own options under its
own namespace, validated by its own attrs class through ``DstConfig.plugin_options``.
Everything is JSON-serialisable so a deriver can be rebuilt in another process.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import attrs

from ._direction import Direction, to_direction
from .exceptions import ConfigError

T = TypeVar("T")


class FrozenOptions(Mapping[str, Any]):
    """A read-only, hashable mapping of JSON-serialisable values."""

    __slots__ = ("_data", "_key")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(
                "DstConfig.options: expected a mapping of plugin name to its options, e.g. "
                f'{{"sae": {{"path": "..."}}}}, got {type(data).__name__} {data!r}'
            )
        raw = dict(data or {})
        try:
            key = json.dumps(raw, sort_keys=True)
        except TypeError as exc:
            raise ConfigError(
                f"DstConfig.options must be JSON-serialisable (plain dicts, lists, strings, "
                f"numbers): {exc}"
            ) from None
        self._data: dict[str, Any] = json.loads(key)
        self._key = key

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenOptions):
            return self._key == other._key
        return isinstance(other, Mapping) and self._data == dict(other)

    def __repr__(self) -> str:
        return f"FrozenOptions({self._data!r})"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self._key)  # type: ignore[no-any-return]


def validation_message(exc: BaseException) -> str:
    """``"field: expected X, got Y"`` for attrs validator errors, the plain message otherwise.

    attrs' ``instance_of`` raises ``TypeError(msg, attribute, expected, value)``, whose ``str``
    is a tuple with the whole ``Attribute(name=..., default=NOTHING, ...)`` repr in it.
    """
    args = exc.args
    if len(args) >= 4 and isinstance(args[1], attrs.Attribute):
        expected = args[2]
        names = (
            " or ".join(t.__name__ for t in expected)
            if isinstance(expected, tuple)
            else getattr(expected, "__name__", repr(expected))
        )
        return f"{args[1].name}: expected {names}, got {args[3]!r}"
    return str(args[0]) if len(args) == 1 else str(exc)


def _to_layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,)
    try:
        layers = tuple(value)
    except TypeError:
        raise ConfigError(
            f"DstConfig.layer_indices must be None or a sequence of ints, got {value!r}"
        ) from None
    if not layers:
        # An empty selection would derive nothing and return an empty store without a word.
        raise ConfigError(
            "DstConfig.layer_indices (derive's layers=): expected at least one layer index, "
            "got an empty list; use None for all layers"
        )
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ConfigError(
                f"DstConfig.layer_indices must hold non-negative ints, got {layer!r} in "
                f"{value!r}; layers count from 0 (see the model's n_layers)"
            )
    return tuple(sorted(set(layers)))


def _check_device(_: object, __: attrs.Attribute[str | None], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or value.split(":")[0] not in {
        "cpu",
        "cuda",
        "mps",
        "xpu",
        "meta",
    }:
        raise ConfigError(
            f"DstConfig.device must be a torch device string such as 'cpu' or 'cuda:0', "
            f"got {value!r}"
        )


MEMORY_MODES = ("default", "low")


def _check_memory(_: object, __: attrs.Attribute[str], value: str) -> None:
    if value not in MEMORY_MODES:
        raise ConfigError(f"DstConfig.memory must be one of {MEMORY_MODES}, got {value!r}")


def _check_bool(inst: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"DstConfig.{attribute.name} must be True or False, got {value!r}")


def _to_positions(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"DstConfig.patch_positions: expected a list of ints, got {value!r}")
    positions = list(value)
    if not positions or any(not isinstance(p, int) or isinstance(p, bool) for p in positions):
        raise ConfigError(
            f"DstConfig.patch_positions: expected a non-empty list of ints (negative counts "
            f"from the end), got {value!r}; use None for every position"
        )
    return tuple(dict.fromkeys(positions))


def _check_positive_int(inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"DstConfig.{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen(cache_hash=True)  # part of every plan node key
class DstConfig:
    """Settings a deriver is built with.

    * ``layer_indices`` — the layers to compute (``None``: all). Sub-derivers compute only what
      these layers need.
    * ``derive_gradients`` — also derive the BACKWARD pass of DSTs that support it.
    * ``device`` — where derived tensors live (``None``: where the activations are).
    * ``detach_final_ln_scale`` — treat the final LayerNorm's scale as a constant in the backward
      pass, which makes direct effects sum exactly to the objective (reference §5.2 item 11).
    * ``direction`` — where direct effects are measured: the objective's gradient ``g`` at a
      residual location (default: before the final LayerNorm; ``Direction.trace_upstream``
      for a node). Shared by every plugin's direct-effect DSTs.
    * ``options`` — per-plugin option namespaces: ``{"sae": {"path": ...}}``; each plugin
      validates its own namespace through ``plugin_options``.
    * ``memory`` — ``"default"``, or ``"low"``: the backward pass recomputes each layer's
      forward instead of keeping every layer's intermediate tensors, so peak memory is the
      residual stream at layer boundaries, the planned captures and one layer's activations
      (identical results; roughly one more forward pass of time).
    * ``steps`` — quadrature points of integrated gradients (Gauss–Legendre on the path from
      the baseline to the main prompt's activation; exact for polynomials of degree
      ``2·steps − 1``).
    * ``patch_group`` — activation patching patches this many consecutive components of the
      last component axis together (heads, neurons, positions); every member of a group gets
      the group's effect.  ``1``: each component alone.
    * ``batch_rows`` — prompts per forward pass in the engine's extra runs (integrated
      gradients, patching): more is faster until memory runs out.
    * ``patch_positions`` — activation patching patches components at these token positions
      only (negative counts from the end; ``None``: every position); other positions read 0.
    """

    layer_indices: tuple[int, ...] | None = attrs.field(default=None, converter=_to_layers)
    derive_gradients: bool = attrs.field(default=False, validator=_check_bool)
    device: str | None = attrs.field(default=None, validator=_check_device)
    detach_final_ln_scale: bool = attrs.field(default=False, validator=_check_bool)
    direction: Direction = attrs.field(factory=Direction, converter=to_direction)
    options: FrozenOptions = attrs.field(factory=FrozenOptions, converter=FrozenOptions)
    memory: str = attrs.field(default="default", validator=_check_memory)
    steps: int = attrs.field(default=8, validator=_check_positive_int)
    patch_group: int = attrs.field(default=1, validator=_check_positive_int)
    batch_rows: int = attrs.field(default=32, validator=_check_positive_int)
    patch_positions: tuple[int, ...] | None = attrs.field(default=None, converter=_to_positions)

    def plugin_options(self, namespace: str, schema: type[T]) -> T:
        """Validate and return the options a plugin keeps under ``namespace``.

        ``schema`` is an attrs class; unknown keys and validator failures become ``ConfigError``
        naming the namespace and field.
        """
        raw = self.options.get(namespace, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"DstConfig.options[{namespace!r}] must be a mapping, got {raw!r}")
        fields = {f.name for f in attrs.fields(cast(Any, schema))}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(
                f"DstConfig.options[{namespace!r}]: unknown field(s) {unknown}; "
                f"valid fields: {sorted(fields)}"
            )
        try:
            return schema(**raw)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"DstConfig.options[{namespace!r}]: {validation_message(exc)}"
            ) from exc

    def with_options(self, namespace: str, **values: Any) -> DstConfig:
        merged = self.options.to_dict()
        merged[namespace] = {**merged.get(namespace, {}), **values}
        return attrs.evolve(self, options=merged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_indices": None if self.layer_indices is None else list(self.layer_indices),
            "derive_gradients": self.derive_gradients,
            "device": self.device,
            "detach_final_ln_scale": self.detach_final_ln_scale,
            "direction": self.direction.to_dict(),
            "options": self.options.to_dict(),
            "memory": self.memory,
            "steps": self.steps,
            "patch_group": self.patch_group,
            "batch_rows": self.batch_rows,
            "patch_positions": None if self.patch_positions is None else list(self.patch_positions),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DstConfig:
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"DstConfig: unknown field(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)
