"""GFLOP/s of the Relax backend's own product kernels against ``torch.matmul``, same shapes,
same run.

    python benchmarks/bench_gemm.py [--repeat 50] [--knobs '{"tile": 16}']

Each kernel is the stage the backend really emits (``kernels.TaskLowering._linear`` for IBP's
``W·c`` / ``|W|·r`` pair, ``crown_kernels.BackwardLowering._back_linear`` for CROWN's
coefficient product ``A·W``), built with ``te.create_prim_func`` and scheduled by
``schedules.schedule`` with the default (rule-based) knobs or ``--knobs``, compiled for this
machine's CPU; ``torch.matmul`` computes the same products from the same layouts. One thread
each (TVM_NUM_THREADS=1, torch.set_num_threads(1)). Shapes: the CROWN products of the shared
mlp (784-256-256-10) and cnn (2048-100-10 head) with 9 margin specs or a layer of neurons as
rows, CROWN's window-form adjoint convolution (``crown_patch_kernels``) of the shared cnn's
conv2d_1 neurons against the torch backend's window rule on the same windows, and IBP's batch
products,
at batch 1 and 32 (the window case at 1 and 8).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse          # noqa: E402
import json              # noqa: E402

import numpy as np       # noqa: E402
import torch             # noqa: E402
import tvm               # noqa: E402
from tvm import te, tirx  # noqa: E402

from boundflow.api import as_graph                              # noqa: E402
from boundflow.backend.relax.crown_kernels import BackwardLowering, Coef  # noqa: E402
from boundflow.backend.relax.kernels import TaskLowering, Value, param_tensor  # noqa: E402
from boundflow.backend.relax.schedules import schedule          # noqa: E402
from boundflow.backend.relax.target import tvm_target           # noqa: E402
from boundflow.domains.traversal import graph_tensors           # noqa: E402
from boundflow.ir.normalize import normalised                   # noqa: E402
from bench_ibp import median_seconds                            # noqa: E402

# (what, batch, rows S, out features N, in features K): CROWN computes A[b, S, N] · W[N, K]
CROWN = [("mlp layer-2 rows", 1, 256, 256, 784), ("mlp final", 1, 9, 256, 784),
         ("mlp final", 32, 9, 256, 784), ("mlp layer-2 rows", 32, 256, 256, 784),
         ("mlp final, last", 32, 9, 10, 256), ("cnn head rows", 1, 100, 100, 2048),
         ("cnn final", 32, 9, 100, 2048)]
IBP = [("mlp layer 1", 1, 784, 256), ("mlp layer 1", 32, 784, 256),
       ("cnn head", 32, 2048, 100), ("mlp layer 2", 32, 256, 256)]


def linear_graph(k: int, n: int):
    layer = torch.nn.Linear(k, n)
    g, _ = normalised(as_graph(layer, torch.zeros(1, k)))
    node = next(x for x in g.nodes if x.op == "linear")
    return g, node, graph_tensors(g, torch.float32)


def compile_func(func, knobs, target):
    return tvm.compile(tvm.IRModule({"main": schedule(func, knobs, target)}), target=target)


def crown_case(batch, S, N, K, knobs, target, repeat):
    g, node, tensors = linear_graph(K, N)
    n = tirx.Var("n", "int64")
    low = BackwardLowering(g, "float32", n)
    A = te.placeholder((n, S, N), "float32", name="A")
    [new], _ = low._back_linear(node, Coef(lambda b, s, o: A[b, s, o],
                                           lambda b, s, o: A[b, s, o], True), S, {})
    out = te.compute((n, S, K), lambda b, s, i: new.la(b, s, i), name="out")
    keys = list(low.params)
    func = te.create_prim_func([A] + [low.params[k] for k in keys] + [out],
                               index_dtype_override="int64")
    f = compile_func(func, knobs, target)["main"]
    a = torch.rand(batch, S, N)
    w = [param_tensor(tensors, k) for k in keys]
    args = [tvm.runtime.tensor(a.numpy())] + [tvm.runtime.tensor(t.numpy()) for t in w] \
        + [tvm.runtime.tensor(np.zeros((batch, S, K), np.float32))]
    weight = tensors[node.params["weight"]]
    ours = median_seconds(lambda: f(*args), repeat)
    ref = median_seconds(lambda: torch.matmul(a, weight), repeat)
    ok = np.allclose(args[-1].numpy(), torch.matmul(a, weight).numpy(), rtol=1e-4, atol=1e-4)
    return 2 * batch * S * N * K, ours, ref, ok


# CROWN's window-form adjoint convolutions (crown_patch_kernels.PatchWalk._conv2d) of the shared
# cnn's crown task at conv2d_1 (every one of its 2,048 neurons a row): (what, batch, node)
PATCH = [("cnn conv2d_1 rows, conv2d", 1, "conv2d"), ("cnn conv2d_1 rows, conv2d", 8, "conv2d")]


def patch_case(batch, node_name, knobs, target, repeat):
    """The window-form stage through ``node_name`` against the torch backend's window rule
    (``crown_patches._transpose``: ATen products) on the same window coefficients."""
    from bench_ibp import model as shared_model
    from boundflow.backend.relax.crown_patch_kernels import PatchWalk
    from boundflow.domains import crown_patches

    module = shared_model("cnn")
    g, _ = normalised(as_graph(module, torch.zeros((1,) + (3, 32, 32))))
    tensors = graph_tensors(g, torch.float32)
    n = tirx.Var("n", "int64")
    low = BackwardLowering(g, "float32", n)
    walk = PatchWalk(low, g, g.node("conv2d_1"))
    node = g.node(node_name)
    win, S = walk.windows[node.name], walk.S
    C, (Rh, Rw) = node.shape[0], win.size
    A = te.placeholder((n, C, Rh, Rw, S), "float32", name="A")
    acc = lambda b, s, c, y, x: A[b, c, y, x, s]  # noqa: E731
    [new], _ = walk._conv2d(node, Coef(acc, acc, True), win, {})
    cin, (Gh, Gw) = g.node(node.inputs[0]).shape[0], walk._grown(node, win).size
    out = te.compute((n, cin, Gh, Gw, S), lambda b, c, y, x, s: new.la(b, s, c, y, x),
                     name="out")
    keys = list(low.params)
    func = te.create_prim_func([A] + [low.params[k] for k in keys] + [out],
                               index_dtype_override="int64")
    f = compile_func(func, knobs, target)["main"]
    a = torch.rand(batch, C, Rh, Rw, S)
    args = [tvm.runtime.tensor(a.numpy())] \
        + [tvm.runtime.tensor(param_tensor(tensors, k).numpy()) for k in keys] \
        + [tvm.runtime.tensor(np.zeros((batch, cin, Gh, Gw, S), np.float32))]
    weight = tensors[node.params["weight"]]
    at = node.attrs
    rows = a.permute(0, 4, 1, 2, 3).reshape(batch, S, 1, C, Rh, Rw).contiguous()

    def eager():                      # the torch backend's own window rule, same coefficients
        return crown_patches._transpose(rows, weight, at["stride"], at["dilation"],
                                        at["groups"])
    ours = median_seconds(lambda: f(*args), repeat)
    ref = median_seconds(eager, repeat)
    want = eager().reshape(batch, S, cin, Gh, Gw).permute(0, 2, 3, 4, 1)
    ok = np.allclose(args[-1].numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    kh, kw = weight.shape[2:]
    return 2 * batch * S * C * Rh * Rw * cin * kh * kw, ours, ref, ok, (S, C, Rh, cin, Gh)


def ibp_case(batch, K, N, knobs, target, repeat):
    g, node, tensors = linear_graph(K, N)
    n = tirx.Var("n", "int64")
    low = TaskLowering(g, "float32", n)
    c, r = (te.placeholder((n, K), "float32", name=x) for x in ("c", "r"))
    v = low._linear(node, [Value("cr", lambda b, k: c[b, k], lambda b, k: r[b, k], (K,))])
    outs = [te.compute((n, N), lambda b, o: v.a(b, o), name="mid"),
            te.compute((n, N), lambda b, o: v.b(b, o), name="rad")]
    keys = list(low.params)
    func = te.create_prim_func([c, r] + [low.params[k] for k in keys] + outs,
                               index_dtype_override="int64")
    f = compile_func(func, knobs, target)["main"]
    ct, rt = torch.rand(batch, K), torch.rand(batch, K)
    args = [tvm.runtime.tensor(t.numpy()) for t in (ct, rt)] \
        + [tvm.runtime.tensor(param_tensor(tensors, k).numpy()) for k in keys] \
        + [tvm.runtime.tensor(np.zeros((batch, N), np.float32)) for _ in range(2)]
    w, b = tensors[node.params["weight"]], tensors[node.params["bias"]]
    wa = w.abs()
    ours = median_seconds(lambda: f(*args), repeat)
    ref = median_seconds(lambda: (torch.addmm(b, ct, w.t()), torch.matmul(rt, wa.t())), repeat)
    ok = np.allclose(args[-1].numpy(), (rt @ wa.t()).numpy(), rtol=1e-4, atol=1e-4)
    return 2 * 2 * batch * K * N, ours, ref, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--knobs", default="{}", help="schedule knobs as JSON (default: rule)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    knobs = json.loads(args.knobs)
    target = tvm_target("llvm")
    print(f"target {target}, knobs {knobs or 'rule-based defaults'}, 1 thread, "
          f"load average {os.getloadavg()[0]:.2f}")
    head = (f"{'kernel':<28} {'B':>3} {'shape':<18} {'ours GF/s':>9} {'torch GF/s':>10} "
            f"{'ours/torch':>10}")
    print(head)
    print("-" * len(head))
    ratios = []
    for what, batch, S, N, K in CROWN:
        flops, ours, ref, ok = crown_case(batch, S, N, K, knobs, target, args.repeat)
        ratios.append(ref / ours)
        print(f"{'CROWN A·W, ' + what:<28} {batch:>3} {f'{S}x{N} · {N}x{K}':<18} "
              f"{flops / ours / 1e9:>9.1f} {flops / ref / 1e9:>10.1f} {ref / ours:>9.0%}"
              f"{'' if ok else '  WRONG'}", flush=True)
    for what, batch, node in PATCH:
        flops, ours, ref, ok, (S, C, R, cin, G) = patch_case(batch, node, knobs, target,
                                                             args.repeat)
        ratios.append(ref / ours)
        print(f"{'CROWN window, ' + what:<28} {batch:>3} {f'{S}x{C}x{R}² -> {cin}x{G}²':<18} "
              f"{flops / ours / 1e9:>9.1f} {flops / ref / 1e9:>10.1f} {ref / ours:>9.0%}"
              f"{'' if ok else '  WRONG'}", flush=True)
    for what, batch, K, N in IBP:
        flops, ours, ref, ok = ibp_case(batch, K, N, knobs, target, args.repeat)
        ratios.append(ref / ours)
        print(f"{'IBP W·c, |W|·r, ' + what:<28} {batch:>3} {f'{K} -> {N}':<18} "
              f"{flops / ours / 1e9:>9.1f} {flops / ref / 1e9:>10.1f} {ref / ours:>9.0%}"
              f"{'' if ok else '  WRONG'}", flush=True)
    print(f"geometric mean ours/torch {np.exp(np.mean(np.log(ratios))):.0%}; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
