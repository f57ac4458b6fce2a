"""ScalarLens against TransformerLens 2.x and hand-written torch, on the same random weights.

Runs inside the TransformerLens venv (``benchmarks/setup_tl_venv.sh``), where ScalarLens is
installed editable next to ``transformer-lens<3``.  One random Hugging Face GPT-2 per shape
(GPT-2-small: 12 layers, d_model 768, 12 heads, d_mlp 3072; and a 2-layer model: d_model 256,
4 heads, d_mlp 1024; vocabulary 50257 for both) is saved once as safetensors; ScalarLens loads it
with ``load_gpt2_checkpoint`` and TransformerLens with ``convert_gpt2_weights`` into a
``HookedTransformer`` (no weight processing: ``fold_ln``, ``center_writing_weights``,
``center_unembed`` and ``fold_value_biases`` off, so both hold the very same weights).

Workloads (objective: the logit difference ``logit[target] − logit[distractor]`` at the last
token):

1. Direct logit attribution of every head and every neuron.  ScalarLens:
   ``derive(attn.write_to_final_residual_grad_per_token, mlp.write_to_final_residual_grad,
   detach_final_ln_scale=True)``.  TransformerLens, its documented recipe: ``run_with_cache``
   (cache everything, with ``use_attn_result`` so head results are made in the forward),
   ``stack_head_results`` / ``stack_neuron_results`` at the last position with
   ``apply_ln=True`` (the cached final-LN scale), dotted with ``γ_f ⊙ (W_U[:, a] − W_U[:, b])``.
   Both sides run under their normal gradient mode: TransformerLens under ``torch.no_grad``.
   TransformerLens used frugally: ``run_with_cache`` with a ``names_filter`` for ``hook_z`` and
   ``hook_post`` only, ``pos_slice=-1`` and ``stop_at_layer=n_layers`` (no final LayerNorm, no
   unembedding; the returned residual gives the final-LN scale at the last position), head and
   neuron direct effects from ``z[-1]·W_O`` and ``post[-1]·W_out`` against the LN-centred
   direction, divided by that scale (no ``T×F×D`` stack).  The physical limit: the forward
   through the blocks without the unembedding, under ``torch.no_grad`` — ScalarLens's
   ``GPT2Model(..., unembed=False)`` and TransformerLens ``stop_at_layer=n_layers`` are both
   timed and the faster one is the limit.
2. act×grad for every head (``Σ_s p·∂p``, ScalarLens ``attn.act_times_grad_per_token``) and every
   neuron (``a·∂a``, ``mlp.act_times_grad``).  TransformerLens: ``get_caching_hooks(incl_bwd=True)``
   (cache every activation and its gradient) around a forward and the objective's backward, with
   the weights frozen (no parameter gradients; the embedding output is made a leaf), then
   ``hook_pattern · hook_pattern_grad`` and ``hook_post · hook_post_grad``.  Hand-written torch:
   ScalarLens's own ``GPT2Model`` with a hook that keeps just the probabilities and MLP
   activations and their ``.grad``.  Also: ScalarLens with ``DstConfig(memory="low")``
   (per-layer recomputation in the backward), and the hand-written torch baseline with the same
   one-row unembedding as ScalarLens's engine (``GPT2Model(..., rows=[T−1])``: ``B×1×V`` logits
   instead of ``B×T×V``), a separate row.  Peak memory of act×grad (default, low,
   TransformerLens) is also reported as a curve over 128 / 512 / 2,048 tokens for GPT-2-small.
6. Peak memory of ``mlp.write_to_final_residual_grad`` (all neurons, all layers) against
   TransformerLens's cache for the same quantity (neuron DLA as in workload 1).

Every time is the median of ``RUNS`` alternated runs after a warm-up (min–max in brackets; the
ratio's range is over per-run pairs).  Every memory figure is the peak resident set size above
the loaded model's baseline, each in a fresh process after a short warm-up forward (and backward
where the case has one), sampled every millisecond (``bench_capture.PeakSampler``).  Before
timing, each workload checks that the sides agree.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_capture import PeakSampler, live_cell  # noqa: E402

if TYPE_CHECKING:
    import torch
    from scalarlens.models import GPT2Adapter
    from transformer_lens import HookedTransformer

VOCAB, N_CTX = 50257, 2048  # 2,048: the memory curve's longest prompt
SHAPES: dict[str, dict[str, int]] = {
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": 3072},
    "2-layer": {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_inner": 1024},
}
N_TOKENS = (128, 512)
CURVE_SHAPE, CURVE_EXTRA_TOKENS = "gpt2-small", (2048,)  # memory curve: N_TOKENS + these
# TransformerLens act×grad at 2,048 tokens caches every activation and gradient, attention
# scores and patterns included (14.4 GiB above the model measured, 15.7 GiB peak RSS); it
# is only run when this much memory is available.
TL_CURVE_NEED_GIB = 18.0
RUNS = 5
TARGET, DISTRACTOR = 11, 12
HEAD_DE = "attn.write_to_final_residual_grad_per_token"
NEURON_DE = "mlp.write_to_final_residual_grad"
HEAD_ATG = "attn.act_times_grad_per_token"
NEURON_ATG = "mlp.act_times_grad"
# Relative agreement (max |difference| / max |value|) required before anything is timed.
RTOL = {"float32": 1e-4, "float64": 1e-10}

Pair = tuple["torch.Tensor", "torch.Tensor"]  # (heads, neurons)


# --- the same random weights for everyone -----------------------------------------------------


def save_random_gpt2(directory: str | Path, shape: Mapping[str, int], seed: int = 0) -> Path:
    """A random ``GPT2LMHeadModel`` saved as safetensors, with non-trivial LN and biases.

    Hugging Face initialises LayerNorm to (1, 0) and biases to 0; we randomise them so that the
    final LayerNorm's γ and every bias take part in the comparison.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    options: dict[str, Any] = {"attn_implementation": "eager", **shape}
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_CTX,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **options,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_(
                    (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param)
                )
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def load_scalarlens(directory: str | Path, dtype: torch.dtype | None = None) -> GPT2Adapter:
    import torch
    from scalarlens.models import load_gpt2_checkpoint

    return load_gpt2_checkpoint(directory, dtype=dtype or torch.float32)


