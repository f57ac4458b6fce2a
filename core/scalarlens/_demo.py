"""``scalarlens demo``: why does the bundled model predict token A rather than token B?

On a repeated word sequence the bundled ``tiny-induction`` model must copy the token that
followed the previous occurrence of the current token.  The demo ranks attention heads and
MLP neurons by estimated total effect (activation × gradient) and by direct effect (write
projected on the objective's gradient at the final residual) on the target-minus-distractor
logit difference, prints both tables and draws one figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ._config import DstConfig
from ._model import ModelAdapter
from ._report import _pyplot, _token_heatmap, fit_titles, format_table
from ._store import DerivedScalarStore

DEMO_PROMPT = "the old king saw a red fox and one happy dog ran to the big green tree"
HEAD_EFFECT = "attn.act_times_grad_per_token"
HEAD_DIRECT = "attn.write_to_final_residual_grad_per_token"
NEURON_EFFECT = "mlp.act_times_grad"
NEURON_DIRECT = "mlp.write_to_final_residual_grad"
DEMO_DSTS = (HEAD_EFFECT, HEAD_DIRECT, NEURON_EFFECT, NEURON_DIRECT, "attn.qk_probs")


@attrs.frozen
class Component:
    """One ranked row: a head or a neuron (at a token for neurons)."""

    kind: str  # "head" or "neuron"
    layer: int
    index: int
    token: int | None
    total_effect: float
    direct_effect: float


@attrs.frozen
class DemoResult:
    words: tuple[str, ...]
    target: str
    distractor: str
    logit_diff: float
    heads: tuple[Component, ...]  # sorted by |total effect|
    neurons: tuple[Component, ...]
    store: DerivedScalarStore = attrs.field(eq=False, repr=False)
    figure: Path | None = None


def demo_prompt(words: str = DEMO_PROMPT) -> tuple[str, str, str]:
    """Prompt (sequence, then its repeat minus the last word), target, distractor.

    The target is the word that followed the current word last time (what an induction
    circuit copies); the distractor is the word that followed the sequence's first word, a
    plausible continuation the model must not copy.
    """
    seq = words.split()
    prompt = " ".join(seq + seq[:-1])
    return prompt, seq[-1], seq[1]


def run_demo(
    model: ModelAdapter, *, words: str = DEMO_PROMPT, top: int = 8, figure: str | Path | None = None
) -> DemoResult:
    from ._derive import derive

    prompt, target, distractor = demo_prompt(words)
    store = derive(
        model,
        prompt,
        list(DEMO_DSTS),
        target=target,
        distractor=distractor,
        config=DstConfig(detach_final_ln_scale=True),
    )
    tokenizer: Any = getattr(model, "tokenizer", None)
    ids = store.tokens[0]
    words_out = tuple(tokenizer.decode_tokens(ids)) if tokenizer else tuple(map(str, ids))
    logit_diff = float(store.metadata["objective_values"][0])

    heads = []
    for layer in store.activations(HEAD_EFFECT).layer_indices:
        assert layer is not None
        total = store.get(HEAD_EFFECT, layer).sum(0)  # over query tokens: T×H → H
        direct = store.get(HEAD_DIRECT, layer).sum(0)
        heads += [
            Component("head", layer, h, None, float(total[h]), float(direct[h]))
            for h in range(total.shape[0])
        ]
    neurons = []
    for layer in store.activations(NEURON_EFFECT).layer_indices:
        assert layer is not None
        total = store.get(NEURON_EFFECT, layer)
        direct = store.get(NEURON_DIRECT, layer)
        flat = total.abs().reshape(-1)
        for idx in flat.topk(min(top, flat.numel())).indices.tolist():
            t, n = divmod(idx, total.shape[1])
            neurons.append(
                Component("neuron", layer, n, t, float(total[t, n]), float(direct[t, n]))
            )
    heads.sort(key=lambda c: -abs(c.total_effect))
    neurons.sort(key=lambda c: -abs(c.total_effect))
    result = DemoResult(
        words_out, target, distractor, logit_diff, tuple(heads), tuple(neurons[:top]), store
    )
    if figure is not None:
        result = attrs.evolve(result, figure=draw_demo(result, figure))
    return result


def _share(value: float, total: float) -> str:
    return f"{100 * value / total:.0f}%" if total else "-"


def format_demo(result: DemoResult, top: int = 8) -> str:
    def rows(components: Sequence[Component], key: str) -> list[list[str]]:
        ranked = sorted(components, key=lambda c: -abs(getattr(c, key)))[:top]
        return [
            [
                str(i + 1),
                c.kind,
                str(c.layer),
                str(c.index),
                "all" if c.token is None else f"{c.token}:{result.words[c.token]}",
                f"{getattr(c, key):+.3f}",
                _share(getattr(c, key), result.logit_diff),
            ]
            for i, c in enumerate(ranked)
        ]

    headers = ["#", "component", "layer", "index", "token", "value", "share"]
    both = [*result.heads, *result.neurons]
    parts = [
        f"prompt: {' '.join(result.words)}",
        f"objective: logit[{result.target!r}] - logit[{result.distractor!r}] at the last token "
        f"= {result.logit_diff:+.3f}",
        "",
        "Top components by estimated total effect (activation x gradient):",
        format_table(headers, rows(both, "total_effect")),
        "",
        "Top components by direct effect (write . gradient at the final residual):",
        format_table(headers, rows(both, "direct_effect")),
    ]
    if result.figure is not None:
        parts += ["", f"figure written to {result.figure}"]
    return "\n".join(parts)


def draw_demo(result: DemoResult, path: str | Path) -> Path:
    """Heads heatmap (layers × heads), the top head's attention pattern, the top neurons."""
    import torch

    plt = _pyplot()
    n_layers = max(c.layer for c in result.heads) + 1
    n_heads = max(c.index for c in result.heads) + 1
    grid = torch.zeros(n_layers, n_heads)
    for c in result.heads:
        grid[c.layer, c.index] = c.total_effect
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1.4, 1.2]})
    bound = float(grid.abs().max()) or 1.0
    image = axes[0].imshow(grid.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    axes[0].set_xticks(range(n_heads))
    axes[0].set_yticks(range(n_layers))
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    axes[0].set_title("head effect on logit diff\n(act x grad, summed over tokens)")
    for c in result.heads:
        axes[0].text(
            c.index, c.layer, f"{c.total_effect:+.2f}", ha="center", va="center", fontsize=8
        )

    best = result.heads[0]
    pattern = result.store.get("attn.qk_probs", best.layer)[..., best.index]
    _token_heatmap(axes[1], pattern, result.words)
    axes[1].set_title(f"attention pattern of the top head L{best.layer}H{best.index}")

    labels = [
        f"L{c.layer}N{c.index}@{c.token}:{result.words[c.token or 0]}" for c in result.neurons
    ]
    values = [c.total_effect for c in result.neurons]
    axes[2].barh(
        range(len(values)), values, color=["#c0392b" if v > 0 else "#2471a3" for v in values]
    )
    axes[2].set_yticks(range(len(values)))
    axes[2].set_yticklabels(labels, fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set_title("top MLP neurons (act x grad)")
    fig.suptitle(
        f"Why {result.target!r} and not {result.distractor!r}? logit diff {result.logit_diff:+.2f}"
    )
    fit_titles(fig)
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
