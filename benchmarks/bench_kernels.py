"""The default path and the compiled default plan beside a forward pass and auto_LiRPA.

    python benchmarks/bench_kernels.py [--rounds 15] [--rows mlp,cnn,deep,residual]
                                       [--methods ibp,crown-ibp,crown,alpha-crown]

One row per (model, batch, method), each measured in one run of interleaved rounds (a forward
pass, then ``bf.compute_bounds`` on the default torch path, then the same call with
``backend="relax"``, which compiles the same default plan with TVM; medians). Models: the
shared auto_LiRPA ``mlp`` and ``cnn`` (recorded weights, their inputs and margin spec, eps
8/255), ``deep`` (the ``random_deep_mlp`` example) and ``residual`` (``random_residual``; its
plain counterpart ``plain_residual``, the same layers and weights without the skip connection,
rides along for CROWN per FLOP; ``plain_cnn`` is ``random_cnn``), margin spec on the clean
prediction, eps 2/255. Batch 1 and 32; alpha-CROWN (10 iterations, as auto_LiRPA's record)
at batch 1. One torch thread, one TVM thread.

``x fwd`` = call time over the forward pass. ``aL x`` = the implied speedup over auto_LiRPA,
``alirpa_over_forward / (ms / forward_ms)`` from ../shared/reference/alirpa/speed_vs_forward.csv
(shared models only). ``relax/torch`` > 1 means the compiled plan is slower. ``ms/MFLOP`` is
call time per forward MFLOP (per sample), for the residual-vs-plain comparison; with the
residual rows a second table sets both side by side with every neuron bounded (the same rows:
the skip connection leaves more neurons unstable, and the default bounds only those). With
IBP, a last table times the call a user makes with the torch module itself beside the call
with its traced graph: the difference is the cached trace's check that the module is
unchanged.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")   # TVM's thread pool as small as torch's

import argparse                                # noqa: E402
import copy                                    # noqa: E402
import csv                                     # noqa: E402
import statistics                              # noqa: E402
import time                                    # noqa: E402
from pathlib import Path                       # noqa: E402

import numpy as np                             # noqa: E402
import torch                                   # noqa: E402

import boundflow as bf                         # noqa: E402
from boundflow.api import as_graph             # noqa: E402
from boundflow.examples import load            # noqa: E402
from bench_ibp import model as shared_model    # noqa: E402

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "alirpa"
ALPHA = bf.AlphaConfig(iterations=10)


def alirpa_ratios() -> dict[tuple[str, int, str], float]:
    path = REF / "speed_vs_forward.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        return {(r["model"], int(r["batch"]), r["method"]): float(r["alirpa_over_forward"])
                for r in csv.DictReader(f)}


def margin(labels: np.ndarray, n_out: int) -> np.ndarray:
    C = np.zeros((len(labels), n_out - 1, n_out), np.float32)
    for b, y in enumerate(labels):
        others = [j for j in range(n_out) if j != y]
        for k, j in enumerate(others):
            C[b, k, y], C[b, k, j] = 1.0, -1.0
    return C


def workload(name: str, batch: int):
    """(module, x, C, eps) of a row."""
    if name in ("mlp", "cnn"):
        data = np.load(REF / f"{name}_inputs.npz")
        return shared_model(name), data["x"][:batch], data["C"][:batch], 8 / 255
    ex = load({"deep": "random_deep_mlp", "residual": "random_residual",
               "plain_residual": "random_residual", "plain_cnn": "random_cnn"}[name])
    model = plain_counterpart(ex.model) if name == "plain_residual" else ex.model
    x = np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return model, x, margin(out.argmax(1).numpy(), out.shape[1]), 2 / 255


class _NoSkip(torch.nn.Module):
    """A residual block's layers without its skip connection."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.conv1, self.bn, self.conv2 = block.conv1, block.bn, block.conv2

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))


def plain_counterpart(model: torch.nn.Module) -> torch.nn.Module:
    """The residual example with the same layers and weights but no skip connection: its
    plain CNN counterpart, of the same forward FLOPs (but for the one addition)."""
    plain = copy.deepcopy(model)
    plain.block = _NoSkip(plain.block)
    return plain.eval()