def load_transformer_lens(
    directory: str | Path, dtype: torch.dtype | None = None
) -> HookedTransformer:
    """``HookedTransformer`` holding exactly the checkpoint's weights (no folding/centering)."""
    import torch
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(directory), attn_implementation="eager")
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
        init_weights=False,
        default_prepend_bos=False,
        dtype=dtype or torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    state = {k: v.to(cfg.dtype) for k, v in convert_gpt2_weights(hf, cfg).items()}
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.eval()
    del hf
    return model


def random_tokens(n: int, seed: int = 1) -> list[int]:
    import torch

    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- workload 1: direct logit attribution -----------------------------------------------------


def scalarlens_dla(adapter: GPT2Adapter, tokens: list[int], *, heads: bool = True) -> Pair:
    """Per-head and per-neuron direct effect at the last token, ``L×H`` and ``L×F``."""
    import scalarlens
    import torch

    names = [HEAD_DE, NEURON_DE] if heads else [NEURON_DE]
    store = scalarlens.derive(
        adapter,
        [tokens],
        names,
        target=TARGET,
        distractor=DISTRACTOR,
        config=scalarlens.DstConfig(detach_final_ln_scale=True),
    )
    layers = range(adapter.dims.n_layers)
    h = torch.stack([store.get(HEAD_DE, layer)[-1] for layer in layers]) if heads else None
    n = torch.stack([store.get(NEURON_DE, layer)[-1] for layer in layers])
    return (h if h is not None else torch.empty(0)), n


