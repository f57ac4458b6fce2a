"""The fixed vocabulary every DST, deriver and model adapter speaks.

These enums are closed on purpose: they describe the transformer (axes, raw hook points,
weights), not the catalogue.  The catalogue itself (``DerivedScalarType``) is open and lives in
``_dst.py``.  Metadata sits *on* each member instead of in parallel lookup tables, so adding a
location means editing one line.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class PassType(str, enum.Enum):
    """Which pass a tensor belongs to: the value itself, or the objective's gradient of it."""

    FORWARD = "forward"
    BACKWARD = "backward"


class DimensionKind(str, enum.Enum):
    """Where a dimension's size comes from."""

    TOKENS = "tokens"  # the prompt decides
    MODEL = "model"  # the model's config decides
    PARAMETERIZED = "parameterized"  # a plugin option decides (e.g. number of SAE latents)


class Dimension(str, enum.Enum):
    """One axis of a per-prompt tensor.

    ``TOKEN_PAIRS`` is a real axis of length ``T(T+1)/2`` (the causal lower triangle, row-major,
    diagonal included), so flattened attention DSTs declare what they actually hold.
    """

    kind: DimensionKind

    def __new__(cls, value: str, kind: DimensionKind) -> Dimension:
        member = str.__new__(cls, value)
        member._value_ = value
        member.kind = kind
        return member

    TOKENS = ("tokens", DimensionKind.TOKENS)
    ATTENDED_TO_TOKENS = ("attended_to_tokens", DimensionKind.TOKENS)
    TOKEN_PAIRS = ("token_pairs", DimensionKind.TOKENS)
    MAX_CONTEXT_LENGTH = ("max_context_length", DimensionKind.MODEL)
    RESIDUAL_STREAM_CHANNELS = ("residual_stream_channels", DimensionKind.MODEL)
    VOCAB_SIZE = ("vocab_size", DimensionKind.MODEL)
    ATTN_HEADS = ("attn_heads", DimensionKind.MODEL)
    KV_HEADS = ("kv_heads", DimensionKind.MODEL)
    QUERY_AND_KEY_CHANNELS = ("query_and_key_channels", DimensionKind.MODEL)
    VALUE_CHANNELS = ("value_channels", DimensionKind.MODEL)
    MLP_ACTS = ("mlp_acts", DimensionKind.MODEL)
    LAYERS = ("layers", DimensionKind.MODEL)
    SINGLETON = ("singleton", DimensionKind.MODEL)
    AUTOENCODER_LATENTS = ("autoencoder_latents", DimensionKind.PARAMETERIZED)

    @property
    def is_token_axis(self) -> bool:
        return self.kind is DimensionKind.TOKENS


ShapeSpec = tuple[Dimension, ...]


class NodeType(str, enum.Enum):
    """What one entry along a DST's last axis is: the unit researchers rank."""

    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    QK_CHANNEL = "qk_channel"
    V_CHANNEL = "v_channel"
    LAYER = "layer"
    RESIDUAL_STREAM_CHANNEL = "residual_stream_channel"
    VOCAB_TOKEN = "vocab_token"
    AUTOENCODER_LATENT = "autoencoder_latent"


class LocationWithinLayer(enum.IntEnum):
    """Coarse order of positions inside a layer, used only to decide causality.

    ``a < b`` means "a is computed before b and can influence it".
    """

    END_OF_PREV_LAYER = 1
    ATTN = 2
    RESID_POST_ATTN = 3
    MLP = 4
    RESID_POST_MLP = 5


_T, _S = Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS
_D, _H = Dimension.RESIDUAL_STREAM_CHANNELS, Dimension.ATTN_HEADS
_KVH = Dimension.KV_HEADS
_DK, _DV = Dimension.QUERY_AND_KEY_CHANNELS, Dimension.VALUE_CHANNELS
_F, _V, _ONE = Dimension.MLP_ACTS, Dimension.VOCAB_SIZE, Dimension.SINGLETON
_CTX = Dimension.MAX_CONTEXT_LENGTH
_LOC = LocationWithinLayer


