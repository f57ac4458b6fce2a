"""Loading Hugging Face checkpoints: every bad input ends in one clear error, good ones load.

Each row of ``CASES`` damages a copy of a tiny saved model in a directory of its own, runs
``scalarlens derive`` on it in a subprocess (all rows at once) and calls the Python API on the
same files.  The CLI must exit 1 with exactly one line ``scalarlens: error: ...`` and no
traceback; Python must raise the matching ``ScalarLensError`` subclass with the same text.
The rest checks what loads: shards (also linked, as in the Hugging Face cache), token ids
without a tokenizer, routing of plain directories, bfloat16, and GPT-2 through ``hf:`` against
the core's own GPT-2 adapter on the whole builtin catalogue.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import scalarlens
import tiny_models as tm
import torch
from safetensors.torch import load_file, save_file
from scalarlens import DstConfig, PassType
from scalarlens.exceptions import CheckpointError, ModelInputError, TokenizerError
from scalarlens.models import GPT2Config, GPT2Model, load_gpt2_checkpoint, save_gpt2_checkpoint

from scalarlens_transformers import FAMILIES, HFAdapter, load_hf_model
from scalarlens_transformers._loading import ADAPTER_GUIDE

PROMPT = "w1 w2 Paris"
DST = "attn.act_times_grad_per_token"
PARIS, ROME = tm.WORDS.index("Paris"), tm.WORDS.index("Rome")
INDEX = "model.safetensors.index.json"
SavedModels = Callable[[str], Path]


# --- builders: each gets the session's saved models and its own directory, returns a spec ---


def _copy(saved: SavedModels, d: Path, model_type: str = "llama") -> Path:
    return Path(shutil.copytree(saved(model_type), d / "ckpt"))


def _model_type(name: str, *, prefix: str = "hf:") -> Callable[[SavedModels, Path], str]:
    def build(saved: SavedModels, d: Path) -> str:
        config = _copy(saved, d) / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": name}))
        return f"{prefix}{config.parent}"

    return build


def _no_model_type(saved: SavedModels, d: Path) -> str:
    config = _copy(saved, d) / "config.json"
    body = json.loads(config.read_text())
    del body["model_type"]
    config.write_text(json.dumps(body))
    return f"hf:{config.parent}"


def _pickle_only(saved: SavedModels, d: Path) -> str:
    ckpt = _copy(saved, d)
    (ckpt / "model.safetensors").unlink()
    # Never unpickled, so it need not be a pickle: loading it would fail loudly if it were.
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle, and never unpickled")
    return str(ckpt)


def _damaged(damage: Callable[[bytes], bytes]) -> Callable[[SavedModels, Path], str]:
    def build(saved: SavedModels, d: Path) -> str:
        weights = _copy(saved, d) / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        return str(weights.parent)

    return build


def _without_tensor(saved: SavedModels, d: Path) -> str:
    weights = _copy(saved, d) / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(weights.parent)


def _sharded(d: Path, model_type: str = "llama") -> Path:
    """A checkpoint saved in several shards (the tiny models are ~60 kB)."""
    ckpt = d / "sharded"
    tm.build(model_type).save_pretrained(ckpt, max_shard_size="20KB")
    tm.save_tokenizer(ckpt)
    return ckpt


def _shard_named(name: Callable[[Path, str], str]) -> Callable[[SavedModels, Path], str]:
    """A sharded checkpoint whose index names the first shard as ``name(d, shard)``."""

    def build(saved: SavedModels, d: Path) -> str:
        ckpt = _sharded(d)
        index = json.loads((ckpt / INDEX).read_text())
        first = sorted(set(index["weight_map"].values()))[0]
        (ckpt / first).rename(d / first)  # the real file now lives outside the checkpoint
        (d / "elsewhere").mkdir()
        shutil.copy(d / first, d / "elsewhere" / first)
        (ckpt / "sub").symlink_to(d / "elsewhere", target_is_directory=True)
        renamed = name(d, first)
        index["weight_map"] = {
            k: renamed if v == first else v for k, v in index["weight_map"].items()
        }
        (ckpt / INDEX).write_text(json.dumps(index))
        return str(ckpt)

    return build


def _without_tokenizer(saved: SavedModels, d: Path) -> str:
    ckpt = _copy(saved, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    return str(ckpt)


def _saved(saved: SavedModels, d: Path) -> str:
    return str(saved("llama"))


def _hub_id(saved: SavedModels, d: Path) -> str:
    return "hf:meta-llama/Llama-3.2-1B"


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[SavedModels, Path], str]
    error: type[Exception]
    says: tuple[str, ...]
    prompt: str = PROMPT
    target: str = "Paris"
    cli_says: tuple[str, ...] = field(default=())


LONG = " ".join(["w1"] * (tm.CTX + 6))

CASES = [
    Case("unsupported_model_type", _model_type("mamba"), CheckpointError,
         ("model_type 'mamba' is not supported", "Llama (llama)", "Gemma 3 (gemma3_text)",
          "GPT-NeoX / Pythia (gpt_neox)", "GPT-2 (gpt2)", ADAPTER_GUIDE)),
    # A plain directory of an unclaimed type: the core names what is supported here.
    Case("unsupported_model_type_plain_dir", _model_type("mamba", prefix=""), CheckpointError,
         ("model_type 'mamba'", "gpt2, gemma2", "llama", "scalarlens plugins")),
    Case("config_without_model_type", _no_model_type, CheckpointError, ("no model_type",)),
    Case("pickle_only", _pickle_only, CheckpointError,
         ("pickled PyTorch weights", "never loads", "save_pretrained", "AutoModelForCausalLM")),
    Case("truncated_safetensors", _damaged(lambda b: b[: len(b) // 2]), CheckpointError,
         ("cannot load the checkpoint",)),
    Case("garbage_safetensors", _damaged(lambda b: b"PK\x03\x04 a zip file" * 20),
         CheckpointError, ("cannot load the checkpoint",)),
    Case("checkpoint_lacks_a_tensor", _without_tensor, CheckpointError,
         ("lacks 1 weight(s)", "model.layers.0.mlp.up_proj.weight")),
    Case("shard_in_parent_directory", _shard_named(lambda d, s: f"../{s}"), CheckpointError,
         ("lies outside the checkpoint directory", "refusing to load")),
    Case("shard_absolute_path", _shard_named(lambda d, s: str(d / s)), CheckpointError,
         ("lies outside the checkpoint directory",)),
    Case("shard_through_symlinked_directory", _shard_named(lambda d, s: f"sub/{s}"),
         CheckpointError, ("lies outside the checkpoint directory",)),
    Case("shard_missing", _shard_named(lambda d, s: f"gone-{s}"), CheckpointError,
         ("is missing",)),
    Case("hub_id", _hub_id, CheckpointError,
         ("never downloads", "hf download meta-llama/Llama-3.2-1B --local-dir")),
    Case("words_without_tokenizer", _without_tokenizer, TokenizerError,
         ("has no tokenizer", "token ids")),
    Case("target_of_two_tokens", _saved, TokenizerError,
         ("must be exactly one token", f"'Paris' ({PARIS}) + 'Rome' ({ROME})"),
         target="Paris Rome"),
    Case("prompt_longer_than_the_context", _saved, ModelInputError,
         (f"has {tm.CTX + 7} tokens", f"context length (n_ctx) is {tm.CTX}"), prompt=LONG),
]  # fmt: skip


def _cli(spec: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``scalarlens derive`` in a subprocess, through the installed console script."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("scalarlens")), "derive", "--model", spec,
         "--dst", DST, *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


# One interpreter runs every case's CLI (importing transformers costs seconds per process):
# ``scalarlens.cli.main`` as the console script calls it, with the process's own stdout and
# stderr (file descriptors 1 and 2, so library handlers that hold sys.stderr are caught too)
# sent to one file per case, and any uncaught exception printed as the user would see it.
DRIVER = """
import json, os, sys, tempfile, traceback
from scalarlens.cli import main
cases, results = json.loads(sys.argv[1]), {}
for case_id, argv, cwd in cases:
    os.chdir(cwd)
    files = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc(); code = "uncaught"
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    out, err = [(f.seek(0), f.read())[1] for f in files]
    results[case_id] = {"returncode": code, "stdout": out, "stderr": err}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli_runs(
    saved_models: SavedModels, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Every case's CLI result (returncode, stdout, stderr), from one subprocess."""
    root = tmp_path_factory.mktemp("bad_loading")
    cases = []
    for case in CASES:
        (root / case.id).mkdir()
        spec = case.build(saved_models, root / case.id)
        argv = ["derive", "--model", spec, "--dst", DST, "--prompt", case.prompt,
                "--target", case.target, "--distractor", "Rome"]  # fmt: skip
        cases.append((case.id, argv, str(root / case.id)))
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    runs: dict[str, dict[str, Any]] = json.loads(result.stdout.splitlines()[-1])
    return runs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_prints_one_error_line(case: Case, cli_runs: dict[str, dict[str, Any]]) -> None:
    run = cli_runs[case.id]
    stderr = run["stderr"]
    assert run["returncode"] == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("scalarlens: error: ") and stderr.count("\n") == 1, stderr
    for text in case.says:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert run["stdout"] == ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_python_raises_the_matching_error(
    case: Case, saved_models: SavedModels, tmp_path: Path
) -> None:
    spec = case.build(saved_models, tmp_path)
    with pytest.raises(case.error) as err:
        scalarlens.derive(spec, case.prompt, DST, target=case.target, distractor="Rome")
    for text in case.says:
        assert text in str(err.value), f"{text!r} not in {str(err.value)!r}"


def test_an_unknown_dtype_is_refused(saved_models: SavedModels) -> None:
    with pytest.raises(CheckpointError, match="expected one of float32, bfloat16, float16"):
        load_hf_model(saved_models("llama"), dtype="float8")


# --- what loads -------------------------------------------------------------------------------


def _logits(adapter: Any, prompt: list[int]) -> torch.Tensor:
    return adapter.run([prompt], [])[0].logits


def test_a_sharded_checkpoint_equals_the_single_file(
    saved_models: SavedModels, tmp_path: Path
) -> None:
    sharded = _sharded(tmp_path)
    assert len({*json.loads((sharded / INDEX).read_text())["weight_map"].values()}) > 1
    assert not (sharded / "model.safetensors").exists()
    one, many = scalarlens.load_model(saved_models("llama")), scalarlens.load_model(sharded)
    assert torch.equal(_logits(one, [1, 5, 9, 13]), _logits(many, [1, 5, 9, 13]))


def test_shards_may_be_links_to_files_elsewhere(tmp_path: Path) -> None:
    """The Hugging Face cache links each snapshot file into a blob store outside it."""
    sharded = _sharded(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sharded.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    assert isinstance(scalarlens.load_model(f"hf:{sharded}"), HFAdapter)


def test_token_ids_work_without_a_tokenizer(saved_models: SavedModels, tmp_path: Path) -> None:
    spec = _without_tokenizer(saved_models, tmp_path)
    adapter = scalarlens.load_model(spec)
    assert adapter.tokenizer is None
    store = scalarlens.derive(adapter, [[1, 5, 9]], DST, target=PARIS, distractor=ROME)
    assert store.get(DST, 0).shape == (3, tm.HEADS)
    result = _cli(spec, "--tokens", "1 5 9", "--target", str(PARIS), "--distractor", str(ROME),
                  "--top", "2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert DST in result.stdout
    assert result.stderr == "", "loading printed progress bars or warnings"


@pytest.mark.parametrize("model_type", [t for t in tm.FAMILY_KEYS if t != "gpt2"])
def test_a_plain_directory_goes_to_its_family(model_type: str, saved_models: SavedModels) -> None:
    adapter = scalarlens.load_model(saved_models(model_type))
    assert isinstance(adapter, HFAdapter)
    assert model_type in adapter.family.model_types
    assert adapter.config_dict()["architecture"] == adapter.family.name
    # Each family's tokenizer is the saved word-level one (AutoTokenizer would give qwen2 a
    # BPE Qwen2Tokenizer that drops every word).
    assert adapter.tokenizer.encode(PROMPT) == [
        1,
        tm.WORDS.index("w1"),
        tm.WORDS.index("w2"),
        PARIS,
    ]
    store = scalarlens.derive(adapter, PROMPT, DST, target="Paris", distractor="Rome")
    assert torch.isfinite(store.get(DST, 1)).all()


def test_every_family_but_gpt2_has_a_model_type_loader() -> None:
    keys = set(scalarlens.registry.model_loaders())
    expected = {f"model_type:{t}" for f in FAMILIES for t in f.model_types if t != "gpt2"}
    assert "hf:" in keys and expected <= keys and "model_type:gpt2" not in keys


def test_gpt2_directories_stay_with_the_core_unless_asked_for_with_hf(
    saved_models: SavedModels,
) -> None:
    directory = saved_models("gpt2")
    assert type(scalarlens.load_model(directory)).__name__ == "GPT2Adapter"
    assert isinstance(scalarlens.load_model(f"hf:{directory}"), HFAdapter)


def test_bfloat16_loads_and_derives_finite_values(saved_models: SavedModels) -> None:
    adapter = load_hf_model(saved_models("gemma2"), dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    dsts = [DST, "mlp.write_to_final_residual_grad", "resid.post_mlp"]
    store = scalarlens.derive(adapter, PROMPT, dsts, target="Paris", distractor="Rome")
    for dst in dsts:
        for layer in range(tm.LAYERS):
            assert torch.isfinite(store.get(dst, layer)).all(), dst


# --- GPT-2 through transformers = the core's GPT-2 adapter, DST by DST ------------------------


def _core_written(d: Path) -> tuple[Path, list[int]]:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=16)
    return save_gpt2_checkpoint(GPT2Model(cfg), d / "core"), [1, 5, 9, 2, 7, 11]


def _hf_written(d: Path) -> tuple[Path, list[int]]:
    return tm.save("gpt2", d / "hf"), [1, 5, 9, 13, 2, 7, 11, 3]


def _builtins() -> tuple[list[str], DstConfig]:
    registry = scalarlens.registry
    names = sorted(n for n in registry.names() if registry.provider(n).name == "builtins")
    options: dict[str, Any] = {}
    for name, example in registry.dst_examples().items():
        if name in names:
            options.update(example.options)
    return names, DstConfig(derive_gradients=True, options=options)


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


@pytest.mark.parametrize("write", [_core_written, _hf_written], ids=["core_written", "hf_written"])
def test_gpt2_through_hf_equals_the_core_adapter_on_every_builtin(
    write: Callable[[Path], tuple[Path, list[int]]], tmp_path: Path
) -> None:
    directory, prompt = write(tmp_path)
    hf, core = scalarlens.load_model(f"hf:{directory}"), load_gpt2_checkpoint(directory)
    assert isinstance(hf, HFAdapter) and not isinstance(core, HFAdapter)
    names, config = _builtins()
    refused = {
        n for n in names if scalarlens.unsupported_reason(scalarlens.registry.get(n, config), hf)
    }
    assert refused == {"mlp.up"}  # GPT-2's MLP is not gated
    names = [n for n in names if n not in refused]
    # The two-prompt DSTs too: the HF adapter patches with full forwards, the core one resumes
    # mid-model, so this also checks one against the other.
    baseline = [*prompt[:-2], (prompt[-2] + 1) % hf.dims.n_vocab, prompt[-1]]
    stores = [
        scalarlens.derive(
            m, [prompt], names, target=3, distractor=7, config=config, baseline=[baseline]
        )
        for m in (hf, core)
    ]
    assert set(stores[0].keys()) == set(stores[1].keys())
    passes = {k.pass_type for k in stores[0].keys()}
    assert passes == {PassType.FORWARD, PassType.BACKWARD}
    for key in stores[1].keys():
        ours = stores[0].activations(key.dst, key.pass_type).activations_by_layer_index
        theirs = stores[1].activations(key.dst, key.pass_type).activations_by_layer_index
        assert ours.keys() == theirs.keys(), key
        for layer, expected in theirs.items():
            got, where = ours[layer].double(), (str(key), layer)
            assert got.shape == expected.shape, where
            finite = torch.isfinite(expected)  # masked attention logits are -inf in both
            assert torch.equal(torch.isfinite(got), finite), where
            assert torch.equal(got[~finite], expected[~finite].double()), where
            expected = expected[finite].double()
            error = _max_abs(got[finite] - expected)
            assert error <= 1e-5 * max(1.0, _max_abs(expected)), (*where, error)


def test_the_models_page_has_a_row_per_family() -> None:
    page = Path(__file__).resolve().parents[3] / "docs" / "models.md"
    if not page.is_file():
        pytest.skip("not in the ScalarLens repository (no docs/models.md)")
    rows = [line for line in page.read_text().splitlines() if line.startswith("| ")]
    for family in FAMILIES:
        types = " / ".join(f"`{t}`" for t in family.model_types)
        assert any(line.startswith(f"| {family.name} | {types} |") for line in rows), family.name


def test_spec_options_set_dtype_and_refuse_unknown_keys(saved_models: Any) -> None:
    directory = saved_models("llama")
    adapter = scalarlens.load_model(f"hf:{directory}?dtype=bfloat16&device=cpu")
    assert adapter.dtype is torch.bfloat16 and adapter.accumulation_dtype is torch.float32
    with pytest.raises(CheckpointError, match="unknown option 'precision=half'"):
        scalarlens.load_model(f"hf:{directory}?precision=half")
