"""A PlanBundle as one Relax function: a ``call_tir`` per task, compiled by TVM, run by the VM.

``build_module(bundle, graph)`` emits, inside one dataflow block, a ``call_tir`` of each task's
PrimFunc (see ``kernels.py``) with the task's input buffers, the weights it reads and, for the
final task, ``C``; the function returns the lower and upper bounds. The batch dimension is a
symbolic ``n``, so one compile serves every batch size. ``RelaxExecutor`` compiles it for a
target and runs it with the same interface as the torch executor.

A task whose lowering is ``tir`` and that the kernel generators cover becomes a PrimFunc
(``coverage.lowers_to_tir``); every other task becomes a ``call_dps_packed`` of a registered
function that runs the torch executor's implementation of that task on the same buffers
(zero-copy DLPack views), so every plan runs on this backend and ``fallbacks`` lists what did
not lower. What lowers:

* ``ibp`` tasks whose ops all have a TIR IBP kernel: linear, conv2d, conv_transpose2d,
  avgpool2d, maxpool2d, relu, leaky_relu, hardtanh, sigmoid, tanh, add, sub, mul, div, batchnorm, flatten, reshape,
  permute, identity, concat, pad, slice, gather; ``layout`` tasks;
* ``crown`` tasks (not with the sparse rule) and CROWN ``final`` tasks whose walk back to the
  input crosses only ops with a TIR backward rule: linear, conv2d, conv_transpose2d,
  avgpool2d, relu, add, sub, mul, div, batchnorm, flatten, reshape, permute, identity, concat,
  pad, slice, gather (a ``crown`` task from a spatial node in window form where the torch
  rules would keep patches: ``coverage.patch_walk``);
* IBP ``final`` tasks.

Torch callbacks: tasks with lowering ``torch``; ``ibp`` tasks holding softmax; ``crown`` /
CROWN ``final`` tasks behind any relaxed op but relu (leaky_relu, hardtanh, sigmoid, tanh,
maxpool2d, softmax: their relaxations live in ``boundflow.domains``); sparse ``crown`` tasks; alpha-CROWN's final task (its slope optimisation
needs autograd).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch
import tvm
import tvm_ffi
from tvm import relax, te, tirx

import boundflow.backend.torch as torch_backend
from boundflow.backend.torch import DTYPES, RunResult, TorchExecutor, Value as TorchValue
from boundflow.backend.relax.cache import CompileCache
from boundflow.backend.relax.coverage import lowers_to_tir
from boundflow.backend.relax.crown_kernels import BackwardLowering
from boundflow.backend.relax.kernels import param_shape, param_tensor
from boundflow.backend.relax.schedules import schedule
from boundflow.backend.relax.target import run_device, tvm_target
from boundflow.domains.crown_relaxed import LinesMemo
from boundflow.domains.traversal import graph_tensors
from boundflow.errors import BoundFlowError, ShapeError, SpecError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.spec import InputSpec, LinearSpec
from boundflow.ir.normalize import normalised
from boundflow.runtime.cache import BoundCache, CacheKey, array_hash


__all__ = ["RelaxExecutor", "build_module", "callback_name", "kernel_count", "lowers_to_tir"]

ALIGNMENT = 64          # bytes: what TVM's DLPack import requires of a CPU tensor's data
_REGISTERING = threading.Lock()     # callbacks registered and their VM made as one step


def _name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def callback_name(bundle: PlanBundle, task) -> str:
    return f"boundflow.task.{bundle.compile_key}.{_name(task.name)}"


def build_module(bundle: PlanBundle, graph: Graph, target: Any = "llvm"
                 ) -> tuple[tvm.IRModule, list[str]]:
    """The Relax module of ``bundle`` on the normalised ``graph`` (each PrimFunc scheduled
    for ``target`` by its task's schedule knobs), and the weight keys its ``main`` takes
    after the input box (and ``C``), in order."""
    target = tvm_target(target)
    knobs = {t: dict(s) for t, _, s in bundle.lowering_plan.tasks}
    dtype = bundle.workload.dtype
    n_specs = bundle.workload.n_specs
    n = tirx.Var("n", "int64")
    buffers = {b.name: b for b in bundle.task_graph.buffers}

    def ty(shape):
        return relax.TensorType([n] + [int(s) for s in shape], dtype)

    inp = graph.input
    xl, xu = relax.Var("x_lower", ty(inp.shape)), relax.Var("x_upper", ty(inp.shape))
    params = [xl, xu]
    cvar = None
    if n_specs:
        cvar = relax.Var("C", ty((n_specs, int(torch.tensor(graph.output_shape).prod()))))
        params.append(cvar)
    # every weight a task reads becomes a parameter of main, in order of first use
    lowered = []
    weight_keys: list[str] = []
    for t in bundle.task_graph.tasks:
        if t.kind == "input":
            continue
        if not lowers_to_tir(bundle, t, graph):
            lowered.append((t, None, [], [buffers[o] for o in t.outputs]))
            continue
        low = BackwardLowering(graph, dtype, n, bundle.domain_plan.lower_slope,
                               vector_rows=target.kind.name != "cuda")
        extra = []
        if t.kind in ("ibp", "layout"):
            args, outs = low.ibp_task(t, buffers)
        elif t.kind == "crown":
            args, outs = low.crown_task(t, buffers)
        elif t.attr("method") == "ibp":
            args, extra, outs = low.final_ibp(t, buffers, n_specs)
        else:
            args, extra, outs = low.final_crown(t, buffers, n_specs)
        keys = list(low.params)
        for k in keys:
            if k not in weight_keys:
                weight_keys.append(k)
        func = te.create_prim_func(args + [low.params[k] for k in keys] + extra + outs,
                                   index_dtype_override="int64")
        func = schedule(func, knobs.get(t.name, {}), target)
        lowered.append((t, func, keys, outs))
    wvars = {k: relax.Var(_name(k), relax.TensorType(list(param_shape(graph, k)), dtype))
             for k in weight_keys}
    params += [wvars[k] for k in weight_keys]

    bb = relax.BlockBuilder()
    with bb.function("main", params):
        env: dict[str, tuple] = {inp.name: (xl, xu)}
        with bb.dataflow():
            for t, func, keys, outs in lowered:
                call_args = [v for b in t.inputs for v in env[b]] + [wvars[k] for k in keys]
                if t.kind == "final" and cvar is not None:
                    call_args.append(cvar)
                if func is None:                 # a torch callback, destination-passing
                    out_ty = [ty(tuple(o.shape[a] for a in o.layout)) for o in outs
                              for _ in range(2)]
                    res = bb.emit(relax.call_dps_packed(callback_name(bundle, t), call_args,
                                                        out_ty))
                else:
                    gv = bb.add_func(func.without_attr("global_symbol"), _name(t.name))
                    out_ty = [relax.TensorType([int(s) if i else n
                                                for i, s in enumerate(o.shape)], dtype)
                              for o in outs]
                    res = bb.emit(relax.call_tir(gv, call_args, out_ty))
                for j, b in enumerate(t.outputs):
                    env[b] = (bb.emit(relax.TupleGetItem(res, 2 * j)),
                              bb.emit(relax.TupleGetItem(res, 2 * j + 1)))
            lo, hi = env[bundle.task_graph.output]
            out = bb.emit_output(relax.Tuple([lo, hi]))
        bb.emit_func_output(out)
    mod = bb.get()
    if bundle.knobs.fuse_passes:           # TVM's own fusion over our task kernels
        mod = tvm.ir.transform.Sequential([
            relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
            relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()])(mod)
    return mod, weight_keys


@tvm.transform.module_pass(opt_level=0, name="BoundFlowNoAlias")
def _no_alias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark every PrimFunc ``tirx.noalias``. The Relax pipeline adds a ``shape_func`` (the
    VM's symbolic shape arithmetic) without it, and one PrimFunc without it in the module
    makes the llvm codegen drop ``noalias`` from every kernel's buffers: LLVM then cannot keep
    a register tile's accumulators in registers, and every kernel ran 2.2x slower (the
    digits-size MLP's IBP task: 0.72 ms against 0.32 ms compiled alone). The shape function
    writes only its own heap, so the mark is true of it."""
    updates = {gv: f.with_attr("tirx.noalias", True) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and not f.attrs.get("tirx.noalias", False)}
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def compile_module(mod: tvm.IRModule, target: tvm.target.Target):
    """``mod`` compiled by TVM's default Relax pipeline for ``target``, every kernel noalias.
    For cuda that is the GPU pipeline, whose dlight rules schedule every PrimFunc our schedule
    left to it (an unscheduled function would otherwise be built as host code that reads
    device memory). That pipeline also runs TVM's FuseOps / FuseTIR, which may merge task
    kernels beyond the plan's fusion (a merged function is scheduled by dlight); the kernel
    count reported is the plan's, before that. The speedups measured on a GPU
    (``benchmarks/results/gpu_h200.txt``) were with this pipeline."""
    default = (relax.get_default_pipeline(target) if target.kind.name == "cuda"
               else relax.get_pipeline("default"))
    pipeline = tvm.transform.Sequential([default, _no_alias])
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def kernel_count(mod: tvm.IRModule) -> int:
    """PrimFuncs in a module (kernels launched per run)."""
    return sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items())


