"""Startup cost: ``import scalarlens`` + first resolved ``registry.get``, minus ``import torch``.

Each sample is a fresh interpreter that imports torch first (the cost we subtract, since every
user of ScalarLens pays it anyway), then times ``import scalarlens`` and a first
``registry.get`` with the builtins.  A second scenario puts 300 synthetic installed
distributions on ``sys.path`` (6 of them ScalarLens plugins) and times discovery alone.
Prints a Markdown table; targets: ≤ 30 ms and ≤ 25 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import scalarlens
from scalarlens import registry, DstConfig
t2 = time.perf_counter()
registry.get("mlp.post_act", DstConfig(layer_indices=[0]))
t3 = time.perf_counter()
from scalarlens._plugins import discover_candidates
t4 = time.perf_counter()
found = discover_candidates()
t5 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "import": t2 - t1, "get": t3 - t2,
                  "discovery": t5 - t4, "n_plugins": len(found),
                  "n_loaded": len(registry.plugins())}))
"""


def make_synthetic_site(root: Path, n: int = 300, every_plugin: int = 50) -> None:
    for i in range(n):
        info = root / f"synthetic_dist_{i}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: synthetic-dist-{i}\nVersion: 1.0\n"
        )
        lines = ["[console_scripts]", f"synthetic-{i} = synthetic_mod_{i}:main"]
        if i % every_plugin == 0:
            lines += ["[scalarlens]", f"synthetic{i} = synthetic_mod_{i}"]
            (root / f"synthetic_mod_{i}.py").write_text(
                "from scalarlens import hookimpl\n"
                "@hookimpl\ndef scalarlens_derivers():\n    return {}\n"
            )
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def sample(env: dict[str, str], runs: int) -> list[dict[str, float]]:
    out = []
    for _ in range(runs):
        res = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        )
        out.append(json.loads(res.stdout))
    return out


def summarize(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ms ({min(ms):.1f}–{max(ms):.1f})"


def main(runs: int = 9) -> str:
    base_env = dict(os.environ)
    # "with the builtins": only the builtin catalogue is loaded, whatever else is installed.
    builtins_env = {
        **base_env,
        "SCALARLENS_DISABLE_PLUGIN_AUTOLOAD": "1",
        "SCALARLENS_PLUGINS": "builtins",
    }
    sample(builtins_env, 2)  # warm the page cache
    builtins_only = sample(builtins_env, runs)
    everything = sample(base_env, runs)
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_site(Path(tmp))
        env = {**base_env, "PYTHONPATH": tmp + os.pathsep + base_env.get("PYTHONPATH", "")}
        sample(env, 1)
        crowded = sample(env, runs)
    installed = int(everything[0]["n_loaded"])
    rows = [
        (
            "`import scalarlens` + first `registry.get` with the builtins (torch already imported)",
            summarize([s["import"] + s["get"] for s in builtins_only]),
            "≤ 30 ms",
        ),
        ("  of which `import scalarlens`", summarize([s["import"] for s in builtins_only]), ""),
        (
            "  of which first `registry.get` (discovery + loading the builtins)",
            summarize([s["get"] for s in builtins_only]),
            "",
        ),
        (
            f"same with every installed plugin loaded ({installed} plugins)",
            summarize([s["import"] + s["get"] for s in everything]),
            "",
        ),
        (
            "entry-point discovery alone, 300 synthetic distributions on the path "
            f"({int(crowded[0]['n_plugins'])} plugins found)",
            summarize([s["discovery"] for s in crowded]),
            "≤ 25 ms",
        ),
        (
            "`import torch` (subtracted, for reference)",
            summarize([s["torch"] for s in builtins_only]),
            "",
        ),
    ]
    lines = [
        f"### Startup (median of {runs} fresh interpreters, min–max)",
        "",
        "| measurement | time | target |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
