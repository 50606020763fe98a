"""The Relax backend (interval plans so far): one PrimFunc per task, the same bounds as the
torch backend, sound, one compile for every batch size, CUDA source for the cuda target."""

import random
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from boundflow.backend.relax.executor import (  # noqa: E402
    RelaxExecutor, build_module, compile_module)
from boundflow.backend.torch import TorchExecutor  # noqa: E402
from boundflow.examples import EXAMPLES  # noqa: E402
from boundflow.ir.spec import InputSpec, LinearSpec, margin_spec  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.planner import default, normalised, plan, space  # noqa: E402
from tests.helpers import assert_contains, box_points, example_graph, true_outputs  # noqa: E402


def _query(name, batch=3, dtype=np.float32, eps=0.02):
    ex, g = example_graph(name)
    x = InputSpec.linf(ex.inputs[:batch].astype(dtype), eps)
    n_out = int(np.prod(g.output_shape))
    return g, x, margin_spec(np.arange(batch) % n_out, n_out)


def _close(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_interval_plans_match_the_torch_backend_and_are_sound(name):
    g, x, C = _query(name)
    w = Workload.of(g, batch=3, method="ibp")
    k = default(g, w)
    unfused = k.replace(partition=tuple(False for _ in k.partition))
    sampled = space(g, w).sample(random.Random(3))
    counts = {}
    for label, knobs in (("default", k), ("unfused", unfused), ("sampled", sampled)):
        bundle = plan(g, w, knobs)
        exe = RelaxExecutor(bundle, g)
        out = exe.run(x, C)
        ref = TorchExecutor(bundle, g).run(x, C)
        scale = float(ref.upper.abs().max())
        _close(out.lower, ref.lower, atol=1e-6 * max(scale, 1.0))
        _close(out.upper, ref.upper, atol=1e-6 * max(scale, 1.0))
        counts[label] = exe.n_kernels
        if label == "sampled":
            pts = box_points(x.lower, x.upper, n=200)
            assert_contains(out.lower, out.upper, true_outputs(g, pts), C.C, tol=1e-5)
    assert counts["default"] < counts["unfused"]          # fusing tasks fuses kernels


def test_float64_plan_matches_closely_and_one_compile_serves_every_batch():
    g, x, C = _query("random_residual", dtype=np.float64)
    w = Workload.of(g, batch=3, method="ibp", dtype="float64")
    bundle = plan(g, w)
    exe = RelaxExecutor(bundle, g)
    ref = TorchExecutor(bundle, g)
    for batch in (3, 1):
        xb = InputSpec.box(x.lower[:batch], x.upper[:batch])
        Cb = LinearSpec(C.C[:batch])
        out, want = exe.run(xb, Cb), ref.run(xb, Cb)
        _close(out.lower, want.lower, rtol=1e-10, atol=1e-10)
        _close(out.upper, want.upper, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, method", [
    ("digits_mlp", "crown-ibp"), ("digits_cnn", "crown"), ("random_residual", "crown"),
    ("random_nhwc", "crown-ibp"), ("random_cnn", "alpha-crown")])
def test_crown_plans_lower_to_tir_and_match_the_torch_backend(name, method):
    from boundflow.domains.alpha import AlphaConfig

    g, x, C = _query(name)
    w = Workload.of(g, batch=3, method=method)
    knobs = space(g, w).sample(random.Random(5)).replace(lowering="tir", final=w.method
                                                         if method != "crown-ibp" else "crown")
    bundle = plan(g, w, knobs, alpha=AlphaConfig(iterations=3))
    exe = RelaxExecutor(bundle, g)
    # everything lowers to TIR except alpha-CROWN's final task (its optimiser needs autograd)
    assert exe.fallbacks == (["final"] if method == "alpha-crown" else [])
    out, ref = exe.run(x, C), TorchExecutor(bundle, g).run(x, C)
    scale = max(1.0, float(ref.upper.abs().max()))
    _close(out.lower, ref.lower, atol=1e-5 * scale)
    _close(out.upper, ref.upper, atol=1e-5 * scale)
    pts = box_points(x.lower, x.upper, n=200)
    assert_contains(out.lower, out.upper, true_outputs(g, pts), C.C, tol=1e-5)
    if method == "alpha-crown":          # the lower side only: the callback is told so
        low, ref_low = exe.run(x, C, upper=False), TorchExecutor(bundle, g).run(x, C,
                                                                                upper=False)
        _close(low.lower, ref_low.lower, atol=1e-5 * scale)
        _close(low.upper, ref_low.upper, atol=1e-5 * scale)
        _close(low.lower, out.lower, atol=1e-5 * scale)
        assert bool((low.upper >= out.upper - 1e-5 * scale).all())
        assert not torch.allclose(low.upper, out.upper)     # CROWN's, not alpha's