def _logit_diff_direction(model: HookedTransformer) -> torch.Tensor:
    # Without fold_ln the final LayerNorm's γ is still a separate parameter: apply_ln_to_stack
    # centres and divides by the cached scale, γ is folded into the direction here.
    direction: torch.Tensor = (model.W_U[:, TARGET] - model.W_U[:, DISTRACTOR]) * model.ln_final.w
    return direction


def transformer_lens_dla(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    heads: bool = True,
    names_filter: Callable[[str], bool] | None = None,
) -> Pair:
    """TransformerLens's DLA recipe: cache, stack results at the last position, apply final LN."""
    import torch

    cfg = model.cfg
    model.set_use_attn_result(heads)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names_filter)
        direction = _logit_diff_direction(model)
        n = cache.stack_neuron_results(layer=-1, pos_slice=-1, apply_ln=True) @ direction
        h = torch.empty(0)
        if heads:
            h = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True) @ direction
            h = h[:, 0].reshape(cfg.n_layers, cfg.n_heads)
    return h, n[:, 0].reshape(cfg.n_layers, cfg.d_mlp)


def tl_neuron_filter(name: str) -> bool:
    """The only hooks neuron DLA reads (a frugal TransformerLens user's ``names_filter``)."""
    return name.endswith("mlp.hook_post") or name == "ln_final.hook_scale"


def tl_frugal_filter(name: str) -> bool:
    """What frugal head and neuron DLA reads: ``hook_z`` and ``hook_post`` (final LN: computed)."""
    return name.endswith("attn.hook_z") or name.endswith("mlp.hook_post")


def transformer_lens_dla_frugal(
    model: HookedTransformer, tokens: torch.Tensor, *, heads: bool = True
) -> Pair:
    """TransformerLens used frugally: filtered cache at the last position, no unembedding.

    ``stop_at_layer=n_layers`` returns the residual before the final LayerNorm, whose scale at
    the last position is computed from it (TransformerLens's LN: centre, ``sqrt(mean(x²)+ε)``).
    LN centring is moved onto the direction (``(w − mean w)·d = w·(d − mean d)``), so each head's
    ``z[-1]·W_O`` and each neuron's ``W_out`` row is dotted once, never stacked over positions.
    """
    import torch

    cfg = model.cfg
    model.set_use_attn_result(False)
    with torch.no_grad():
        resid, cache = model.run_with_cache(
            tokens, names_filter=tl_frugal_filter, pos_slice=-1, stop_at_layer=cfg.n_layers
        )
        x = resid[0, -1]
        x = x - x.mean()
        scale = (x.pow(2).mean() + cfg.eps).sqrt()
        direction = _logit_diff_direction(model)
        direction = (direction - direction.mean()) / scale
        h_rows, n_rows = [], []
        for layer in range(cfg.n_layers):
            block = model.blocks[layer]
            if heads:
                z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]  # H×dh, last position
                h_rows.append((z * (block.attn.W_O @ direction)).sum(-1))
            post = cache[f"blocks.{layer}.mlp.hook_post"][0, -1]  # F, last position
            n_rows.append(post * (block.mlp.W_out @ direction))
    return (torch.stack(h_rows) if heads else torch.empty(0)), torch.stack(n_rows)


def scalarlens_forward_limit(adapter: GPT2Adapter, tokens: torch.Tensor) -> None:
    """The physical limit of DLA: ScalarLens's ``GPT2Model`` through the blocks, no unembedding."""
    import torch

    with torch.no_grad():
        adapter.model(tokens, unembed=False)


def transformer_lens_forward_limit(model: HookedTransformer, tokens: torch.Tensor) -> None:
    """The same limit in TransformerLens: ``stop_at_layer=n_layers``, no hooks."""
    import torch

    model.set_use_attn_result(False)
    with torch.no_grad():
        model(tokens, stop_at_layer=model.cfg.n_layers)


# --- workload 2: act×grad ---------------------------------------------------------------------


