"""What runs inside a measurement worker process: building and timing one candidate.

These are module-level functions so the worker pool (TVM's ``PopenPoolExecutor``) pickles them
by reference; each returns plain values and raises on failure (the pool turns a raise, a crash
or a timeout into a recorded error).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.measure.result import BuildResult, MeasureInput, MeasureResult, WorkerError, \
    summarise, tightness

# the share of ``timeout_s`` a candidate's whole measurement (its load and first call
# included) is fitted to: a slow candidate (alpha-CROWN on a thousand ACAS Xu boxes: 28 s a
# call on one thread) is timed with fewer calls rather than killed at the timeout for the
# number of its calls; one whose protocol fits is timed in full
TIMEOUT_SHARE = 0.8


@dataclass(frozen=True)
class MeasureConfig:
    """The protocol: ``warmup`` untimed runs, then ``repeat`` timings of ``number`` runs each
    (each timing is the mean of its ``number`` runs); ``timeout_s`` per candidate (build or
    run), in its worker. ``memory_limit_mb``: MiB of address space a candidate's run may add to
    its worker (Linux ``RLIMIT_AS``; None: no cap); a candidate that needs more is recorded
    with error kind ``memory`` (as is any out-of-memory error a candidate raises).
    ``threads``: CPU threads of torch and of TVM's runtime in the worker (None: the
    libraries' defaults, as ``verify`` runs; on a small or shared machine one thread gives
    far steadier times: torch's thread team stalls whenever one of its threads loses its
    core). ``max_seconds``: how long a candidate's timing may take after its first call (None:
    no limit but the timeout's: the measurement, its load and first call included, fitted to
    :data:`TIMEOUT_SHARE` of ``timeout_s``); a slow candidate is then timed with fewer calls
    (``fitted``), at least one."""

    number: int = 3
    repeat: int = 5
    warmup: int = 1
    timeout_s: float = 120.0
    memory_limit_mb: int | None = None
    threads: int | None = None
    max_seconds: float | None = None

    def fitted(self, per_call_s: float, kernels: bool = False, spent: float = 0.0
               ) -> "MeasureConfig":
        """This protocol cut down to fit ``max_seconds``, and what is left of
        :data:`TIMEOUT_SHARE` of ``timeout_s`` after the ``spent`` seconds the measurement
        has taken (its load and first call), at ``per_call_s`` seconds a call (``kernels``:
        the kernels are timed after the calls, as many again, and one more TVM warms up with):
        one call per timing first, then fewer timings, then fewer warm-up calls; unchanged
        when it fits."""
        import dataclasses

        if per_call_s <= 0:
            return self
        limit = TIMEOUT_SHARE * self.timeout_s - spent
        if self.max_seconds is not None:
            limit = min(limit, self.max_seconds)
        per_timing = 2 if kernels else 1
        calls = self.warmup + self.number * self.repeat * per_timing
        budget = int(max(limit, 0.0) // per_call_s) - (1 if kernels else 0)
        if calls <= budget:
            return self
        repeat = max(1, min(self.repeat, budget // per_timing))
        warmup = max(0, min(self.warmup, budget - repeat * per_timing))
        return dataclasses.replace(self, number=1, repeat=repeat, warmup=warmup)

    def __post_init__(self):
        from boundflow.errors import MeasureError

        def whole(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        for name, least in (("number", 1), ("repeat", 1), ("warmup", 0)):
            v = getattr(self, name)
            if not whole(v) or v < least:
                raise MeasureError(f"MeasureConfig.{name} must be a whole number >= {least}, "
                                   f"not {v!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or \
                not math.isfinite(t) or t <= 0:
            raise MeasureError(f"MeasureConfig.timeout_s must be a finite number of seconds "
                               f"> 0, not {t!r}")
        n = self.threads
        if n is not None and (not whole(n) or n < 1):
            raise MeasureError(f"MeasureConfig.threads must be a whole number >= 1, or None for "
                               f"the libraries' defaults, not {n!r}")
        c = self.max_seconds
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float, np.number))
                              or not math.isfinite(c) or c <= 0):
            raise MeasureError(f"MeasureConfig.max_seconds must be a finite number of seconds "
                               f"> 0, or None for no limit, not {c!r}")
        m = self.memory_limit_mb
        if m is not None and (not whole(m) or m < 1):
            raise MeasureError(f"MeasureConfig.memory_limit_mb (the memory cap per candidate) "
                               f"must be a whole number of MiB >= 1, or None for no cap, not "
                               f"{m!r}")


# how an allocation failure reads when it is not a MemoryError: torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory"), CUDA ("CUDA out of memory",
# torch.OutOfMemoryError), C++ (std::bad_alloc), TVM and the C library
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory",
             "bad_alloc", "failed to allocate", "unable to allocate",
             "not enough memory")        # torch's CPU allocator


# under an address-space cap, oneDNN reports a failed scratch allocation only as this
_OOM_TEXT_CAPPED = ("could not create a primitive",)


def out_of_memory(error: BaseException, capped: bool = False) -> bool:
    """Whether ``error`` is an allocation failure (of the host or the device); ``capped``:
    raised under a memory cap, where some libraries' vaguer failures mean the same."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(t in text for t in _OOM_TEXT + (_OOM_TEXT_CAPPED if capped else ()))


