#!/usr/bin/env bash
# Create (once) the venv of a Hugging Face peer that bench_families.py runs in: torch, the peer
# with the transformers 5.x it needs, ScalarLens itself (editable) and, when present, the
# scalarlens-transformers plugin, so that one process can load the same checkpoint into both
# libraries.  Prints the venv's python on success.
#
#   benchmarks/setup_hf_peer_venv.sh tlbridge   # TransformerLens 4.x TransformerBridge -> .venv-tlbridge
#   benchmarks/setup_hf_peer_venv.sh nnsight    # nnsight 0.8.x                       -> .venv-nnsight
#   PEER_VENV=/path/to/venv benchmarks/setup_hf_peer_venv.sh nnsight
#
# torch is installed first with its exact pin (another spec pulls a multi-GB CUDA build).
# Exits non-zero (with pip's error on stderr) when something cannot be installed; bench_families
# then skips that peer's rows with a note.
set -euo pipefail
case "${1:-}" in
    tlbridge) SPEC="transformer-lens>=4.3,<5"; CHECK="transformer_lens.model_bridge" ;;
    nnsight) SPEC="nnsight>=0.8.1,<0.9"; CHECK="nnsight" ;;
    *) echo "usage: $0 tlbridge|nnsight" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$ROOT/benchmarks/.venv-$1}"
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
    "$VENV/bin/python" -m pip install -q "$SPEC" "transformers>=5.9,<6" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT" >&2
    : >"$STAMP.new"
    if [ -f "$PLUGIN/pyproject.toml" ]; then
        "$VENV/bin/python" -m pip install -q -e "$PLUGIN" >&2
        echo plugin >>"$STAMP.new"
    fi
    mv "$STAMP.new" "$STAMP"
fi
"$VENV/bin/python" -c "import scalarlens, $CHECK" >&2
echo "$VENV/bin/python"
