"""Every bad input ends in one clear error, from the command line and from Python.

Each row of ``CASES`` builds its bad files in a directory of its own, runs the CLI on them in a
subprocess (all rows at once, so the table costs about one interpreter start) and calls the
Python API on the same files.  The CLI must exit 1 (2 for usage errors) with exactly one line
``scalarlens: error: ...`` naming the file, line or field; Python must raise the matching
``ScalarLensError`` subclass; and neither may leave a file behind (no partial output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import scalarlens
import torch
from scalarlens import DerivedScalarStore, DstConfig
from scalarlens._inputs import parse_token_ids, read_prompts_file
from scalarlens._report import plot_dst
from scalarlens._scaffold import write_plugin
from scalarlens.exceptions import (
    CheckpointError,
    ConfigError,
    ModelInputError,
    OutputError,
    ScalarLensError,
    TokenizerError,
)
from scalarlens.models import GPT2Config, GPT2Model, load_gpt2_checkpoint, save_gpt2_checkpoint

PROMPT = "the old king saw a red fox the old king saw a red"
CFG = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=16)
READ_ONLY = Path("/sys")  # not writable even by root (a chmod'ed directory is, for root)
DERIVE = ["derive", "--dst", "mlp.post_act"]


def _derive(*args: str) -> Callable[[Path], list[str]]:
    return lambda d: [*DERIVE, *(a.replace("{d}", str(d)) for a in args)]


# --- builders of bad files (each gets the case's own directory) ---------------------------


def _checkpoint(d: Path) -> Path:
    torch.manual_seed(0)
    return save_gpt2_checkpoint(GPT2Model(CFG), d / "ckpt")


def _truncated(d: Path) -> None:
    weights = _checkpoint(d) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage(d: Path) -> None:
    (_checkpoint(d) / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file" * 20)


def _config(**fields: object) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        path = _checkpoint(d) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return build


def _config_list(d: Path) -> None:
    (_checkpoint(d) / "config.json").write_text("[12, 768]")


def _index(body: str | Callable[[Path], str]) -> Callable[[Path], None]:
    """A checkpoint whose weights live outside it, reached (or not) through the index."""

    def build(d: Path) -> None:
        ckpt = _checkpoint(d)
        (ckpt / "model.safetensors").rename(d / "outside.safetensors")
        (d / "elsewhere").mkdir()
        (d / "elsewhere" / "w.safetensors").write_bytes((d / "outside.safetensors").read_bytes())
        (ckpt / "sub").symlink_to(d / "elsewhere", target_is_directory=True)
        text = body(d) if callable(body) else body
        (ckpt / "model.safetensors.index.json").write_text(text)

    return build


def _weight_map(shard: str | Callable[[Path], str]) -> Callable[[Path], str]:
    def text(d: Path) -> str:
        name = shard(d) if callable(shard) else shard
        return json.dumps({"weight_map": {"transformer.wte.weight": name}})

    return text


def _file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _nothing(d: Path) -> None:
    return None


# --- what the Python API does with the same input ------------------------------------------

Api = Callable[[Path, "scalarlens.ModelAdapter"], object]
EMPTY_STORE = DerivedScalarStore([], [])


def _load(d: Path, model: object) -> object:
    return load_gpt2_checkpoint(d / "ckpt")


def _prompts(name: str) -> Api:
    return lambda d, model: read_prompts_file(d / name)


CORRUPTED = "the old king saw a red cat the old king saw a red"
CONTRAST = [
    "derive",
    "--dst",
    "attn.attribution_patching",
    "--target",
    "fox",
    "--distractor",
    "cat",
]


def _contrast(*args: str) -> Callable[[Path], list[str]]:
    return lambda d: [*CONTRAST, *(a.replace("{d}", str(d)) for a in args)]


def _contrast_api(**kwargs: object) -> Api:
    kwargs = {"target": "fox", "distractor": "cat", **kwargs}
    return lambda d, m: scalarlens.derive(m, PROMPT, "attn.attribution_patching", **kwargs)  # type: ignore[arg-type]


def _compare_api(d: Path, model: object) -> object:
    from scalarlens._compare import compare

    return compare(scalarlens.derive(model, PROMPT, "mlp.post_act"), "mlp.post_act")  # type: ignore[arg-type]


def _derive_api(prompt: object = PROMPT, **kwargs: object) -> Api:
    return lambda d, model: scalarlens.derive(model, prompt, "mlp.post_act", **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path], None]
    cli: Callable[[Path], list[str]]
    cli_says: tuple[str, ...]
    api: Api
    error: type[ScalarLensError]
    api_says: tuple[str, ...]
    exit_code: int = 1


C = Case
MODEL = ("--model", "{d}/ckpt", "--tokens", "1 2 3")
CASES = [
    C("truncated_safetensors", _truncated, _derive(*MODEL),
      ("ckpt/model.safetensors is not a readable safetensors file", "download or convert"),
      _load, CheckpointError, ("model.safetensors", "truncated or corrupted")),
    C("garbage_safetensors", _garbage, _derive(*MODEL),
      ("ckpt/model.safetensors is not a readable safetensors file",),
      _load, CheckpointError, ("model.safetensors", "download or convert")),
    C("config_n_head_zero", _config(n_head=0), _derive(*MODEL),
      ("config.json: field 'n_head': expected a positive integer, got 0",),
      _load, CheckpointError, ("field 'n_head'", "got 0")),
    C("config_n_head_list", _config(n_head=[2]), _derive(*MODEL),
      ("config.json: field 'n_head': expected a positive integer, got [2]",),
      _load, CheckpointError, ("field 'n_head'", "got [2]")),
    C("config_is_a_list", _config_list, _derive(*MODEL),
      ("config.json: expected a JSON object", "got a JSON list"),
      _load, CheckpointError, ("config.json", "JSON object")),
    C("index_not_json", _index("{not json"), _derive(*MODEL),
      ("model.safetensors.index.json is not valid JSON",),
      _load, CheckpointError, ("index.json", "not valid JSON")),
    C("index_without_weight_map", _index('{"metadata": {}}'), _derive(*MODEL),
      ("model.safetensors.index.json: expected a JSON object with a 'weight_map' field",),
      _load, CheckpointError, ("'weight_map'",)),
    C("index_weight_map_not_a_mapping", _index('{"weight_map": ["model.safetensors"]}'),
      _derive(*MODEL), ("field 'weight_map': expected a mapping",),
      _load, CheckpointError, ("field 'weight_map'", "got list")),
    C("index_shard_in_parent_directory", _index(_weight_map("../outside.safetensors")),
      _derive(*MODEL), ("shard '../outside.safetensors' lies outside the checkpoint directory",),
      _load, CheckpointError, ("outside the checkpoint directory",)),
    C("index_shard_absolute_path", _index(_weight_map(lambda d: f"{d}/outside.safetensors")),
      _derive(*MODEL), ("/outside.safetensors' lies outside the checkpoint directory",),
      _load, CheckpointError, ("outside the checkpoint directory",)),
    C("index_shard_through_symlinked_directory", _index(_weight_map("sub/w.safetensors")),
      _derive(*MODEL), ("shard 'sub/w.safetensors' lies outside the checkpoint directory",),
      _load, CheckpointError, ("outside the checkpoint directory",)),
    C("unknown_model_path", _nothing, _derive("--model", "{d}/nope", "--tokens", "1 2"),
      ("cannot resolve model", "/nope"),
      lambda d, m: scalarlens.load_model(d / "nope"), CheckpointError, ("/nope",)),
    C("prompts_file_missing", _nothing, _derive("--prompts-file", "{d}/prompts.txt"),
      ("prompts.txt: cannot read it (No such file or directory)",),
      _prompts("prompts.txt"), ModelInputError, ("prompts.txt", "No such file")),
    C("prompts_file_is_a_directory", lambda d: (d / "prompts").mkdir(),
      _derive("--prompts-file", "{d}/prompts"), ("prompts is a directory",),
      _prompts("prompts"), ModelInputError, ("is a directory",)),
    C("prompts_file_not_utf8", _file("p.txt", b"the cat\nthe \xff\xfe dog\n"),
      _derive("--prompts-file", "{d}/p.txt"), ("p.txt:2: not UTF-8 text (byte 0xff",),
      _prompts("p.txt"), ModelInputError, ("p.txt:2:", "UTF-8")),
    C("prompts_file_prompt_not_a_string", _file("p.jsonl", b'the cat\n{"prompt": 5}\n'),
      _derive("--prompts-file", "{d}/p.jsonl"),
      ("p.jsonl:2: field 'prompt': expected a string, got int 5",),
      _prompts("p.jsonl"), ModelInputError, ("p.jsonl:2:", "field 'prompt'")),
    C("prompts_file_record_without_prompt", _file("p.jsonl", b'{"target": "fox"}\n'),
      _derive("--prompts-file", "{d}/p.jsonl"),
      ("p.jsonl:1: a JSON record needs exactly one of 'prompt' (text) or 'tokens'",),
      _prompts("p.jsonl"), ModelInputError, ("p.jsonl:1:", "'tokens'")),
    C("prompts_file_unknown_word_on_line_4", _file("p.txt", b"the old\nking\n\nthe zebra\n"),
      _derive("--prompts-file", "{d}/p.txt"), ("p.txt:4: unknown word(s)", "'zebra'"),
      lambda d, m: scalarlens.derive(m, read_prompts_file(d / "p.txt")[2].prompt, "mlp.post_act"),
      TokenizerError, ("'zebra'", "scalarlens vocab")),
    C("tokens_not_integers", _nothing, _derive("--tokens", "1 2 x"),
      ("--tokens: item 2 is 'x', expected an integer token id",),
      _derive_api([1, 2, "x"]), ModelInputError, ("integer token ids", "'x'")),
    C("empty_prompt", _nothing, _derive("--prompt", ""), ("--prompt: cannot tokenize an empty",),
      _derive_api(""), TokenizerError, ("empty prompt",)),
    C("target_equals_distractor", _nothing,
      _derive("--prompt", PROMPT, "--target", "fox", "--distractor", "fox"),
      ("target 'fox' and distractor 'fox' are the same token",),
      _derive_api(target="fox", distractor="fox"), ModelInputError, ("same token",)),
    C("empty_layer_list", _nothing, _derive("--prompt", PROMPT, "--layers"),
      ("argument --layers: expected at least one argument",),
      _derive_api(layers=[]), ConfigError, ("at least one layer", "None for all layers"),
      exit_code=2),
    C("negative_layer", _nothing, _derive("--prompt", PROMPT, "--layers", "-1"),
      ("--layers: DstConfig.layer_indices must hold non-negative ints, got -1",),
      _derive_api(layers=[-1]), ConfigError, ("non-negative",)),
    C("top_negative", _nothing, _derive("--prompt", PROMPT, "--top", "-1"),
      ("--top: expected a positive integer", "got -1"),
      lambda d, m: EMPTY_STORE.topk(-1), ConfigError, ("topk: k", "got -1")),
    C("options_not_json", _nothing, _derive("--prompt", PROMPT, "--options", "{bad"),
      ("--options must be JSON",),
      lambda d, m: DstConfig(options=[1]), ConfigError, ("DstConfig.options", "mapping")),  # type: ignore[arg-type]
    C("direction_not_a_residual", _nothing,
      _derive("--prompt", PROMPT, "--direction", '{"location": "mlp.post_act", "layer": 0}'),
      ("--direction: DstConfig.direction.location must be one of",),
      lambda d, m: DstConfig(direction={"location": "mlp.post_act", "layer": 0}),  # type: ignore[arg-type]
      ConfigError, ("direction.location", "'mlp.post_act'")),
    C("out_in_missing_directory", _nothing,
      _derive("--prompt", PROMPT, "--out", "{d}/missing/s.safetensors"),
      ("missing does not exist; create it first",),
      lambda d, m: EMPTY_STORE.save(d / "missing" / "s.safetensors"), OutputError,
      ("does not exist",)),
    C("out_under_a_file", _file("afile", b"x"),
      _derive("--prompt", PROMPT, "--out", "{d}/afile/s.safetensors"),
      ("afile is a file, not a directory",),
      lambda d, m: EMPTY_STORE.save(d / "afile" / "s.safetensors"), OutputError,
      ("afile is a file",)),
    C("out_in_read_only_directory", _nothing,
      _derive("--prompt", PROMPT, "--out", f"{READ_ONLY}/scalarlens-test.safetensors"),
      (f"cannot write to directory {READ_ONLY}",),
      lambda d, m: EMPTY_STORE.save(READ_ONLY / "scalarlens-test.safetensors"), OutputError,
      ("cannot write to directory",)),
    C("plot_under_a_file_with_a_valid_out", _file("afile", b"x"),
      _derive("--prompt", PROMPT, "--out", "{d}/s.safetensors", "--plot", "{d}/afile/p.png"),
      ("--plot", "afile is a file, not a directory"),
      lambda d, m: plot_dst(EMPTY_STORE, "mlp.post_act", d / "afile" / "p.png"), OutputError,
      ("afile is a file",)),
    C("plot_with_unknown_format", _nothing,
      _derive("--prompt", PROMPT, "--out", "{d}/s.safetensors", "--plot", "{d}/p.xyz"),
      ("--plot", "matplotlib cannot write 'xyz' images"),
      lambda d, m: plot_dst(EMPTY_STORE, "mlp.post_act", d / "p.xyz"), ConfigError,
      ("'xyz'", ".png")),
    C("baseline_of_another_length", _nothing,
      _contrast("--prompt", PROMPT, "--baseline", "the old king saw a red cat"),
      ("has 13 tokens but its baseline has 7", "positions must align"),
      _contrast_api(baseline="the old king saw a red cat"), ModelInputError,
      ("13 tokens", "baseline has 7", "same token count")),
    C("baseline_line_of_another_length",
      _file("p.jsonl", b'{"prompt": "a red fox a red", "baseline": "a red cat a red"}\n'
            b'{"prompt": "a red fox a red", "baseline": "a red cat"}\n'),
      _contrast("--prompts-file", "{d}/p.jsonl"),
      ("p.jsonl:2: the prompt has 5 tokens but its baseline has 3",),
      _contrast_api(baseline=["a red cat"]), ModelInputError, ("baseline has 3",)),
    C("baseline_nobody_uses", _nothing, _derive("--prompt", PROMPT, "--baseline", CORRUPTED),
      ("a baseline prompt was given but none of the requested DSTs (mlp.post_act)",),
      _derive_api(baseline=CORRUPTED), ModelInputError, ("compares two prompts",)),
    C("baseline_missing", _nothing, _contrast("--prompt", PROMPT),
      ("attn.attribution_patching compare(s) the prompt with a baseline", "--baseline"),
      _contrast_api(), ModelInputError, ("none was given", "baseline=")),
    C("integration_steps_zero", _nothing,
      _contrast("--prompt", PROMPT, "--baseline", CORRUPTED, "--steps", "0"),
      ("--steps: DstConfig.steps must be an integer >= 1, got 0",),
      lambda d, m: DstConfig(steps=0), ConfigError, ("steps", ">= 1")),
    C("compare_without_an_estimate", _nothing, _derive("--prompt", PROMPT, "--compare"),
      ("--compare compares an estimate with the exact effect", "attn.attribution_patching"),
      _compare_api, ConfigError, ("does not estimate another DST",)),
    C("new_plugin_named_sae", _nothing, lambda d: ["new-plugin", "sae", "--dir", str(d)],
      ("plugin name 'sae' is already taken by",),
      lambda d, m: write_plugin("sae", d), ConfigError, ("already taken", "Choose another")),
    C("new_plugin_named_builtins", _nothing,
      lambda d: ["new-plugin", "builtins", "--dir", str(d)],
      ("plugin name 'builtins' is already taken by",),
      lambda d, m: write_plugin("builtins", d), ConfigError, ("'builtins'", "already taken")),
]  # fmt: skip


def _files(directory: Path) -> set[str]:
    """Every path under ``directory``, hidden temporaries included."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _read_only_is_usable() -> bool:
    probe = READ_ONLY / ".scalarlens-probe"
    try:
        probe.touch()
    except OSError:
        return READ_ONLY.is_dir()
    probe.unlink()
    return False