_warm: set[str] = set()


def _warm_up(args: tuple) -> None:
    """Load and initialise, outside the cap, what any candidate's run needs: the libraries
    (mapping their code takes address space) and the thread pools (each thread's stack does),
    so the cap measures the candidate and not the worker's first use of torch or TVM."""
    if "torch" not in _warm:
        import torch
        import torch.nn.functional as F

        import boundflow.backend.torch  # noqa: F401
        import boundflow.runtime.cache  # noqa: F401
        F.conv2d(torch.ones(1, 4, 16, 16), torch.ones(4, 4, 3, 3))     # oneDNN, OpenMP threads
        (torch.ones(128, 128) @ torch.ones(128, 128)).sum()
        torch.ones(1 << 18).sum()
        _warm.add("torch")
    from boundflow.backend import create

    # the compiled backend runs on TVM's runtime: its thread pool starts here
    flat = [x for a in args for x in (a if isinstance(a, list) else [a])]
    relax = [a for a in flat if isinstance(a, MeasureInput) and create(a.backend).needs_build]
    if relax and "relax" not in _warm:
        import tvm

        import boundflow.backend.relax.executor  # noqa: F401
        config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if config is not None:
            config(1, 0)          # start the runtime's workers now (the default: big cores, all)
        _warm.add("relax")
    from boundflow.target import target_kind

    if any(target_kind(a.target) == "cuda" for a in relax) and "cuda" not in _warm:
        import tvm

        tvm.device("cuda", 0).exist          # the driver maps its (large) address space now
        _warm.add("cuda")


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def guarded(fn, limit_mb: int | None, *args: Any) -> Any:
    """``fn(*args)`` with the worker's address space capped at what it has mapped now plus
    ``limit_mb`` MiB (Linux), so a candidate that wants too much memory fails in its own worker
    instead of taking the machine down; the cap is lifted afterwards. An allocation failure
    (:func:`out_of_memory`) leaves as a plain ``MemoryError`` (recorded as kind ``memory``),
    any other exception as a :class:`WorkerError` (kind ``run``): both unpickle in the
    parent, whatever the original type."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_AS)
    if limit_mb is not None:
        _warm_up(args)
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + limit_mb * 2**20, old[1]))
    try:
        return fn(*args)
    except BoundFlowError:
        raise
    except Exception as e:                # any exception type reaches the parent intact
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if out_of_memory(e, capped=limit_mb is not None):    # recorded as kind "memory"
            cap = "" if limit_mb is None else f" (the cap is {limit_mb} MiB per candidate)"
            raise MemoryError(f"{text[:1500]}{cap}") from None
        raise WorkerError(text) from None
    finally:
        if limit_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, old)


def code_cache(root: str | None):
    """The compiled-code cache at ``root`` that a compiling backend's executor reads and
    writes (None: the backend's default)."""
    if root is None:
        return None
    from boundflow.backend.relax.cache import CompileCache

    return CompileCache(root)


def build(inp: MeasureInput, root: str) -> tuple[float, int]:
    """Compile ``inp``'s plan on its backend into the code cache at ``root``: (compile
    seconds, kernels)."""
    from boundflow.backend import create

    exe = create(inp.backend).executor(inp.bundle, inp.graph, inp.target,
                                       cache=code_cache(root))
    return float(getattr(exe, "build_seconds", 0.0)), int(getattr(exe, "n_kernels", 0))


build_relax = build          # the name earlier releases used


def _query(inp: MeasureInput):
    from boundflow.ir.spec import InputSpec, LinearSpec

    return InputSpec(inp.lower, inp.upper), (None if inp.C is None else LinearSpec(inp.C))


class Prepared:
    """One candidate ready to time in this process: its executor (built, or loaded from the
    code cache), its query, its first bounds and what the result records besides times."""

    def __init__(self, inp: MeasureInput, build: BuildResult, runner: str = "local"):
        from boundflow.backend import create, run_bounds

        self.inp = inp
        self.exe = create(inp.backend).executor(inp.bundle, inp.graph, inp.target,
                                                cache=code_cache(build.artifact))
        self.x, self.C = _query(inp)
        self.options = dict(inp.run_options)
        self.common: dict[str, Any] = dict(compile_seconds=build.compile_seconds, runner=runner)
        self.upper = inp.bundle.workload.upper      # a verdict's workload reads lower bounds
        start = time.perf_counter()
        try:                      # the torch executor measures its peak; others plan it
            out = run_bounds(self.exe, self.x, self.C, self.upper, measure_memory=True)
            self.common.update(peak_bytes=int(out.stats["peak_bytes"]), peak_source="measured")
        except BoundFlowError:
            out = run_bounds(self.exe, self.x, self.C, self.upper)
            self.common.update(peak_bytes=inp.bundle.peak_bytes(inp.lower.shape[0]),
                               peak_source="planned")
        self.first_s = time.perf_counter() - start        # the first call, loading included
        n_tasks = sum(t.kind != "input" for t in inp.bundle.task_graph.tasks)
        self.common["n_kernels"] = int(getattr(self.exe, "n_kernels", n_tasks))
        self.out = out
        from boundflow.runtime.cache import BoundCache

        self.cache = BoundCache() if self.options else None

    def call(self) -> bool:
        """What ``verify`` does with the plan: bounds of the host box (the lower side only
        where the workload's query reads no more, ``bounds="lower"``), checked finite and
        back on the host as arrays."""
        import torch

        from boundflow.backend import run_bounds

        out = run_bounds(self.exe, self.x, self.C, self.upper, cache=self.cache,
                         **self.options)
        lo, hi = out.lower.detach(), out.upper.detach()
        finite = bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())
        lo.cpu().numpy(), hi.cpu().numpy()
        return finite

    def time_calls(self, number: int) -> float:
        """Seconds per call, over ``number`` calls (synchronised on GPUs)."""
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(number):
            self.call()
        sync()
        return (time.perf_counter() - start) / number

    def kernel_times(self, config: "MeasureConfig", calls: list[float]) -> list[float]:
        """Per-call times of the compiled code alone: the Relax VM's ``time_evaluator`` on
        device tensors already in place; for an executor with no VM (nothing compiled, or a
        repeated query through the bound cache), the calls themselves."""
        exe = self.exe
        if getattr(exe, "vm", None) is None or self.options:
            return list(calls)
        return exe.time_calls(self.x, self.C, upper=self.upper, number=config.number,
                              repeat=config.repeat)

    def result(self, times: list[float], kernel: list[float]) -> MeasureResult:
        inp = self.inp
        return MeasureResult(inp.key, inp.backend, inp.target, **summarise(times),
                             kernel_s=float(np.median(kernel)),
                             **tightness(self.out.lower.detach().numpy(),
                                         self.out.upper.detach().numpy(), self.C is not None),
                             **self.common)


