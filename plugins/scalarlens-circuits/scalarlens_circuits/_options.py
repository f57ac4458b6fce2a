"""``DstConfig.options["circuits"]``: the node an edge DST is about.

A node is a neuron (``layer``, ``token``, ``index``) or an attention head at a query token
(``index`` is the head), optionally narrowed to one attended-to token (``key_token``) and, as
the downstream end of an edge, to one of its inputs (``path``: ``"q"``, ``"k"`` or ``"v"``).
The structure is checked when the deriver is built; the ranges (layer, token, index) only when
the model is known, with an error naming the valid range.
"""

from __future__ import annotations

from typing import Any

import attrs
from scalarlens import DstConfig
from scalarlens.exceptions import ConfigError, ModelInputError

__all__ = ["NAMESPACE", "CircuitsOptions", "NodeIndex", "circuits_options", "read_stage"]

NAMESPACE = "circuits"
KINDS = ("neuron", "head")
PATHS = ("q", "k", "v")


def read_stage(dims: Any, sublayer: str, layer: int) -> int:
    """The last write stage (0 embeddings, ``2l+1`` attention, ``2l+2`` MLP at layer ``l``)
    that ``sublayer`` at ``layer`` reads: attention reads the layer's input; the MLP also reads
    the layer's attention, except in a parallel-residual block."""
    if sublayer == "attn" or dims.parallel_residual:
        return 2 * layer
    return 2 * layer + 1


def _int(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"node.{attribute.name} must be an integer, got {value!r}")


def _int_or_none(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _int(_, attribute, value)


@attrs.frozen(kw_only=True)
class NodeIndex:
    """One node; ``token`` and ``key_token`` may be negative (counted from the end)."""

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    layer: int = attrs.field(validator=_int)
    token: int = attrs.field(validator=_int)
    index: int = attrs.field(validator=_int)
    key_token: int | None = attrs.field(default=None, validator=_int_or_none)
    path: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(PATHS))
    )

    def __attrs_post_init__(self) -> None:
        if self.kind == "neuron" and (self.path is not None or self.key_token is not None):
            raise ValueError("node.path and node.key_token apply to heads only")

    def resolved(self, dims: Any, n_tokens: int, dst: str) -> NodeIndex:
        """This node with non-negative tokens, checked against the model; errors name the range."""

        def bad(field: str, value: int, valid: str) -> ModelInputError:
            return ModelInputError(
                f"{dst}: options['circuits']['node'].{field} = {value} is out of range ({valid}); "
                "fix the node index in DstConfig.options"
            )

        if not 0 <= self.layer < dims.n_layers:
            raise bad("layer", self.layer, f"valid: 0..{dims.n_layers - 1}")
        size = dims.d_mlp if self.kind == "neuron" else dims.n_heads
        if not 0 <= self.index < size:
            what = "neurons" if self.kind == "neuron" else "heads"
            raise bad("index", self.index, f"{size} {what}: valid 0..{size - 1}")
        tokens = {"token": self.token, "key_token": self.key_token}
        fixed: dict[str, int | None] = {}
        for name, value in tokens.items():
            if value is None:
                fixed[name] = None
                continue
            if not -n_tokens <= value < n_tokens:
                raise bad(
                    name, value, f"{n_tokens}-token prompt: valid {-n_tokens}..{n_tokens - 1}"
                )
            fixed[name] = value % n_tokens
        if fixed["key_token"] is not None and fixed["key_token"] > (fixed["token"] or 0):
            raise bad(
                "key_token", self.key_token or 0, "a query token attends only to itself and earlier"
            )
        return attrs.evolve(self, token=fixed["token"], key_token=fixed["key_token"])

    @property
    def stage(self) -> int:
        """When the node writes: ``2l+1`` for attention at layer ``l``, ``2l+2`` for its MLP."""
        return 2 * self.layer + (1 if self.kind == "head" else 2)


def _node(value: Any) -> NodeIndex:
    if isinstance(value, NodeIndex):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"node must be a mapping like {{'kind': 'neuron', 'layer': 1, 'token': -1, "
            f"'index': 5}}, got {value!r}"
        )
    try:
        return NodeIndex(**value)
    except TypeError as exc:
        raise ValueError(f"node: {exc}") from None


@attrs.frozen(kw_only=True)
class CircuitsOptions:
    """``node``: the downstream node (many → one DSTs) or the upstream one (one → many).

    ``detach_norm_scale`` (default true) holds the reading norm's ``σ`` fixed, so a node's
    pre-activation is linear in the residual stream it reads.
    """

    node: NodeIndex = attrs.field(converter=_node)
    detach_norm_scale: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )

    def to_dict(self) -> dict[str, Any]:
        return {"node": attrs.asdict(self.node), "detach_norm_scale": self.detach_norm_scale}


def circuits_options(config: DstConfig, dst: str) -> CircuitsOptions:
    """The validated options of ``config``; a missing node says what to write."""
    if NAMESPACE not in config.options:
        raise ConfigError(
            f"{dst} needs a node: DstConfig(options={{'circuits': {{'node': {{'kind': 'neuron', "
            "'layer': 1, 'token': -1, 'index': 5}}}}}) (heads: kind 'head', index = the head, "
            "optional key_token and path 'q'/'k'/'v')"
        )
    return config.plugin_options(NAMESPACE, CircuitsOptions)
