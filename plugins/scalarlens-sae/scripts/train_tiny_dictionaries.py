"""Train the shipped tiny JumpReLU SAE, TopK SAE and cross-layer transcoder of ``tiny-induction``.

Same data as ``train_tiny_sae.py`` (activations of the bundled model on its own ``R1 + A + R2
+ A`` training distribution), fixed seeds, Adam:

* ``tiny-induction-l1-jumprelu`` — 256 JumpReLU latents on layer 1 ``mlp.post_act``
  (SAELens layout, ``architecture: jumprelu``).  Objective ``‖x − x̂‖² + λ·L0`` with the
  threshold trained through a rectangle-kernel straight-through estimator (bandwidth 0.05),
  the usual JumpReLU recipe; the saved file is plain inference maths.
* ``tiny-induction-l1-topk`` — 256 TopK latents (k = 16) on layer 1 ``mlp.post_act``
  (``architecture: topk``); objective ``‖x − x̂‖²`` with unit-norm decoder rows.
* ``tiny-induction-clt`` — a 2-layer cross-layer transcoder, 128 ReLU latents per layer,
  reading each layer's normalised MLP input and writing the MLP outputs of that layer and
  every later one (circuit-tracer CLT layout: ``W_enc_{i}`` / ``W_dec_{i}.safetensors``).
  Objective ``Σ_t ‖y_t − ŷ_t‖² + λ·Σ z·‖W_dec‖`` (λ = 0.1) (decoder norm over all target layers).

Held-out FVU and L0 are written to ``metrics.json`` (the transcoder) or ``cfg.json``
(``scalarlens.heldout``), with the sha256 of the model.  Usage (from the repository root;
about a minute on 2 CPU cores)::

    .venv/bin/python plugins/scalarlens-sae/scripts/train_tiny_dictionaries.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import scalarlens
import torch
from scalarlens import ActivationLocationType, CaptureRequest, PassType

from scalarlens_sae import SparseAutoencoder, save_sae
from scalarlens_sae._transcoder_derivers import mlp_input_norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_sae import make_sequences, model_fingerprint

DATA = Path(__file__).resolve().parents[1] / "scalarlens_sae" / "data"
ALT = ActivationLocationType
SCRIPT = "plugins/scalarlens-sae/scripts/train_tiny_dictionaries.py"


def collect(model: scalarlens.ModelAdapter, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Rows of layer-1 neurons, and each layer's normalised MLP input and MLP output."""
    n_layers = model.dims.n_layers
    requests = [
        CaptureRequest(ALT.MLP_POST_ACT, PassType.FORWARD, {1}),
        CaptureRequest(ALT.RESID_POST_ATTN, PassType.FORWARD, set(range(n_layers))),
        CaptureRequest(ALT.RESID_DELTA_MLP, PassType.FORWARD, set(range(n_layers))),
    ]
    rows: dict[str, list[torch.Tensor]] = {"neurons": []}
    for layer in range(n_layers):
        rows[f"in{layer}"], rows[f"out{layer}"] = [], []
    for i in range(0, len(prompts), 64):
        for run in model.run(prompts[i : i + 64], requests):
            rows["neurons"].append(run.captured[(ALT.MLP_POST_ACT, PassType.FORWARD)][1])
            for layer in range(n_layers):
                resid = run.captured[(ALT.RESID_POST_ATTN, PassType.FORWARD)][layer]
                rows[f"in{layer}"].append(mlp_input_norm(model, layer, resid))
                rows[f"out{layer}"].append(
                    run.captured[(ALT.RESID_DELTA_MLP, PassType.FORWARD)][layer]
                )
    return {k: torch.cat(v).to(torch.float32) for k, v in rows.items()}