def set_threads(n: int | None, compiled: bool) -> None:
    """Use ``n`` CPU threads in torch and (``compiled``) TVM's runtime (None: leave them)."""
    if n is None:
        return
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if compiled:
        import tvm

        config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if config is not None:
            config(1, n)


def measure_local(inp: MeasureInput, build: BuildResult, config: MeasureConfig,
                  runner: str = "local") -> MeasureResult:
    """Time ``inp`` in this process: ``warmup`` calls, then ``repeat`` timings of ``number``
    calls each of the whole call ``verify`` makes (see :class:`Prepared`), then the kernels
    alone (see ``Prepared.kernel_times``)."""
    from boundflow.backend import create

    start = time.monotonic()
    set_threads(config.threads, create(inp.backend).needs_build)
    p = Prepared(inp, build, runner)
    config = config.fitted(p.first_s, getattr(p.exe, "vm", None) is not None,
                           spent=time.monotonic() - start)
    for _ in range(config.warmup):
        p.call()
    times = [p.time_calls(config.number) for _ in range(config.repeat)]
    return p.result(times, p.kernel_times(config, times))


def measure_interleaved(inputs: list[MeasureInput], builds: list[BuildResult],
                        config: MeasureConfig, runner: str = "local") -> list[MeasureResult]:
    """Time several candidates in this process, interleaved: each timing round times
    ``number`` calls of every candidate in turn, so all of them see the same machine load
    (the final comparison of a tuned plan with the default path); then each one's kernels."""
    from boundflow.backend import create

    start = time.monotonic()
    set_threads(config.threads, any(create(i.backend).needs_build for i in inputs))
    prepared = [Prepared(inp, b, runner) for inp, b in zip(inputs, builds)]
    config = config.fitted(sum(p.first_s for p in prepared),
                           any(getattr(p.exe, "vm", None) is not None for p in prepared),
                           spent=time.monotonic() - start)
    for _ in range(config.warmup):
        for p in prepared:
            p.call()
    times: list[list[float]] = [[] for _ in prepared]
    for _ in range(config.repeat):
        for p, t in zip(prepared, times):
            t.append(p.time_calls(config.number))
    return [p.result(t, p.kernel_times(config, t)) for p, t in zip(prepared, times)]