def scalarlens_act_times_grad(
    adapter: GPT2Adapter, tokens: list[int], memory: str = "default"
) -> Pair:
    """``Σ_s p·∂p`` per (token, head) and ``a·∂a`` per (token, neuron): ``L×T×H``, ``L×T×F``.

    ``memory="low"``: per-layer recomputation in the backward pass (identical results).
    """
    import scalarlens
    import torch

    store = scalarlens.derive(
        adapter,
        [tokens],
        [HEAD_ATG, NEURON_ATG],
        target=TARGET,
        distractor=DISTRACTOR,
        config=scalarlens.DstConfig(memory=memory),
    )
    layers = range(adapter.dims.n_layers)
    return (
        torch.stack([store.get(HEAD_ATG, layer) for layer in layers]),
        torch.stack([store.get(NEURON_ATG, layer) for layer in layers]),
    )


def _leaf(act: torch.Tensor, hook: object) -> torch.Tensor:
    return act.detach().requires_grad_(True)


def transformer_lens_act_times_grad(model: HookedTransformer, tokens: torch.Tensor) -> Pair:
    """Cache every activation and gradient (``get_caching_hooks(incl_bwd=True)``), then multiply.

    The weights are frozen, and the embedding output made a leaf, so that the backward computes
    activation gradients only (no parameter gradients): TransformerLens at its fastest.
    """
    import torch

    cfg = model.cfg
    model.set_use_attn_result(False)
    model.requires_grad_(False)
    cache, fwd, bwd = model.get_caching_hooks(incl_bwd=True)
    with (
        warnings.catch_warnings(),
        torch.enable_grad(),
        model.hooks(fwd_hooks=[("hook_embed", _leaf), *fwd], bwd_hooks=bwd),
    ):
        # hook_embed's own backward hook has no input needing a gradient; torch says so.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits = model(tokens)
        (logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]).backward()
    with torch.no_grad():
        heads = torch.stack(
            [
                (
                    cache[f"blocks.{i}.attn.hook_pattern"]
                    * cache[f"blocks.{i}.attn.hook_pattern_grad"]
                )
                .sum(-1)[0]
                .T
                for i in range(cfg.n_layers)
            ]
        )
        neurons = torch.stack(
            [
                (cache[f"blocks.{i}.mlp.hook_post"] * cache[f"blocks.{i}.mlp.hook_post_grad"])[0]
                for i in range(cfg.n_layers)
            ]
        )
    return heads, neurons


