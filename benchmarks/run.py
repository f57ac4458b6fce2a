"""Run every benchmark and write benchmarks/RESULTS.md (the README's `make bench`)."""

from __future__ import annotations

import datetime
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


def peers() -> str:
    """bench_peers.py runs in the TransformerLens venv (made by setup_tl_venv.sh if absent)."""
    title = "### Peers: TransformerLens and hand-written torch (bench_peers.py)\n\n"
    python = os.environ.get("SCALARLENS_TL_PYTHON")  # an existing venv's python, if given
    if not python:
        setup = subprocess.run(
            ["bash", str(HERE / "setup_tl_venv.sh")], capture_output=True, text=True
        )
        if setup.returncode:
            reason = (setup.stderr.strip().splitlines() or ["no output"])[-1]
            return (
                title + "**Skipped**: the TransformerLens venv could not be created "
                f"(`benchmarks/setup_tl_venv.sh` failed: `{reason}`), so workloads 1, 2 "
                "and 6 have no TransformerLens baseline in this run.\n"
            )
        python = setup.stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.md"
        run = subprocess.run(
            [python, str(HERE / "bench_peers.py"), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        if run.returncode or not out.is_file():
            reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return title + f"**Failed** in the TransformerLens venv (`{python}`): `{reason}`\n"
        return out.read_text()


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
    import bench_startup
    import bench_sweep

    sections = [
        header(),
        bench_startup.main(),
        bench_capture.main(),
        bench_catalogue.main(),
        bench_dedup.main(),
        bench_sweep.main(),
        peers(),
        families(),
    ]
    text = "\n".join(sections)
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
