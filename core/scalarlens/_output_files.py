"""Output files: checked before any work, written whole or not at all.

A derivation can take minutes; finding out afterwards that ``--out`` names a missing or
read-only directory wastes all of it, and a file written in place and interrupted looks like a
result.  So the directory is probed before work starts, and every file is written under a
temporary name in the same directory and renamed into place (``os.replace`` is atomic within a
file system): a reader sees the old file, or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from .exceptions import OutputError, ScalarLensError

Writer = Callable[[Path], object]
"""Writes a complete output to the path it is given (a temporary name beside the target)."""


def check_output_path(path: str | Path, what: str = "output") -> Path:
    """Fail now, before any work, if ``path`` cannot be written; return it as a ``Path``.

    The directory is probed by creating and removing a file, because ``os.access`` says yes to
    root on a read-only directory and knows nothing of read-only mounts.
    """
    target = Path(path)
    directory = target.parent
    if target.is_dir():
        raise OutputError(f"{what} {target} is a directory; name a file inside it")
    if not directory.exists():
        raise OutputError(
            f"{what} {target}: directory {directory} does not exist; create it first "
            f"(mkdir -p {directory}) or choose another path"
        )
    if not directory.is_dir():
        raise OutputError(
            f"{what} {target}: {_first_file(directory)} is a file, not a directory; "
            "choose another path"
        )
    probe = _temporary_name(target)
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise OutputError(
            f"{what} {target}: cannot write to directory {directory} ({exc.strerror}); "
            "choose a writable directory"
        ) from None
    probe.unlink()
    return target


def _first_file(directory: Path) -> Path:
    """The ancestor of ``directory`` that exists but is not a directory (for the message)."""
    for ancestor in (directory, *directory.parents):
        if ancestor.exists():
            return ancestor
    return directory


def _temporary_name(target: Path) -> Path:
    """A hidden name beside ``target`` that keeps its suffix (plot formats go by suffix)."""
    return target.with_name(f".{target.stem}.{secrets.token_hex(4)}.tmp{target.suffix}")


def atomic_write(path: str | Path, write: Writer, what: str = "output") -> Path:
    """Write ``path`` through ``write`` without ever leaving a partial file behind."""
    target = check_output_path(path, what)
    temporary = _render(target, write, what)
    _commit([(temporary, target)], what)
    return target


def write_all(outputs: Sequence[tuple[str, Path, Writer]]) -> list[Path]:
    """Write several outputs as a set: all are rendered before any is renamed into place.

    If one fails to render, none is written and the error says so; a failure in the final
    renames (which do not fail in practice) names the files already in place.
    """
    for what, path, _ in outputs:
        check_output_path(path, what)
    rendered: list[tuple[Path, Path]] = []
    try:
        for what, path, write in outputs:
            rendered.append((_render(path, write, what), path))
    except BaseException:
        for temporary, _ in rendered:
            temporary.unlink(missing_ok=True)
        raise
    return _commit(rendered, ", ".join(what for what, _, _ in outputs))


def _render(target: Path, write: Writer, what: str) -> Path:
    temporary = _temporary_name(target)
    try:
        write(temporary)
    except (OSError, ScalarLensError, ValueError, RuntimeError) as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(
            f"writing {what} {target} failed: {exc}; no output file was written"
        ) from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _commit(rendered: Sequence[tuple[Path, Path]], what: str) -> list[Path]:
    done: list[Path] = []
    for temporary, target in rendered:
        try:
            os.replace(temporary, target)
        except OSError as exc:
            for leftover, _ in rendered[len(done) :]:
                with contextlib.suppress(OSError):
                    leftover.unlink()
            already = ", ".join(map(str, done)) or "none"
            raise OutputError(
                f"moving {what} into place at {target} failed ({exc.strerror}); "
                f"outputs already written: {already}"
            ) from exc
        done.append(target)
    return done