def forward_mflops(module: torch.nn.Module, x: np.ndarray) -> float:
    """Multiply-adds of one sample's forward pass through linear and conv layers, in millions."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Conv2d):
            total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] \
                * m.kernel_size[1]
    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(torch.from_numpy(x[:1]))
    for h in handles:
        h.remove()
    return 2 * total / 1e6


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median ms of each function, timed in interleaved rounds after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def row(name: str, batch: int, method: str, rounds: int, ratios: dict) -> dict:
    module, x, C, eps = workload(name, batch)
    graph = as_graph(module, torch.from_numpy(x[:1]))
    xt = torch.from_numpy(x)
    opts = dict(eps=eps, C=C, method=method, alpha=ALPHA)

    def forward():
        with torch.no_grad():
            module(xt)
    fns = {"forward": forward,
           "torch": lambda: bf.compute_bounds(graph, x, **opts),
           "relax": lambda: bf.compute_bounds(graph, x, backend="relax", **opts)}
    t0 = time.perf_counter()
    fns["relax"]()                                   # compile (or load) outside the rounds
    compile_s = time.perf_counter() - t0
    a, b = bf.compute_bounds(graph, x, **opts), bf.compute_bounds(graph, x, backend="relax",
                                                                   **opts)
    gap = float(max((a.lower - b.lower).abs().max(), (a.upper - b.upper).abs().max()))
    slow = method == "alpha-crown" or (method == "crown" and batch == 32 and name == "cnn")
    ms = interleaved(fns, max(3, rounds // 5) if slow else rounds)
    ref = ratios.get((name, batch, method))
    out = {"model": name, "batch": batch, "method": method, "forward_ms": ms["forward"],
           "torch_ms": ms["torch"], "relax_ms": ms["relax"], "compile_s": compile_s,
           "torch_x_fwd": ms["torch"] / ms["forward"], "relax_x_fwd": ms["relax"] / ms["forward"],
           "relax_over_torch": ms["relax"] / ms["torch"], "max_gap": gap,
           "torch_ms_per_mflop": ms["torch"] / batch / forward_mflops(module, x)}
    if ref is not None:
        out["alirpa_x_fwd"] = ref
        out["torch_vs_alirpa"] = ref / out["torch_x_fwd"]
        out["relax_vs_alirpa"] = ref / out["relax_x_fwd"]
    return out


def unstable(graph, x: np.ndarray, C: np.ndarray, eps: float) -> list[float]:
    """Unstable neurons per sample at each ReLU input under the default CROWN plan's final
    intermediate bounds. Its sparse backward passes start from the neurons unstable before
    CROWN tightened them: at least these."""
    from boundflow.bab.relu_split import relu_inputs

    nodes = relu_inputs(graph)
    v = bf.compile(graph, batch=x.shape[0], n_specs=C.shape[1], method="crown")
    out = v._executor.run(bf.InputSpec.box(x - eps, x + eps), bf.LinearSpec(C), keep=nodes)
    return [float(((iv.lower < 0) & (iv.upper > 0)).reshape(x.shape[0], -1).sum(1)
                  .float().mean()) for iv in (out.stats["bounds"][n] for n in nodes)]


def same_rows(batches: list[int], rounds: int) -> list[dict]:
    """CROWN per FLOP of the residual example and its plain counterpart, by default (each
    sample's unstable neurons get a backward pass) and with every neuron bounded (the same
    rows in both: what the kernels cost, apart from how many neurons the skip connection
    leaves unstable)."""
    print("\nresidual vs plain, CROWN on the torch path: the default gives a backward pass "
          "to each sample's unstable neurons where that pays (sparse auto); 'all' to every "
          "neuron (sparse=False), the same rows in both")
    print(f"{'model':<15} {'B':>3} {'unstable after CROWN, per ReLU input':<36} "
          f"{'default ms':>10} {'all ms':>8} {'ms/MFLOP':>9} {'all ms/MFLOP':>12}")
    out = []
    for batch in batches:
        for name in ("residual", "plain_residual"):
            module, x, C, eps = workload(name, batch)
            graph = as_graph(module, torch.from_numpy(x[:1]))
            opts = dict(eps=eps, C=C, method="crown")
            ms = interleaved({"default": lambda: bf.compute_bounds(graph, x, **opts),
                              "all": lambda: bf.compute_bounds(graph, x, sparse=False, **opts)},
                             max(3, rounds // 3))
            mflop = batch * forward_mflops(module, x)
            counts = " ".join(f"{c:.1f}" for c in unstable(graph, x, C, eps))
            r = {"model": name, "batch": batch, "unstable": counts, "default_ms": ms["default"],
                 "all_ms": ms["all"], "ms_per_mflop": ms["default"] / mflop,
                 "all_ms_per_mflop": ms["all"] / mflop}
            out.append(r)
            print(f"{name:<15} {batch:>3} {counts:<36} {ms['default']:>10.2f} "
                  f"{ms['all']:>8.2f} {r['ms_per_mflop']:>9.3f} {r['all_ms_per_mflop']:>12.3f}",
                  flush=True)
    return out


def module_rows(names: list[str], batches: list[int], rounds: int) -> list[dict]:
    """IBP called with the torch module, as a user calls it, beside the same call with its
    graph (what the main table times): the difference is the cached trace's check that the
    module is unchanged (its structure walked, every weight compared byte for byte)."""
    print("\nIBP on the torch path, called with the module (a user's call: the cached trace "
          "is checked against the module's weights and settings) and with its traced graph")
    print(f"{'model':<9} {'B':>3} {'fwd ms':>7} {'graph ms':>9} {'module ms':>9} "
          f"{'check ms':>8} {'graph xfwd':>10} {'module xfwd':>11} {'weights MiB':>11}")
    out = []
    for name in names:
        for batch in batches:
            module, x, C, eps = workload(name, batch)
            xt = torch.from_numpy(x)
            graph = as_graph(module, xt[:1])

            def forward():
                with torch.no_grad():
                    module(xt)
            ms = interleaved({"forward": forward,
                              "graph": lambda: bf.compute_bounds(graph, x, eps=eps, C=C),
                              "module": lambda: bf.compute_bounds(module, x, eps=eps, C=C)},
                             3 * rounds)
            mib = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20
            r = {"model": name, "batch": batch, "forward_ms": ms["forward"],
                 "graph_ms": ms["graph"], "module_ms": ms["module"],
                 "check_ms": ms["module"] - ms["graph"], "weights_mib": mib}
            out.append(r)
            print(f"{name:<9} {batch:>3} {ms['forward']:>7.3f} {ms['graph']:>9.3f} "
                  f"{ms['module']:>9.3f} {r['check_ms']:>8.3f} "
                  f"{ms['graph'] / ms['forward']:>10.1f} {ms['module'] / ms['forward']:>11.1f} "
                  f"{mib:>11.2f}", flush=True)
    return out


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", default="mlp,cnn,deep,residual")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--methods", default="ibp,crown-ibp,crown,alpha-crown")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios = alirpa_ratios()
    print(f"torch {torch.__version__}, 1 thread; load average before {os.getloadavg()[0]:.2f}")
    head = (f"{'model':<9} {'B':>3} {'method':<11} {'fwd ms':>7} {'torch ms':>9} "
            f"{'relax ms':>9} {'torch xfwd':>10} {'relax xfwd':>10} {'aL xfwd':>8} "
            f"{'torch/aL':>8} {'relax/aL':>8} {'relax/torch':>11} {'ms/MFLOP':>8} {'gap':>8}")
    print(head)
    print("-" * len(head))
    rows = []
    names = args.rows.split(",")
    if "residual" in names and "crown" in args.methods and "plain_residual" not in names:
        names.append("plain_residual")
    for name in names:
        for batch in (int(b) for b in args.batches.split(",")):
            for method in args.methods.split(","):
                if method == "alpha-crown" and batch != 1:
                    continue
                if name.startswith("plain_") and method != "crown":
                    continue
                r = row(name, batch, method, args.rounds, ratios)
                rows.append(r)
                print(f"{name:<9} {batch:>3} {method:<11} {r['forward_ms']:>7.3f} "
                      f"{r['torch_ms']:>9.3f} {r['relax_ms']:>9.3f} {r['torch_x_fwd']:>10.1f} "
                      f"{r['relax_x_fwd']:>10.1f} {fmt(r.get('alirpa_x_fwd'), '8.1f')} "
                      f"{fmt(r.get('torch_vs_alirpa'), '7.2f')}x "
                      f"{fmt(r.get('relax_vs_alirpa'), '7.2f')}x "
                      f"{r['relax_over_torch']:>10.2f}x {r['torch_ms_per_mflop']:>8.3f} "
                      f"{r['max_gap']:>8.1e}", flush=True)
    same = (same_rows([int(b) for b in args.batches.split(",")], args.rounds)
            if "plain_residual" in names else [])
    by_module = (module_rows([n for n in names if not n.startswith("plain_")],
                             [int(b) for b in args.batches.split(",")], args.rounds)
                 if "ibp" in args.methods.split(",") else [])
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.csv:
        tables = [(args.csv, rows)]
        if same:
            path = Path(args.csv)
            tables.append((path.with_name(path.stem + "_same_rows.csv"), same))
        if by_module:
            path = Path(args.csv)
            tables.append((path.with_name(path.stem + "_module.csv"), by_module))
        for path, table in tables:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=sorted({k for r in table for k in r}))
                w.writeheader()
                w.writerows(table)


if __name__ == "__main__":
    main()