class ActivationLocationType(str, enum.Enum):
    """A named point in the forward pass whose value (and gradient) a model adapter captures.

    The value is the hook name, which is also the name of the DST twin (``mlp.post_act``).
    Q and K are *unscaled* (``u W_Q + b_Q``, after any rotary embedding or q/k norm); the
    ``1/sqrt(dk)`` factor (or the model's own attention scale) lives in the logits.

    ``attn.k`` and ``attn.v`` are per *query* head: with grouped-query attention each query
    head reads its key/value group's vectors, repeated, so every attention DST indexes heads one
    way.  The weights ``attn.w_k``/``attn.w_v`` keep the model's own key/value-head axis.

    Gated MLPs (``act(gate)·up``): ``mlp.pre_act`` is the gate pre-activation, ``mlp.up`` the
    up projection, and ``mlp.post_act`` — the neuron — is ``act(gate)·up``, the input of the
    down projection.  Post-norm scales (Gemma's sandwich norms) are ones on models without them,
    so a write through them is the same formula everywhere.
    """

    shape: ShapeSpec
    node_type: NodeType
    location_within_layer: LocationWithinLayer | None
    has_no_layers: bool

    def __new__(
        cls,
        value: str,
        shape: ShapeSpec,
        node_type: NodeType,
        location: LocationWithinLayer | None,
        has_no_layers: bool = False,
    ) -> ActivationLocationType:
        member = str.__new__(cls, value)
        member._value_ = value
        member.shape = shape
        member.node_type = node_type
        member.location_within_layer = location
        member.has_no_layers = has_no_layers
        return member

    RESID_POST_EMBEDDING = (
        "resid.post_emb",
        (_T, _D),
        NodeType.RESIDUAL_STREAM_CHANNEL,
        None,
        True,
    )
    ATTN_INPUT_LAYER_NORM_SCALE = ("attn_ln.scale", (_T, _ONE), NodeType.LAYER, _LOC.ATTN)
    ATTN_QUERY = ("attn.q", (_T, _H, _DK), NodeType.QK_CHANNEL, _LOC.ATTN)
    ATTN_KEY = ("attn.k", (_S, _H, _DK), NodeType.QK_CHANNEL, _LOC.ATTN)
    ATTN_VALUE = ("attn.v", (_S, _H, _DV), NodeType.V_CHANNEL, _LOC.ATTN)
    ATTN_QK_LOGITS = ("attn.qk_logits", (_T, _S, _H), NodeType.ATTENTION_HEAD, _LOC.ATTN)
    ATTN_QK_PROBS = ("attn.qk_probs", (_T, _S, _H), NodeType.ATTENTION_HEAD, _LOC.ATTN)
    ATTN_WEIGHTED_SUM_OF_VALUES = ("attn.v_out", (_T, _H, _DV), NodeType.V_CHANNEL, _LOC.ATTN)
    ATTN_POST_NORM_SCALE = ("attn_post_ln.scale", (_T, _ONE), NodeType.LAYER, _LOC.ATTN)
    RESID_DELTA_ATTN = ("resid.delta_attn", (_T, _D), NodeType.RESIDUAL_STREAM_CHANNEL, _LOC.ATTN)
    RESID_POST_ATTN = (
        "resid.post_attn",
        (_T, _D),
        NodeType.RESIDUAL_STREAM_CHANNEL,
        _LOC.RESID_POST_ATTN,
    )
    MLP_INPUT_LAYER_NORM_SCALE = ("mlp_ln.scale", (_T, _ONE), NodeType.LAYER, _LOC.MLP)
    MLP_PRE_ACT = ("mlp.pre_act", (_T, _F), NodeType.MLP_NEURON, _LOC.MLP)
    MLP_UP = ("mlp.up", (_T, _F), NodeType.MLP_NEURON, _LOC.MLP)
    MLP_POST_ACT = ("mlp.post_act", (_T, _F), NodeType.MLP_NEURON, _LOC.MLP)
    MLP_POST_NORM_SCALE = ("mlp_post_ln.scale", (_T, _ONE), NodeType.LAYER, _LOC.MLP)
    RESID_DELTA_MLP = ("resid.delta_mlp", (_T, _D), NodeType.RESIDUAL_STREAM_CHANNEL, _LOC.MLP)
    RESID_POST_MLP = (
        "resid.post_mlp",
        (_T, _D),
        NodeType.RESIDUAL_STREAM_CHANNEL,
        _LOC.RESID_POST_MLP,
    )
    RESID_FINAL_LAYER_NORM_SCALE = ("resid.ln_f.scale", (_T, _ONE), NodeType.LAYER, None, True)
    LOGITS = ("logits", (_T, _V), NodeType.VOCAB_TOKEN, None, True)

    @property
    def may_be_non_finite(self) -> bool:
        """Whether captured values may hold ``-inf`` by design (masked attention logits)."""
        return self is ActivationLocationType.ATTN_QK_LOGITS


