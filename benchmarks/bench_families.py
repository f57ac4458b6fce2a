"""Hugging Face model families: ScalarLens against TransformerLens, nnsight and hand-written torch.

One random ``LlamaForCausalLM`` (8 layers, d_model 512, 8 query heads sharing 2 KV heads,
d_mlp 1408, vocabulary 32000, default RoPE, untied unembedding; RMSNorm scales randomised so that
γ takes part) is saved once as safetensors, with a word-level tokenizer (``t0`` … ``t31999``) so
that libraries which insist on loading one can.  Every side loads that directory:

* **hand**: plain ``transformers.LlamaForCausalLM`` with torch hooks on just the tensors needed
  (the reference every other side is checked against; ``tests/peers`` checks it against an
  independent autograd computation);
* **scalarlens**: ``scalarlens.models.load_model("hf:DIR")`` (the ``scalarlens-transformers``
  plugin) and ``scalarlens.derive``; skipped with a note while the plugin is not installed;
* **tl2**: TransformerLens 2.x ``HookedTransformer`` (``benchmarks/setup_tl_venv.sh``), its config
  written by hand from the HF config and the weights converted with its own
  ``convert_llama_weights`` (no folding or centring, so the weights are the checkpoint's);
* **tlbridge**: TransformerLens 4.x ``TransformerBridge.boot_transformers(DIR)``
  (``benchmarks/setup_hf_peer_venv.sh tlbridge``), no compatibility mode (raw HF weights);
* **nnsight**: ``nnsight.TransformersModel(DIR, task="text-generation")``
  (``benchmarks/setup_hf_peer_venv.sh nnsight``).

Workloads, on one prompt of N random token ids, objective ``logit[11] − logit[12]`` at the last
token:

1. **DLA** of every head and every MLP neuron at the last token: head h's write
   ``o[T−1, h] · W_O[:, h]ᵀ`` and neuron n's ``a[T−1, n] · W_down[:, n]``, pulled back through the
   final RMSNorm with its scale frozen: dotted with ``γ_f ⊙ (W_U[11] − W_U[12]) / σ_f[T−1]``.
   Layout ``{"heads": L×H, "neurons": L×F}``.  Every side captures only what it needs (the
   ``o_proj`` and ``down_proj`` inputs at the last position and the final norm's input or scale)
   under ``torch.no_grad``, skipping the unembedding where its API allows.
2. **act×grad** of every head (``Σ_s p[t, s, h] · ∂obj/∂p[t, s, h]`` per query token t) and every
   neuron (``a · ∂obj/∂a``), gradients with respect to activations only (weights frozen, the
   embedding output made the leaf).  Layout ``{"heads": L×T×H, "neurons": L×T×F}``.  Every side
   keeps just p and a and multiplies each by its gradient as the gradient arrives, and computes
   the logits at the last position only (``logits_to_keep=1`` for HF-based sides, TL 2.x:
   ``stop_at_layer`` + ``ln_final`` + ``unembed`` on the last position).

Attention: HF-based sides (hand, nnsight) use ``sdpa`` for DLA (HF's default; the probabilities
are not needed) and ``eager`` for act×grad (it returns them); the bridge always runs eager (it
forces that to hook patterns); TL 2.x has its own attention.

Each peer runs in its own venv and process; each venv also has ScalarLens (and the plugin where
it installs) so that ScalarLens is timed alternated with the peer in the same process.  Before
timing, every side is checked against the hand-written reference computed in the main venv
(max |difference| / max |value| ≤ 1e-4, float32).  Times: median of ``RUNS`` alternated runs
after a warm-up (min–max).  Memory: peak RSS above the loaded model (every weight read once
first: HF keeps safetensors memory-mapped), fresh process per figure, after a short warm-up
(``bench_capture.PeakSampler``).

    .venv/bin/python benchmarks/bench_families.py               # the section (Markdown)
    .venv/bin/python benchmarks/bench_families.py --quick       # tiny shape, 16 tokens, 1 run
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_capture import PeakSampler, live_cell  # noqa: E402
from bench_peers import _fmt_s, _mib, _ratio  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "llama-8l": {
        "num_hidden_layers": 8,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 1408,
        "vocab_size": 32000,
    },
    # For smoke tests and --quick.
    "tiny": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 176,
        "vocab_size": 512,
    },
}
N_TOKENS = (128, 512)
RUNS = 5
TARGET, DISTRACTOR = 11, 12
HEAD_DE = "attn.write_to_final_residual_grad_per_token"
NEURON_DE = "mlp.write_to_final_residual_grad"
HEAD_ATG = "attn.act_times_grad_per_token"
NEURON_ATG = "mlp.act_times_grad"
RTOL = 1e-4  # float32, max |difference| / max |value|

Result = dict[str, Any]  # {"heads": Tensor, "neurons": Tensor}

# Peer venvs: (setup command, environment variable naming an existing python instead).
PEERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tl2": (("setup_tl_venv.sh",), "SCALARLENS_TL_PYTHON"),
    "tlbridge": (("setup_hf_peer_venv.sh", "tlbridge"), "SCALARLENS_TLBRIDGE_PYTHON"),
    "nnsight": (("setup_hf_peer_venv.sh", "nnsight"), "SCALARLENS_NNSIGHT_PYTHON"),
}
LABELS = {
    "hand": "hand-written torch (HF modules)",
    "scalarlens": "ScalarLens",
    "tl2": "TransformerLens 2.x (HookedTransformer)",
    "tlbridge": "TransformerLens (TransformerBridge)",
    "nnsight": "nnsight",
}


# --- the same random weights for everyone -----------------------------------------------------


def save_random_llama(
    directory: str | Path, shape: Mapping[str, int] | str = "llama-8l", seed: int = 0
) -> Path:
    """A random ``LlamaForCausalLM`` (float32 safetensors) plus a word-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    dims = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **dims,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory), safe_serialization=True)
    vocab = {f"t{i}": i for i in range(dims["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2"
    ).save_pretrained(str(directory))
    return Path(directory)


def _config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())  # type: ignore[no-any-return]


def random_tokens(n: int, vocab: int, seed: int = 1) -> list[int]:
    import torch

    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _batch(ids: list[int]) -> Any:
    import torch

    return torch.tensor([ids])


# --- hand-written torch over the HF modules (the reference) ------------------------------------


def load_hf(directory: str | Path, attn: str = "eager") -> Any:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attn
    )
    model.eval()
    model.requires_grad_(False)
    return model


