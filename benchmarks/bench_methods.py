"""Time and tightness per bound method, beside auto_LiRPA's recorded times, plus the VNN-COMP
instances each method solves.

    python benchmarks/bench_methods.py [--repeat 20] [--slow]

Models: the fixed auto_LiRPA reference models (../shared/reference/alirpa), margin spec,
eps = 8/255, one thread. auto_LiRPA's times are the ranges in that folder's README (same
kind of machine); its mean widths are computed from its recorded bounds. ``--slow`` adds
alpha-CROWN on the CNN at batch 32 (minutes).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

import boundflow as bf
from boundflow.api import BoundOptions, as_graph
from bench_ibp import median_seconds, model as model_with_weights

ROOT = Path(__file__).resolve().parents[2] / "shared"
REF = ROOT / "reference" / "alirpa"
# auto_LiRPA's recorded seconds (README of the reference folder), low-high
ALIRPA_S = {
    ("mlp", 1): {"ibp": (4e-3, 5e-3), "crown-ibp": (9e-3, 12e-3), "crown": (22e-3, 30e-3),
                 "alpha-crown": (1.0, 1.4)},
    ("mlp", 32): {"ibp": (10e-3, 10e-3), "crown-ibp": (42e-3, 42e-3), "crown": (0.54, 0.57),
                  "alpha-crown": (30.0, 30.0)},
    ("cnn", 1): {"ibp": (6e-3, 7e-3), "crown-ibp": (21e-3, 21e-3), "crown": (0.16, 0.22),
                 "alpha-crown": (7.0, 11.0)},
    ("cnn", 32): {"ibp": (16e-3, 16e-3), "crown-ibp": (0.16, 0.24), "crown": (5.6, 6.5),
                  "alpha-crown": (295.0, 295.0)},
}
NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def bound_table(repeat: int, slow: bool) -> None:
    print(f"{'model':<4} {'B':>3} {'method':<12} {'BoundFlow s':>12} {'auto_LiRPA s':>14} "
          f"{'speedup':>8} {'width':>9} {'aL width':>9}")
    for name in ("mlp", "cnn"):
        model = model_with_weights(name)
        inputs, ref = np.load(REF / f"{name}_inputs.npz"), np.load(REF / f"{name}_bounds.npz")
        for batch in (1, 32):
            x, C = inputs["x"][:batch], inputs["C"][:batch]
            graph = as_graph(model, torch.from_numpy(x[:1]))
            for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
                if method == "alpha-crown" and name == "cnn" and batch == 32 and not slow:
                    continue
                n = 1 if method == "alpha-crown" or (method == "crown" and batch == 32) \
                    else repeat
                run = lambda: bf.compute_bounds(graph, x, eps=8 / 255, C=C,  # noqa: E731
                                                method=method,
                                                alpha=bf.AlphaConfig(iterations=10))
                sec = median_seconds(run, n)
                out = run()
                lo, hi = ALIRPA_S[(name, batch)][method]
                key = f"{NAMES[method]}|eps=8_255|B={batch}|margin|"
                ref_w = float((ref[key + "ub"] - ref[key + "lb"]).mean()) \
                    if key + "lb" in ref else float("nan")
                print(f"{name:<4} {batch:>3} {method:<12} {sec:>12.4f} "
                      f"{f'{lo:g}-{hi:g}':>14} {(lo + hi) / 2 / sec:>7.1f}x "
                      f"{float(out.width.mean()):>9.4f} {ref_w:>9.4f}")


def vnncomp_table() -> None:
    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib
    from boundflow.vnncomp import check_property, onnx_runner

    base = ROOT / "benchmarks"
    with open(base / "instances.csv") as f:
        rows = list(csv.DictReader(f))
    print(f"\nVNN-COMP instances ({len(rows)}): solved (verdict = ground truth), wrong, seconds")
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        solved = wrong = 0
        t0 = time.perf_counter()
        for r in rows:
            graph = load_onnx(base / r["onnx"])
            prop = load_vnnlib(base / r["vnnlib"], int(np.prod(graph.input_shape)),
                               int(np.prod(graph.output_shape)))
            res = check_property(graph, prop, BoundOptions(method), timeout=float(r["timeout_s"]),
                                 confirm=onnx_runner(base / r["onnx"]))
            solved += res.status == r["expected"]
            wrong += res.status in ("sat", "unsat") and res.status != r["expected"]
        print(f"  {method:<12} solved {solved:>2}/{len(rows)}  wrong {wrong}  "
              f"{time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--slow", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; margin spec, eps 8/255; median seconds")
    bound_table(args.repeat, args.slow)
    vnncomp_table()


if __name__ == "__main__":
    main()
