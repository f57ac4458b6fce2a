#!/usr/bin/env bash
# Create (once) the venv of the nnsight peer that bench_families.py runs in: torch, nnsight 0.8.x
# with the transformers it resolves, ScalarLens itself (editable) and, when present, the
# scalarlens-transformers plugin, so that one process can load the same checkpoint into both
# libraries.  Prints the venv's python on success.
#
#   benchmarks/setup_nnsight_venv.sh             # -> benchmarks/.venv-nnsight (gitignored)
#   NNSIGHT_VENV=/path/to/venv benchmarks/setup_nnsight_venv.sh
#
# torch is installed first with its exact pin (another spec pulls a multi-GB CUDA build).
# Exits non-zero (with pip's error on stderr) when something cannot be installed; bench_families
# then skips the nnsight rows with a note.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NNSIGHT_VENV:-$ROOT/benchmarks/.venv-nnsight}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PLUGIN="$ROOT/plugins/scalarlens-transformers"
STAMP="$VENV/.installed"

stale() {
    [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] ||
        { [ -f "$PLUGIN/pyproject.toml" ] && { [ "$PLUGIN/pyproject.toml" -nt "$STAMP" ] ||
            ! grep -qx plugin "$STAMP"; }; }
}

if stale; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" >&2
    "$VENV/bin/python" -m pip install -q "nnsight>=0.8.1,<0.9" "transformers>=5.9,<6" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT" >&2
    : >"$STAMP.new"
    if [ -f "$PLUGIN/pyproject.toml" ]; then
        "$VENV/bin/python" -m pip install -q -e "$PLUGIN" >&2
        echo plugin >>"$STAMP.new"
    fi
    mv "$STAMP.new" "$STAMP"
fi
"$VENV/bin/python" -c "import scalarlens, nnsight" >&2
echo "$VENV/bin/python"