def test_lowering_torch_runs_every_task_as_a_callback():
    g, x, C = _query("digits_mlp")
    w = Workload.of(g, batch=3, method="crown")
    bundle = plan(g, w, default(g, w).replace(lowering="torch"))
    exe = RelaxExecutor(bundle, g)
    assert exe.n_kernels == 0 and len(exe.fallbacks) == len(bundle.task_graph.tasks) - 1
    _close(exe.run(x, C).lower, TorchExecutor(bundle, g).run(x, C).lower)


# CUDA schedule knobs (threads, shared): TVM's dlight, our own binding, shared-memory tiling
# (the default) with its thread budget
CUDA_KNOBS = [(0, 0), (128, 0), (0, 16), (256, 8)]


def _cuda_plan(g, method, threads, shared=0, torch_every=0, n_specs=None):
    """The default plan of ``g`` for cuda with every task's schedule knobs set (and every
    ``torch_every``-th task lowered to a torch callback)."""
    w = Workload.of(g, batch=3, method=method, target="cuda", n_specs=n_specs)
    k = default(g, w).replace(lowering="tir", task_lowering=())
    tasks = [t.name for t in plan(g, w, k).task_graph.tasks if t.kind != "input"]
    knobs = (("shared", shared), ("threads", threads))
    k = k.replace(schedule=tuple((t, knobs) for t in tasks))
    if torch_every:
        k = k.replace(task_lowering=tuple((t, "torch") for t in tasks[::torch_every]))
    return plan(g, w, k)


@pytest.mark.parametrize("threads,shared", CUDA_KNOBS)
def test_cuda_target_builds_cuda_source(threads, shared):
    import tvm

    g, _, _ = _query("digits_cnn")
    bundle = _cuda_plan(g, "crown-ibp", threads, shared)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    mod, _ = build_module(bundle, normalised(g)[0], target)
    exe = compile_module(mod, target)

    def find_cuda(m):
        if m.kind == "cuda":
            return m
        return next((r for r in map(find_cuda, m.imports) if r is not None), None)

    if threads or shared:                     # our schedule took every function, not dlight
        assert all(f.attrs.get("tirx.is_scheduled") for _, f in mod.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc))
    src = find_cuda(exe.mod).inspect_source()
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src))
    # every task's function runs on the GPU (one left unscheduled would be built as host code
    # that reads device memory: a segfault on a GPU machine)
    funcs = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(any(k.startswith(f + "_kernel") for k in kernels) for f in funcs)
    bounds = set(re.findall(r"__launch_bounds__\((\d+)\)", src))
    if threads and not shared:                # bound by our schedule, not dlight's
        assert bounds == {str(threads)}
    if shared:                                # tiles staged in shared memory, within budget
        assert "__shared__" in src
        assert all(int(b) <= (threads or 128) for b in bounds)
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: CUDA source generated but not compiled")
    from tvm.support import nvcc

    with target:
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch="sm_80", compiler="nvcc")
    assert b".entry" in bytes(ptx)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "random_residual"])
@pytest.mark.parametrize("n_specs", [1, None])
def test_cuda_default_schedule_takes_every_function(name, n_specs):
    """The default cuda schedule (shared-memory tiling) schedules every task's function
    itself, with one spec row too (a unit output loop is no reuse, and a block whose
    outputs give no block level is bound, not tiled): nothing falls to dlight."""
    import tvm

    g, _, _ = _query(name)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    for method in ("crown-ibp", "crown"):
        w = Workload.of(g, batch=3, method=method, target="cuda", n_specs=n_specs)
        bundle = plan(g, w, default(g, w).replace(lowering="tir", task_lowering=()))
        mod, _ = build_module(bundle, normalised(g)[0], target)
        left = [gv.name_hint for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled")]
        assert not left, f"{name} {method}: left to dlight: {left}"


def _has_gpu() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.mark.skipif(not _has_gpu(), reason="no CUDA device")
@pytest.mark.parametrize("threads,shared", CUDA_KNOBS)
@pytest.mark.parametrize("name,method,torch_every", [("digits_cnn", "crown-ibp", 0),
                                                     ("random_residual", "crown", 0),
                                                     ("digits_mlp", "crown", 2)])
def test_cuda_run_matches_cpu(monkeypatch, name, method, torch_every, threads, shared):
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")            # GPU machines only
    g, x, C = _query(name)
    bundle = _cuda_plan(g, method, threads, shared, torch_every)
    exe = RelaxExecutor(bundle, g, target="cuda")
    assert bool(exe.fallbacks) == bool(torch_every)       # torch callbacks on GPU tensors
    gpu = exe.run(x, C)
    cpu = TorchExecutor(bundle, g).run(x, C)
    _close(gpu.lower.cpu(), cpu.lower, atol=1e-4)
    _close(gpu.upper.cpu(), cpu.upper, atol=1e-4)
    assert_contains(gpu.lower, gpu.upper, true_outputs(g, box_points(x.lower, x.upper, n=500)),
                    C.C, tol=1e-5)



def test_compile_cache_memory_disk_and_corrupt_entries(tmp_path):
    from boundflow.backend.relax.cache import CompileCache

    g, x, C = _query("digits_mlp")
    bundle = plan(g, Workload.of(g, batch=3, method="ibp"))
    cache = CompileCache(tmp_path)
    first = RelaxExecutor(bundle, g, cache=cache)
    again = RelaxExecutor(bundle, g, cache=cache)
    assert (first.compile_source, again.compile_source) == ("built", "memory")
    other = RelaxExecutor(bundle, g, cache=CompileCache(tmp_path))       # as a new process
    assert other.compile_source == "disk"
    torch.testing.assert_close(other.run(x, C).lower, first.run(x, C).lower)
    # a truncated library (in another folder: this process has the first one mapped)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tmp_path.glob("*.*"):
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:100] if f.suffix == ".so" else data)
    fresh = CompileCache(broken)
    rebuilt = RelaxExecutor(bundle, g, cache=fresh)
    assert rebuilt.compile_source == "built" and fresh.stats["rebuilt_corrupt"] == 1
    torch.testing.assert_close(rebuilt.run(x, C).upper, first.run(x, C).upper)


