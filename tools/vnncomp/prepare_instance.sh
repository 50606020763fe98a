#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh VERSION BENCHMARK ONNX VNNLIB
# Stops leftover runs, then checks the model and property load (exit 1 when they do not),
# which also warms the OS file cache for run_instance.sh.
set -uo pipefail
[ "$#" -eq 4 ] || { echo "usage: $0 VERSION BENCHMARK ONNX VNNLIB" >&2; exit 1; }
[ "$1" = "v1" ] || { echo "unsupported interface version $1 (expected v1)" >&2; exit 1; }
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${BOUNDFLOW_PYTHON:-$HERE/../../.venv/bin/python}"
pkill -f "boundflow.cli verify" >/dev/null 2>&1 || true
exec "$PY" -c '
import sys
import numpy as np
from boundflow.errors import BoundFlowError
from boundflow.frontend.onnx import load_onnx
from boundflow.frontend.vnnlib import load_vnnlib
try:
    g = load_onnx(sys.argv[1])
    load_vnnlib(sys.argv[2], int(np.prod(g.input_shape)), int(np.prod(g.output_shape)))
except BoundFlowError as e:
    print(f"boundflow: {e}", file=sys.stderr)
    sys.exit(1)
' "$3" "$4"
