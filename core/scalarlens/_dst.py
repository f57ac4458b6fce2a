"""``DerivedScalarType``: an open, self-describing set of named quantities.

The reference keeps DSTs in a closed enum plus a dozen parallel tables; here each DST is one
frozen value carrying all of its metadata, so a plugin creates a new one in one statement and
nothing else needs editing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from ._vocab import (
    ActivationLocationType,
    Dimension,
    LocationWithinLayer,
    NodeType,
    PassType,
    ShapeSpec,
)
from .exceptions import RegistrationError

if TYPE_CHECKING:
    from ._locations import PluginLocation

_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")


def _check_name(_: object, __: attrs.Attribute[str], name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistrationError(
            f"invalid DST name {name!r}: use dotted lowercase words such as 'mlp.write_norm'"
        )


def _check_shape(_: object, __: attrs.Attribute[ShapeSpec], shape: ShapeSpec) -> None:
    if not shape or not shape[0].is_token_axis:
        raise RegistrationError(
            f"a DST shape must start with a token axis (tokens or token_pairs), got {shape!r}"
        )


def _to_shape(value: Iterable[Dimension]) -> ShapeSpec:
    return tuple(value)


def _to_passes(value: Iterable[PassType]) -> frozenset[PassType]:
    return frozenset(value)


@attrs.frozen(cache_hash=True)  # hashed in every plan and store key
class DerivedScalarType:
    """A named per-prompt quantity and everything a caller needs to know about its tensor.

    ``DerivedScalarType("probe.share", (Dimension.TOKENS, Dimension.ATTN_HEADS),
    NodeType.ATTENTION_HEAD, "each head's share of the layer's write")`` — the description is
    the fourth positional field, the rest are keywords.

    ``shape`` is per prompt and per layer; its first axis is a token axis.  ``location`` is
    declared explicitly (never guessed) and only used to decide causality.  ``pass_types`` lists
    what a deriver of this DST may be asked for: ``FORWARD`` is the value, ``BACKWARD`` is the
    objective's gradient with respect to the value.
    """

    name: str = attrs.field(validator=_check_name)
    shape: ShapeSpec = attrs.field(converter=_to_shape, validator=_check_shape)
    node_type: NodeType
    description: str = ""
    location: LocationWithinLayer | None = attrs.field(default=None, kw_only=True)
    pass_types: frozenset[PassType] = attrs.field(
        default=frozenset({PassType.FORWARD}), converter=_to_passes, kw_only=True
    )
    has_no_layers: bool = attrs.field(default=False, kw_only=True)
    # NaN/inf in this DST's values are meaningful (masked attention logits are -inf), so the
    # engine's finiteness check is skipped for it.
    allows_non_finite: bool = attrs.field(default=False, kw_only=True)
    # Its kernel reads ``ctx.objective`` (e.g. a logit lens of the target token): derive and
    # the CLI then require target/distractor even when no backward pass runs.
    needs_objective: bool = attrs.field(default=False, kw_only=True)
    # The DST holding the exact value this one estimates (attribution patching and integrated
    # gradients estimate activation patching): ``--compare`` pairs them by this name.
    estimate_of: str | None = attrs.field(default=None, kw_only=True)

    def __str__(self) -> str:
        return self.name

    @property
    def uses_token_pairs(self) -> bool:
        return Dimension.TOKEN_PAIRS in self.shape


def raw_dst(
    location: ActivationLocationType | PluginLocation, description: str
) -> DerivedScalarType:
    """The DST twin of a raw capture location: same name, shape and metadata."""
    return DerivedScalarType(
        name=location.value,
        shape=location.shape,
        node_type=location.node_type,
        location=location.location_within_layer,
        pass_types=frozenset(PassType),
        description=description,
        has_no_layers=location.has_no_layers,
        allows_non_finite=getattr(location, "may_be_non_finite", False),
    )


@attrs.frozen(cache_hash=True)
class DstAndPass:
    """The key of a derived store entry: one DST in one pass."""

    dst: DerivedScalarType
    pass_type: PassType

    def __str__(self) -> str:
        return f"{self.dst.name}/{self.pass_type.value}"