def test_second_process_loads_instead_of_compiling(tmp_path):
    import os
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from boundflow.examples import load\n"
        "from boundflow.api import as_graph, executor\n"
        "from boundflow.ir.workload import Workload\n"
        "from boundflow.planner import plan\n"
        "import torch\n"
        "ex = load('digits_mlp'); g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]))\n"
        "e = executor(plan(g, Workload.of(g, method='ibp')), g, 'relax')\n"
        "print(e.compile_source)\n")
    env = dict(os.environ, BOUNDFLOW_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ["built", "disk"], \
        [r.stderr[-500:] for r in runs]


def test_api_and_cli_run_the_relax_backend(capsys):
    from boundflow.api import compute_bounds
    from boundflow.cli import main
    import boundflow.examples as examples

    g, x, C = _query("digits_cnn")
    relax_b = compute_bounds(g, x, C=C, backend="relax")
    torch_b = compute_bounds(g, x, C=C)
    _close(relax_b.lower, torch_b.lower, atol=1e-4)
    crown = compute_bounds(g, x, C=C, method="crown", backend="relax")
    _close(crown.lower, compute_bounds(g, x, C=C, method="crown").lower, atol=1e-4)
    argv = ["verify", "--model", str(examples.DATA / "digits_cnn.pt2"), "--input",
            str(examples.DATA / "digits_x.npy"), "--eps", "0.01", "--json"]
    assert main(argv + ["--backend", "relax"]) == 0
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    import json
    a, b = json.loads(out[0]), json.loads(out[1])
    assert a["verdicts"] == b["verdicts"]
    np.testing.assert_allclose(a["lower"], b["lower"], rtol=1e-4, atol=1e-4)


def test_relax_cache_bounds_and_refusals():
    from boundflow.errors import BoundFlowError
    from boundflow.runtime.cache import BoundCache

    g, x, C = _query("digits_mlp")
    exe = RelaxExecutor(plan(g, Workload.of(g, batch=3, method="ibp")), g)
    cache = BoundCache()
    first = exe.run(x, C, cache_bounds=True, cache=cache)
    again = exe.run(x, C, cache_bounds=True, cache=cache)
    assert cache.stats()["hits"] == 1 and torch.equal(first.lower, again.lower)
    exe.run(InputSpec.linf(x.center, 0.05), C, cache_bounds=True, cache=cache)
    assert cache.stats()["hits"] == 1
    with pytest.raises(BoundFlowError, match="torch backend only"):
        exe.run(x, C, reuse_ibp=True, cache=cache)
    with pytest.raises(BoundFlowError, match="needs a BoundCache"):
        exe.run(x, C, cache_bounds=True)


def test_fuse_passes_knob_merges_kernels_and_keeps_bounds():
    g, x, C = _query("digits_cnn")
    w = Workload.of(g, batch=3, method="crown")
    k = default(g, w)
    unfused = k.replace(partition=tuple(False for _ in k.partition))
    plain = RelaxExecutor(plan(g, w, unfused), g)
    fused = RelaxExecutor(plan(g, w, unfused.replace(fuse_passes=True)), g)
    assert fused.n_kernels < plain.n_kernels
    a, b = fused.run(x, C), plain.run(x, C)
    scale = max(1.0, float(b.upper.abs().max()))
    _close(a.lower, b.lower, atol=1e-5 * scale)
    _close(a.upper, b.upper, atol=1e-5 * scale)


def test_random_schedule_knobs_keep_bounds():
    from boundflow.backend.relax import schedules
    from boundflow.errors import BoundFlowError

    g, x, C = _query("random_cnn")
    w = Workload.of(g, batch=3, method="crown-ibp")
    base = plan(g, w, default(g, w).replace(lowering="tir"))     # convolutions too
    rng = random.Random(11)
    tasks = [t.name for t in base.task_graph.tasks if t.kind != "input"]
    knobs = base.knobs.replace(schedule=tuple((t, schedules.sample(rng)) for t in tasks))
    bundle = plan(g, w, knobs)
    assert dict(bundle.lowering_plan.tasks[0][2]) == dict(knobs.schedule[0][1])
    out, ref = RelaxExecutor(bundle, g).run(x, C), TorchExecutor(bundle, g).run(x, C)
    scale = max(1.0, float(ref.upper.abs().max()))
    _close(out.lower, ref.lower, atol=1e-5 * scale)
    _close(out.upper, ref.upper, atol=1e-5 * scale)
    # register tiling with a local accumulator, vectorised, on every task
    tiled = (("cache_write", True), ("tile", 4), ("vectorize", 4))
    bundle = plan(g, w, base.knobs.replace(schedule=tuple((t, tiled) for t in tasks)))
    mod, _ = build_module(bundle, normalised(g)[0])
    assert '"local"' in mod.script() and "T.vectorized" in mod.script()
    out = RelaxExecutor(bundle, g).run(x, C)
    _close(out.lower, ref.lower, atol=1e-5 * scale)
    _close(out.upper, ref.upper, atol=1e-5 * scale)
    with pytest.raises(BoundFlowError, match="schedule knob"):
        schedules.check({"tile": 3})
    with pytest.raises(BoundFlowError, match="for target llvm"):
        schedules.check({"threads": 64}, "llvm")
    assert schedules.check({"threads": 64}, "cuda") == {"threads": 64, "shared": 16}


def test_a_plan_with_forward_domains_runs_its_forward_tasks_as_callbacks_and_agrees():
    """Forward mode has no TIR kernel: its tasks run as torch callbacks inside the Relax
    module; the rest compiles, and the bounds equal the torch backend's."""
    from boundflow.backend import create

    g, x, C = _query("random_mlp", batch=4, eps=0.05)
    w = Workload.of(g, batch=4, method="crown", n_specs=C.n_specs)
    k = default(g, w)
    bundle = plan(g, w, k.replace(domains=tuple("forward" for _ in k.domains),
                                  lowering="tir"))
    fwd = [t for t in bundle.task_graph.tasks if t.kind == "forward"]
    assert all(bundle.lowering_plan.lowering(t.name) == "torch" for t in fwd)
    relax_backend = create("relax")
    assert fwd and not any(relax_backend.compiles(bundle, t, g) for t in fwd)
    assert any(relax_backend.compiles(bundle, t, g) for t in bundle.task_graph.tasks)
    got = RelaxExecutor(bundle, g).run(x, C)
    want = TorchExecutor(bundle, g).run(x, C)
    _close(got.lower, want.lower)
    _close(got.upper, want.upper)


def test_misaligned_inputs_are_copied_once_not_offered_to_tvm(monkeypatch):
    """A numpy input is 16-byte aligned; TVM's DLPack import wants 64. The executor copies
    such an input into an aligned torch tensor itself: handing it to TVM first and catching
    the refusal cost ~60 us an input, 2.4x the whole call of the shared MLP's IBP bound.
    Bounds are the same either way."""
    import tvm

    g, x, C = _query("digits_mlp", batch=2)
    bundle = plan(g, Workload.of(g, batch=2, method="ibp", n_specs=C.n_specs))
    exe = RelaxExecutor(bundle, g)
    want = exe.run(x, C)
    offered, real = [], tvm.runtime.from_dlpack

    def from_dlpack(t):
        offered.append(t.data_ptr() % 64)
        return real(t)
    monkeypatch.setattr(tvm.runtime, "from_dlpack", from_dlpack)
    buf = np.empty(x.lower.size + 4, np.float32)          # data 16 bytes past 64
    for shift in (1, 2, 3):
        lo = buf[shift:shift + x.lower.size].reshape(x.lower.shape)
        lo[...] = x.lower
        assert lo.ctypes.data % 64 != 0
        got = exe.run(InputSpec(lo, x.upper), C)
        torch.testing.assert_close(got.lower, want.lower, rtol=0, atol=0)
        torch.testing.assert_close(got.upper, want.upper, rtol=0, atol=0)
    assert offered and set(offered) == {0}
