"""Train the bundled ``tiny-induction`` model (2-layer GPT-2, word vocabulary) from scratch.

Two synthetic tasks, both solvable only by copying what followed an earlier occurrence:

* **repeat** (what the model is evaluated on): ``R1 + A + R2 + A`` where ``R1 + A + R2`` are
  *distinct* random words, ``|A| = L`` in 4..24 and ``|R1| + |R2|`` in 0..16; the second copy
  of ``A`` is predicted from the first.
* **recall** (80 % of batches): distinct body words, then pairs ``(q, word after q)`` with the
  ``q`` in random order.

Why recall: trained on repeats alone (even plain ``A + A``), the model reaches high accuracy
with *positional* heads (layer-0 heads attending to ``t/2`` or fixed offsets) and never forms
the textbook circuit.  Random-order queries defeat every positional rule, so the model learns a
previous-token head in layer 0 and an induction head in layer 1, which then also solve the
repeats.  Distinct words keep every copy target unambiguous.  Loss covers every position, with
copy positions weighted 10x (the rest are unpredictable random words).

Reproducible: fixed seeds, deterministic algorithms, one CPU thread; reruns are bit-identical.

Usage (from the repository root, about 1.5-3 minutes on a CPU core)::

    PYTHONPATH=core .venv/bin/python scripts/train_tiny_induction.py
    PYTHONPATH=core .venv/bin/python scripts/train_tiny_induction.py --out /tmp/tiny --steps 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scalarlens.models import GPT2Config, GPT2Model, WordTokenizer, save_gpt2_checkpoint

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "core/scalarlens/models/tiny_induction"

# 140 simple words; ``the cat sat on the mat`` and similar toy prompts tokenize.
WORDS: tuple[str, ...] = tuple(
    """
    the a an and or but if then so of to in on at by for with from up down over under
    cat dog bird fish cow pig hen fox owl bee ant bat rat frog duck goat horse sheep mouse lion
    mat hat bed box cup pot pan map bag car bus van boat ship tree sun moon star sky rain
    snow wind hill road door wall roof house room park farm shop school book pen ink
    red blue green black white big small old new hot cold good bad happy sad fast slow
    sat ran saw ate got put sang hid dug fed met was is are has had can will did said
    one two three four five six ten man boy girl king queen cook baby friend mom dad
    apple bread cake milk tea egg rice soup
    """.split()
)

N_CTX = 64
MIN_L, MAX_L = 4, 24
MAX_FILLER = 16  # |R1| + |R2| <= 16 keeps most positions on the copy task


def sample_lengths(generator: torch.Generator) -> tuple[int, int]:
    """``(L, total)`` for one batch: ``L`` in ``MIN_L..MAX_L``, ``total - 2L`` in ``0..16``."""
    length = int(torch.randint(MIN_L, MAX_L + 1, (1,), generator=generator))
    max_total = min(N_CTX, 2 * length + MAX_FILLER)
    total = int(torch.randint(2 * length, max_total + 1, (1,), generator=generator))
    return length, total


def make_batch(
    generator: torch.Generator, batch: int, length: int, total: int, n_vocab: int
) -> torch.Tensor:
    """``batch`` sequences ``R1 + A + R2 + A`` of ``total`` tokens with ``|A| = length``.

    ``R1 + A + R2`` are distinct random ids and ``|R1|`` is uniform in ``0..total-2*length``,
    so the second copy of ``A`` always occupies the last ``length`` positions.  The bundled
    model's test (tests/models/test_tiny_induction.py) uses this same recipe.
    """
    body = torch.argsort(torch.rand(batch, n_vocab, generator=generator), dim=1)
    body = body[:, : total - length]
    start = torch.randint(0, total - 2 * length + 1, (batch, 1), generator=generator)
    copy = torch.gather(body, 1, start + torch.arange(length))
    return torch.cat([body, copy], dim=1)


def make_recall_batch(
    generator: torch.Generator, batch: int, n_body: int, n_pairs: int, n_vocab: int
) -> torch.Tensor:
    """Associative recall: ``body`` (distinct ids) then ``n_pairs`` pairs ``(q, next(q))``.

    ``q`` is a random body word (never the last) and ``next(q)`` the word after it in the
    body.  Queries come in random order, so no positional rule can answer them: only
    "find the earlier ``q``, copy its successor" (an induction head) does.
    """
    body = torch.argsort(torch.rand(batch, n_vocab, generator=generator), dim=1)[:, :n_body]
    idx = torch.argsort(torch.rand(batch, n_body - 1, generator=generator), dim=1)[:, :n_pairs]
    pairs = torch.stack([body.gather(1, idx), body.gather(1, idx + 1)], dim=2)
    return torch.cat([body, pairs.reshape(batch, 2 * n_pairs)], dim=1)


def repeated_copy_accuracy(model: GPT2Model, seqs: torch.Tensor, length: int) -> float:
    """Next-token accuracy for predictions made inside the second copy of ``A``.

    Positions ``T-L..T-2`` predict tokens ``T-L+1..T-1``; the first token of the copy itself
    cannot be predicted (nothing says a repeat is about to start).
    """
    with torch.no_grad():
        logits = model(seqs)
    total = seqs.shape[1]
    pred = logits[:, total - length : total - 1].argmax(-1)
    target = seqs[:, total - length + 1 :]
    return float((pred == target).float().mean())


def evaluate(model: GPT2Model, seed: int, n_vocab: int, per_length: int = 64) -> float:
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(MIN_L, MAX_L + 1):
        length, total = sample_lengths(g)
        seqs = make_batch(g, per_length, length, total, n_vocab)
        accs.append(repeated_copy_accuracy(model, seqs, length))
    return sum(accs) / len(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-weight", type=float, default=10.0)
    parser.add_argument("--recall-fraction", type=float, default=0.8)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    # One thread: this model's matmuls are too small to gain from more, and on a busy 2-core
    # machine a second thread mostly adds contention (measured ~2.5x slower per step).
    torch.set_num_threads(1)
    start = time.perf_counter()

    n_vocab = len(WORDS)
    cfg = GPT2Config(
        vocab_size=n_vocab,
        n_positions=N_CTX,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=256,
        activation_function="gelu_new",
        tie_word_embeddings=True,
    )
    model = GPT2Model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * s / args.steps)).item())
        ),
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    for step in range(args.steps):
        # Positions whose prediction needs copying weigh ``copy_weight`` times more than the
        # rest (random words, unpredictable): with equal weights the copy signal is a small
        # fraction of the loss and the circuit takes far longer to form.
        if float(torch.rand((), generator=g)) < args.recall_fraction:
            n_body = int(torch.randint(8, 41, (), generator=g))
            n_pairs = min(n_body - 1, (N_CTX - n_body) // 2)
            seqs = make_recall_batch(g, args.batch, n_body, n_pairs, n_vocab)
            weights = torch.full((seqs.shape[1] - 1,), 1.0 / args.copy_weight)
            weights[n_body::2] = 1.0
        else:
            length, total = sample_lengths(g)
            seqs = make_batch(g, args.batch, length, total, n_vocab)
            weights = torch.full((total - 1,), 1.0 / args.copy_weight)
            weights[total - length :] = 1.0
        logits = model(seqs[:, :-1])
        per_token = F.cross_entropy(
            logits.reshape(-1, n_vocab), seqs[:, 1:].reshape(-1), reduction="none"
        ).reshape(args.batch, -1)
        loss = (per_token * weights).sum() / (weights.sum() * args.batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            model.eval()
            acc = evaluate(model, seed=1234, n_vocab=n_vocab, per_length=16)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  repeated-copy acc {acc:.3f}")

    model.eval()
    acc = evaluate(model, seed=999, n_vocab=n_vocab)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_gpt2_checkpoint(
        model,
        args.out,
        extra_config={
            "scalarlens_training": {
                "script": "scripts/train_tiny_induction.py",
                "seed": args.seed,
                "steps": args.steps,
                "heldout_repeated_copy_accuracy": round(acc, 4),
            }
        },
    )
    WordTokenizer(WORDS).save(args.out / "vocab.json")
    print(f"held-out repeated-copy next-token accuracy: {acc:.4f}")
    print(f"wall time: {elapsed:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
