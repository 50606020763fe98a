#!/usr/bin/env bash
# VNN-COMP: run_instance.sh VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT
# Decides the instance within TIMEOUT seconds (start-up included) and writes the result file
# (sat with the counterexample, unsat, unknown or timeout). Records its pid for
# prepare_instance.sh.
set -uo pipefail
[ "$#" -eq 6 ] || { echo "usage: $0 VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT" >&2; exit 1; }
[ "$1" = "v1" ] || { echo "unsupported interface version $1 (expected v1)" >&2; exit 1; }
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${BOUNDFLOW_PYTHON:-$HERE/../../.venv/bin/python}"
STATE="${BOUNDFLOW_VNNCOMP_STATE:-${TMPDIR:-/tmp}/boundflow-vnncomp-$(id -u)}"
mkdir -p "$STATE" && echo $$ > "$STATE/run.pid"
exec "$PY" -m boundflow.cli verify --onnx "$3" --vnnlib "$4" --out "$5" --timeout "$6"
