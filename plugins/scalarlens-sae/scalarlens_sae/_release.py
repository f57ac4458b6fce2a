"""A local release index: a directory of downloaded SAE releases, selected by release + SAE id.

Layout (what ``huggingface-cli download`` of a release gives, one folder per release)::

    DIR/<release>/<sae_id>/cfg.json + sae_weights.safetensors     # SAELens layout
    DIR/<release>/<sae_id>/params.npz                             # Gemma Scope
    DIR/<release>/<sae_id>/layer_0.safetensors …                  # circuit-tracer transcoders

``<sae_id>`` may contain slashes (Gemma Scope's ``layer_20/width_16k/average_l0_71``), as in
SAELens' pretrained table.  Nothing is downloaded: the index is whatever is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._errors import SaeLoadError

__all__ = ["RELEASES_ENV", "ReleaseEntry", "list_releases", "resolve_release"]

RELEASES_ENV = "SCALARLENS_SAE_RELEASES"


def _releases_dir(releases: str | Path | None) -> Path:
    if releases is None:
        releases = os.environ.get(RELEASES_ENV)
        if not releases:
            raise SaeLoadError(
                "options['sae']['release'] needs a directory of downloaded releases: give "
                f"options['sae']['releases'] or set ${RELEASES_ENV}"
            )
    directory = Path(releases).expanduser()
    if not directory.is_dir():
        raise SaeLoadError(
            f"releases directory {str(directory)!r} does not exist or is not a directory "
            f"(options['sae']['releases'] / ${RELEASES_ENV})"
        )
    return directory.resolve()


def _kind(directory: Path) -> str | None:
    """What dictionary a directory holds, if any."""
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if {"cfg.json", "sae_weights.safetensors"} <= names:
        return "saelens"
    if names & {"params.npz", "params.safetensors"}:
        return "gemma_scope"
    if "layer_0.safetensors" in names:
        return "circuit_tracer_plt"
    if "W_enc_0.safetensors" in names:
        return "circuit_tracer_clt"
    return None


ReleaseEntry = dict[str, Any]


def list_releases(releases: str | Path | None) -> list[ReleaseEntry]:
    """Every dictionary under the releases directory: release, sae_id, format and sizes."""
    from ._sae import read_sae_config

    root = _releases_dir(releases)
    entries: list[ReleaseEntry] = []
    for release in sorted(p for p in root.iterdir() if p.is_dir()):
        for directory in sorted([release, *(p for p in release.rglob("*") if p.is_dir())]):
            kind = _kind(directory)
            if kind is None:
                continue
            sae_id = directory.relative_to(release).as_posix()
            entry: ReleaseEntry = {
                "release": release.name,
                "sae_id": "." if sae_id == "." else sae_id,
                "format": kind,
                "path": str(directory),
            }
            if kind in ("saelens", "gemma_scope"):
                try:
                    cfg = read_sae_config(directory)
                except SaeLoadError as exc:
                    entry["error"] = str(exc)
                else:
                    entry.update(
                        architecture=cfg.get("architecture", "standard"),
                        d_in=cfg["d_in"],
                        d_sae=cfg["d_sae"],
                        hook=cfg.get("hook_name", ""),
                    )
            else:
                try:
                    entry.update(_transcoder_summary(directory, kind))
                except (SaeLoadError, OSError, ValueError) as exc:
                    entry["error"] = str(exc)
            entries.append(entry)
    return entries


def _transcoder_summary(directory: Path, kind: str) -> dict[str, Any]:
    """Architecture, widths and layers of circuit-tracer transcoder files (headers only)."""
    from safetensors import safe_open

    from ._transcoder import transcoder_layers

    clt = kind == "circuit_tracer_clt"
    file, key = ("W_enc_0.safetensors", "W_enc_0") if clt else ("layer_0.safetensors", "W_enc")
    with safe_open(str(directory / file), framework="pt") as handle:
        d_sae, d_in = handle.get_slice(key).get_shape()
    layers = transcoder_layers(directory, None)
    return {
        "architecture": "cross_layer_transcoder" if clt else "transcoder",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "hook": f"layers {layers[0]}..{layers[-1]}",
    }


def resolve_release(releases: str | Path | None, release: str, sae_id: str) -> Path:
    """The directory of ``sae_id`` in ``release`` (errors list what is there)."""
    root = _releases_dir(releases)
    release_dir = root / release
    if not release_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise SaeLoadError(
            f"release {release!r} is not in {str(root)!r}; releases there: {present}. "
            "Download it first (nothing is downloaded at run time)"
        )
    directory = (release_dir / sae_id).resolve()
    if release_dir.resolve() not in (directory, *directory.parents) or not directory.is_dir():
        ids = [e["sae_id"] for e in list_releases(root) if e["release"] == release]
        raise SaeLoadError(
            f"release {release!r} has no SAE id {sae_id!r} in {str(release_dir)!r}; "
            f"SAE ids there: {ids}"
        )
    return directory


def main(argv: list[str] | None = None) -> int:
    """``scalarlens-sae list DIR``: the local release index, one dictionary per line."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="scalarlens-sae",
        description="Dictionaries (SAEs, transcoders) downloaded to local disk.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the releases and SAE ids under DIR")
    listing.add_argument("directory", metavar="DIR", help=f"releases directory (${RELEASES_ENV})")
    args = parser.parse_args(argv)
    try:
        entries = list_releases(args.directory)
    except SaeLoadError as exc:
        print(f"scalarlens-sae: error: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"no SAEs or transcoders under {args.directory}", file=sys.stderr)
        return 1
    print("release\tsae_id\tformat\tarchitecture\td_in\td_sae\thook")
    for e in entries:
        if "error" in e:
            print(f"{e['release']}\t{e['sae_id']}\t{e['format']}\tERROR: {e['error']}")
            continue
        cells = [e.get(c, "") for c in ("architecture", "d_in", "d_sae", "hook")]
        print("\t".join(str(c) for c in (e["release"], e["sae_id"], e["format"], *cells)))
    return 0