@dataclass(frozen=True)
class CliRun:
    result: subprocess.CompletedProcess[str]
    before: set[str]
    after: set[str]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """Every case's CLI run, all subprocesses at once (each spends ~1 s importing torch)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    befores = {}
    for case in CASES:
        (root / case.id).mkdir()
        case.setup(root / case.id)
        befores[case.id] = _files(root / case.id)

    def run(case: Case) -> subprocess.CompletedProcess[str]:
        d = root / case.id
        return subprocess.run(
            [sys.executable, "-m", "scalarlens.cli", *case.cli(d)],
            capture_output=True, text=True, cwd=d, timeout=120,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=min(len(CASES), os.cpu_count() or 4)) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(run, CASES), strict=True))
    return {
        case.id: CliRun(results[case.id], befores[case.id], _files(root / case.id))
        for case in CASES
    }


@pytest.fixture(scope="module")
def model() -> scalarlens.ModelAdapter:
    return scalarlens.load_model()


def _skip_unusable(case: Case) -> None:
    if "read_only" in case.id and not _read_only_is_usable():
        pytest.skip(f"{READ_ONLY} is writable or missing here; no read-only directory to use")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_prints_one_error_line(case: Case, cli_runs: dict[str, CliRun]) -> None:
    _skip_unusable(case)
    run = cli_runs[case.id]
    stderr = run.result.stderr
    assert run.result.returncode == case.exit_code, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("scalarlens: error: ") and stderr.count("\n") == 1, stderr
    for text in case.cli_says:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert run.result.stdout == ""
    assert run.after == run.before, "the failed command left files behind"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_python_raises_the_matching_error(
    case: Case, model: scalarlens.ModelAdapter, tmp_path: Path
) -> None:
    _skip_unusable(case)
    case.setup(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(case.error) as err:
        case.api(tmp_path, model)
    for text in case.api_says:
        assert text in str(err.value), f"{text!r} not in {str(err.value)!r}"
    assert _files(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scalarlens.cli", "--debug", *DERIVE, "--tokens", "1 x"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModelInputError" in result.stderr


def test_parse_token_ids_accepts_commas_and_spaces() -> None:
    assert parse_token_ids("1, 2 3,4") == (1, 2, 3, 4)
    with pytest.raises(ModelInputError, match="got nothing"):
        parse_token_ids(" , ")


# --- what the table cannot show: sets of outputs, linked shards, installed names -----------


def _writes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _fails_halfway(path: Path) -> None:
    path.write_bytes(b"half a figure")
    raise ValueError("the plot backend gave up")


def test_a_failing_plot_leaves_no_output_at_all(tmp_path: Path) -> None:
    from scalarlens._output_files import write_all

    outputs = [
        ("--out", tmp_path / "s.safetensors", _writes(b"store")),
        ("--plot", tmp_path / "p.png", _fails_halfway),
    ]
    with pytest.raises(OutputError, match=r"writing --plot .*p\.png failed: the plot backend"):
        write_all(outputs)
    assert list(tmp_path.iterdir()) == []  # neither the store nor either temporary file


def test_a_failed_rename_says_which_outputs_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scalarlens import _output_files

    real_replace = os.replace

    def replace(src: Path, dst: Path) -> None:
        if Path(dst).name == "p.png":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(_output_files.os, "replace", replace)
    store, plot = tmp_path / "s.safetensors", tmp_path / "p.png"
    with pytest.raises(OutputError) as err:
        _output_files.write_all([("--out", store, _writes(b"s")), ("--plot", plot, _writes(b"p"))])
    assert f"outputs already written: {store}" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_a_complete_write_replaces_the_old_file(tmp_path: Path) -> None:
    from scalarlens._output_files import atomic_write

    target = tmp_path / "s.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError):
        atomic_write(target, _fails_halfway)
    assert target.read_bytes() == b"old"  # a failed write never touches the existing file
    atomic_write(target, _writes(b"new"))
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_shards_may_be_links_to_files_elsewhere(tmp_path: Path) -> None:
    """The Hugging Face cache links each snapshot file into a blob store outside it."""
    ckpt = _checkpoint(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (ckpt / "model.safetensors").rename(blobs / "abc123")
    (ckpt / "model-00001-of-00001.safetensors").symlink_to(blobs / "abc123")
    (ckpt / "model.safetensors.index.json").write_text(
        _weight_map("model-00001-of-00001.safetensors")(tmp_path)
    )
    assert load_gpt2_checkpoint(ckpt).dims.n_layers == CFG.n_layer


def test_new_plugin_refuses_an_installed_distributions_name(
    make_plugin_dist: Callable[..., str], tmp_path: Path
) -> None:
    make_plugin_dist("", dist="scalarlens-probe", version="2.0", entry_name="probe")
    with pytest.raises(ConfigError, match="entry point 'probe' of scalarlens-probe"):
        write_plugin("probe", tmp_path)
    make_plugin_dist("", dist="scalarlens-lens_kit", version="0.3", entry_name="other")
    with pytest.raises(ConfigError, match="installed distribution scalarlens-lens_kit 0.3"):
        write_plugin("lens_kit", tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "site"]  # no plugin directory was written
    assert write_plugin("free_name", tmp_path).name == "scalarlens-free_name"