def hand_act_times_grad(
    adapter: GPT2Adapter, tokens: torch.Tensor, *, one_row: bool = False
) -> Pair:
    """Plain torch on the same ``GPT2Model``: keep p and a, ``.grad`` them, multiply.

    ``one_row``: unembed only the last position (``rows=[T−1]``, ``1×1×V`` logits), the
    objective-aware unembedding ScalarLens's engine uses; otherwise the full ``1×T×V`` logits.
    """
    import torch
    from scalarlens import ActivationLocationType as ALT

    probs_name, post_name = ALT.ATTN_QK_PROBS.value, ALT.MLP_POST_ACT.value
    kept: dict[tuple[str, int | None], torch.Tensor] = {}

    def hook(name: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        if name == ALT.RESID_POST_EMBEDDING.value:
            return t.detach().requires_grad_(True)
        if name == probs_name or name == post_name:
            t.retain_grad()
            kept[(name, layer)] = t
        return t

    with torch.enable_grad():
        if one_row:
            last = torch.tensor([tokens.shape[1] - 1])
            logits = adapter.model(tokens, hook=hook, rows=last)
        else:
            logits = adapter.model(tokens, hook=hook)
        assert logits is not None
        (logits[0, -1, TARGET] - logits[0, -1, DISTRACTOR]).backward()
    n = adapter.dims.n_layers
    with torch.no_grad():
        heads = torch.stack(
            [
                (kept[probs_name, layer] * kept[probs_name, layer].grad)[0].sum(1)  # type: ignore[operator]
                for layer in range(n)
            ]
        )
        neurons = torch.stack(
            [
                (kept[post_name, layer] * kept[post_name, layer].grad)[0]  # type: ignore[operator]
                for layer in range(n)
            ]
        )
    return heads, neurons


# --- agreement --------------------------------------------------------------------------------


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|`` (the scale of the values, not each entry's)."""
    import torch

    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worst_difference(ours: Pair, theirs: Pair) -> float:
    return max(relative_difference(x, y) for x, y in zip(ours, theirs, strict=True) if x.numel())


# --- workers (each run in its own process) ----------------------------------------------------


def _time_alternating(fns: Mapping[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def worker_time(directory: str, n_tokens: int, runs: int) -> dict[str, Any]:
    import torch

    adapter = load_scalarlens(directory)
    tl = load_transformer_lens(directory)
    ids = random_tokens(n_tokens)
    batch = torch.tensor([ids])
    rtol = RTOL["float32"]
    out: dict[str, Any] = {}

    dla_ours = scalarlens_dla(adapter, ids)
    atg_ours = scalarlens_act_times_grad(adapter, ids)
    out["agreement"] = agree = {
        "dla": worst_difference(dla_ours, transformer_lens_dla(tl, batch)),
        "dla_frugal": worst_difference(dla_ours, transformer_lens_dla_frugal(tl, batch)),
        "atg_tl": worst_difference(atg_ours, transformer_lens_act_times_grad(tl, batch)),
        "atg_hand": worst_difference(atg_ours, hand_act_times_grad(adapter, batch)),
        "atg_hand_one_row": worst_difference(
            atg_ours, hand_act_times_grad(adapter, batch, one_row=True)
        ),
        "atg_low": worst_difference(atg_ours, scalarlens_act_times_grad(adapter, ids, "low")),
    }
    if max(agree.values()) > rtol:
        raise AssertionError(f"sides disagree beyond {rtol}: {agree}")

    out["dla"] = _time_alternating(
        {
            "scalarlens": lambda: scalarlens_dla(adapter, ids),
            "transformer_lens": lambda: transformer_lens_dla(tl, batch),
            "transformer_lens_frugal": lambda: transformer_lens_dla_frugal(tl, batch),
            "limit_scalarlens": lambda: scalarlens_forward_limit(adapter, batch),
            "limit_transformer_lens": lambda: transformer_lens_forward_limit(tl, batch),
        },
        runs,
    )
    out["atg"] = _time_alternating(
        {
            "scalarlens": lambda: scalarlens_act_times_grad(adapter, ids),
            "scalarlens_low": lambda: scalarlens_act_times_grad(adapter, ids, "low"),
            "transformer_lens": lambda: transformer_lens_act_times_grad(tl, batch),
            "hand": lambda: hand_act_times_grad(adapter, batch),
            "hand_one_row": lambda: hand_act_times_grad(adapter, batch, one_row=True),
        },
        runs,
    )
    return out


MEMORY_CASES: dict[str, tuple[str, Callable[[Any, list[int]], object]]] = {
    # name: (which model to load, what to run)
    "sl_dla": ("scalarlens", lambda m, ids: scalarlens_dla(m, ids)),
    "tl_dla": ("tl", lambda m, ids: transformer_lens_dla(m, _batch(ids))),
    "tl_dla_frugal": ("tl", lambda m, ids: transformer_lens_dla_frugal(m, _batch(ids))),
    "sl_atg": ("scalarlens", lambda m, ids: scalarlens_act_times_grad(m, ids)),
    "sl_atg_low": ("scalarlens", lambda m, ids: scalarlens_act_times_grad(m, ids, "low")),
    "tl_atg": ("tl", lambda m, ids: transformer_lens_act_times_grad(m, _batch(ids))),
    "hand_atg": ("scalarlens", lambda m, ids: hand_act_times_grad(m, _batch(ids))),
    "hand_atg_one_row": (
        "scalarlens",
        lambda m, ids: hand_act_times_grad(m, _batch(ids), one_row=True),
    ),
    "sl_neuron_de": ("scalarlens", lambda m, ids: scalarlens_dla(m, ids, heads=False)),
    "tl_neuron_de": ("tl", lambda m, ids: transformer_lens_dla(m, _batch(ids), heads=False)),
    "tl_neuron_de_filtered": (
        "tl",
        lambda m, ids: transformer_lens_dla(
            m, _batch(ids), heads=False, names_filter=tl_neuron_filter
        ),
    ),
}


def _batch(ids: list[int]) -> torch.Tensor:
    import torch

    return torch.tensor([ids])


def worker_memory(directory: str, n_tokens: int, case: str) -> dict[str, float]:
    side, fn = MEMORY_CASES[case]
    model = load_scalarlens(directory) if side == "scalarlens" else load_transformer_lens(directory)
    fn(model, random_tokens(8, seed=2))  # warm-up: one-time library set-up is not the workload
    ids = random_tokens(n_tokens)
    with PeakSampler() as sampler:
        result = fn(model, ids)
    del result
    live = sampler.live_above_baseline
    return {"bytes": float(sampler.above_baseline), "live": None if live is None else float(live)}


# --- driver -----------------------------------------------------------------------------------


def _spawn(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench_peers worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _fmt_s(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f})"


def _ratio(ours: list[float], base: list[float]) -> str:
    per_run = [o / b for o, b in zip(ours, base, strict=True)]
    return (
        f"{statistics.median(ours) / statistics.median(base):.2f}× "
        f"({min(per_run):.2f}–{max(per_run):.2f})"
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _versions() -> str:
    from importlib.metadata import version

    import torch
    import transformer_lens  # noqa: F401

    return (
        f"TransformerLens {version('transformer-lens')}, transformers "
        f"{version('transformers')}, torch {torch.__version__}"
    )


def _mem_available_gib() -> float:
    """``MemAvailable`` from ``/proc/meminfo`` (0 when unreadable: then nothing big is run)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _time_rows(
    shape: str, n: int, dla: dict[str, list[float]], atg: dict[str, list[float]]
) -> list[str]:
    limits = {
        "ScalarLens `GPT2Model(unembed=False)`": dla["limit_scalarlens"],
        "TransformerLens `stop_at_layer=n_layers`": dla["limit_transformer_lens"],
    }
    (limit_name, limit), (other_name, other) = sorted(
        limits.items(), key=lambda item: _median(item[1])
    )
    rows = [
        (
            "1. DLA, every head and neuron",
            dla["scalarlens"],
            "TransformerLens",
            dla["transformer_lens"],
            "≤ 1.0× (aim 0.7×)",
        ),
        (
            "1. DLA, every head and neuron",
            dla["scalarlens"],
            "TransformerLens frugal (`hook_z`, `hook_post`, last position, `stop_at_layer`)",
            dla["transformer_lens_frugal"],
            "≤ 1.0×",
        ),
        (
            "1. DLA, every head and neuron",
            dla["scalarlens"],
            f"limit: forward through the blocks, no unembedding, {limit_name} "
            f"(faster; {other_name} {_median(other):.3f} s)",
            limit,
            "≤ 1.05×",
        ),
        (
            "2. act×grad, every head and neuron",
            atg["scalarlens"],
            "TransformerLens",
            atg["transformer_lens"],
            "≤ 0.7×",
        ),
        (
            "2. act×grad, every head and neuron",
            atg["scalarlens"],
            "hand-written torch",
            atg["hand"],
            "≤ 0.8×",
        ),
        (
            "2. act×grad, every head and neuron",
            atg["scalarlens"],
            "hand-written torch, one-row unembedding",
            atg["hand_one_row"],
            "",
        ),
        (
            '2. act×grad, `memory="low"`',
            atg["scalarlens_low"],
            "ScalarLens default mode",
            atg["scalarlens"],
            "≤ 1.4×",
        ),
    ]
    return [
        f"| {label} | {shape} | {n} | {_fmt_s(ours)} | {base_label} {_fmt_s(base)} | "
        f"{_ratio(ours, base)} | {target} |"
        for label, ours, base_label, base, target in rows
    ]


# (label, ours, baseline, baseline label, target) for each memory row.
MEMORY_ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("1. DLA, every head and neuron", "sl_dla", "tl_dla", "TransformerLens", "≤ 0.5×"),
    ("1. DLA, every head and neuron", "sl_dla", "tl_dla_frugal", "TransformerLens frugal", ""),
    ("2. act×grad, every head and neuron", "sl_atg", "tl_atg", "TransformerLens", "≤ 0.5×"),
    ("2. act×grad, every head and neuron", "sl_atg", "hand_atg", "hand-written torch", ""),
    (
        "2. act×grad, every head and neuron",
        "sl_atg",
        "hand_atg_one_row",
        "hand-written torch, one-row unembedding",
        "",
    ),
    ('2. act×grad, `memory="low"`', "sl_atg_low", "tl_atg", "TransformerLens", "≤ 0.35× at 512"),
    ('2. act×grad, `memory="low"`', "sl_atg_low", "sl_atg", "ScalarLens default mode", ""),
    (
        "6. `mlp.write_to_final_residual_grad`",
        "sl_neuron_de",
        "tl_neuron_de",
        "TransformerLens, cache everything",
        "≤ 0.5×",
    ),
    (
        "6. `mlp.write_to_final_residual_grad`",
        "sl_neuron_de",
        "tl_neuron_de_filtered",
        "TransformerLens, `names_filter` (post, ln_final)",
        "",
    ),
)
CURVE_CASES = ("sl_atg", "sl_atg_low", "tl_atg")


def _log(message: str) -> None:
    print(f"[bench_peers] {message}", file=sys.stderr, flush=True)


def main(
    runs: int = RUNS,
    shapes: tuple[str, ...] = tuple(SHAPES),
    n_tokens: tuple[int, ...] = N_TOKENS,
    curve_extra: tuple[int, ...] = CURVE_EXTRA_TOKENS,
) -> str:
    started = time.perf_counter()
    time_rows: list[str] = []
    memory_rows: list[str] = []
    agreement: list[str] = []
    curve: dict[int, dict[str, float | None]] = {}
    curve_notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scalarlens-peers-") as tmp:
        for shape in shapes:
            directory = str(save_random_gpt2(Path(tmp) / shape, SHAPES[shape]))
            for n in n_tokens:
                _log(f"{shape}, {n} tokens: timing")
                t = _spawn("time", directory, str(n), str(runs))
                a = t["agreement"]
                agreement.append(
                    f"{shape}, {n} tokens: DLA {a['dla']:.1e} (frugal TransformerLens "
                    f"{a['dla_frugal']:.1e}), act×grad vs TransformerLens {a['atg_tl']:.1e}, "
                    f"vs hand-written {a['atg_hand']:.1e} (one-row {a['atg_hand_one_row']:.1e}), "
                    f'`memory="low"` vs default {a["atg_low"]:.1e}'
                )
                time_rows.extend(_time_rows(shape, n, t["dla"], t["atg"]))

                _log(f"{shape}, {n} tokens: memory")
                measured = {
                    case: _spawn("memory", directory, str(n), case) for case in MEMORY_CASES
                }
                mem = {case: m["bytes"] for case, m in measured.items()}
                for label, ours, base, base_label, target in MEMORY_ROWS:
                    live = live_cell(measured[ours].get("live"), measured[base].get("live"))
                    memory_rows.append(
                        f"| {label} | {shape} | {n} | {_mib(mem[ours])} | {base_label} "
                        f"{_mib(mem[base])} | {mem[ours] / mem[base]:.3f}× | {live} | {target} |"
                    )
                if shape == CURVE_SHAPE:
                    curve[n] = {case: mem[case] for case in CURVE_CASES}
            if shape != CURVE_SHAPE:
                continue
            for n in curve_extra:
                _log(f"{shape}, {n} tokens: memory curve")
                point: dict[str, float | None] = {}
                for case in CURVE_CASES:
                    available = _mem_available_gib()
                    if case.startswith("tl_") and available < TL_CURVE_NEED_GIB:
                        point[case] = None
                        curve_notes.append(
                            f"TransformerLens at {n} tokens not run: {available:.1f} GiB "
                            f"available, it needs ≈ {TL_CURVE_NEED_GIB:.0f} GiB"
                        )
                        continue
                    point[case] = _spawn("memory", directory, str(n), case)["bytes"]
                curve[n] = point
    minutes = (time.perf_counter() - started) / 60

    def cell(value: float | None) -> str:
        return "—" if value is None else _mib(value)

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:.3f}×"

    curve_rows = [
        f"| {n} | {cell(p['sl_atg'])} | {cell(p['sl_atg_low'])} | {cell(p['tl_atg'])} | "
        f"{ratio(p['sl_atg'], p['tl_atg'])} | {ratio(p['sl_atg_low'], p['tl_atg'])} | "
        f"{ratio(p['sl_atg_low'], p['sl_atg'])} |"
        for n, p in sorted(curve.items())
    ]
    lines = [
        "### Peers: TransformerLens and hand-written torch (bench_peers.py)",
        "",
        f"Random weights saved once per shape and loaded by both libraries ({_versions()}); "
        "float32, one prompt, objective logit[11] − logit[12] at the last token. "
        f"Times: median of {runs} alternated runs after a warm-up (min–max); the ratio is of "
        "medians, with the range of per-run ratios. Memory: peak RSS above the loaded model, "
        "fresh process per figure, after an 8-token warm-up; the live-allocation column is the "
        "peak of glibc's in-use malloc bytes over the same run, which does not count freed "
        "memory the allocator keeps (so it does not depend on what the warm-up freed). "
        f"This section took {minutes:.1f} min.",
        "",
        "| workload | model | tokens | ScalarLens | baseline | ratio | target |",
        "|---|---|---|---|---|---|---|",
        *time_rows,
        "",
        "| peak memory above the model | model | tokens | ScalarLens | baseline | ratio | "
        "live allocations: ScalarLens / baseline | target |",
        "|---|---|---|---|---|---|---|---|",
        *memory_rows,
        "",
    ]
    if curve_rows:
        lines += [
            f"act×grad of every head and neuron, peak memory above the model by prompt length "
            f"({CURVE_SHAPE}; 128 and 512 are the figures above, longer prompts measured the "
            "same way, memory only):",
            "",
            '| tokens | ScalarLens default | ScalarLens `memory="low"` | TransformerLens | '
            "default / TL | low / TL | low / default |",
            "|---|---|---|---|---|---|---|",
            *curve_rows,
            "",
        ]
        if curve_notes:
            lines += ["; ".join(curve_notes) + ".", ""]
    lines += [
        "Agreement checked before timing (max |difference| / max |value|, float32): "
        + "; ".join(agreement)
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "time":
        print(json.dumps(worker_time(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "memory":
        print(json.dumps(worker_memory(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--out", type=Path, help="write the Markdown section here")
        parser.add_argument("--runs", type=int, default=RUNS)
        parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
        parser.add_argument("--tokens", nargs="+", type=int, default=list(N_TOKENS))
        parser.add_argument(
            "--curve-tokens",
            nargs="*",
            type=int,
            default=list(CURVE_EXTRA_TOKENS),
            help="longer prompts for the act×grad memory curve (gpt2-small)",
        )
        args = parser.parse_args()
        text = main(args.runs, tuple(args.shapes), tuple(args.tokens), tuple(args.curve_tokens))
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
