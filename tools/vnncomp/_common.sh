# Sourced by the VNN-COMP scripts: checks "v1" and the argument count, and sets PY (the
# project's Python, or $BOUNDFLOW_PYTHON) and STATE (where run_instance.sh records its pid,
# $BOUNDFLOW_VNNCOMP_STATE or a per-user folder in $TMPDIR).
# usage: vnncomp_setup COUNT "USAGE" "$@"
vnncomp_setup() {
    local count="$1" usage="$2"
    shift 2
    [ "$#" -eq "$count" ] || { echo "usage: $0 $usage" >&2; exit 1; }
    [ "$1" = "v1" ] || { echo "unsupported interface version $1 (expected v1)" >&2; exit 1; }
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    PY="${BOUNDFLOW_PYTHON:-$here/../../.venv/bin/python}"
    STATE="${BOUNDFLOW_VNNCOMP_STATE:-${TMPDIR:-/tmp}/boundflow-vnncomp-$(id -u)}"
}