class RelaxExecutor:
    """A PlanBundle compiled with TVM for ``target``; ``run`` has the torch executor's
    interface (no bound cache yet)."""

    def __init__(self, bundle: PlanBundle, graph: Graph, target: Any = "llvm",
                 cache: CompileCache | None = None):
        bundle.workload.check_graph(graph)
        g, _ = normalised(graph)
        if g.structural_hash() != bundle.graph_hash:
            raise BoundFlowError("the plan's normalised graph differs from this model's")
        self.bundle, self.graph = bundle, g
        self.dtype = DTYPES[bundle.workload.dtype]
        self.plan_id = bundle.key + graph.weights_hash()[:16]
        self.device = run_device(target)            # before the target: no GPU, one line
        self.target = tvm_target(target)

        def build():
            mod, keys = build_module(bundle, g, self.target)
            return compile_module(mod, self.target), keys, kernel_count(mod)
        if cache is None:
            start = time.perf_counter()
            executable, self.weight_keys, self.n_kernels = build()
            self.compile_seconds, self.compile_source = time.perf_counter() - start, "built"
            self.build_seconds = self.compile_seconds
        else:
            got = cache.get(CompileCache.key(bundle.compile_key, self.target), build)
            executable, self.weight_keys, self.n_kernels = got.module, got.weight_keys, \
                got.n_kernels
            self.compile_seconds, self.compile_source = got.seconds, got.source
            self.build_seconds = got.build_seconds      # the compile's own time, even if loaded
        self.fallbacks = [t.name for t in bundle.task_graph.tasks
                          if t.kind != "input" and not lowers_to_tir(bundle, t, g)]
        self._upper = True
        self._lock = threading.Lock()
        # one VM run's torch views of its tensors, by handle, and its memo of relaxation lines
        # (reset by the run's first callback; see _callback)
        self._views: dict = {}
        self._lines: LinesMemo | None = None
        self._first = self.fallbacks[0] if self.fallbacks else None
        if self.fallbacks:
            on_gpu = self.device.dlpack_device_type() != 1       # the callbacks' tensors' device
            self._torch = TorchExecutor(bundle, graph, device="cuda" if on_gpu else "cpu")
        # the VM looks its packed functions up once, when it is made: our callbacks, just
        # registered under the module's names (shared by every executor of one compiled
        # module), must be the ones it finds, even when executors are made in threads
        with _REGISTERING:
            for t in bundle.task_graph.tasks:
                if t.name in self.fallbacks:
                    tvm_ffi.register_global_func(callback_name(bundle, t),
                                                 self._callback(t), override=True)
            self.vm = relax.VirtualMachine(executable, self.device)
        tensors = graph_tensors(g, self.dtype)
        self.weights = [tvm.runtime.tensor(param_tensor(tensors, k).numpy(), self.device)
                        for k in self.weight_keys]

    def _tensor(self, array) -> Any:
        """``array`` on the device: on the CPU through DLPack, zero-copy when it is
        contiguous and 64-byte aligned (as TVM requires), else after one copy into a fresh
        torch tensor (torch aligns its allocations to 64 bytes). Asking TVM first and
        catching its refusal cost ~60 us an input (the error's construction, then a second
        copy), more than a small model's whole call saves over the torch backend."""
        t = torch.as_tensor(array).to(self.dtype).contiguous()
        if self.device.dlpack_device_type() == 1:
            if t.data_ptr() % ALIGNMENT:
                t = t.clone()
            try:
                return tvm.runtime.from_dlpack(t)
            except Exception:          # noqa: BLE001 - any refusal: copy instead
                pass
        return tvm.runtime.tensor(t.numpy(), self.device)

    def _callback(self, task):
        """The torch implementation of ``task`` over DLPack views of the VM's tensors.

        The callbacks of one VM run share the torch executor's memo of relaxation lines
        (``LinesMemo``, keyed on the identity of an activation's interval tensors): each
        tensor the VM passes is viewed once per run, by its handle, so a later task reading
        the same VM tensor gets the same torch tensors. The view keeps the VM's tensor
        object alive, so no other tensor of the run takes its handle; the VM writes a
        tensor once (its producer; Relax here has no in-place calls) before any task reads
        it. The run's first callback starts a new memo (a ``time_evaluator`` repeats the
        whole function; so does any callback that finds none), and ``run`` and
        ``time_calls`` drop it after the call."""
        exe = self._torch
        buffers = exe.buffers
        inputs = [buffers[b] for b in task.inputs]
        n_in = 2 * len(inputs)
        has_c = task.kind == "final" and self.bundle.workload.n_specs > 0
        inp = self.graph.input.name
        first = task.name == self._first

        def logical(t, buf):
            key = (t.__chandle__(), buf.name)
            hit = self._views.get(key)
            if hit is not None:
                return hit[1]
            view = torch.from_dlpack(t).permute(
                (0,) + tuple(1 + buf.layout.index(j) for j in range(len(buf.shape))))
            self._views[key] = (t, view)
            return view

        def run(*arrays):
            if first or self._lines is None:
                # the torch backend's budget, read now (one knob for both backends)
                self._views, self._lines = {}, LinesMemo(torch_backend.LINES_MEMO_BYTES)
            env = {b.name: TorchValue(b.form, logical(arrays[2 * i], b),
                                      logical(arrays[2 * i + 1], b))
                   for i, b in enumerate(inputs)}
            C = torch.from_dlpack(arrays[n_in]) if has_c else None
            outs = arrays[n_in + has_c:]
            tensors = graph_tensors(self.graph, self.dtype, exe.device)
            with torch.no_grad():
                if task.kind in ("ibp", "layout"):
                    values = (exe._ibp(task, env, tensors, False)[0] if task.kind == "ibp"
                              else {task.outputs[0]: env[task.inputs[0]]})
                else:
                    box = env[inp].interval() if inp in env else None
                    values = exe.bound_task(task, env, tensors, box, C, upper=self._upper,
                                            lines=self._lines)
            for j, name in enumerate(task.outputs):
                buf = buffers[name]
                v = values[name].as_form(buf.form)
                logical(outs[2 * j], buf).copy_(v.a)
                logical(outs[2 * j + 1], buf).copy_(v.b)
        return run

    def time_calls(self, x: InputSpec, C: LinearSpec | None = None, *, upper: bool = True,
                   number: int = 5, repeat: int = 5) -> list[float]:
        """Seconds per call of the compiled function on ``x`` (and ``C``), by TVM's
        ``time_evaluator`` (``repeat`` timings of ``number`` calls each) on device tensors
        already in place: kernels and callbacks, none of ``run``'s checks and copies."""
        args = [self._tensor(a) for a in (x.lower, x.upper)]
        if C is not None:
            args.append(self._tensor(C.C))
        timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
        with self._lock:                 # its torch callbacks read the query's side, as run's
            self._upper = upper
            try:
                return list(timer(*args, *self.weights).results)
            finally:
                self._views, self._lines = {}, None

    def run(self, x: InputSpec, C: LinearSpec | None = None, *, reuse_ibp: bool = False,
            cache_bounds: bool = False, split: Any = None, cache: BoundCache | None = None,
            measure_memory: bool = False, upper: bool = True) -> RunResult:
        """Bounds over ``x`` (of ``C·y`` when the plan has specs). ``cache_bounds`` with a
        ``cache`` returns the bounds of an identical earlier query (same box, spec and
        split); intermediate-bound reuse and memory measurement are torch-backend only.
        ``upper=False``: as the torch executor's (an alpha-CROWN final bound optimises its
        lower side only)."""
        if reuse_ibp or measure_memory:
            raise BoundFlowError("reuse_ibp and measure_memory run on the torch backend only")
        if cache_bounds:
            if cache is None:
                raise BoundFlowError("cache_bounds needs a BoundCache (cache=...)")
            key = CacheKey(self.plan_id, "final", "relax", array_hash(None if C is None
                                                                      else C.C),
                           array_hash(x.lower, x.upper), (repr(split) if split else "")
                           + ("" if upper else "|lower"))
            hit = cache.get(key)
            if hit is not None:
                return RunResult(hit[0].clone(), hit[1].clone(), {"tasks_cached": 1})
            out = self.run(x, C, upper=upper)
            cache.put(key, (out.lower, out.upper))
            return out
        if x.sample_shape != self.graph.input_shape:
            raise ShapeError(f"input of shape {list(x.lower.shape)} does not fit the model")
        n_specs = self.bundle.workload.n_specs
        if (C is None) != (n_specs == 0) or (C is not None and C.n_specs != n_specs):
            raise SpecError(f"this plan bounds {n_specs} specs; C does not match")
        if C is not None:
            C.check(x.batch, math.prod(self.graph.output_shape))
        start = time.perf_counter()
        args = [self._tensor(a) for a in (x.lower, x.upper)]
        if C is not None:
            args.append(self._tensor(C.C))
        with self._lock:                     # one run at a time: its callbacks read _upper
            self._upper = upper
            try:
                lo, hi = self.vm["main"](*args, *self.weights)
            finally:
                self._views, self._lines = {}, None
        if self.device.dlpack_device_type() == 1:          # CPU: zero copy
            lower, upper = torch.from_dlpack(lo), torch.from_dlpack(hi)
        else:
            lower, upper = torch.from_numpy(lo.numpy()), torch.from_numpy(hi.numpy())
        return RunResult(lower, upper, {"seconds": time.perf_counter() - start,
                                        "n_kernels": self.n_kernels,
                                        "compile_seconds": self.compile_seconds,
                                        "compile_source": self.compile_source,
                                        "fallbacks": len(self.fallbacks)})
