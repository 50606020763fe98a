"""What runs inside a measurement worker process: building and timing one candidate.

These are module-level functions so the worker pool (TVM's ``PopenPoolExecutor``) pickles them
by reference; each returns plain values and raises on failure (the pool turns a raise, a crash
or a timeout into a recorded error).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.measure.result import BuildResult, MeasureInput, MeasureResult, WorkerError, \
    summarise, tightness


@dataclass(frozen=True)
class MeasureConfig:
    """The protocol: ``warmup`` untimed runs, then ``repeat`` timings of ``number`` runs each
    (each timing is the mean of its ``number`` runs); ``timeout_s`` per candidate (build or
    run), in its worker."""

    number: int = 3
    repeat: int = 5
    warmup: int = 1
    timeout_s: float = 120.0
    memory_limit_mb: int | None = None    # address space a candidate may add to its worker

    def __post_init__(self):
        from boundflow.errors import MeasureError
        if self.number < 1 or self.repeat < 1 or self.warmup < 0 or self.timeout_s <= 0 or \
                (self.memory_limit_mb is not None and self.memory_limit_mb <= 0):
            raise MeasureError(f"bad measurement protocol {self}")


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def guarded(fn, limit_mb: int | None, *args: Any) -> Any:
    """``fn(*args)`` with the worker's address space capped at what it has mapped now plus
    ``limit_mb`` (Linux), so a candidate that wants too much memory gets a MemoryError in its
    own worker instead of taking the machine down; the cap is lifted afterwards."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_AS)
    if limit_mb is not None:
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + limit_mb * 2**20, old[1]))
    try:
        return fn(*args)
    except MemoryError as e:              # numpy's subclass does not unpickle in the parent
        raise MemoryError(str(e)) from None
    except BoundFlowError:
        raise
    except Exception as e:                # any exception type reaches the parent intact
        raise WorkerError(f"{type(e).__name__}: {e}") from None
    finally:
        if limit_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, old)


def build_relax(inp: MeasureInput, root: str) -> tuple[float, int]:
    """Compile ``inp``'s plan into the compile cache at ``root``: (compile seconds, kernels)."""
    from boundflow.backend.relax.cache import CompileCache
    from boundflow.backend.relax.executor import RelaxExecutor

    exe = RelaxExecutor(inp.bundle, inp.graph, inp.target, cache=CompileCache(root))
    return exe.build_seconds, exe.n_kernels


def _query(inp: MeasureInput):
    from boundflow.ir.spec import InputSpec, LinearSpec

    return InputSpec(inp.lower, inp.upper), (None if inp.C is None else LinearSpec(inp.C))


def measure_local(inp: MeasureInput, build: BuildResult, config: MeasureConfig,
                  runner: str = "local") -> MeasureResult:
    """Time ``inp`` in this process: the Relax VM's ``time_evaluator`` for the relax backend,
    a wall clock (synchronised on GPUs) for the torch backend and for runs with
    ``run_options`` (repeated identical queries through one BoundCache)."""
    import torch

    x, C = _query(inp)
    batch = inp.lower.shape[0]
    common: dict[str, Any] = dict(compile_seconds=build.compile_seconds, runner=runner)
    options = dict(inp.run_options)
    if inp.backend == "relax":
        from boundflow.backend.relax.cache import CompileCache
        from boundflow.backend.relax.executor import RelaxExecutor

        exe = RelaxExecutor(inp.bundle, inp.graph, inp.target, cache=CompileCache(build.artifact))
        out = exe.run(x, C)
        common.update(n_kernels=exe.n_kernels, peak_bytes=inp.bundle.peak_bytes(batch),
                      peak_source="planned")
        if not options:
            args = [exe._tensor(a) for a in (x.lower, x.upper)]
            if C is not None:
                args.append(exe._tensor(C.C))
            for _ in range(config.warmup):
                exe.vm["main"](*args, *exe.weights)
            timer = exe.vm.time_evaluator("main", exe.device, number=config.number,
                                          repeat=config.repeat)
            times = list(timer(*args, *exe.weights).results)
    else:
        from boundflow.backend.torch import TorchExecutor

        exe = TorchExecutor(inp.bundle, inp.graph)
        out = exe.run(x, C, measure_memory=True)
        n_tasks = sum(t.kind != "input" for t in inp.bundle.task_graph.tasks)
        common.update(n_kernels=n_tasks, peak_bytes=int(out.stats["peak_bytes"]),
                      peak_source="measured")
    if inp.backend == "torch" or options:
        from boundflow.runtime.cache import BoundCache

        cache = BoundCache() if options else None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for _ in range(config.warmup):
            exe.run(x, C, cache=cache, **options)
        times = []
        for _ in range(config.repeat):
            sync()
            start = time.perf_counter()
            for _ in range(config.number):
                exe.run(x, C, cache=cache, **options)
            sync()
            times.append((time.perf_counter() - start) / config.number)
    return MeasureResult(inp.key, inp.backend, inp.target, **summarise(times),
                         **tightness(out.lower.numpy(), out.upper.numpy(), C is not None),
                         **common)


