"""Run every benchmark and write benchmarks/RESULTS.md (the README's `make bench`)."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def header() -> str:
    import torch

    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
        or "unknown"
    )
    return (
        "# Benchmark results\n\n"
        f"Date {datetime.date.today().isoformat()}, commit `{commit}`, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}.\n"
        "Every figure is a median over repeated runs with min–max; ratios are against a baseline "
        "measured in the same run.\n\n"
    )


@functools.cache
def tl_python() -> tuple[str | None, str]:
    """The TransformerLens venv's python (made by setup_tl_venv.sh if absent), or why not."""
    python = os.environ.get("SCALARLENS_TL_PYTHON")  # an existing venv's python, if given
    if python:
        return python, ""
    setup = subprocess.run(["bash", str(HERE / "setup_tl_venv.sh")], capture_output=True, text=True)
    if setup.returncode:
        return None, (setup.stderr.strip().splitlines() or ["no output"])[-1]
    return setup.stdout.strip().splitlines()[-1], ""


def in_tl_venv(script: str, title: str, skipped: str) -> str:
    """Run ``script --out FILE`` in the TransformerLens venv and return its section."""
    python, reason = tl_python()
    if python is None:
        return (
            title + "**Skipped**: the TransformerLens venv could not be created "
            f"(`benchmarks/setup_tl_venv.sh` failed: `{reason}`), so {skipped} in this run.\n"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "section.md"
        run = subprocess.run(
            [python, str(HERE / script), "--out", str(out)], capture_output=True, text=True
        )
        if run.returncode or not out.is_file():
            reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return title + f"**Failed** in the TransformerLens venv (`{python}`): `{reason}`\n"
        return out.read_text()


def peers() -> str:
    """bench_peers.py runs in the TransformerLens venv (made by setup_tl_venv.sh if absent)."""
    return in_tl_venv(
        "bench_peers.py",
        "### Peers: TransformerLens and hand-written torch (bench_peers.py)\n\n",
        "workloads 1, 2 and 6 have no TransformerLens baseline",
    )


def patching() -> str:
    """bench_patching.py (clean vs corrupted, issue 12), also in the TransformerLens venv."""
    return in_tl_venv(
        "bench_patching.py",
        "### Clean vs corrupted: activation and attribution patching (bench_patching.py)\n\n",
        "this section (every row needs the TransformerLens venv) was not measured",
    )


def families() -> str:
    """bench_families.py in the main venv; it makes and runs the peers' venvs itself."""
    title = (
        "### Hugging Face families: Llama against TransformerLens, nnsight and hand-written "
        "torch (bench_families.py)\n\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "families.md"
        run = subprocess.run(
            [sys.executable, str(HERE / "bench_families.py"), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        if run.returncode or not out.is_file():
            reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return title + f"**Failed**: `{reason}`\n"
        return out.read_text()


def main() -> None:
    import bench_capture
    import bench_catalogue
    import bench_dedup
    import bench_graph
    import bench_startup
    import bench_sweep

    sections = [
        header(),
        bench_startup.main(),
        bench_capture.main(),
        bench_catalogue.main(),
        bench_dedup.main(),
        bench_sweep.main(),
        bench_graph.main(),
        peers(),
        patching(),
        families(),
    ]
    text = "\n".join(sections)
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