def measure_rpc(inp: MeasureInput, build: BuildResult, config: MeasureConfig,
                tracker: tuple[str, int], key: str, session_timeout: float) -> MeasureResult:
    """Time ``inp``'s compiled module on a device the RPC tracker hands out under ``key``:
    the module file is uploaded, loaded remotely and timed there with ``time_evaluator``;
    inputs and weights are copied to the remote device, bounds copied back."""
    import tvm
    from tvm import rpc

    from boundflow.backend import create
    from boundflow.backend.relax.cache import CompileCache
    from boundflow.backend.relax.target import tvm_target
    from boundflow.errors import MeasureError

    bundle = inp.bundle
    backend = create(inp.backend)
    if not backend.needs_build or any(
            t.kind != "input" and not backend.compiles(bundle, t, inp.graph)
            for t in bundle.task_graph.tasks):
        raise MeasureError("the plan has tasks that run as torch callbacks (or torch ops); "
                           "only plans compiled wholly (every task a kernel) run over RPC")
    target = tvm_target(inp.target)        # as the builder resolved it (llvm: this CPU)
    cache = CompileCache(build.artifact)
    lib, meta = cache.paths(CompileCache.key(bundle.compile_key, target))
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
    # the remote VM call is all that is timed there: kernels and call are one
    return MeasureResult(inp.key, inp.backend, inp.target, **summarise(times),
                         kernel_s=float(np.median(times)),
                         **tightness(lower, upper, inp.C is not None),
                         n_kernels=build.n_kernels,
                         peak_bytes=bundle.peak_bytes(inp.lower.shape[0]), peak_source="planned",
                         compile_seconds=build.compile_seconds, runner=f"rpc:{key}")


def _time_remote(session, lib, target, inp: MeasureInput, weight_keys, config: MeasureConfig):
    """Upload, load and time the module on ``session``: (times, lower, upper)."""
    import tvm
    from tvm import relax

    from boundflow.backend.relax.kernels import param_tensor
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
    weights = [remote(param_tensor(tensors, k).numpy()) for k in weight_keys]  # packed
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