class _JumpReLU(torch.autograd.Function):
    """``pre·[pre > θ]``; θ's gradient by a rectangle kernel of ``bandwidth`` (training only)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> Any:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre) / ctx.bandwidth
        return grad * (pre > theta), (-(theta * window * grad)).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> Any:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre) / ctx.bandwidth
        return None, (-(window * grad)).sum(0), None


def _init(d_in: int, n: int, mean: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    w_dec = torch.randn(n, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(n).requires_grad_(),
        "W_dec": w_dec.requires_grad_(),
        "b_dec": mean.clone().requires_grad_(),
    }


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def train_jumprelu(train: torch.Tensor, gen: torch.Generator, args: Any) -> SparseAutoencoder:
    p = _init(train.shape[1], args.latents, train.mean(0), gen)
    p["log_theta"] = torch.full((args.latents,), -1.0).requires_grad_()
    opt = torch.optim.Adam(p.values(), lr=args.lr)
    for _ in range(args.steps):
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        theta = p["log_theta"].exp()
        z = _JumpReLU.apply(pre, theta, 0.05)
        l0 = _Step.apply(pre, theta, 0.05).sum(-1).mean()
        loss = (x - (z @ p["W_dec"] + p["b_dec"])).pow(2).sum(-1).mean() + args.l0 * l0
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return SparseAutoencoder(
            p["W_enc"].detach(),
            p["b_enc"].detach(),
            p["W_dec"].detach(),
            p["b_dec"].detach(),
            source="trained",
            architecture="jumprelu",
            threshold=p["log_theta"].exp().detach(),
        )


def train_topk(train: torch.Tensor, gen: torch.Generator, args: Any) -> SparseAutoencoder:
    p = _init(train.shape[1], args.latents, train.mean(0), gen)
    opt = torch.optim.Adam(p.values(), lr=args.lr)
    for _ in range(args.steps):
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(args.k).indices, True)
        z = pre.relu() * keep
        loss = (x - (z @ p["W_dec"] + p["b_dec"])).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
    return SparseAutoencoder(
        *(p[n].detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")),
        source="trained",
        architecture="topk",
        k=args.k,
    )


def train_clt(data: dict[str, torch.Tensor], n_layers: int, gen: torch.Generator, args: Any) -> Any:
    d = data["in0"].shape[1]
    n = args.clt_latents
    enc = [(torch.randn(d, n, generator=gen) / d**0.5).requires_grad_() for _ in range(n_layers)]
    b_enc = [torch.zeros(n).requires_grad_() for _ in range(n_layers)]
    dec = {
        (s, t): (torch.randn(n, d, generator=gen) * 0.1 / n**0.5).requires_grad_()
        for s in range(n_layers)
        for t in range(s, n_layers)
    }
    b_dec = [data[f"out{t}"].mean(0).clone().requires_grad_() for t in range(n_layers)]
    opt = torch.optim.Adam([*enc, *b_enc, *dec.values(), *b_dec], lr=args.lr)
    rows = data["in0"].shape[0]
    for _ in range(args.steps):
        idx = torch.randint(0, rows, (args.batch,), generator=gen)
        z = [(data[f"in{s}"][idx] @ enc[s] + b_enc[s]).relu() for s in range(n_layers)]
        loss = torch.zeros(())
        for t in range(n_layers):
            y_hat = b_dec[t] + sum(z[s] @ dec[(s, t)] for s in range(t + 1))
            loss = loss + (data[f"out{t}"][idx] - y_hat).pow(2).sum(-1).mean()
        for s in range(n_layers):
            norms = torch.cat([dec[(s, t)] for t in range(s, n_layers)], dim=1).norm(dim=1)
            loss = loss + args.clt_l1 * (z[s] * norms).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc, b_enc, dec, b_dec


def save_clt(out: Path, n_layers: int, params: Any, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    enc, b_enc, dec, b_dec = params
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_layers):
        save_file(
            {
                f"W_enc_{i}": enc[i].detach().T.contiguous(),
                f"b_enc_{i}": b_enc[i].detach().contiguous(),
                f"b_dec_{i}": b_dec[i].detach().contiguous(),
            },
            str(out / f"W_enc_{i}.safetensors"),
        )
        stacked = torch.stack([dec[(i, t)].detach() for t in range(i, n_layers)], dim=1)
        save_file({f"W_dec_{i}": stacked.contiguous()}, str(out / f"W_dec_{i}.safetensors"))
    (out / "metrics.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--clt-latents", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--l0", type=float, default=0.05)
    parser.add_argument("--clt-l1", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = scalarlens.load_model("tiny-induction")
    n_layers = model.dims.n_layers
    gen = torch.Generator().manual_seed(args.seed)
    n_vocab = model.dims.n_vocab
    with torch.no_grad():
        train = collect(model, make_sequences(gen, 768, n_vocab))
        heldout = collect(model, make_sequences(gen, 128, n_vocab))
    print(f"activations collected ({time.perf_counter() - start:.1f}s)")
    common = {"model_sha256": model_fingerprint(), "script": SCRIPT, "seed": args.seed}

    for name, trainer in (("jumprelu", train_jumprelu), ("topk", train_topk)):
        sae = trainer(train["neurons"], gen, args)
        with torch.no_grad():
            x = heldout["neurons"]
            z = sae.encode(x)
            result = {
                "fvu": round(_fvu(x, sae.decode(z)), 4),
                "l0": round(float((z > 0).sum(-1).float().mean()), 2),
            }
        save_sae(
            sae,
            args.out / f"tiny-induction-l1-{name}",
            model_name="tiny-induction",
            hook_name="mlp.post_act",
            hook_layer=1,
            scalarlens={
                **common,
                "location": "mlp.post_act",
                "layer": 1,
                "steps": args.steps,
                "heldout": result,
            },
        )
        print(
            f"{name}: held-out FVU {result['fvu']:.4f}  L0 {result['l0']:.1f} "
            f"({time.perf_counter() - start:.1f}s)"
        )

    params = train_clt(train, n_layers, gen, args)
    enc, b_enc, dec, b_dec = params
    with torch.no_grad():
        z = [(heldout[f"in{s}"] @ enc[s] + b_enc[s]).relu() for s in range(n_layers)]
        per_layer = {}
        for t in range(n_layers):
            y_hat = b_dec[t] + sum(z[s] @ dec[(s, t)] for s in range(t + 1))
            per_layer[str(t)] = round(_fvu(heldout[f"out{t}"], y_hat), 4)
        l0 = {str(s): round(float((z[s] > 0).sum(-1).float().mean()), 2) for s in range(n_layers)}
    meta = {
        **common,
        "input": "mlp.input",
        "output": "resid.delta_mlp",
        "steps": args.steps,
        "heldout": {"fvu": per_layer, "l0": l0},
    }
    save_clt(args.out / "tiny-induction-clt", n_layers, params, meta)
    print(f"clt: held-out FVU per layer {per_layer}  L0 {l0} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
