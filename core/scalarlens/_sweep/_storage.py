"""A sweep directory: ``manifest.json``, one safetensors file per shard, ``results.safetensors``.

::

    DIR/manifest.json                  what was swept: model, corpus hash, DSTs, settings
    DIR/shards/shard-000000.safetensors   one shard's partial statistics and its prompts' tokens
    DIR/results.safetensors            every shard merged in shard order, plus derived results

Every file is written under a temporary name and renamed into place (``_output_files``), so a
run killed at any instant leaves only complete files: a shard file exists exactly when that
shard is done, which is all a resumed run needs to know.  Safetensors, never pickle; the JSON
header lives under one metadata key so its bytes do not depend on map ordering.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..exceptions import OutputError, StoreError
from ._stats import ComponentStats, SweepSettings

FORMAT = "scalarlens-sweep/2"
"""/2: shard files without ``bin_priority``, results without the per-bin tables.  A directory of
another version reads as another sweep (refused unless ``overwrite``)."""
MANIFEST = "manifest.json"
RESULTS = "results.safetensors"
SHARDS = "shards"
IDENTITY = ("format", "model", "corpus", "dsts", "config")
"""Manifest fields a resumed run must match (versions may differ: same inputs, same outputs)."""


def shard_path(directory: Path, index: int) -> Path:
    return directory / SHARDS / f"shard-{index:06d}.safetensors"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    from .._output_files import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), str(path.name))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: not a readable sweep manifest ({exc})") from None
    if not str(data.get("format")).startswith(FORMAT.split("/")[0] + "/"):  # any version
        raise StoreError(f"{path}: not a ScalarLens sweep manifest (format {data.get('format')!r})")
    return data


def prepare_directory(directory: Path, manifest: Mapping[str, Any], *, overwrite: bool) -> None:
    """Make ``directory`` ready for this sweep: new, resumable, or (with overwrite) cleared.

    A directory holding another sweep is refused (its shards would be merged into ours); one
    holding files that are not a sweep is refused even with ``overwrite``, which only ever
    deletes files this module writes.
    """
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"sweep output {directory} is a file; name a directory")
    existing = read_manifest(directory) if directory.is_dir() else None
    if existing is None and directory.is_dir() and any(directory.iterdir()):
        raise OutputError(
            f"sweep output {directory} is not empty and holds no {MANIFEST}; choose a new or "
            "empty directory (ScalarLens only overwrites directories it wrote)"
        )
    if existing is not None:
        differ = [k for k in IDENTITY if _identity(existing, k) != _identity(manifest, k)]
        if differ and not overwrite:
            raise OutputError(
                f"sweep output {directory} holds another sweep (different {', '.join(differ)}); "
                "rerun with overwrite=True (--overwrite) to replace it, or choose another "
                "directory"
            )
        if differ or overwrite:
            clear(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SHARDS).mkdir(exist_ok=True)
    _remove_temporaries(directory)
    if not (directory / MANIFEST).is_file():
        write_json(directory / MANIFEST, manifest)


def _identity(manifest: Mapping[str, Any], field: str) -> Any:
    """A manifest field as compared on resume: the corpus by content, not by path."""
    value = manifest.get(field)
    if field == "corpus" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "source"}
    return value


def _remove_temporaries(directory: Path) -> None:
    """Half-written files of a killed run (``_output_files`` names them ``.NAME.HEX.tmp.EXT``)."""
    for pattern in (
        ".shard-*.tmp.safetensors",
        ".results.*.tmp.safetensors",
        ".manifest.*.tmp.json",
    ):
        for folder in (directory, directory / SHARDS):
            for path in folder.glob(pattern):
                path.unlink(missing_ok=True)


def clear(directory: Path) -> None:
    """Delete this module's files (and nothing else) from ``directory``."""
    for path in sorted((directory / SHARDS).glob("shard-*.safetensors")):
        path.unlink()
    _remove_temporaries(directory)
    for name in (RESULTS, MANIFEST):
        (directory / name).unlink(missing_ok=True)


def _header(meta: Mapping[str, Any]) -> dict[str, str]:
    return {"scalarlens_sweep": json.dumps(meta, sort_keys=True)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    from .._output_files import atomic_write

    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=_header(meta)), path.name)


def shard_bytes(tensors: dict[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    """A shard file's bytes (a Ray worker returns these; the driver writes them)."""
    from safetensors.torch import save

    result: bytes = save(tensors, metadata=_header(meta))
    return result


def write_bytes(path: Path, data: bytes) -> None:
    from .._output_files import atomic_write

    atomic_write(path, lambda p: p.write_bytes(data), path.name)


def load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from .._store import read_tagged_safetensors

    text, tensors = read_tagged_safetensors(path, "scalarlens_sweep", "sweep file")
    if text is None:
        raise StoreError(f"{path}: a safetensors file that is not part of a ScalarLens sweep")
    meta: dict[str, Any] = json.loads(text)
    return meta, tensors


def stats_of(
    tensors: dict[str, torch.Tensor], meta: Mapping[str, Any], settings: SweepSettings
) -> dict[str, ComponentStats]:
    return {
        prefix: ComponentStats.from_tensors(tensors, prefix, settings)
        for prefix in meta["components"]
    }
