"""Local sweeps on the bundled model: results, the induction head, gradients, show, export."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import load_sweep, sweep, synthetic_corpus
from scalarlens._sweep._shard import next_token_objective
from scalarlens.cli import main

N_PROMPTS = 24


@pytest.fixture(scope="module")
def model() -> scalarlens.ModelAdapter:
    return scalarlens.load_model()


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> scalarlens.SweepResult:
    out = tmp_path_factory.mktemp("sweep") / "out"
    return sweep(
        "tiny-induction",
        synthetic_corpus(N_PROMPTS, seed=3),
        ["mlp.post_act", "attn.qk_logits"],
        out=out,
        top_k=8,
        shard_size=10,
        batch_size=4,
    )


def test_statistics_match_a_direct_derivation(swept: scalarlens.SweepResult, model) -> None:
    texts = [text for text, _ in synthetic_corpus(N_PROMPTS, seed=3).items()]
    store = scalarlens.derive(model, texts, "mlp.post_act", layers=[1])
    every = torch.cat([store.get("mlp.post_act", 1, prompt=p) for p in range(len(texts))])
    x = every.to(torch.float64)  # tokens × neurons, the whole corpus
    stats = swept.stats("mlp.post_act", 1)
    assert stats["count"].tolist() == [x.shape[0]] * x.shape[1]
    assert torch.allclose(stats["mean"], x.mean(0), rtol=1e-6, atol=1e-7)
    assert torch.allclose(stats["variance"], x.var(0, unbiased=False), rtol=1e-5, atol=1e-8)
    assert torch.equal(stats["max"], x.amax(0)) and torch.equal(stats["min"], x.amin(0))
    assert int(stats["hist"].sum()) == x.numel()
    # Component 311 does not exist on this model (d_mlp = 256); take neuron 31.
    top = swept.top("mlp.post_act", 1, 31)
    values = [r.value for r in top]
    assert values == sorted(values, reverse=True)
    assert values[:3] == pytest.approx(torch.topk(every[:, 31], 3).values.tolist())
    first = top[0]
    assert first.context[swept.settings.window_before] == first.value  # the window's centre
    tokens = swept.tokens(first.prompt)
    assert len(tokens) == len(store.tokens[first.prompt])
    assert tokens == store.tokens[first.prompt]


def test_top_examples_of_layer1_induction_heads_are_repeated_positions(
    swept: scalarlens.SweepResult,
) -> None:
    """Each layer-1 head's largest attention logits are queries in the repeated copy looking at
    the token right after the previous occurrence of the query token."""
    for head in range(4):
        records = swept.top("attn.qk_logits", 1, head)
        assert len(records) == 8
        for record in records:
            ids = swept.tokens(record.prompt)
            t, s = record.token, record.attended
            assert s is not None and 1 <= s <= t
            assert ids[s - 1] == ids[t], (head, record)  # s follows an earlier copy of token t
            assert ids.index(ids[t]) < t  # the query is a repeated token


def test_samples_are_uniform_positions_with_their_values(swept: scalarlens.SweepResult) -> None:
    samples = swept.samples("mlp.post_act", 0, 5)
    assert len(samples) == 32 and len({(r.prompt, r.token) for r in samples}) == 32
    quantile_bins = swept.quantile_samples("mlp.post_act", 0, 5)
    boundaries = swept.stats("mlp.post_act", 0)["quantile_boundaries"][5].tolist()
    assert len(quantile_bins) == len(boundaries) + 1
    lows = [-math.inf, *boundaries]
    highs = [*boundaries, math.inf]
    for records, low, high in zip(quantile_bins, lows, highs, strict=True):
        for record in records:
            assert low <= record.value < high or (math.isnan(low) or math.isnan(high))


def test_gradient_dst_uses_each_prompts_next_token_log_likelihood(tmp_path: Path, model) -> None:
    texts = [text for text, _ in synthetic_corpus(3, seed=5).items()]
    result = sweep(model, texts, "mlp.act_times_grad", out=tmp_path / "g", layers=[0], top_k=3)
    assert result.manifest["config"]["objective"] == "next_token"
    best = -math.inf
    for text in texts:
        ids = model.tokenizer.encode(text)
        store = scalarlens.derive(
            model, [ids], "mlp.act_times_grad", objective=next_token_objective(ids), layers=[0]
        )
        best = max(best, float(store.get("mlp.act_times_grad", 0)[:, 7].max()))
    assert result.top("mlp.act_times_grad", 0, 7)[0].value == pytest.approx(best, rel=1e-5)


def test_cli_sweep_show_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["sweep", "--synthetic", "6", "--dst", "attn.qk_logits", "--layers", "1"]
    assert main([*argv, "--out", str(out), "--top-k", "4", "--quiet"]) == 0
    assert "swept 6 prompts" in capsys.readouterr().out
    assert main(["show", str(out), "--dst", "attn.qk_logits", "--layer", "1", "--index", "2"]) == 0
    shown = capsys.readouterr().out
    assert (
        "attn.qk_logits layer 1 component 2" in shown
        and shown.count("]] ") + shown.count("]]\n") == 4
    )
    assert "<<" in shown or "→" in shown
    assert main(["show", str(out), "--dst", "attn.qk_logits", "--layer", "1", "--index", "2",
                 "--json"]) == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert payload["index"] == 2 and len(payload["top"]) == 4
    assert payload["top"][0]["value"] == load_sweep(out).top("attn.qk_logits", 1, 2)[0].value
    assert main(["export", str(out), "--to", str(tmp_path / "np")]) == 0
    features = gzip.decompress((tmp_path / "np/features/batch-0.jsonl.gz").read_bytes())
    rows = [json.loads(line) for line in features.decode().splitlines()]
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"] and rows[0][
        "layer"
    ] == "1-attn.qk_logits"
    acts = gzip.decompress((tmp_path / "np/activations/batch-0.jsonl.gz").read_bytes())
    first = json.loads(acts.decode().splitlines()[0])
    top = load_sweep(out).top("attn.qk_logits", 1, 0)[0]
    assert first["dataIndex"] == top.prompt and top.value in first["values"]
    assert set(first) >= {"modelId", "layer", "index", "tokens", "values", "maxValue"}
    assert first["maxValue"] == max(first["values"])


def test_plugin_dst_sae_latents_are_swept_like_any_other(tmp_path: Path, model) -> None:
    sae = pytest.importorskip("scalarlens_sae")
    path = Path(sae.__file__).parent / "data" / "tiny-induction-l1-topk"
    config = scalarlens.DstConfig(
        options={"sae": {"path": str(path), "location": "mlp.post_act", "layer": 1}}
    )
    texts = [text for text, _ in synthetic_corpus(4, seed=9).items()]
    result = sweep(model, texts, "sae.latents", out=tmp_path / "sae", config=config, top_k=2)
    store = scalarlens.derive(model, texts, "sae.latents", config=config)
    latents = torch.cat([store.get("sae.latents", 1, prompt=p) for p in range(len(texts))])
    assert result.component_shape("sae.latents", 1) == [latents.shape[1]]
    active = int(latents.amax(0).argmax())
    assert result.top("sae.latents", 1, active)[0].value == pytest.approx(float(latents.max()))
    stats = result.stats("sae.latents", 1)
    assert torch.allclose(stats["fraction_nonzero"], (latents != 0).double().mean(0))
