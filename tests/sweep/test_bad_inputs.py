"""Bad sweep inputs: each a ScalarLens error naming what and where, and one line from the CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from scalarlens import (
    ModelInputError,
    OutputError,
    TokenizerError,
    TruncationWarning,
    UnknownDstError,
    load_sweep,
    sweep,
)
from scalarlens.cli import main


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalarlens: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def _corpus(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_empty_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _corpus(tmp_path, "\n   \n\n")
    with pytest.raises(ModelInputError, match=r"corpus .*corpus.txt holds no prompts; give a file"):
        sweep("tiny-induction", corpus, "mlp.post_act", out=tmp_path / "out")
    line = _cli_error(
        ["sweep", "--corpus", str(corpus), "--dst", "mlp.post_act", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "holds no prompts" in line


def test_line_longer_than_the_context_is_truncated_with_a_warning(tmp_path: Path) -> None:
    words = "the cat sat on the mat and the dog ran to the red fox".split()
    corpus = _corpus(tmp_path, "the cat sat\n" + " ".join(words * 2) + "\n")
    with pytest.warns(
        TruncationWarning, match=r"corpus.txt:2: 28 tokens, longer than the context \(8\)"
    ):
        result = sweep("tiny-induction", corpus, "mlp.post_act", out=tmp_path / "o", context=8)
    assert result.manifest["corpus"]["n_tokens"] == 3 + 8
    assert len(result.tokens(1)) == 8


def test_unknown_dst_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = _corpus(tmp_path, "the cat sat\n")
    with pytest.raises(UnknownDstError, match="mlp.post_akt"):
        sweep("tiny-induction", corpus, ["mlp.post_akt"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    line = _cli_error(
        ["sweep", "--corpus", str(corpus), "--dst", "mlp.post_akt", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "mlp.post_akt" in line and "mlp.post_act" in line  # the suggestion


def test_gradient_dst_without_an_objective(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = _corpus(tmp_path, "the cat sat\n")
    with pytest.raises(
        ModelInputError, match=r"mlp.act_times_grad need\(s\) an objective.*next_token"
    ):
        sweep("tiny-induction", corpus, "mlp.act_times_grad", out=tmp_path / "o", objective=None)
    argv = ["sweep", "--corpus", str(corpus), "--dst", "mlp.act_times_grad", "--objective", "none"]
    line = _cli_error([*argv, "--out", str(tmp_path / "o")], capsys)
    assert "--objective next-token" in line


def test_output_directory_holding_another_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = _corpus(tmp_path, "the cat sat\n", "a.txt")
    second = _corpus(tmp_path, "the dog ran\n", "b.txt")
    before = sweep("tiny-induction", first, "mlp.post_act", out=out, layers=[0]).tokens(0)
    with pytest.raises(OutputError, match=r"holds another sweep \(different corpus\).*--overwrite"):
        sweep("tiny-induction", second, "mlp.post_act", out=out, layers=[0])
    with pytest.raises(OutputError, match=r"different config"):
        sweep("tiny-induction", first, "mlp.post_act", out=out, layers=[0], top_k=3)
    argv = ["sweep", "--corpus", str(second), "--dst", "mlp.post_act", "--layers", "0"]
    assert "holds another sweep" in _cli_error([*argv, "--out", str(out)], capsys)
    assert main([*argv, "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert load_sweep(out).tokens(0) != before  # replaced by the second corpus
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty and holds no manifest.json"):
        sweep("tiny-induction", first, "mlp.post_act", out=tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_corpus_errors_name_the_file_and_line(tmp_path: Path) -> None:
    words = _corpus(tmp_path, "the cat sat\nthe zyzzyva sat\n")
    with pytest.raises(TokenizerError, match=r"corpus.txt:2: "):
        sweep("tiny-induction", words, "mlp.post_act", out=tmp_path / "o")
    jsonl = _corpus(tmp_path, '{"text": "the cat"}\n{"txt": "the cat"}\n', "c.jsonl")
    with pytest.raises(ModelInputError, match=r"c.jsonl:2: expected a JSON object with a 'text'"):
        sweep("tiny-induction", jsonl, "mlp.post_act", out=tmp_path / "o")
    with pytest.raises(ModelInputError, match=r"no such file"):
        sweep("tiny-induction", tmp_path / "missing.txt", "mlp.post_act", out=tmp_path / "o")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_dataset_directory_without_datasets_says_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(ModelInputError, match=r"pip install datasets"):
        sweep("tiny-induction", tmp_path / "data", "mlp.post_act", out=tmp_path / "o")
