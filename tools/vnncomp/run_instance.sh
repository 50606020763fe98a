#!/usr/bin/env bash
# VNN-COMP: run_instance.sh VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT
# Decides the instance within TIMEOUT seconds (start-up included) and writes the result file
# (sat with the counterexample, unsat, unknown or timeout). Records its pid for
# prepare_instance.sh.
set -uo pipefail
source "$(dirname "$0")/_common.sh"
vnncomp_setup 6 "VERSION BENCHMARK ONNX VNNLIB RESULT_FILE TIMEOUT" "$@"
mkdir -p "$STATE" && echo $$ > "$STATE/run.pid"
exec "$PY" -m boundflow.cli verify --onnx "$3" --vnnlib "$4" --out "$5" --timeout "$6"
