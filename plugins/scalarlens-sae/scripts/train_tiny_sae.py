"""Train the shipped tiny SAE: 512 ReLU latents on layer 1 ``mlp.post_act`` of ``tiny-induction``.

Data: activations of the bundled model on its own training distribution, ``R1 + A + R2 + A``
(distinct random words, the second copy of ``A`` predictable only by induction), so the SAE
sees both "fresh" and "copying" positions.  Objective: ``‖x − x̂‖² + λ·Σ_j z_j`` with decoder
rows kept at unit norm (so the L1 penalty cannot be dodged by shrinking ``z``), Adam, fixed
seeds; the SAE is saved in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``,
float32) with its held-out FVU and L0 recorded in ``cfg.json``.

Usage (from the repository root; 2–3 minutes on 2 CPU cores)::

    .venv/bin/python plugins/scalarlens-sae/scripts/train_tiny_sae.py
    .venv/bin/python plugins/scalarlens-sae/scripts/train_tiny_sae.py --out /tmp/sae --steps 300
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import scalarlens
import torch
from scalarlens import ActivationLocationType, CaptureRequest, PassType

from scalarlens_sae import TINY_INDUCTION_SAE, SparseAutoencoder, save_sae

LAYER = 1
LOCATION = ActivationLocationType.MLP_POST_ACT


def model_fingerprint() -> str:
    """sha256 of the bundled model's weights: the SAE is only valid for this exact model."""
    from scalarlens import models

    weights = Path(models.__file__).resolve().parent / "tiny_induction" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def make_sequences(generator: torch.Generator, n: int, n_vocab: int) -> list[list[int]]:
    """``n`` prompts ``R1 + A + R2 + A`` with distinct words, |A| in 4..24, |R1|+|R2| ≤ 16."""
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 25, (1,), generator=generator))
        filler = int(torch.randint(0, 17, (1,), generator=generator))
        total = min(64, 2 * length + filler)
        body = torch.randperm(n_vocab, generator=generator)[: total - length]
        start = int(torch.randint(0, total - 2 * length + 1, (1,), generator=generator))
        out.append([*body.tolist(), *body[start : start + length].tolist()])
    return out


def collect(
    model: scalarlens.ModelAdapter, prompts: list[list[int]], batch: int = 64
) -> torch.Tensor:
    rows = []
    request = CaptureRequest(LOCATION, PassType.FORWARD, {LAYER})
    for i in range(0, len(prompts), batch):
        for run in model.run(prompts[i : i + batch], [request]):
            rows.append(run.captured[(LOCATION, PassType.FORWARD)][LAYER])
    return torch.cat(rows).to(torch.float32)


def metrics(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        z = sae.encode(x)
        error = x - sae.decode(z)
        fvu = float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((z > 0).sum(-1).float().mean())
        dead = float(((z > 0).sum(0) == 0).float().mean())
    return {"fvu": round(fvu, 4), "l0": round(l0, 2), "dead_fraction": round(dead, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TINY_INDUCTION_SAE)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--l1", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model = scalarlens.load_model("tiny-induction")
    n_vocab = len(model.tokenizer) if getattr(model, "tokenizer", None) else model.dims.n_vocab
    generator = torch.Generator().manual_seed(args.seed)
    train = collect(model, make_sequences(generator, 768, n_vocab))
    heldout = collect(model, make_sequences(generator, 128, n_vocab))
    d_in = train.shape[1]
    print(
        f"activations: {tuple(train.shape)} train, {tuple(heldout.shape)} held out "
        f"({time.perf_counter() - start:.1f}s)"
    )

    # Init: unit-norm random decoder, tied encoder, b_dec at the data mean.
    w_dec = torch.randn(args.latents, d_in, generator=generator)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(args.latents).requires_grad_(),
        "W_dec": w_dec.requires_grad_(),
        "b_dec": train.mean(0).clone().requires_grad_(),
    }
    optimiser = torch.optim.Adam(params.values(), lr=args.lr)
    for step in range(args.steps):
        index = torch.randint(0, train.shape[0], (args.batch,), generator=generator)
        x = train[index]
        z = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        x_hat = z @ params["W_dec"] + params["b_dec"]
        mse = (x - x_hat).pow(2).sum(-1).mean()
        loss = mse + args.l1 * z.sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  mse {mse.item():.4f}  loss {loss.item():.4f}")

    sae = SparseAutoencoder(*(p.detach() for p in params.values()), source="trained")
    result = metrics(sae, heldout)
    save_sae(
        sae,
        args.out,
        model_name="tiny-induction",
        hook_name=LOCATION.value,
        hook_layer=LAYER,
        scalarlens={
            "location": LOCATION.value,
            "layer": LAYER,
            "script": "plugins/scalarlens-sae/scripts/train_tiny_sae.py",
            "model_sha256": model_fingerprint(),
            "seed": args.seed,
            "steps": args.steps,
            "l1_coefficient": args.l1,
            "heldout": result,
        },
    )
    print(
        f"held-out FVU {result['fvu']:.4f}  L0 {result['l0']:.1f} of {args.latents}  "
        f"dead {result['dead_fraction']:.1%}  ({time.perf_counter() - start:.1f}s)"
    )
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
