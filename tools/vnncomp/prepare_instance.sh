#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh VERSION BENCHMARK ONNX VNNLIB
# Stops a run_instance.sh of ours still running (the one whose pid it recorded, and its
# children; nobody else's processes), then checks the model and property load (exit 1 when
# they do not), which also warms the OS file cache for run_instance.sh.
set -uo pipefail
source "$(dirname "$0")/_common.sh"
vnncomp_setup 4 "VERSION BENCHMARK ONNX VNNLIB" "$@"
if [ -f "$STATE/run.pid" ]; then
    pid="$(cat "$STATE/run.pid")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && grep -qa boundflow "/proc/$pid/cmdline" 2>/dev/null; then
        pkill -KILL -P "$pid" >/dev/null 2>&1 || true
        kill -KILL "$pid" >/dev/null 2>&1 || true
    fi
    rm -f "$STATE/run.pid"
fi
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
