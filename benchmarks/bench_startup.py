"""Fixed costs a user pays on every command: start-up, `--help`, a tiny VNN-COMP instance, and
how close to the limit `verify --timeout` answers.

    python benchmarks/bench_startup.py [--rounds 7] [--baseline-tree /path/to/older/checkout]

Each row is the wall time of a whole process (median of ``rounds``), run the way a user runs
it (``python -m boundflow.cli ...``). With ``--baseline-tree`` (e.g. a ``git worktree`` of an
older commit) the same commands run from that tree too, interleaved round by round on the same
machine, and the table shows both and their ratio. The machine's load average is printed
beside the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shared() -> Path:
    return Path(os.environ.get("BOUNDFLOW_SHARED", ROOT.parent / "shared"))


def commands() -> dict[str, list[str]]:
    vnn = _shared() / "benchmarks" / "vnncomp_test"
    acas = _shared() / "benchmarks" / "acasxu"
    return {
        "import boundflow": ["-c", "import boundflow"],
        "boundflow --help": ["-m", "boundflow.cli", "--help"],
        "verify test_nano (alpha-crown)": ["-m", "boundflow.cli", "verify", "--onnx",
                                           str(vnn / "test_nano.onnx"), "--vnnlib",
                                           str(vnn / "test_nano.vnnlib")],
        "verify test_nano --timeout 60": ["-m", "boundflow.cli", "verify", "--onnx",
                                          str(vnn / "test_nano.onnx"), "--vnnlib",
                                          str(vnn / "test_nano.vnnlib"), "--timeout", "60"],
        "verify ACAS Xu 1_1 prop 1 --timeout 1": [
            "-m", "boundflow.cli", "verify", "--onnx",
            str(acas / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"), "--vnnlib",
            str(acas / "vnnlib" / "prop_1.vnnlib"), "--timeout", "1"],
    }


def run(tree: Path, argv: list[str], limit: float = 120.0) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, *argv], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=limit)
    except subprocess.TimeoutExpired:
        return float("inf")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline-tree", type=Path,
                        help="an older checkout to time the same commands from")
    args = parser.parse_args()
    trees = {"now": ROOT}
    if args.baseline_tree:
        trees["baseline"] = args.baseline_tree.resolve()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, argv in commands().items():
            for label, tree in trees.items():
                times.setdefault((name, label), []).append(run(tree, argv))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    load = os.getloadavg()
    print(f"{len(os.sched_getaffinity(0))} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; median of {args.rounds} whole-process runs; python {sys.version.split()[0]}")
    head = f"| {'command':<40} | {'now s':>7} |"
    if args.baseline_tree:
        head += f" {'baseline s':>10} | {'baseline / now':>14} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name in commands():
        now = statistics.median(times[(name, "now")])
        row = f"| {name:<40} | {now:>7.3f} |"
        if args.baseline_tree:
            base = statistics.median(times[(name, "baseline")])
            row += f" {base:>10.3f} | {base / now:>13.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