def measure_rpc(inp: MeasureInput, build: BuildResult, config: MeasureConfig,
                tracker: tuple[str, int], key: str, session_timeout: float) -> MeasureResult:
    """Time ``inp``'s compiled module on a device the RPC tracker hands out under ``key``:
    the module file is uploaded, loaded remotely and timed there with ``time_evaluator``;
    inputs and weights are copied to the remote device, bounds copied back."""
    import tvm
    from tvm import rpc

    from boundflow.backend.relax.cache import CompileCache
    from boundflow.backend.relax.executor import lowers_to_tir
    from boundflow.errors import MeasureError

    bundle = inp.bundle
    if any(t.kind != "input" and not lowers_to_tir(bundle, t) for t in bundle.task_graph.tasks):
        raise MeasureError("the plan has tasks that run as torch callbacks; only plans lowered "
                           "wholly to TIR run over RPC")
    target = tvm.target.Target(inp.target)
    cache = CompileCache(build.artifact)
    lib, meta = cache.paths(CompileCache.key(bundle.key, target))
    weight_keys = json.loads(meta.read_text())["weight_keys"]
    session = rpc.connect_tracker(*tracker).request(key, priority=1,
                                                    session_timeout=session_timeout)
    try:
        times, lower, upper = _time_remote(session, lib, target, inp, weight_keys, config)
    finally:
        # drop every remote handle now: a session kept alive by a reference cycle holds its
        # server, and the next request would queue behind it until the timeout
        del session
        import gc
        gc.collect()
    return MeasureResult(inp.key, inp.backend, inp.target, **summarise(times),
                         **tightness(lower, upper, inp.C is not None),
                         n_kernels=build.n_kernels,
                         peak_bytes=bundle.peak_bytes(inp.lower.shape[0]), peak_source="planned",
                         compile_seconds=build.compile_seconds, runner=f"rpc:{key}")


def _time_remote(session, lib, target, inp: MeasureInput, weight_keys, config: MeasureConfig):
    """Upload, load and time the module on ``session``: (times, lower, upper)."""
    import tvm
    from tvm import relax

    from boundflow.backend.torch import DTYPES
    from boundflow.domains.traversal import graph_tensors
    from boundflow.planner.passes import normalised

    session.upload(str(lib))
    dev = session.cpu(0) if target.kind.name == "llvm" else session.device(target.kind.name, 0)
    vm = relax.VirtualMachine(session.load_module(lib.name), dev)
    dtype = inp.bundle.workload.dtype
    g, _ = normalised(inp.graph)
    tensors = graph_tensors(g, DTYPES[dtype])

    def remote(a):
        return tvm.runtime.tensor(np.ascontiguousarray(np.asarray(a, dtype=dtype)), dev)
    args = [remote(inp.lower), remote(inp.upper)] + ([] if inp.C is None else [remote(inp.C)])
    weights = [remote(tensors[k].numpy()) for k in weight_keys]
    vm.set_input("main", *args, *weights)            # the RPC-friendly calling convention
    vm.invoke_stateful("main")
    lo, hi = vm.get_outputs("main")
    lower, upper = lo.numpy(), hi.numpy()
    for _ in range(config.warmup):
        vm.invoke_stateful("main")
    timer = vm.time_evaluator("invoke_stateful", dev, number=config.number,
                              repeat=config.repeat)
    times = list(timer("main").results)
    return times, lower, upper