class WeightLocationType(str, enum.Enum):
    """A weight or bias a model adapter must hand out, with its canonical (TDB) layout.

    Unlike the reference, every bias is reachable: write decompositions need ``b_out`` and
    ``b_O`` to close exactly.  A model without some bias returns zeros for it.  Norm gains are
    the *effective* multiplier (Gemma's ``1 + w``); ``embedding`` is the embedding as added to
    the residual stream (Gemma's ``√d`` scaling included).  Key and value weights keep the
    model's key/value-head axis (``KV_HEADS``; equal to ``ATTN_HEADS`` without grouped-query
    attention).  ``mlp.w_up``/``mlp.b_up`` exist only on gated MLPs, the post-norm gains only
    on models with post-norms.
    """

    shape: ShapeSpec
    has_no_layers: bool

    def __new__(
        cls, value: str, shape: ShapeSpec, has_no_layers: bool = False
    ) -> WeightLocationType:
        member = str.__new__(cls, value)
        member._value_ = value
        member.shape = shape
        member.has_no_layers = has_no_layers
        return member

    EMBEDDING = ("embedding", (_V, _D), True)
    POSITION_EMBEDDING = ("position_embedding", (_CTX, _D), True)
    UNEMBEDDING = ("unembedding", (_D, _V), True)
    LAYER_NORM_GAIN_FINAL = ("ln_f.gain", (_D,), True)
    LAYER_NORM_BIAS_FINAL = ("ln_f.bias", (_D,), True)
    LAYER_NORM_GAIN_PRE_ATTN = ("attn_ln.gain", (_D,))
    LAYER_NORM_BIAS_PRE_ATTN = ("attn_ln.bias", (_D,))
    ATTN_TO_QUERY = ("attn.w_q", (_H, _D, _DK))
    ATTN_TO_KEY = ("attn.w_k", (_KVH, _D, _DK))
    ATTN_TO_VALUE = ("attn.w_v", (_KVH, _D, _DV))
    ATTN_BIAS_QUERY = ("attn.b_q", (_H, _DK))
    ATTN_BIAS_KEY = ("attn.b_k", (_KVH, _DK))
    ATTN_BIAS_VALUE = ("attn.b_v", (_KVH, _DV))
    ATTN_TO_RESIDUAL = ("attn.w_o", (_H, _DV, _D))
    ATTN_BIAS_RESIDUAL = ("attn.b_o", (_D,))
    ATTN_POST_NORM_GAIN = ("attn_post_ln.gain", (_D,))
    LAYER_NORM_GAIN_PRE_MLP = ("mlp_ln.gain", (_D,))
    LAYER_NORM_BIAS_PRE_MLP = ("mlp_ln.bias", (_D,))
    MLP_TO_HIDDEN = ("mlp.w_in", (_D, _F))
    MLP_BIAS_HIDDEN = ("mlp.b_in", (_F,))
    MLP_TO_UP = ("mlp.w_up", (_D, _F))
    MLP_BIAS_UP = ("mlp.b_up", (_F,))
    MLP_TO_RESIDUAL = ("mlp.w_out", (_F, _D))
    MLP_BIAS_RESIDUAL = ("mlp.b_out", (_D,))
    MLP_POST_NORM_GAIN = ("mlp_post_ln.gain", (_D,))


def known_sizes(
    spec: ShapeSpec,
    *,
    n_tokens: int | None,
    model_sizes: Mapping[Dimension, int],
    parameter_sizes: Mapping[Dimension, int] | None = None,
) -> tuple[int | None, ...]:
    """Each axis's size for one prompt, ``None`` where nothing given declares it.

    The engine's output check uses this directly (it checks what it can know); callers that
    need every size use :func:`resolve_shape`, which turns a ``None`` into an error.
    """
    sizes: list[int | None] = []
    for dim in spec:
        if dim in (Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS):
            sizes.append(n_tokens)
        elif dim is Dimension.TOKEN_PAIRS:
            sizes.append(None if n_tokens is None else n_tokens * (n_tokens + 1) // 2)
        elif dim is Dimension.SINGLETON:
            sizes.append(1)
        elif dim.kind is DimensionKind.PARAMETERIZED:
            sizes.append((parameter_sizes or {}).get(dim))
        else:
            sizes.append(model_sizes.get(dim))
    return tuple(sizes)


def resolve_shape(
    spec: ShapeSpec,
    *,
    n_tokens: int,
    model_sizes: Mapping[Dimension, int],
    parameter_sizes: Mapping[Dimension, int] | None = None,
) -> tuple[int, ...]:
    """Turn a shape spec into concrete sizes for one prompt of ``n_tokens`` tokens.

    ``model_sizes`` comes from a model adapter (``ModelDims.sizes()``); parameterised axes come
    from the deriver that declares them.
    """
    from .exceptions import ShapeError

    sizes = known_sizes(
        spec, n_tokens=n_tokens, model_sizes=model_sizes, parameter_sizes=parameter_sizes
    )
    for dim, size in zip(spec, sizes, strict=True):
        if size is None and dim.kind is DimensionKind.PARAMETERIZED:
            raise ShapeError(
                f"dimension {dim.value!r} is parameterised but no size was declared for it; "
                "set `dimension_sizes` on the ScalarDeriver that produces it"
            )
        if size is None:
            raise ShapeError(f"the model does not declare a size for dimension {dim.value!r}")
    return tuple(size for size in sizes if size is not None)
