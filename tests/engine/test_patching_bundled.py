"""Clean vs corrupted on the bundled induction model: the story the DSTs must tell.

Prompt: a word sequence repeated; baseline: the same with the *first* occurrence of the target
changed.  Only an induction head can carry the target from its first occurrence to the final
position, so exact activation patching must single one out in layer 1, and attribution
patching must agree with it.
"""

from __future__ import annotations

from typing import Any

import pytest
import scalarlens
from scalarlens._compare import compare

# Measured over 12 random repeat prompts (random.Random(0): 6 distinct content words, the
# target one of words 2–6, repeated up to the target's first occurrence; baseline = the target
# replaced by a word not in the prompt): Pearson r between attribution patching and exact
# patching over all heads × positions ranged 0.964–0.999 (the docs page's own 12 prompts:
# 0.954–0.998).  The gap is the softmax's curvature in the saturated layer-1 heads, which a
# first-order estimate cannot see; 0.9 leaves room for that without accepting an estimate
# that ranks heads differently from the exact effect.
MIN_PEARSON = 0.9

CASES = [
    ("the old king saw a red fox the old king saw a red", "fox", "cat"),
    ("milk bad sun egg hen milk bad", "sun", "ant"),
    ("boy sat on a big hill boy sat on a big", "hill", "road"),
]


@pytest.fixture(scope="module")
def model() -> Any:
    return scalarlens.load_model()


def _corrupt(prompt: str, target: str, replacement: str) -> str:
    words = prompt.split()
    words[words.index(target)] = replacement  # the first occurrence
    return " ".join(words)


@pytest.mark.parametrize(("prompt", "target", "distractor"), CASES)
def test_top_exact_head_is_a_layer_1_induction_head(
    model: Any, prompt: str, target: str, distractor: str
) -> None:
    names = ["attn.attribution_patching", "attn.activation_patching"]
    store = scalarlens.derive(
        model,
        prompt,
        [*names, "attn.qk_probs"],
        baseline=_corrupt(prompt, target, distractor),
        target=target,
        distractor=distractor,
    )
    (top,) = store.topk(1, ["attn.activation_patching"])
    assert top.layer == 1 and top.value > 1.0
    # Induction: from the last position the head attends to the token *after* the previous
    # occurrence of the last word (the first occurrence of the target).
    words = prompt.split()
    last = len(words) - 1
    after_previous = words.index(words[last]) + 1
    assert words[after_previous] == target
    probs = store.get("attn.qk_probs", 1)[last, :, top.component[0]]
    assert int(probs.argmax()) == after_previous and float(probs.max()) > 0.5

    comparison = compare(store, "attn.attribution_patching")
    print(f"{prompt!r}: Pearson r = {comparison.pearson:.4f} over {comparison.n} heads×positions")
    assert comparison.n == 2 * 4 * len(words)
    assert comparison.pearson > MIN_PEARSON
