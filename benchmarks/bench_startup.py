"""Startup cost: ``import scalarlens`` + first resolved ``registry.get``, and ``scalarlens dsts``.

Each sample is a fresh interpreter that times ``import scalarlens`` and a first
``registry.get`` with the builtins, twice over: after importing torch first (the historical
definition: torch is subtracted, since a user who derives pays it anyway) and without torch at
all (nothing on that path imports it; the probe checks).  A second scenario puts 300 synthetic
installed distributions on ``sys.path`` (6 of them ScalarLens plugins) and times discovery
alone.  Last, the wall time of the ``scalarlens dsts`` console script against
``python -c "import torch"``, alternating fresh processes in the same run.
Prints a Markdown table; targets: ≤ 30 ms, ≤ 25 ms and ≤ 0.25× ``import torch``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
if "torch" in sys.argv[1:]:
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
                  "n_loaded": len(registry.plugins()), "torch_loaded": "torch" in sys.modules}))
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


def sample(env: dict[str, str], runs: int, torch_first: bool = True) -> list[dict[str, float]]:
    argv = [sys.executable, "-c", PROBE, *(["torch"] if torch_first else [])]
    out = []
    for _ in range(runs):
        res = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        record = json.loads(res.stdout)
        if not torch_first and record["torch_loaded"]:
            raise RuntimeError("import scalarlens + registry.get imported torch")
        out.append(record)
    return out


def wall_times(env: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Wall time of ``scalarlens dsts`` and of ``python -c "import torch"``, alternating."""
    commands = {
        "dsts": [str(Path(sys.executable).with_name("scalarlens")), "dsts"],
        "torch": [sys.executable, "-c", "import torch"],
    }
    out: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(runs + 1):  # the first round warms the page cache
        for name, argv in commands.items():
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            if i:
                out[name].append(time.perf_counter() - t0)
    return out


def summarize(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.1f} ms ({min(ms):.1f}–{max(ms):.1f})"


def _import_and_get(s: dict[str, float]) -> float:
    return s["import"] + s["get"]


def main(runs: int = 9) -> str:
    # Bytecode is cached, as after a pip install: with PYTHONDONTWRITEBYTECODE set, every module
    # edited since its .pyc was last written would be compiled again in every probe.
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # "with the builtins": only the builtin catalogue is loaded, whatever else is installed.
    builtins_env = {
        **base_env,
        "SCALARLENS_DISABLE_PLUGIN_AUTOLOAD": "1",
        "SCALARLENS_PLUGINS": "builtins",
    }
    sample(builtins_env, 2)  # warm the page cache
    with_torch = {
        "builtins": sample(builtins_env, runs),
        "everything": sample(base_env, runs),
    }
    no_torch = {
        "builtins": sample(builtins_env, runs, torch_first=False),
        "everything": sample(base_env, runs, torch_first=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_site(Path(tmp))
        env = {**base_env, "PYTHONPATH": tmp + os.pathsep + base_env.get("PYTHONPATH", "")}
        sample(env, 1)
        crowded = sample(env, runs)
    walls = wall_times(base_env, runs)
    return _table(runs, with_torch, no_torch, crowded, walls)


def _table(
    runs: int,
    with_torch: dict[str, list[dict[str, float]]],
    no_torch: dict[str, list[dict[str, float]]],
    crowded: list[dict[str, float]],
    walls: dict[str, list[float]],
) -> str:
    def both(values: Callable[[dict[str, float]], float], key: str = "builtins") -> list[str]:
        return [summarize([values(s) for s in runs_[key]]) for runs_ in (with_torch, no_torch)]

    installed = int(with_torch["everything"][0]["n_loaded"])
    ratio = statistics.median(walls["dsts"]) / statistics.median(walls["torch"])
    rows = [
        (
            "`import scalarlens` + first `registry.get` with the builtins",
            *both(_import_and_get),
            "≤ 30 ms",
        ),
        ("  of which `import scalarlens`", *both(lambda s: s["import"]), ""),
        (
            "  of which first `registry.get` (discovery + loading the builtins)",
            *both(lambda s: s["get"]),
            "",
        ),
        (
            f"same with every installed plugin loaded ({installed} plugins)",
            *both(_import_and_get, "everything"),
            "",
        ),
        (
            "entry-point discovery alone, 300 synthetic distributions on the path "
            f"({int(crowded[0]['n_plugins'])} plugins found)",
            summarize([s["discovery"] for s in crowded]),
            "",
            "≤ 25 ms",
        ),
        (
            "`import torch` in the probe (subtracted in the first column)",
            summarize([s["torch"] for s in with_torch["builtins"]]),
            "",
            "",
        ),
        (
            f"`scalarlens dsts`, wall time of a fresh process ({installed} plugins)",
            "",
            f"{summarize(walls['dsts'])} = {ratio:.2f}× `import torch`",
            "≤ 0.25×",
        ),
        ('`python -c "import torch"`, wall time (same run)', "", summarize(walls["torch"]), ""),
    ]
    lines = [
        f"### Startup (median of {runs} fresh interpreters, min–max)",
        "",
        "| measurement | torch already imported | without torch | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
