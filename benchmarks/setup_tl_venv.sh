#!/usr/bin/env bash
# Create (once) the TransformerLens venv the peer benchmark runs in: torch, TransformerLens 2.x
# with pins known to work next to torch 2.13, and ScalarLens itself (editable), so that one
# process can load the same weights into both libraries.  Prints the venv's python on success.
#
#   benchmarks/setup_tl_venv.sh            # -> benchmarks/.venv-tl (gitignored)
#   TL_VENV=/path/to/venv benchmarks/setup_tl_venv.sh
#
# Exits non-zero (with pip's error on stderr) when something cannot be installed; run.py then
# skips the TransformerLens rows with a note.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TL_VENV:-$ROOT/benchmarks/.venv-tl}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.installed"

if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" >&2
    "$VENV/bin/python" -m pip install -q "transformer-lens<3" "numpy<2" "pyarrow<17" \
        "datasets<3" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT" >&2
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import scalarlens, transformer_lens" >&2
echo "$VENV/bin/python"
