"""The README's main job (``scalarlens demo``) and ``scalarlens derive`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import DerivedScalarStore, DstConfig, PassType
from scalarlens._demo import run_demo
from scalarlens.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    figure = tmp_path_factory.mktemp("demo") / "demo.png"
    return run_demo(scalarlens.load_model(), figure=figure)


def _attention_scores(result) -> dict[tuple[int, int], tuple[float, float]]:  # type: ignore[no-untyped-def]
    """(layer, head) → (previous-token score, induction score), measured on the demo prompt."""
    n = len(result.words)
    period = (n + 1) // 2  # the prompt is a sequence followed by its repeat minus one word
    scores = {}
    for layer in range(2):
        probs = result.store.get("attn.qk_probs", layer)
        prev = torch.stack([probs[t, t - 1] for t in range(1, n)]).mean(0)
        induction = torch.stack([probs[t, t - period + 1] for t in range(period, n)]).mean(0)
        for head in range(probs.shape[-1]):
            scores[(layer, head)] = (float(prev[head]), float(induction[head]))
    return scores


def test_induction_and_previous_token_heads_rank_first(demo) -> None:  # type: ignore[no-untyped-def]
    scores = _attention_scores(demo)
    top = demo.heads[0]
    assert top.layer == 1 and scores[(1, top.index)][1] > 0.5, "top head is not an induction head"
    top3 = demo.heads[:3]
    assert any(h.layer == 0 and scores[(0, h.index)][0] > 0.3 for h in top3), (
        "no previous-token head among the top three heads"
    )
    direct = sorted(demo.heads, key=lambda h: -abs(h.direct_effect))
    assert direct[0].layer == 1 and scores[(1, direct[0].index)][1] > 0.5
    assert demo.logit_diff > 0  # the model does predict the repeated word


def test_effects_are_consistent_with_the_objective(demo) -> None:  # type: ignore[no-untyped-def]
    # Layer-1 heads write straight to the output: their direct effects are most of the answer.
    layer1 = sum(h.direct_effect for h in demo.heads if h.layer == 1)
    assert 0.3 * demo.logit_diff < layer1 < 1.5 * demo.logit_diff


def test_demo_png_is_a_sensible_image(demo) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.image

    data = demo.figure.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(demo.figure).shape[:2]
    assert width >= 1000 and 300 <= height <= 1200


def test_demo_cli_prints_both_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--plot", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "Top components by estimated total effect" in out
    assert "Top components by direct effect" in out
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_demo_without_matplotlib_prints_the_tables_and_a_hint(tmp_path: Path) -> None:
    # What `pip install scalarlens` (no extras) gets; the wheel-built venv test does it for real.
    code = (
        "import sys; sys.modules['matplotlib'] = None; from scalarlens.cli import main; "
        "sys.exit(main(['demo', '--top', '3']))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "Top components by estimated total effect" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1] == (
        "figure: not drawn (matplotlib is not installed); to get it: pip install 'scalarlens[plot]'"
    )
    assert list(tmp_path.iterdir()) == []  # no figure, no stray file
    explicit = subprocess.run(
        [sys.executable, "-c", code.replace("'3'", "'3', '--plot', 'x.png'")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert explicit.returncode == 1 and "plotting needs matplotlib" in explicit.stderr


def test_demo_no_plot_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--top", "2", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "Top components by direct effect" in out and "figure" not in out
    assert list(tmp_path.iterdir()) == []


PROMPT = "the old king saw a red fox the old king saw a red"


def test_cli_derive_out_equals_the_python_api(tmp_path: Path) -> None:
    out = tmp_path / "store.safetensors"
    args = [
        "derive",
        "--prompt",
        PROMPT,
        "--dst",
        "mlp.act_times_grad",
        "--dst",
        "attn.qk_probs",
        "--target",
        "fox",
        "--distractor",
        "king",
        "--out",
        str(out),
        "--derive-gradients",
    ]
    assert main(args) == 0
    loaded = DerivedScalarStore.load(out)
    api = scalarlens.derive(
        scalarlens.load_model(),
        PROMPT,
        ["mlp.act_times_grad", "attn.qk_probs"],
        target="fox",
        distractor="king",
        config=DstConfig(derive_gradients=True),
    )
    for dst, passes in (
        ("mlp.act_times_grad", [PassType.FORWARD]),
        ("attn.qk_probs", [PassType.FORWARD, PassType.BACKWARD]),
    ):
        for pass_type in passes:
            for layer in range(2):
                assert torch.equal(
                    loaded.get(dst, layer, pass_type), api.get(dst, layer, pass_type)
                )


def test_cli_derive_json_and_prompts_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        f'{PROMPT}\n{{"prompt": "a dog ran to a", "target": "dog", "distractor": "ran"}}\n'
    )
    assert (
        main(
            [
                "derive",
                "--prompts-file",
                str(prompts),
                "--dst",
                "mlp.act_times_grad",
                "--target",
                "fox",
                "--distractor",
                "king",
                "--top",
                "3",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert [r["prompt"] for r in payload["results"]] == [0, 1]
    assert all(len(r["top"]) == 3 for r in payload["results"])  # one DST: 3 records
    assert [r["rank"] for r in payload["results"][0]["top"]] == [1, 2, 3]
    assert payload["results"][1]["words"] == ["a", "dog", "ran", "to", "a"]
    assert "2/2 prompts" in captured.err  # progress bar


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalarlens.cli", *args], capture_output=True, text=True
    )


def test_cli_derive_top_ranks_each_dst_separately(capsys: pytest.CaptureFixture[str]) -> None:
    # act×grad values are ~1, attention probabilities up to 1 and the residual norm ~10: one
    # ranking across DSTs would show only the largest-scale DST.
    dsts = ["mlp.act_times_grad", "attn.qk_probs", "resid.post_mlp"]
    args = ["derive", "--prompt", PROMPT, "--target", "fox", "--distractor", "king", "--top", "4"]
    for dst in dsts:
        args += ["--dst", dst]
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["dsts"] == dsts and payload["top_per_dst"] == 4
    top = payload["results"][0]["top"]
    assert [r["dst"] for r in top] == [d for d in dsts for _ in range(4)]  # grouped, in order
    assert [r["rank"] for r in top] == [1, 2, 3, 4] * 3
    store = scalarlens.derive(
        scalarlens.load_model(), PROMPT, dsts, target="fox", distractor="king"
    )
    for dst in dsts:
        want = [r.value for r in store.topk(4, [dst], absolute=True)]
        assert [r["value"] for r in top if r["dst"] == dst] == pytest.approx(want)

    assert main(args) == 0
    out = capsys.readouterr().out
    for dst in dsts:
        heading = f"\n{dst}: top 4 by |value|\n"
        table = out[out.index(heading) + len(heading) :].split("\n\n")[0].splitlines()
        assert table[0].split()[:2] == ["#", "layer"] and len(table) == 2 + 4


def test_friendly_failures() -> None:
    unknown = _cli("derive", "--prompt", PROMPT, "--dst", "mlp.act_times_grd")
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1  # one clear line, no traceback
    assert "did you mean 'mlp.act_times_grad'" in unknown.stderr
    assert "scalarlens dsts" in unknown.stderr
    no_target = _cli("derive", "--prompt", PROMPT, "--dst", "mlp.act_times_grad")
    assert no_target.returncode == 1
    assert "need(s) an objective" in no_target.stderr
    assert "--target" in no_target.stderr and "--distractor" in no_target.stderr
    bad_word = _cli("derive", "--prompt", "the zebra", "--dst", "mlp.post_act")
    assert bad_word.returncode == 1 and "scalarlens vocab" in bad_word.stderr
    debug = _cli("--debug", "derive", "--prompt", PROMPT, "--dst", "nope.nope")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_derive_takes_plugin_options_and_a_direction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = '{"builtins": {"neuron": {"layer": 1, "index": 3}}}'
    assert (
        main(
            [
                "derive",
                "--prompt",
                PROMPT,
                "--dst",
                "vocab.write_to_input_direction",
                "--options",
                options,
                "--top",
                "2",
                "--json",
            ]
        )
        == 0
    )
    records = json.loads(capsys.readouterr().out)["results"][0]["top"]
    assert [r["dst"] for r in records] == ["vocab.write_to_input_direction"] * 2
    direction = '{"location": "resid.post_attn", "layer": 1}'
    assert (
        main(
            [
                "derive",
                "--prompt",
                PROMPT,
                "--dst",
                "mlp.write_to_final_residual_grad",
                "--target",
                "fox",
                "--distractor",
                "king",
                "--direction",
                direction,
                "--json",
            ]
        )
        == 0
    )
    top = json.loads(capsys.readouterr().out)["results"][0]["top"]
    assert top and all(r["layer"] == 0 for r in top if r["value"] != 0)  # layer 1 is after g
    bad = _cli("derive", "--prompt", PROMPT, "--dst", "mlp.post_act", "--options", "{bad")
    assert bad.returncode == 1 and "--options must be JSON" in bad.stderr


def test_cli_derive_writes_the_store_and_the_plot_and_nothing_else(tmp_path: Path) -> None:
    out, plot = tmp_path / "store.safetensors", tmp_path / "fig.png"
    args = ["derive", "--prompt", PROMPT, "--dst", "attn.qk_probs", "--out", str(out),
            "--plot", str(plot)]  # fmt: skip
    assert main(args) == 0
    assert DerivedScalarStore.load(out).get("attn.qk_probs", 1).shape[0] == len(PROMPT.split())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(tmp_path.iterdir()) == [plot, out]  # no temporary file left behind