def _set_attn(model: Any, attn: str) -> None:
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)


def _final_direction(model: Any, last_norm_input: Any) -> Any:
    """``γ_f ⊙ (W_U[target] − W_U[distractor]) / σ_f`` for the last position (scale frozen)."""
    norm = model.model.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    sigma = (last_norm_input.pow(2).mean() + eps).sqrt()
    w_u = model.lm_head.weight
    return norm.weight * (w_u[TARGET] - w_u[DISTRACTOR]) / sigma


def _dla_from_last(model: Any, z_last: list[Any], a_last: list[Any], direction: Any) -> Result:
    """Per-head and per-neuron direct effect from the last position's o_proj/down_proj inputs."""
    import torch

    cfg = model.config
    n_heads = cfg.num_attention_heads
    heads, neurons = [], []
    for layer, (z, a) in enumerate(zip(z_last, a_last, strict=True)):
        block = model.model.layers[layer]
        w_o = block.self_attn.o_proj.weight  # D × (H·d_head)
        heads.append((z * (w_o.T @ direction)).view(n_heads, -1).sum(-1))
        neurons.append(a * (block.mlp.down_proj.weight.T @ direction))
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


def hand_dla(model: Any, ids: list[int]) -> Result:
    """Forward pre-hooks keep the last row of each o_proj/down_proj input and the final norm's."""
    import torch

    layers = model.model.layers
    z_last: list[Any] = [None] * len(layers)
    a_last: list[Any] = [None] * len(layers)
    x_last: list[Any] = [None]

    def keep(store: list[Any], index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            store[index] = args[0][0, -1].clone()

        return hook

    handles = [model.model.norm.register_forward_pre_hook(keep(x_last, 0))]
    for i, block in enumerate(layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(keep(z_last, i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(keep(a_last, i)))
    _set_attn(model, "sdpa")
    try:
        with torch.no_grad():
            model.model(input_ids=_batch(ids), use_cache=False)  # the base model: no unembedding
            return _dla_from_last(model, z_last, a_last, _final_direction(model, x_last[0]))
    finally:
        for handle in handles:
            handle.remove()


def hand_act_times_grad(model: Any, ids: list[int]) -> Result:
    """Keep p (attention output [1]) and a (down_proj input); multiply each by its gradient."""
    import torch

    layers = model.model.layers
    heads: list[Any] = [None] * len(layers)
    neurons: list[Any] = [None] * len(layers)

    def leaf(module: Any, args: Any, out: Any) -> Any:
        return out.detach().requires_grad_(True)

    def on_probs(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, out: Any) -> None:
            p = out[1]  # B × H × T × S

            def grad_hook(g: Any) -> None:
                heads[index] = (p * g)[0].sum(-1).T

            p.register_hook(grad_hook)

        return hook

    def on_post(index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            a = args[0]  # B × T × F

            def grad_hook(g: Any) -> None:
                neurons[index] = (a * g)[0]

            a.register_hook(grad_hook)

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(leaf)]
    for i, block in enumerate(layers):
        handles.append(block.self_attn.register_forward_hook(on_probs(i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(on_post(i)))
    _set_attn(model, "eager")
    try:
        with torch.enable_grad():
            logits = model(input_ids=_batch(ids), use_cache=False, logits_to_keep=1).logits
            (logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]).backward()
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        return {"heads": torch.stack(heads).detach(), "neurons": torch.stack(neurons).detach()}


def autograd_reference(model: Any, ids: list[int]) -> tuple[Result, Result]:
    """Independent computation for the smoke test (slow, tiny models only).

    DLA: the gradient of the objective with respect to the final residual at the last position,
    the RMS scale detached, dotted with each head's and neuron's write (computed from the
    captured activations times full weight slices, not from the fused formulas above).
    act×grad: ``torch.autograd.grad`` of the objective with respect to retained p and a.
    """
    import torch

    _set_attn(model, "eager")
    cfg = model.config
    n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    probs: list[Any] = []
    posts: list[Any] = []
    o_in: list[Any] = []
    resid: list[Any] = []
    handles = [
        model.model.embed_tokens.register_forward_hook(
            lambda m, a, out: out.detach().requires_grad_(True)
        ),
        model.model.norm.register_forward_pre_hook(lambda m, a: resid.append(a[0])),
    ]
    for block in model.model.layers:
        handles.append(block.self_attn.register_forward_hook(lambda m, a, o: probs.append(o[1])))
        handles.append(
            block.mlp.down_proj.register_forward_pre_hook(lambda m, a: posts.append(a[0]))
        )
        handles.append(
            block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: o_in.append(a[0]))
        )
    try:
        with torch.enable_grad():
            logits = model(input_ids=_batch(ids), use_cache=False).logits
            objective = logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]
            grads = torch.autograd.grad(objective, [*probs, *posts], retain_graph=True)
            # Final norm with its scale frozen: recompute it on a detached residual.
            x = resid[0][0, -1].detach().requires_grad_(True)
            norm = model.model.norm
            scale = (x.detach().pow(2).mean() + norm.variance_epsilon).rsqrt()
            frozen = model.lm_head(norm.weight * (x * scale))
            (g_final,) = torch.autograd.grad(frozen[TARGET] - frozen[DISTRACTOR], x)
    finally:
        for handle in handles:
            handle.remove()
    n = len(probs)
    atg = {
        "heads": torch.stack([(p * g)[0].sum(-1).T for p, g in zip(probs, grads[:n], strict=True)]),
        "neurons": torch.stack([(a * g)[0] for a, g in zip(posts, grads[n:], strict=True)]),
    }
    heads, neurons = [], []
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            z = o_in[layer][0, -1].view(n_heads, d_head)
            w_o = block.self_attn.o_proj.weight.view(-1, n_heads, d_head)  # D × H × d_head
            writes = torch.einsum("hk,dhk->hd", z, w_o)  # each head's write, H × D
            heads.append(writes @ g_final)
            w_down = block.mlp.down_proj.weight  # D × F
            neurons.append((posts[layer][0, -1][:, None] * w_down.T) @ g_final)
    dla = {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}
    return dla, atg


# --- ScalarLens (the scalarlens-transformers plugin) -------------------------------------------


def load_scalarlens(directory: str | Path) -> Any:
    """``load_model("hf:DIR")`` (or ``load_model(DIR)``); raises while the plugin is missing."""
    import scalarlens

    load_model = scalarlens.load_model

    errors = []
    for spec in (f"hf:{directory}", str(directory)):
        try:
            adapter = load_model(spec)
        except Exception as error:  # the plugin is absent or refuses: try the next spelling
            errors.append(f"{spec!r}: {type(error).__name__}: {error}")
            continue
        if (
            getattr(getattr(adapter, "dims", None), "n_layers", None)
            == _config(directory)["num_hidden_layers"]
        ):
            return adapter
        errors.append(f"{spec!r}: loaded {type(adapter).__name__}, not the Llama checkpoint")
    raise RuntimeError("; ".join(errors))


def scalarlens_dla(adapter: Any, ids: list[int]) -> Result:
    import scalarlens
    import torch

    store = scalarlens.derive(
        adapter,
        [ids],
        [HEAD_DE, NEURON_DE],
        target=TARGET,
        distractor=DISTRACTOR,
        config=scalarlens.DstConfig(detach_final_ln_scale=True),
    )
    layers = range(adapter.dims.n_layers)
    return {
        "heads": torch.stack([store.get(HEAD_DE, layer)[-1] for layer in layers]),
        "neurons": torch.stack([store.get(NEURON_DE, layer)[-1] for layer in layers]),
    }


def scalarlens_act_times_grad(adapter: Any, ids: list[int]) -> Result:
    import scalarlens
    import torch

    store = scalarlens.derive(
        adapter, [ids], [HEAD_ATG, NEURON_ATG], target=TARGET, distractor=DISTRACTOR
    )
    layers = range(adapter.dims.n_layers)
    return {
        "heads": torch.stack([store.get(HEAD_ATG, layer) for layer in layers]),
        "neurons": torch.stack([store.get(NEURON_ATG, layer) for layer in layers]),
    }


# --- TransformerLens 2.x (HookedTransformer) ---------------------------------------------------


def load_tl2(directory: str | Path) -> Any:
    """A ``HookedTransformer`` for the Llama checkpoint, config by hand, weights unprocessed.

    TL 2.x's own ``from_pretrained`` only accepts official model names (it maps the name to a
    config table entry and downloads), but its Llama pieces work on a local random model: the
    config below is what ``convert_hf_model_config`` builds for ``LlamaForCausalLM`` (grouped
    KV heads via ``n_key_value_heads``), and ``convert_llama_weights`` maps the HF modules.
    """
    import torch
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf = transformers.LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
    c = _config(directory)
    rope = c.get("rope_parameters") or {}
    d_head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    cfg = HookedTransformerConfig(
        n_layers=c["num_hidden_layers"],
        d_model=c["hidden_size"],
        d_head=d_head,
        n_heads=c["num_attention_heads"],
        n_key_value_heads=kv if kv != c["num_attention_heads"] else None,
        d_mlp=c["intermediate_size"],
        d_vocab=c["vocab_size"],
        n_ctx=c["max_position_embeddings"],
        eps=c["rms_norm_eps"],
        act_fn=c["hidden_act"],
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=int(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        init_weights=False,
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    state = {k: v.detach().to(torch.float32) for k, v in convert_llama_weights(hf, cfg).items()}
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.eval()
    model.requires_grad_(False)
    del hf
    return model


def _tl_direction(model: Any, scale_last: Any) -> Any:
    """``γ_f ⊙ (W_U[:, a] − W_U[:, b]) / σ_f`` with TL's cached ``ln_final.hook_scale`` (= σ)."""
    w_u = model.W_U
    return model.ln_final.w * (w_u[:, TARGET] - w_u[:, DISTRACTOR]) / scale_last


def _tl_dla_from_last(model: Any, z: list[Any], a: list[Any], scale: Any) -> Result:
    """z: H × d_head (``hook_z``), a: F (``hook_post``); TL's W_O is H × d_head × D."""
    import torch

    direction = _tl_direction(model, scale)
    blocks = model.blocks  # per block: model.W_O / model.W_out would stack every layer's
    heads = [(zl * (blocks[i].attn.W_O @ direction)).sum(-1) for i, zl in enumerate(z)]
    neurons = [al * (blocks[i].mlp.W_out @ direction) for i, al in enumerate(a)]
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


def _last_row_hooks(
    n_layers: int, z_name: str, post_name: str
) -> tuple[list[tuple[str, Callable[..., None]]], list[Any], list[Any], list[Any]]:
    """Forward hooks that keep only the last position of hook_z, hook_post and the final scale."""
    z: list[Any] = [None] * n_layers
    a: list[Any] = [None] * n_layers
    scale: list[Any] = [None]

    def keep(store: list[Any], index: int) -> Callable[..., None]:
        def hook(act: Any, hook: Any) -> None:
            store[index] = act[0, -1].clone()

        return hook

    hooks = [(z_name.format(i), keep(z, i)) for i in range(n_layers)]
    hooks += [(post_name.format(i), keep(a, i)) for i in range(n_layers)]
    hooks.append(("ln_final.hook_scale", keep(scale, 0)))
    return hooks, z, a, scale


def tl2_dla(model: Any, ids: list[int]) -> Result:
    """``run_with_hooks`` keeping the last row of hook_z / hook_post / ln_final.hook_scale.

    ``return_type=None`` stops after ``ln_final`` (no unembedding).
    """
    import torch

    hooks, z, a, scale = _last_row_hooks(
        model.cfg.n_layers, "blocks.{}.attn.hook_z", "blocks.{}.mlp.hook_post"
    )
    with torch.no_grad():
        model.run_with_hooks(_batch(ids), return_type=None, fwd_hooks=hooks)
        return _tl_dla_from_last(model, z, a, scale[0])


def _product_hooks(
    n_layers: int, pattern: str, post: str
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """Forward hooks keeping p and a, backward hooks multiplying each by its gradient."""
    heads: list[Any] = [None] * n_layers
    neurons: list[Any] = [None] * n_layers
    kept: dict[str, Any] = {}

    def keep(act: Any, hook: Any) -> None:
        kept[hook.name] = act

    def head_product(index: int) -> Callable[..., None]:
        def hook(grad: Any, hook: Any) -> None:
            heads[index] = (kept.pop(hook.name) * grad)[0].sum(-1).T.detach()

        return hook

    def neuron_product(index: int) -> Callable[..., None]:
        def hook(grad: Any, hook: Any) -> None:
            neurons[index] = (kept.pop(hook.name) * grad)[0].detach()

        return hook

    fwd = [(pattern.format(i), keep) for i in range(n_layers)]
    fwd += [(post.format(i), keep) for i in range(n_layers)]
    bwd = [(pattern.format(i), head_product(i)) for i in range(n_layers)]
    bwd += [(post.format(i), neuron_product(i)) for i in range(n_layers)]
    return fwd, bwd, heads, neurons


def _leaf_hook(act: Any, hook: Any) -> Any:
    return act.detach().requires_grad_(True)


def tl2_act_times_grad(model: Any, ids: list[int]) -> Result:
    """Forward/backward hooks on hook_pattern and hook_post only; logits at the last position.

    ``stop_at_layer=n_layers`` returns the residual before ``ln_final``; the objective applies
    ``ln_final`` and ``unembed`` to the last position only (TL computes all positions' logits
    otherwise, a T × d_vocab matmul forward and backward).
    """
    import torch

    n = model.cfg.n_layers
    fwd, bwd, heads, neurons = _product_hooks(
        n, "blocks.{}.attn.hook_pattern", "blocks.{}.mlp.hook_post"
    )
    with (
        warnings.catch_warnings(),
        torch.enable_grad(),
        model.hooks(fwd_hooks=[("hook_embed", _leaf_hook), *fwd], bwd_hooks=bwd),
    ):
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        resid = model(_batch(ids), stop_at_layer=n)
        logits = model.unembed(model.ln_final(resid[:, -1:]))
        (logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]).backward()
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


# --- TransformerLens 4.x (TransformerBridge over the HF model) ---------------------------------


def load_tlbridge(directory: str | Path) -> Any:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float32)
    bridge.eval()
    bridge.requires_grad_(False)
    return bridge


def _bridge_direction(bridge: Any, scale_last: Any) -> Any:
    hf = bridge.original_model
    w_u = hf.lm_head.weight
    return hf.model.norm.weight * (w_u[TARGET] - w_u[DISTRACTOR]) / scale_last


def tlbridge_dla(bridge: Any, ids: list[int]) -> Result:
    """``run_with_hooks`` keeping the last row of hook_z / hook_post / ln_final.hook_scale.

    ``logits_to_keep=1`` is passed through to the HF forward (one row of logits).
    """
    import torch

    hf = bridge.original_model
    hooks, z, a, scale = _last_row_hooks(
        bridge.cfg.n_layers, "blocks.{}.attn.hook_z", "blocks.{}.mlp.hook_post"
    )
    with torch.no_grad():
        bridge.run_with_hooks(
            _batch(ids), return_type=None, fwd_hooks=hooks, logits_to_keep=1, use_cache=False
        )
        direction = _bridge_direction(bridge, scale[0])
        n_heads = bridge.cfg.n_heads
        heads = [
            (zl.reshape(-1) * (hf.model.layers[i].self_attn.o_proj.weight.T @ direction))
            .view(n_heads, -1)
            .sum(-1)
            for i, zl in enumerate(z)
        ]
        neurons = [
            al * (hf.model.layers[i].mlp.down_proj.weight.T @ direction) for i, al in enumerate(a)
        ]
        return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


def tlbridge_act_times_grad(bridge: Any, ids: list[int]) -> Result:
    """The TL hook API on the bridge: forward/backward hooks on hook_pattern and hook_post."""
    import torch

    n = bridge.cfg.n_layers
    fwd, bwd, heads, neurons = _product_hooks(
        n, "blocks.{}.attn.hook_pattern", "blocks.{}.mlp.hook_post"
    )
    with (
        warnings.catch_warnings(),
        torch.enable_grad(),
        bridge.hooks(fwd_hooks=[("hook_embed", _leaf_hook), *fwd], bwd_hooks=bwd),
    ):
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits = bridge(_batch(ids), logits_to_keep=1, use_cache=False)
        (logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]).backward()
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


# --- nnsight ---------------------------------------------------------------------------------
# nnsight runs the body of a trace interleaved with the model and requires values to be requested
# in execution order; only .save()d values (or objects created outside the block) survive it.


def load_nnsight(directory: str | Path) -> Any:
    import torch
    from nnsight import TransformersModel

    model = TransformersModel(
        str(directory),
        task="text-generation",
        dispatch=True,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model._module.eval()
    model._module.requires_grad_(False)
    return model


def nnsight_dla(model: Any, ids: list[int]) -> Result:
    """Save the last row of each o_proj / down_proj input and the final norm's input, then stop."""
    import torch

    hf = model._module
    n = hf.config.num_hidden_layers
    z: list[Any] = []
    a: list[Any] = []
    x: list[Any] = []
    _set_attn(hf, "sdpa")
    with torch.no_grad():
        with model.trace(_batch(ids), use_cache=False) as tracer:
            for i in range(n):
                z.append(model.model.layers[i].self_attn.o_proj.input[0, -1].clone().save())
                a.append(model.model.layers[i].mlp.down_proj.input[0, -1].clone().save())
            x.append(model.model.norm.input[0, -1].clone().save())
            tracer.stop()  # nothing after the final norm's input is needed
        return _dla_from_last(hf, z, a, _final_direction(hf, x[0]))


def nnsight_act_times_grad(model: Any, ids: list[int]) -> Result:
    """Embedding output made the leaf; p·∂p and a·∂a computed inside ``obj.backward()``."""
    import torch

    hf = model._module
    n = hf.config.num_hidden_layers
    heads: list[Any] = [None] * n
    neurons: list[Any] = [None] * n
    _set_attn(hf, "eager")
    with model.trace(_batch(ids), use_cache=False, logits_to_keep=1):
        model.model.embed_tokens.output.requires_grad_(True)
        probs, posts = [], []
        for i in range(n):
            probs.append(model.model.layers[i].self_attn.output[1])
            posts.append(model.model.layers[i].mlp.down_proj.input)
        logits = model.output.logits
        objective = logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]
        with objective.backward():
            for i in reversed(range(n)):
                neurons[i] = (posts[i] * posts[i].grad)[0].detach().save()
                heads[i] = (probs[i] * probs[i].grad)[0].sum(-1).T.detach().save()
    return {"heads": torch.stack(heads), "neurons": torch.stack(neurons)}


# --- sides ------------------------------------------------------------------------------------

SIDES: dict[str, tuple[Callable[[str], Any], Callable[..., Result], Callable[..., Result]]] = {
    # side: (load(directory), dla(model, ids), act_times_grad(model, ids))
    "hand": (load_hf, hand_dla, hand_act_times_grad),
    "scalarlens": (load_scalarlens, scalarlens_dla, scalarlens_act_times_grad),
    "tl2": (load_tl2, tl2_dla, tl2_act_times_grad),
    "tlbridge": (load_tlbridge, tlbridge_dla, tlbridge_act_times_grad),
    "nnsight": (load_nnsight, nnsight_dla, nnsight_act_times_grad),
}
WORKLOADS = ("dla", "atg")


def run_side(side: str, model: Any, workload: str, ids: list[int]) -> Result:
    _, dla, atg = SIDES[side]
    return dla(model, ids) if workload == "dla" else atg(model, ids)


# --- agreement --------------------------------------------------------------------------------


def relative_difference(a: Any, b: Any) -> float:
    """``max |a − b| / max |b|`` (the scale of the values, not each entry's)."""
    import torch

    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worst_difference(ours: Result, reference: Result) -> float:
    return max(relative_difference(ours[k], reference[k]) for k in ("heads", "neurons"))


def _save_reference(path: Path, results: Mapping[str, Result]) -> None:
    from safetensors.torch import save_file

    save_file(
        {f"{w}/{k}": v.contiguous() for w, r in results.items() for k, v in r.items()}, str(path)
    )


def _load_reference(path: Path) -> dict[str, Result]:
    from safetensors.torch import load_file

    out: dict[str, Result] = {}
    for key, value in load_file(str(path)).items():
        workload, kind = key.split("/")
        out.setdefault(workload, {})[kind] = value
    return out


# --- workers (each run in its own process, in the side's venv) ---------------------------------


def _time_alternating(
    fns: Mapping[str, Callable[[], object]], runs: int, warm_up: bool = True
) -> dict[str, list[float]]:
    for fn in fns.values() if warm_up else ():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def _versions(sides: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers"]
    names += {
        "tl2": ["transformer-lens"],
        "tlbridge": ["transformer-lens"],
        "nnsight": ["nnsight"],
    }.get(sides[0], [])
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


def worker_time(
    directory: str, n_tokens: int, runs: int, reference: str, sides: list[str]
) -> dict[str, Any]:
    """Load each side, check it against the reference, then time the sides alternated.

    ``sides[0]`` is required; the others (ScalarLens) are skipped with the reason if they
    cannot load.  When ``reference`` does not exist yet, the first side's results become it.
    """
    vocab = _config(directory)["vocab_size"]
    ids = random_tokens(n_tokens, vocab)
    models: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for side in sides:
        try:
            models[side] = SIDES[side][0](directory)
        except Exception as error:
            if side == sides[0]:
                raise
            skipped[side] = f"{type(error).__name__}: {error}"[:400]
    results = {s: {w: run_side(s, m, w, ids) for w in WORKLOADS} for s, m in models.items()}
    ref_path = Path(reference)
    if not ref_path.exists():
        _save_reference(ref_path, results[sides[0]])
    ref = _load_reference(ref_path)
    agreement = {s: {w: worst_difference(results[s][w], ref[w]) for w in WORKLOADS} for s in models}
    for side, diffs in agreement.items():
        if max(diffs.values()) > RTOL:
            if side == sides[0]:
                raise AssertionError(f"{side} disagrees with the reference beyond {RTOL}: {diffs}")
            skipped[side] = f"disagrees with the reference beyond {RTOL}: {diffs}"
            del models[side]
    del results
    out: dict[str, Any] = {"agreement": agreement, "skipped": skipped, "versions": _versions(sides)}
    for workload in WORKLOADS:
        out[workload] = _time_alternating(
            {s: functools.partial(run_side, s, m, workload, ids) for s, m in models.items()},
            runs,
            warm_up=False,  # the agreement check above ran every side once already
        )
    return out


def _make_resident(model: Any) -> None:
    """Read every weight once, so that the baseline RSS includes the whole model.

    ``from_pretrained`` keeps safetensors weights memory-mapped: without this, the embedding
    rows a prompt touches page in during the measured run (with the kernel's readahead, ≈ 50 MiB
    for 128 random tokens of this model) and count as the workload's memory on HF-based sides.
    """
    import torch

    seen: set[int] = set()
    for name in ("", "model", "_module", "original_model"):
        try:
            module = getattr(model, name) if name else model
        except AttributeError:
            continue
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                float(tensor.detach().float().sum())


def worker_memory(directory: str, n_tokens: int, side: str, workload: str) -> dict[str, float]:
    model = SIDES[side][0](directory)
    _make_resident(model)
    vocab = _config(directory)["vocab_size"]
    run_side(side, model, workload, random_tokens(8, vocab, seed=2))  # warm-up
    ids = random_tokens(n_tokens, vocab)
    with PeakSampler() as sampler:
        result = run_side(side, model, workload, ids)
    del result
    live = sampler.live_above_baseline
    return {"bytes": float(sampler.above_baseline), "live": None if live is None else float(live)}


# --- driver -----------------------------------------------------------------------------------


def _spawn(python: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    out = subprocess.run(
        [python, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    shown = " ".join(a for a in args if not a.startswith(tempfile.gettempdir()))
    print(f"bench_families: {shown}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if out.returncode:
        raise RuntimeError(f"bench_families worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def peer_python(peer: str) -> tuple[str | None, str]:
    """The peer venv's python (made by its setup script if absent), or None and why not."""
    (script, *args), variable = PEERS[peer]
    if os.environ.get(variable):
        return os.environ[variable], ""
    setup = subprocess.run(
        ["bash", str(HERE / script), *args], capture_output=True, text=True, check=False
    )
    if setup.returncode:
        reason = (setup.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`benchmarks/{' '.join((script, *args))}` failed: `{reason}`"
    return setup.stdout.strip().splitlines()[-1], ""


WORKLOAD_LABELS = {
    "dla": "1. DLA, every head and neuron",
    "atg": "2. act×grad, every head and neuron",
}
# The targets for ScalarLens: time against the fastest peer and the hand-written
# baseline, DLA peak memory against the fastest peer.
TIME_TARGETS = {("dla", "peer"): "≤ 1.05×", ("atg", "peer"): "≤ 0.9×", ("atg", "hand"): "≤ 1.05×"}
MEMORY_TARGETS = {"dla": "≤ 0.5×"}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _time_section(
    n: int, timed: Mapping[str, dict[str, Any]], rows: list[str], summary: list[str]
) -> None:
    """Rows for one prompt length: each baseline with ScalarLens timed in the same process."""
    for workload in WORKLOADS:
        for side, t in timed.items():
            base = t[workload][side]
            row = f"| {WORKLOAD_LABELS[workload]} | {n} | {LABELS[side]} | {_fmt_s(base)} |"
            ours = t[workload].get("scalarlens")
            target = TIME_TARGETS.get((workload, "hand" if side == "hand" else "peer"), "")
            if ours:
                row += f" {_fmt_s(ours)} | {_ratio(ours, base)} | {target} |"
            else:
                row += " — | — | |"
            rows.append(row)
        peers = {s: _median(t[workload][s]) for s, t in timed.items() if s != "hand"}
        if peers:
            best = min(peers, key=peers.__getitem__)
            ours = timed[best][workload].get("scalarlens")
            versus = f"ScalarLens {_ratio(ours, timed[best][workload][best])}" if ours else ""
            summary.append(
                f"{WORKLOAD_LABELS[workload][3:]}, {n} tokens: fastest peer {LABELS[best]} "
                f"({peers[best]:.3f} s){'; ' + versus if versus else ''}"
            )


def main(
    runs: int = RUNS,
    shape: str = "llama-8l",
    n_tokens: tuple[int, ...] = N_TOKENS,
    peers: tuple[str, ...] = tuple(PEERS),
) -> str:
    pythons: dict[str, str] = {"hand": sys.executable}  # side -> the python it runs in
    notes: list[str] = []
    for peer in peers:
        python, reason = peer_python(peer)
        if python is None:
            notes.append(f"{LABELS[peer]}: skipped, {reason}.")
        else:
            pythons[peer] = python
    time_rows: list[str] = []
    memory_rows: list[str] = []
    summary: list[str] = []
    agreement: list[str] = []
    versions: dict[str, str] = {}
    skipped_next_to: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="scalarlens-families-") as tmp:
        directory = str(save_random_llama(Path(tmp) / shape, SHAPES[shape]))
        for n in n_tokens:
            reference = str(Path(tmp) / f"reference-{n}.safetensors")
            timed: dict[str, dict[str, Any]] = {}
            for side, python in pythons.items():  # "hand" first: it writes the reference
                args = ("time", directory, str(n), str(runs), reference, side, "scalarlens")
                try:
                    t = _spawn(python, *args)
                except RuntimeError as error:
                    if side == "hand":
                        raise
                    notes.append(f"{LABELS[side]}, {n} tokens: failed: `{_last_line(error)}`")
                    continue
                timed[side] = t
                versions[side] = t["versions"]
                if "scalarlens" in t["skipped"] and side not in skipped_next_to:
                    skipped_next_to.add(side)
                    notes.append(
                        f"ScalarLens not run next to {LABELS[side]}: "
                        f"{t['skipped']['scalarlens'][:200]}"
                    )
                agreement += [
                    f"{LABELS[s]} {n} tokens: DLA {d['dla']:.1e}, act×grad {d['atg']:.1e}"
                    for s, d in t["agreement"].items()
                    if s != "hand" and (s != "scalarlens" or side == "hand")
                ]
            _time_section(n, timed, time_rows, summary)

            with_scalarlens = "scalarlens" in timed.get("hand", {}).get("dla", {})
            for workload in WORKLOADS:
                cases = [(side, side) for side in timed]
                if with_scalarlens:
                    cases.append(("scalarlens", "hand"))  # ScalarLens in the main venv
                figures: dict[str, float] = {}
                live: dict[str, float | None] = {}
                for case, venv in cases:
                    args = ("memory", directory, str(n), case, workload)
                    try:
                        measured = _spawn(pythons[venv], *args)
                        figures[case], live[case] = measured["bytes"], measured.get("live")
                    except RuntimeError as error:
                        notes.append(
                            f"memory of {LABELS[case]}, {WORKLOAD_LABELS[workload]}, {n} tokens: "
                            f"failed: `{_last_line(error)}`"
                        )
                ours = figures.pop("scalarlens", None)
                for side, base in figures.items():
                    ratio = f"{ours / base:.2f}×" if ours is not None and base > 0 else "—"
                    target = MEMORY_TARGETS.get(workload, "") if side != "hand" else ""
                    memory_rows.append(
                        f"| {WORKLOAD_LABELS[workload]} | {n} | {LABELS[side]} | {_mib(base)} | "
                        f"{_mib(ours) if ours is not None else '—'} | {ratio} | "
                        f"{live_cell(live.get('scalarlens'), live.get(side), 2)} | {target} |"
                    )
    dims = SHAPES[shape]
    lines = [
        "### Hugging Face families: Llama against TransformerLens, nnsight and hand-written torch "
        "(bench_families.py)",
        "",
        f"A random Llama-architecture model ({dims['num_hidden_layers']} layers, d_model "
        f"{dims['hidden_size']}, {dims['num_attention_heads']} heads / "
        f"{dims['num_key_value_heads']} KV heads, d_mlp {dims['intermediate_size']}, vocabulary "
        f"{dims['vocab_size']}) saved once and loaded by every side; float32, one prompt, "
        f"objective logit[{TARGET}] − logit[{DISTRACTOR}] at the last token. Each peer runs in its "
        "own venv ("
        + "; ".join(f"{LABELS[side]}: {v}" for side, v in versions.items())
        + f"). Times: median of {runs} alternated runs after a warm-up (min–max); ScalarLens is "
        "timed in the same process as each baseline (the ratio is of medians, with the range of "
        "per-run ratios). Memory: peak RSS above the loaded model, fresh process per figure "
        "(ScalarLens: the main venv); the live-allocation column is the peak of glibc's in-use "
        "malloc bytes over the same run (freed memory the allocator keeps is not counted).",
        "",
        "| workload | tokens | baseline | baseline time | ScalarLens | ratio | target |",
        "|---|---|---|---|---|---|---|",
        *time_rows,
        "",
        "| peak memory above the model | tokens | baseline | baseline peak | ScalarLens | ratio "
        "| live allocations: ScalarLens / baseline | target |",
        "|---|---|---|---|---|---|---|---|",
        *memory_rows,
        "",
        *(f"- {line}" for line in summary),
        "- Agreement with the hand-written reference (main venv), checked before timing (max "
        "|difference| / max |value|, float32): "
        + ("; ".join(agreement) or "no other side ran")
        + ".",
        *(f"- {note}" for note in notes),
        "",
    ]
    return "\n".join(lines)


def _last_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[-1][:300]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "time":
        directory, n, runs, reference, *sides = sys.argv[2:]
        print(json.dumps(worker_time(directory, int(n), int(runs), reference, sides)))
    elif len(sys.argv) > 1 and sys.argv[1] == "memory":
        print(json.dumps(worker_memory(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--quick":
        print(main(runs=1, shape="tiny", n_tokens=(16,)))
    elif len(sys.argv) > 2 and sys.argv[1] == "--out":
        Path(sys.argv[2]).write_text(main())
    else:
        print(main())
