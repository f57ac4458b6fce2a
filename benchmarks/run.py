"""Run every benchmark and write benchmarks/RESULTS.md (the README's `make bench`)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def header() -> str:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip() or "unknown"
    return (
        "# Benchmark results\n\n"
        f"Date {datetime.date.today().isoformat()}, commit `{commit}`, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}.\n"
        "Every figure is a median over repeated runs with min–max; ratios are against a baseline "
        "measured in the same run.\n\n"
    )


def main() -> None:
    import bench_capture
    import bench_startup

    sections = [header(), bench_startup.main(), bench_capture.main()]
    text = "\n".join(sections)
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
