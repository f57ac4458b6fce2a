"""Edge DSTs: how much one component's write drives another's activation.

Edges go from an upstream node U (a neuron, or a head at a query token) to a downstream node
N (a neuron, or one input path — query, key or value — of a head).  N's *attribution* is
``f_N(r) = act_N(r) · stopgrad(∇act_N)``: its activation recomputed from the residual ``r`` it
reads (reconstitution, with the norm scale detached by default) times the objective's gradient
there.  The edge is U's write times ``∂f_N/∂r``.

* **many → one** (``options["circuits"]["node"]`` = N): ``edge.node_attribution_grad`` is
  ``R = ∂f_N/∂r``; ``edge.mlp_out_attribution``, ``edge.attn_out_attribution`` and
  ``edge.token_out_attribution`` are every neuron's, head-and-token-pair's and embedding's
  write times ``R`` — exactly zero where the writer does not precede N.  The ``*_out_activation``
  twins use ``G = ∂act_N/∂r`` (``edge.node_activation_residual_grad``) instead: direct effects
  on N's activation rather than on its attribution (no backward pass needed).
* **one → many** (``node`` = U): ``edge.node_write`` is U's write vector; the ``*_in_attribution``
  DSTs are ``J_f(r_l)·w_U`` for every downstream neuron or head pair of each layer (one
  forward-mode JVP per layer), ``*_in_activation`` the same without the gradient weighting
  (no backward pass needed).
* **node converters**: ``node.token_write`` (which output tokens U's write promotes: a logit
  lens of the node) and ``node.token_read`` (which input token embeddings excite N).

Every kernel reconstitutes through the model (``scalarlens.Reconstitutable``); a model without
that capability gets an error saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scalarlens import (
    IDENTITY,
    LAST_LAYER,
    NO_LAYERS,
    PREVIOUS_LAYER,
    ActivationLocationType,
    DeriveContext,
    DerivedScalarType,
    Dimension,
    DstConfig,
    DstReference,
    Inputs,
    LayerIndex,
    LocationWithinLayer,
    NodeType,
    PassType,
    RawScalarSource,
    Recipe,
    StaticLayerIndexer,
    WeightLocationType,
    recipe_factories,
)
from scalarlens.exceptions import ModelInputError

from ._options import NodeIndex, circuits_options, read_stage

if TYPE_CHECKING:
    import torch

__all__ = ["EXAMPLES", "FACTORIES", "RECIPES"]

ALT, W = ActivationLocationType, WeightLocationType
FWD, BWD = PassType.FORWARD, PassType.BACKWARD
T, S, D = Dimension.TOKENS, Dimension.ATTENDED_TO_TOKENS, Dimension.RESIDUAL_STREAM_CHANNELS
F, H, V, ONE = Dimension.MLP_ACTS, Dimension.ATTN_HEADS, Dimension.VOCAB_SIZE, Dimension.SINGLETON
MLP, ATTN = LocationWithinLayer.MLP, LocationWithinLayer.ATTN
FORWARD_ONLY = frozenset({FWD})


# --- shared helpers -------------------------------------------------------------------------


def _model(ctx: DeriveContext) -> Any:
    from scalarlens import Reconstitutable

    model = ctx.model
    if not isinstance(model, Reconstitutable):
        name = getattr(model, "name", type(model).__name__)
        raise ModelInputError(
            f"{ctx.dst.name} recomputes activations from the residual stream, which model "
            f"{name!r} cannot do: its adapter does not implement scalarlens.Reconstitutable "
            "(ScalarLens's GPT-2 and every scalarlens-transformers family do; see the "
            "model-adapter guide)"
        )
    return model


def _node(ctx: DeriveContext, n_tokens: int) -> NodeIndex:
    options = circuits_options(ctx.config, ctx.dst.name)
    return options.node.resolved(ctx.dims, n_tokens, ctx.dst.name)


def _detach(ctx: DeriveContext) -> bool:
    return circuits_options(ctx.config, ctx.dst.name).detach_norm_scale


def _need(x: torch.Tensor | None, what: str) -> torch.Tensor:
    if x is None:
        from scalarlens.exceptions import MissingActivationError

        raise MissingActivationError(
            f"an edge DST's input was not provided: {what} (a layer indexer returned nothing "
            "where the kernel needs a tensor; report this with the DST and its options)"
        )
    return x


def _read_stage(node: NodeIndex, dims: Any) -> int:
    """The last write stage a downstream node N reads (its sublayer's input residual)."""
    return read_stage(dims, "attn" if node.kind == "head" else "mlp", node.layer)


def _post_factor(scale: torch.Tensor | None, gain: W, layer: int, ctx: DeriveContext) -> Any:
    """``γ/σ`` per token of a sublayer's post-norm (``T×D``), or 1 without post-norms."""
    if not ctx.dims.post_norms or scale is None:
        return 1.0
    return ctx.weight(gain, layer)[None, :] / scale


def _layer_input(previous: torch.Tensor | None, embedding: torch.Tensor | None) -> torch.Tensor:
    return _need(embedding if previous is None else previous, "the residual entering the layer")


def _mlp_reading(
    post_attn: torch.Tensor | None, layer_input: torch.Tensor, ctx: DeriveContext
) -> torch.Tensor:
    return layer_input if ctx.dims.parallel_residual else _need(post_attn, "resid.post_attn")


def _static(layer: int) -> StaticLayerIndexer:
    return StaticLayerIndexer(layer)


def _reading_sources(node: NodeIndex) -> tuple[RawScalarSource, RawScalarSource]:
    """The residuals node N may read: after attention at its layer, and entering its layer."""
    before = (
        RawScalarSource(ALT.RESID_POST_EMBEDDING, FWD, NO_LAYERS)
        if node.layer == 0
        else RawScalarSource(ALT.RESID_POST_MLP, FWD, _static(node.layer - 1))
    )
    return RawScalarSource(ALT.RESID_POST_ATTN, FWD, _static(node.layer)), before


def _node_of(config: DstConfig, dst: str) -> NodeIndex:
    return circuits_options(config, dst).node


def _activation_fn(
    node: NodeIndex, model: Any, detach: bool, weight: Callable[[torch.Tensor], torch.Tensor] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``r ↦ act_N(r)`` (times ``weight`` of the same shape when given), a scalar."""
    from scalarlens import attention_on_path

    t, layer = node.token, node.layer
    if node.kind == "neuron":

        def neuron(r: torch.Tensor) -> torch.Tensor:
            post = model.reconstitute_mlp(r, layer, detach_scale=detach)[1]
            value = post if weight is None else post * weight(post)
            out: torch.Tensor = value[t, node.index]
            return out

        return neuron
    path = node.path or "v"

    def head(r: torch.Tensor) -> torch.Tensor:
        parts = attention_on_path(model, r, layer, path, detach_scale=detach)  # type: ignore[arg-type]
        h, s = node.index, node.key_token
        if path == "v":  # Σ_d p[t,s,h]·v[s,h,d]·w[t,h,d] (w: ∇v_out, or 1)
            contrib = parts.probs[t, :, h, None] * parts.values[:, h]  # S×dv
            if weight is not None:
                contrib = contrib * weight(parts.mixed)[t, h][None, :]
            per_source = contrib.sum(-1)
        else:
            per_source = parts.probs[t, :, h]
            if weight is not None:
                per_source = per_source * weight(parts.probs)[t, :, h]
        out: torch.Tensor = per_source.sum() if s is None else per_source[s]
        return out

    return head


# --- many → one -----------------------------------------------------------------------------


def _grad_sources(config: DstConfig, dst: str) -> tuple[Any, ...]:
    node = _node_of(config, dst)
    if node.kind == "head" and node.path is None:
        from scalarlens.exceptions import ConfigError

        raise ConfigError(
            f"{dst}: a head as the downstream node needs a path: options['circuits']['node']"
            "['path'] = 'q', 'k' or 'v' (and optionally key_token)"
        )
    location = {
        None: ALT.MLP_POST_ACT,
        "q": ALT.ATTN_QK_PROBS,
        "k": ALT.ATTN_QK_PROBS,
        "v": ALT.ATTN_WEIGHTED_SUM_OF_VALUES,
    }[node.path]
    return (*_reading_sources(node), RawScalarSource(location, BWD, _static(node.layer)))


def _node_residual(inputs: Inputs, node: NodeIndex, ctx: DeriveContext) -> torch.Tensor:
    layer_input = _need(inputs[1], "the residual entering the node's layer")
    if node.kind == "head":
        return layer_input
    return _mlp_reading(inputs[0], layer_input, ctx)


def _attribution_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    from scalarlens import reconstitute_gradient

    grad = _need(inputs[2], "the objective's gradient at the node")
    node = _node(ctx, grad.shape[0])
    resid = _node_residual(inputs, node, ctx)
    fixed = grad.detach()
    fn = _activation_fn(node, _model(ctx), _detach(ctx), lambda _: fixed.to(_.dtype))
    return reconstitute_gradient(fn, resid).to(resid.dtype)


def _activation_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    from scalarlens import reconstitute_gradient

    resid0 = _need(inputs[0] if inputs[0] is not None else inputs[1], "a residual")
    node = _node(ctx, resid0.shape[0])
    if node.kind == "head" and (node.path not in ("q", "k") or node.key_token is None):
        from scalarlens.exceptions import ConfigError

        # Σ_s p[t,s,h] = 1 whatever the residual (a zero read vector), and a head's value path
        # has no scalar activation: only one probability is a well-defined head activation.
        raise ConfigError(
            f"{ctx.dst.name}: a head's activation is one attention probability p[t,s,h]; give "
            "the node path 'q' or 'k' and a key_token (or use the attribution DSTs, which weight "
            "by the objective's gradient)"
        )
    resid = _node_residual(inputs, node, ctx)
    fn = _activation_fn(node, _model(ctx), _detach(ctx), None)
    return reconstitute_gradient(fn, resid).to(resid.dtype)


def _ref_grad(weighted: bool = True) -> DstReference:
    """``R``: N's attribution gradient, or (unweighted) its activation gradient ``∂act_N/∂r``."""
    name = "edge.node_attribution_grad" if weighted else "edge.node_activation_residual_grad"
    return DstReference(name, FWD, NO_LAYERS)


def _mlp_out(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    act, r = _need(inputs[0], "mlp.post_act"), _need(inputs[2], "R")
    assert layer is not None
    node = _node(ctx, act.shape[0])
    if 2 * layer + 2 > _read_stage(node, ctx.dims):  # this MLP does not precede N
        return torch.zeros_like(act)
    g = r * _post_factor(inputs[1], W.MLP_POST_NORM_GAIN, layer, ctx)
    return (g @ ctx.weight(W.MLP_TO_RESIDUAL, layer).T) * act


def _attn_out(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    probs, values, r = _need(inputs[0], "probs"), _need(inputs[1], "attn.v"), _need(inputs[3], "R")
    assert layer is not None
    node = _node(ctx, probs.shape[0])
    if 2 * layer + 1 > _read_stage(node, ctx.dims):
        return torch.zeros_like(probs)
    g = r * _post_factor(inputs[2], W.ATTN_POST_NORM_GAIN, layer, ctx)  # T×D
    u = torch.einsum("td,hvd->thv", g, ctx.weight(W.ATTN_TO_RESIDUAL, layer))
    return torch.einsum("tsh,shv,thv->tsh", probs, values, u)


def _token_out(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    emb, r = _need(inputs[0], "resid.post_emb"), _need(inputs[1], "R")
    return (emb * r).sum(-1, keepdim=True)


# --- one → many -----------------------------------------------------------------------------


def _write_sources(config: DstConfig, dst: str) -> tuple[Any, ...]:
    node = _node_of(config, dst)
    at = _static(node.layer)
    if node.kind == "neuron":
        return (
            RawScalarSource(ALT.MLP_POST_ACT, FWD, at),
            RawScalarSource(ALT.MLP_POST_NORM_SCALE, FWD, at),
        )
    return (
        RawScalarSource(ALT.ATTN_QK_PROBS, FWD, at),
        RawScalarSource(ALT.ATTN_VALUE, FWD, at),
        RawScalarSource(ALT.ATTN_POST_NORM_SCALE, FWD, at),
    )


def _node_write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    import torch

    first = _need(inputs[0], "the node's activation")
    node = _node(ctx, first.shape[0])
    t, out = node.token, torch.zeros(first.shape[0], ctx.dims.d_model, dtype=first.dtype)
    if node.kind == "neuron":
        w_out = ctx.weight(W.MLP_TO_RESIDUAL, node.layer)[node.index]
        factor = _post_factor(inputs[1], W.MLP_POST_NORM_GAIN, node.layer, ctx)
        row = first[t, node.index] * w_out
    else:
        probs, values = first, _need(inputs[1], "attn.v")
        weights = probs[t, :, node.index]
        if node.key_token is not None:
            keep = torch.zeros_like(weights)
            keep[node.key_token] = 1.0
            weights = weights * keep
        mixed = weights @ values[:, node.index]  # dv
        row = mixed @ ctx.weight(W.ATTN_TO_RESIDUAL, node.layer)[node.index]
        factor = _post_factor(inputs[2], W.ATTN_POST_NORM_GAIN, node.layer, ctx)
    out[t] = row * (factor[t] if not isinstance(factor, float) else factor)
    return out


def _write_to_grad(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    write, g = _need(inputs[0], "edge.node_write"), _need(inputs[1], "final residual gradient")
    return (write * g).sum(-1, keepdim=True)


def _ref_write() -> DstReference:
    return DstReference("edge.node_write", FWD, NO_LAYERS)


_LAYER_READS = (
    RawScalarSource(ALT.RESID_POST_ATTN, FWD, IDENTITY),
    RawScalarSource(ALT.RESID_POST_MLP, FWD, PREVIOUS_LAYER),
    RawScalarSource(ALT.RESID_POST_EMBEDDING, FWD, NO_LAYERS),
)


def _jvp_in(
    inputs: Inputs,
    layer: LayerIndex,
    ctx: DeriveContext,
    target: str,
    weighted: bool,
) -> torch.Tensor:
    """``J_f(r_layer)·w_U`` for every downstream neuron (``target="mlp"``) or head pair
    (``"q"``/``"k"``/``"v"``) of ``layer``; zero where U does not precede it."""
    import torch
    from scalarlens import attention_on_path, reconstitute_jvp

    assert layer is not None
    write = _need(inputs[-1], "edge.node_write")
    grad = inputs[3] if weighted else None
    n_tokens = write.shape[0]
    upstream = _node(ctx, n_tokens)
    model, detach, dims = _model(ctx), _detach(ctx), ctx.dims
    layer_input = _layer_input(inputs[1], inputs[2])
    if target == "mlp":
        reads = read_stage(dims, "mlp", layer)
        resid = _mlp_reading(inputs[0], layer_input, ctx)
        shape: tuple[int, ...] = (n_tokens, dims.d_mlp)
    else:
        reads, resid = read_stage(dims, "attn", layer), layer_input
        shape = (n_tokens, n_tokens, dims.n_heads)
    if upstream.stage > reads:
        return torch.zeros(shape, dtype=write.dtype)
    fixed = None if grad is None else grad.detach()

    def fn(r: torch.Tensor) -> torch.Tensor:
        if target == "mlp":
            post = model.reconstitute_mlp(r, layer, detach_scale=detach)[1]
            return post if fixed is None else post * fixed.to(post.dtype)
        parts = attention_on_path(model, r, layer, target, detach_scale=detach)  # type: ignore[arg-type]
        if target == "v":  # p[t,s,h]·(v[s,h]·∇o[t,h]) with only v attached
            go = _need(fixed, "∇attn.v_out").to(parts.values.dtype)
            out: torch.Tensor = torch.einsum("tsh,shd,thd->tsh", parts.probs, parts.values, go)
            return out
        return parts.probs if fixed is None else parts.probs * fixed.to(parts.probs.dtype)

    _, tangent = reconstitute_jvp(fn, resid, write.to(resid.dtype))
    return torch.nan_to_num(tangent, nan=0.0).to(write.dtype)


def _in_sources(grad: ALT | None) -> Callable[[DstConfig], tuple[Any, ...]]:
    def sources(config: DstConfig) -> tuple[Any, ...]:
        extra = () if grad is None else (RawScalarSource(grad, BWD, IDENTITY),)
        return (*_LAYER_READS, *extra, _ref_write())

    return sources


def _in_kernel(target: str, weighted: bool) -> Callable[[Inputs, LayerIndex, DeriveContext], Any]:
    def kernel(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
        return _jvp_in(inputs, layer, ctx, target, weighted)

    kernel.__name__ = f"in_{target}_{'attribution' if weighted else 'activation'}"
    return kernel


# --- node converters ------------------------------------------------------------------------


def _token_write(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    write, sigma = _need(inputs[0], "edge.node_write"), _need(inputs[1], "σ_f")
    node = _node(ctx, write.shape[0])
    row = write[node.token]
    if ctx.dims.norm_kind == "layernorm":
        row = row - row.mean()
    row = row * ctx.weight(W.LAYER_NORM_GAIN_FINAL) / sigma[node.token]
    logits = row @ ctx.weight(W.UNEMBEDDING)
    out = write.new_zeros(write.shape[0], logits.shape[0])
    out[node.token] = logits - logits.mean()
    return out


def _token_read(inputs: Inputs, layer: LayerIndex, ctx: DeriveContext) -> torch.Tensor:
    read = _need(inputs[0], "edge.node_activation_residual_grad")
    node = _node(ctx, read.shape[0])
    position = node.key_token if node.path == "k" and node.key_token is not None else node.token
    out = read.new_zeros(read.shape[0], ctx.dims.n_vocab)
    out[position] = ctx.weight(W.EMBEDDING) @ read[position]
    return out


def _read_sources(config: DstConfig) -> tuple[Any, ...]:
    return (DstReference("edge.node_activation_residual_grad", FWD, NO_LAYERS),)


# --- the catalogue --------------------------------------------------------------------------


def _dst(name: str, shape: tuple[Any, ...], node_type: NodeType, text: str, **kw: Any) -> Any:
    return DerivedScalarType(name, shape, node_type, text, pass_types=FORWARD_ONLY, **kw)


def _with_name(dst: str, sources: Callable[[DstConfig, str], tuple[Any, ...]]) -> Any:
    def bound(config: DstConfig) -> tuple[Any, ...]:
        return sources(config, dst)

    return bound


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        _dst(
            "edge.node_attribution_grad",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "R = ∂f_N/∂r: gradient of node N's attribution w.r.t. the residual it reads",
            has_no_layers=True,
        ),
        "∂(act_N(r)·stopgrad(∇act_N))/∂r at N's layer, through reconstitution",
        _attribution_grad,
        _with_name("edge.node_attribution_grad", _grad_sources),
    ),
    Recipe(
        _dst(
            "edge.node_activation_residual_grad",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "∂act_N/∂r: node N's read vector (no gradient weighting; no backward pass)",
            has_no_layers=True,
        ),
        "∂act_N(r)/∂r at N's layer, through reconstitution",
        _activation_grad,
        _with_name(
            "edge.node_activation_residual_grad", lambda c, d: _reading_sources(_node_of(c, d))
        ),
    ),
    *(
        recipe
        for weighted, kind, grad in (
            (True, "attribution", "R"),
            (False, "activation", "G"),
        )
        for recipe in (
            Recipe(
                _dst(
                    f"edge.mlp_out_{kind}",
                    (T, F),
                    NodeType.MLP_NEURON,
                    f"edge from every neuron into node N's {kind} (zero where it does not "
                    "precede N)",
                    location=MLP,
                ),
                f"a[t,n]·(W_out[n]·{grad}[t])",
                _mlp_out,
                (
                    RawScalarSource(ALT.MLP_POST_ACT),
                    RawScalarSource(ALT.MLP_POST_NORM_SCALE),
                    _ref_grad(weighted),
                ),
            ),
            Recipe(
                _dst(
                    f"edge.attn_out_{kind}",
                    (T, S, H),
                    NodeType.ATTENTION_HEAD,
                    f"edge from every head and token pair into node N's {kind} (zero where it "
                    "does not precede N)",
                    location=ATTN,
                ),
                f"p[t,s,h]·(v[s,h]W_O[h]·{grad}[t])",
                _attn_out,
                (
                    RawScalarSource(ALT.ATTN_QK_PROBS),
                    RawScalarSource(ALT.ATTN_VALUE),
                    RawScalarSource(ALT.ATTN_POST_NORM_SCALE),
                    _ref_grad(weighted),
                ),
            ),
            Recipe(
                _dst(
                    f"edge.token_out_{kind}",
                    (T, ONE),
                    NodeType.LAYER,
                    f"edge from every token's embedding into node N's {kind}",
                    has_no_layers=True,
                ),
                f"x_emb[t]·{grad}[t]",
                _token_out,
                (RawScalarSource(ALT.RESID_POST_EMBEDDING, FWD, NO_LAYERS), _ref_grad(weighted)),
            ),
        )
    ),
    Recipe(
        _dst(
            "edge.node_write",
            (T, D),
            NodeType.RESIDUAL_STREAM_CHANNEL,
            "node U's write to the residual stream, in its token's row (zeros elsewhere)",
            has_no_layers=True,
        ),
        "a[t,n]·W_out[n] (neuron) or Σ_s p[t,s,h]·v[s,h]W_O[h] (head; one s with key_token)",
        _node_write,
        _with_name("edge.node_write", _write_sources),
    ),
    Recipe(
        _dst(
            "edge.node_write_to_final_residual_grad",
            (T, ONE),
            NodeType.LAYER,
            "node U's direct edge to the objective",
            has_no_layers=True,
        ),
        "edge.node_write[t]·g[t] (g: the objective's gradient at the final residual)",
        _write_to_grad,
        (_ref_write(), RawScalarSource(ALT.RESID_POST_MLP, BWD, LAST_LAYER)),
    ),
    Recipe(
        _dst(
            "edge.mlp_in_attribution",
            (T, F),
            NodeType.MLP_NEURON,
            "edge from node U into every neuron (zero where U does not precede it)",
            location=MLP,
        ),
        "J_f(r_l)·w_U, f = a·stopgrad(∇a), by forward-mode JVP",
        _in_kernel("mlp", True),
        _in_sources(ALT.MLP_POST_ACT),
    ),
    Recipe(
        _dst(
            "edge.mlp_in_activation",
            (T, F),
            NodeType.MLP_NEURON,
            "first-order change of every neuron along node U's write",
            location=MLP,
        ),
        "J_a(r_l)·w_U, by forward-mode JVP",
        _in_kernel("mlp", False),
        _in_sources(None),
    ),
    *(
        Recipe(
            _dst(
                f"edge.attn_{name}_in_attribution",
                (T, S, H),
                NodeType.ATTENTION_HEAD,
                f"edge from node U into every head's {name} path, per token pair",
                location=ATTN,
            ),
            f"J_f(r_l)·w_U through the {name} path only, f = "
            + ("p·v·stopgrad(∇o)" if path == "v" else "p·stopgrad(∇p)"),
            _in_kernel(path, True),
            _in_sources(ALT.ATTN_WEIGHTED_SUM_OF_VALUES if path == "v" else ALT.ATTN_QK_PROBS),
        )
        for name, path in (("query", "q"), ("key", "k"), ("value", "v"))
    ),
    *(
        Recipe(
            _dst(
                f"edge.attn_{name}_in_activation",
                (T, S, H),
                NodeType.ATTENTION_HEAD,
                f"first-order change of every attention probability along node U's write, "
                f"through the {name} path",
                location=ATTN,
            ),
            f"J_p(r_l)·w_U through the {name} path only",
            _in_kernel(path, False),
            _in_sources(None),
        )
        for name, path in (("query", "q"), ("key", "k"))
    ),
    Recipe(
        _dst(
            "node.token_write",
            (T, V),
            NodeType.VOCAB_TOKEN,
            "which output tokens node U's write promotes (a logit lens of the node)",
            has_no_layers=True,
        ),
        "(centred w_U[t]·γ_f/σ_f[t])·W_U, mean-subtracted",
        _token_write,
        (_ref_write(), RawScalarSource(ALT.RESID_FINAL_LAYER_NORM_SCALE, FWD, NO_LAYERS)),
    ),
    Recipe(
        _dst(
            "node.token_read",
            (T, V),
            NodeType.VOCAB_TOKEN,
            "which input token embeddings excite node N (its read vector against E)",
            has_no_layers=True,
        ),
        "E·(∂act_N/∂r)[t] (key token for a head's k path)",
        _token_read,
        _read_sources,
    ),
)

FACTORIES = recipe_factories(RECIPES)

_EXAMPLE = DstConfig(
    options={"circuits": {"node": {"kind": "neuron", "layer": 0, "token": -1, "index": 0}}}
)
EXAMPLES = {recipe.dst.name: _EXAMPLE for recipe in RECIPES}  # one config: built once
