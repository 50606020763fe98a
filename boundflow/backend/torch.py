"""The torch backend: runs any PlanBundle with torch ops.

``TorchExecutor(bundle, graph)`` binds a plan to a model (the graph is normalised as the
planner did and must have the structure the plan was made for); ``run(box, C)`` executes the
tasks in order:

* buffers live in the storage plan's slots: one flat tensor per slot, allocated at its first
  write; a buffer is a view of its slot in the buffer's physical layout and interval form,
  so tasks write into reused memory and layout conversions are real copies. A small buffer
  (both halves at most :data:`ADOPT_BYTES`) in row-major layout keeps the tensors its task
  made instead (copying it into its slot cost more than the memory it saves: 10 µs of a
  250 µs IBP call on the deep MLP at batch 32), except under ``measure_memory``, which
  measures the planned slots;
* ``ibp`` tasks walk their nodes (``weighted`` ops, i.e. linear, conv2d, conv_transpose2d, in
  centre/radius form, a small linear op on lower and upper bounds side by side,
  :func:`_affine_joint`; ``view`` ops on both halves of an interval without moving data; every
  other op by the domains' IBP rule table, so an op gains this backend with its rule); buffers
  are logical views of their slots, so every op reads any layout; ``crown`` tasks tighten a
  pre-activation; ``final`` bounds the output or ``C·y`` by IBP, CROWN or alpha-CROWN;
* with a :class:`~boundflow.runtime.cache.BoundCache`, a run first looks up what it needs,
  from the bounds backwards, and runs only the tasks whose outputs are not cached
  (``reuse_ibp``: intermediate bounds; ``cache_bounds``: final bounds).

``run(..., measure_memory=True)`` reports ``peak_bytes``: measured, the bytes of slot storage
allocated plus the largest set of task values in flight (the intervals of a fused task's nodes
before they reach a slot) and the run's memo of relaxation lines; temporaries inside one CROWN
pass are not counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from boundflow.backend import chunks
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.beta import beta_lower
from boundflow.domains.backward import intersect
from boundflow.domains.crown import BackwardContext, crown_node
from boundflow.domains.crown_relaxed import MEMO_BYTES, LinesMemo, PartMemo
from boundflow.domains.forward import forward_bounds
from boundflow.domains.driver import final_bounds
from boundflow.domains.interval import RULES as IBP_RULES, Interval
from boundflow.domains.traversal import apply_rule, graph_tensors
from boundflow.errors import BoundFlowError, ShapeError, SpecError
from boundflow.ir import ops
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.spec import InputSpec, LinearSpec
from boundflow.ir.split import ReluSplit
from boundflow.ir.task_graph import Buffer, Task
from boundflow.ir.normalize import normalised
from boundflow.runtime.cache import BoundCache, CacheKey, array_hash

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_VIEW_OPS = ops.having("view")               # flatten, reshape, permute, identity
_WEIGHTED = ops.having("weighted")           # linear, conv2d, conv_transpose2d


class Value(NamedTuple):
    """An interval as stored: ``form`` "lu" (a, b = lower, upper) or "cr" (centre, radius).
    ``joint``: for an "lu" value of ``[batch, n]``, the ``[batch, 2n]`` tensor whose halves
    ``a`` and ``b`` are (see :func:`_affine_joint`), else None."""

    form: str
    a: torch.Tensor
    b: torch.Tensor
    joint: torch.Tensor | None = None

    def interval(self) -> Interval:
        if self.form == "lu":
            return Interval(self.a, self.b)
        return Interval(self.a - self.b, self.a + self.b)

    def as_form(self, form: str) -> "Value":
        if form == self.form:
            return self
        if form == "lu":
            return Value("lu", *self.interval())
        return Value("cr", (self.b + self.a) / 2, (self.b - self.a) / 2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))


@dataclass
class RunResult:
    """Bounds ``[batch, n_specs]`` (or ``[batch, *out]``), on the CPU, and what the run did."""

    lower: torch.Tensor
    upper: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def box_value(box: Interval) -> Value:
    """The input box as a task reads it. Where every sample's radius is the same in every
    element (an L∞ ball), centre/radius form with the radius one number per sample, expanded
    (stride 0): the largest of the sample's half-widths. "The same" is up to the rounding of
    ``x ± eps``: half-widths within 4 units in the last place of the sample's largest
    endpoint (so a box whose widths really differ keeps them, in any dtype). A weighted op
    then needs no product for its radius (:func:`_affine_cr`)."""
    lower, upper = box
    batch = lower.shape[0]
    if lower.dim() < 2 or batch == 0 or lower[0].numel() < 2 or not lower.is_floating_point():
        return Value("lu", lower, upper)
    rad = ((upper - lower) / 2).reshape(batch, -1)
    hi, lo = rad.amax(1), rad.amin(1)
    ulp = torch.finfo(lower.dtype).eps * torch.maximum(lower.abs().reshape(batch, -1).amax(1),
                                                       upper.abs().reshape(batch, -1).amax(1))
    if not bool(((hi - lo) <= 4 * ulp).all()):
        return Value("lu", lower, upper)
    return Value("cr", (upper + lower) / 2,
                 hi.view((batch,) + (1,) * (lower.dim() - 1)).expand(lower.shape))


# the radius products (multiply-adds over the batch) that make :func:`box_value`'s check
# (a few passes over the box, ~10 µs) worth making, and the multiply-adds per input element
# it takes to beat those passes: the shared MLP's first layer makes 256 (1.14-1.30x faster
# IBP), the shared CNN's strided conv 64 (on two threads its radius convolution cost less
# than the check: 0.95x)
UNIFORM_MACS = 1 << 20
UNIFORM_MACS_PER_ELEMENT = 128


def box_weighted_macs(graph: Graph) -> int:
    """Multiply-adds per sample of the ``linear`` and ``conv2d`` ops that read the input box
    (through views): the radius products an L∞ box spares (:func:`_uniform_radius`)."""
    users, total = graph.consumers(), 0
    stack = [graph.input.name]
    while stack:
        for name in users[stack.pop()]:
            node = graph.node(name)
            if node.op in _VIEW_OPS:
                stack.append(name)
            elif node.op in ("linear", "conv2d"):
                w = graph.param(node, "weight")
                total += math.prod(node.shape) * (w.size // w.shape[0])
    return total


def _uniform(t: torch.Tensor) -> bool:
    """Whether each sample of ``t`` is one number: every stride past the batch is 0, as only
    :func:`box_value`'s radius (and views of it) have."""
    return t.dim() >= 2 and not any(t.stride()[1:])


def _uniform_radius(op, params: dict, w_abs: torch.Tensor, rad: torch.Tensor) -> torch.Tensor:
    """``|W|·rad`` for a radius that is one number ``r`` per sample: ``r · (|W|·1)``, the
    response of the linear map ``op`` to ones computed once per input shape."""
    r = rad[(slice(None),) + (0,) * (rad.dim() - 1)]
    key = ("ones", tuple(rad.shape[1:]))
    resp = params.get(key)
    if resp is None:
        ones = torch.ones((1,) + tuple(rad.shape[1:]), dtype=rad.dtype, device=rad.device)
        resp = params[key] = op(ones, w_abs)
    return r.view((-1,) + (1,) * (resp.dim() - 1)) * resp


# a linear op of at most this many multiply-adds over the batch (batch × in × out), whose
# joint weight (4 × W) is at most this many bytes, takes its lower and upper bounds in one
# product (:func:`_affine_joint`): below them torch's per-call cost outweighs the doubled
# multiply-adds (one 48 × 48 layer and its relu at batch 32: 15 µs in centre/radius form, 8
# µs joint; equal near 2^18 multiply-adds, joint 0.77x at 2^19; measured before the one call
# that orders the halves was added); a larger weight leaves the cache between calls (the
# shared MLP's 256 × 256 layer at batch 1: 0.96x)
# A buffer of at most this many bytes (both halves) in row-major layout keeps its task's
# tensors rather than being copied into its storage slot (see the module docstring).
ADOPT_BYTES = 1 << 16
JOINT_MACS = 1 << 17
JOINT_WEIGHT_BYTES = 1 << 18

# the most bytes of relaxation lines one run keeps for its backward passes to share
# (:class:`~boundflow.domains.crown_relaxed.LinesMemo`)
LINES_MEMO_BYTES = MEMO_BYTES


def _joint_batch(node, params: dict) -> int:
    """The largest batch whose ``[batch, n]`` interval the linear ``node`` takes in one
    product of both bounds (:data:`JOINT_MACS`, :data:`JOINT_WEIGHT_BYTES`); 0: none."""
    if node.op != "linear":
        return 0
    w = params["weight"]
    if 4 * w.numel() * w.element_size() > JOINT_WEIGHT_BYTES:
        return 0
    return JOINT_MACS // max(w.numel(), 1)


def _joint_takes(v: Value, limit: int) -> bool:
    """Whether a linear op whose joint batch limit is ``limit`` (:func:`_joint_batch`)
    reads ``v`` in one product of both bounds: a ``[batch, n]`` value of at most ``limit``
    samples whose radius is not one number per sample (that form needs no radius product)."""
    return v.a.dim() == 2 and v.a.shape[0] <= limit and not (v.form == "cr" and _uniform(v.b))


def _joint_pays(node, params: dict, v: Value) -> bool:
    """Whether the linear ``node`` reads ``v`` in one product of both bounds."""
    return _joint_takes(v, _joint_batch(node, params))


def _affine_joint(params: dict, v: Value) -> Value:
    """A linear op on lower and upper bounds side by side, ``[l | u]`` (``[batch, 2n]``), in
    one product: ``[l' | u'] = [l | u] · [[W⁺, W⁻], [W⁻, W⁺]]ᵀ + [b | b]``, i.e.
    ``l' = W⁺l + W⁻u + b`` and ``u' = W⁺u + W⁻l + b``. Twice centre/radius form's
    multiply-adds in two calls instead of six (eight with the relu after it, which clamps
    ``[l' | u']`` at once). The halves sum their products in different orders, so where
    ``l = u`` in every coordinate they may round across each other: ``u'`` is raised to
    ``l'`` there (the interval stays an interval; the width is rounding's)."""
    stacked = params.get("joint")
    if stacked is None:
        w = params["weight"]
        pos, neg = w.clamp(min=0), w.clamp(max=0)
        bias = params.get("bias")
        stacked = params["joint"] = (
            torch.cat([torch.cat([pos, neg], 1), torch.cat([neg, pos], 1)], 0).contiguous(),
            None if bias is None else torch.cat([bias, bias]))
    joint = v.joint
    if joint is None:
        lo, hi = v.interval()
        joint = torch.cat([lo, hi], 1)
    out = F.linear(joint, *stacked)
    lo, hi = out.chunk(2, 1)
    torch.maximum(hi, lo, out=hi)
    return Value("lu", lo, hi, out)


def _affine_cr(node, params: dict, v: Value) -> Value:
    """A ``weighted`` op (linear, conv2d, conv_transpose2d) in centre/radius form:
    ``W·mid + b`` and ``|W|·rad`` (no product where the radius is one number per sample)."""
    v = v.as_form("cr")
    mid, rad = v.a, v.b
    w = params["weight"]
    w_abs = params.get("weight_abs", None)
    w_abs = w.abs() if w_abs is None else w_abs
    a = node.attrs
    if node.op == "linear":
        op = F.linear
    elif node.op in ("conv2d", "conv_transpose2d"):
        kw = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                  groups=a["groups"])
        if node.op == "conv2d":
            def op(t, weight, bias=None):
                return F.conv2d(t, weight, bias, **kw)
        else:
            def op(t, weight, bias=None):
                return F.conv_transpose2d(t, weight, bias, output_padding=a["output_padding"],
                                          **kw)
    else:
        raise BoundFlowError(f"the torch backend has no centre/radius rule for weighted op "
                             f"{node.op!r}")
    out_rad = _uniform_radius(op, params, w_abs, rad) if _uniform(rad) else op(rad, w_abs)
    return Value("cr", op(mid, w, params.get("bias")), out_rad)


def _view(node, t: torch.Tensor) -> torch.Tensor:
    if node.op == "flatten":
        end = node.attrs["end_dim"]
        return t.flatten(node.attrs["start_dim"] + 1, end + 1 if end >= 0 else end)
    if node.op == "reshape":
        return t.reshape((t.shape[0],) + tuple(node.attrs["shape"]))
    if node.op == "permute":
        return t.permute(0, *(d + 1 for d in node.attrs["dims"]))
    return t


def _rows_row_major(t: torch.Tensor) -> bool:
    """Whether each sample of ``t`` (``[batch, ...]``) is row-major in memory (the batch
    stride may be anything: a half of a ``[batch, 2n]`` joint product is)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _private(v: Value, inputs: set[int]) -> bool:
    """Whether ``v`` as lower/upper shares no memory in ``inputs`` (a centre/radius value is
    converted into fresh tensors first)."""
    return v.form == "cr" or not {v.a.untyped_storage().data_ptr(),
                                  v.b.untyped_storage().data_ptr()} & inputs


def _part(v: Value, start: int, size: int, lines: dict | None) -> Value:
    """Samples ``[start, start + size)`` of ``v``: the same slice objects each time the run
    (``lines``, its memo) asks for them while ``v`` holds the same tensors, so the memo's
    entries of a part, keyed on its intervals' identity, serve every task bounding it."""
    part = slice(start, start + size)
    slices = getattr(lines, "slices", None)
    if slices is None:
        return Value(v.form, v.a[part], v.b[part])
    key = (id(v.a), id(v.b), start, size)
    hit = slices.get(key)
    if hit is not None and hit[0] is v.a and hit[1] is v.b:
        return hit[2]
    out = Value(v.form, v.a[part], v.b[part])
    slices[key] = (v.a, v.b, out)
    return out


def _memo_bytes(lines: dict, exclude: set[int]) -> int:
    """Bytes of the storages a run's memo of relaxation lines holds (its lines, and any
    interval it keys on that is not a slot's), each storage once."""
    seen, total = set(exclude), 0
    for lo, hi, _, found in lines.values():
        for t in (lo, hi, *found):
            if t is None:
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _storages(values, exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages under ``values``, leaving out those in ``exclude``."""
    seen, total = set(exclude), 0
    for v in values:
        for t in (v.a, v.b):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


class TorchExecutor:
    """A PlanBundle bound to a model, run with torch ops (see the module docstring)."""

    def __init__(self, bundle: PlanBundle, graph: Graph, device: str | torch.device = "cpu"):
        if not isinstance(bundle, PlanBundle):
            raise BoundFlowError(f"expected a PlanBundle, got {type(bundle).__name__}")
        bundle.workload.check_graph(graph)
        g, _ = normalised(graph)
        if g.structural_hash() != bundle.graph_hash:
            raise BoundFlowError("the plan's normalised graph differs from this model's "
                                 "(was it made by another BoundFlow version?)")
        self.bundle, self.graph, self.device = bundle, g, torch.device(device)
        self.dtype = DTYPES[bundle.workload.dtype]
        self.nodes = {n.name: n for n in g.nodes}
        self.tasks = bundle.task_graph.tasks
        self.buffers = {b.name: b for b in bundle.task_graph.buffers}
        self.slot = dict(bundle.storage_plan.assignment)
        self.last_use = {b: last for b, _, last in bundle.storage_plan.liveness}
        self.plan_id = bundle.key + graph.weights_hash()[:16]
        alpha = dict(bundle.domain_plan.alpha)
        self.alpha = AlphaConfig(**alpha) if alpha else None
        self.domain_plan = bundle.domain_plan.plan
        self.lower_slope = bundle.domain_plan.lower_slope
        self.sparse = bundle.domain_plan.sparse
        self.box_macs = box_weighted_macs(g)
        self._box_elements = math.prod(g.input_shape)
        self._alpha_final = any(t.kind == "final" and t.attr("method") == "alpha-crown"
                                for t in self.tasks)
        self.cache_entries = {e.task: e for e in bundle.cache_plan.entries}
        self.itemsize = itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._slot_elems = [size // itemsize for size in bundle.storage_plan.slots]
        self._chunk_elements: dict[str, int] = {}  # per bound task (backend.chunks)
        chunks.budget_bytes()                      # a bad BOUNDFLOW_CHUNK_BYTES fails here
        self._arena: dict[int, torch.Tensor] = {}
        # per buffer in a slot: (slot, elements per sample, physical shape, axes to logical)
        self._views = {
            b.name: (self.slot[b.name], b.numel, tuple(b.shape[a] for a in b.layout),
                     (0,) + tuple(1 + b.layout.index(j) for j in range(len(b.shape))))
            for b in bundle.task_graph.buffers if b.name in self.slot}
        self._root = {b.name: bundle.task_graph.root(b.name) for b in bundle.task_graph.buffers}
        # per fused task: how many of its own nodes read each of its nodes
        self._readers = {}
        for t in self.tasks:
            counts = dict.fromkeys(t.nodes, 0)
            for name in t.nodes:
                for i in self.nodes[name].inputs:
                    if i in counts:
                        counts[i] += 1
            self._readers[t.name] = counts
        self._affine: tuple[dict, dict] | None = None
        self._steps: dict[tuple, list[tuple]] = {}         # per IBP task (_ibp_steps)

    # --- buffers in slots ------------------------------------------------------------------

    def _slot_view(self, buf: Buffer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, numel, phys, to_logical = self._views[buf.name]
        need = self._slot_elems[s] * batch
        flat = self._arena.get(s)
        if flat is None or flat.numel() != need:
            flat = self._arena[s] = torch.empty(need, dtype=self.dtype, device=self.device)
        n = numel * batch
        phys = (batch,) + phys
        return (flat[:n].view(phys).permute(to_logical),
                flat[n:2 * n].view(phys).permute(to_logical))

    def _write(self, env: dict, name: str, value: Value, batch: int,
               adopt: bool = True) -> None:
        """Put ``value`` in buffer ``name``: a view of its slot, or (``adopt``, a small
        row-major buffer: :data:`ADOPT_BYTES`) the value's own tensors, where they are laid
        out as the slot would be (each sample row-major: a permuted view is copied, so the
        next op sums in the plan's order) and share no slot's memory (a view of another
        buffer's slot would be overwritten when that slot is reused)."""
        buf = self.buffers[name]
        if buf.alias_of:                       # a view: shares its root's memory
            env[name] = value
            return
        value = value.as_form(buf.form)
        if adopt and buf.identity_layout and 2 * buf.numel * batch * self.itemsize \
                <= ADOPT_BYTES and value.a.shape == value.b.shape == (batch, *buf.shape) \
                and _rows_row_major(value.a) and _rows_row_major(value.b) \
                and not {value.a.untyped_storage().data_ptr(),
                         value.b.untyped_storage().data_ptr()} & self._arena_ptrs():
            env[name] = Value(buf.form, value.a, value.b)
            return
        a, b = self._slot_view(buf, batch)
        a.copy_(value.a)
        b.copy_(value.b)
        env[name] = Value(buf.form, a, b)

    # --- tasks -----------------------------------------------------------------------------

    def _ibp_steps(self, t: Task, affine: dict[str, dict]) -> list[tuple]:
        """The fixed schedule of IBP task ``t``, found once: per node ``(name, node, kind,
        joint, fresh_input, dead)``. ``kind``: ``view``, ``affine``, ``relu_`` (relu in
        place: its input was computed here, this is its last reader and it is no output),
        ``rule``. ``joint``: the largest batch a linear op takes in the joint product (0:
        never; :func:`_joint_batch`). A relu runs in place only on a value no view of this
        task shares (a view read later would see the clamp). ``fresh_input``: a ``relu_``'s
        input is an affine op's new tensor (it can share no memory with the task's inputs).
        ``dead``: values no node after this one reads."""
        key = (t.name, JOINT_MACS, JOINT_WEIGHT_BYTES)   # the limits, read as they are now
        steps = self._steps.get(key)
        if steps is not None:
            return steps
        readers_left = dict(self._readers[t.name])
        kinds: dict[str, str] = {}
        viewed: set[str] = set()        # values a view node of this task shares memory with
        steps = []
        for name in t.nodes:
            node = self.nodes[name]
            joint = 0
            src = node.inputs[0] if node.inputs else None
            if node.op in _VIEW_OPS:
                kind = "view"
                viewed.add(src)
            elif node.op in _WEIGHTED:
                kind = "affine"
                joint = _joint_batch(node, affine[name])
            elif node.op == "relu" and src in kinds and readers_left[src] == 1 \
                    and src not in t.outputs and kinds[src] != "view" and src not in viewed:
                kind = "relu_"
            else:
                kind = "rule"
            fresh = kind == "relu_" and kinds[node.inputs[0]] == "affine"
            dead = []
            for i in node.inputs:
                if i in readers_left:
                    readers_left[i] -= 1
                    if readers_left[i] == 0 and i not in t.outputs:
                        dead.append(i)
            kinds[name] = kind
            steps.append((name, node, kind, joint, fresh, tuple(dead)))
        self._steps[key] = steps
        return steps

    def _ibp(self, t: Task, env: dict, tensors, measure: bool) -> tuple[dict[str, Value], int]:
        local: dict[str, Value] = {}
        for b in t.inputs:
            local[self.buffers[b].node] = env[b]
        peak = 0
        # the memory of the task's inputs (slots, or the caller's box): never written here,
        # though a view or slice of an input computed here may share it
        inputs = {t_.untyped_storage().data_ptr() for v in local.values() for t_ in (v.a, v.b)}
        held = (self._arena_ptrs() | inputs if measure else set())   # counted elsewhere
        affine = self._affine_params(tensors)
        for name, node, kind, joint, fresh, dead in self._ibp_steps(t, affine):
            if kind == "view":
                v = local[node.inputs[0]]
                out = Value(v.form, _view(node, v.a), _view(node, v.b))
            elif kind == "affine":
                v = local[node.inputs[0]]
                params = affine[name]
                out = _affine_joint(params, v) if _joint_takes(v, joint) \
                    else _affine_cr(node, params, v)
            # relu's rule is [relu(l), relu(u)]: computed in place where its input dies here
            # (other activations take their rule from the table)
            elif kind == "relu_" and (fresh or _private(local[node.inputs[0]], inputs)):
                v = local[node.inputs[0]]
                v = v if v.form == "lu" else v.as_form("lu")
                if v.joint is not None:                          # both halves in one clamp
                    v.joint.relu_()
                    out = v
                else:
                    out = Value("lu", v.a.relu_(), v.b.relu_())  # in place: its input dies
            else:
                iv = apply_rule(IBP_RULES, node, tensors,
                                [local[i].interval() for i in node.inputs], "IBP")
                out = Value("lu", iv.lower, iv.upper)
            local[name] = out
            if measure:
                peak = max(peak, _storages(local.values(), held))
            for i in dead:
                local.pop(i, None)
        # outputs without the joint tensor: only this task's ops read it (a cache entry would
        # copy it beside its halves)
        return {o: Value(*local[o][:3]) for o in t.outputs}, peak

    def _affine_params(self, tensors: dict) -> dict[str, dict]:
        """Per affine node its parameter tensors (and ``|W|``), gathered once per tensors."""
        if self._affine is None or self._affine[0] is not tensors:
            per_node = {}
            for node in self.graph.nodes:
                if node.op in _WEIGHTED:
                    params = {r: tensors[k] for r, k in node.params.items()}
                    if node.params["weight"] + "|abs" in tensors:
                        params["weight_abs"] = tensors[node.params["weight"] + "|abs"]
                    per_node[node.name] = params
            self._affine = (tensors, per_node)
        return self._affine[1]

    def _bounds_of(self, t: Task, env: dict, skip: int) -> dict[str, Interval]:
        return {self.buffers[b].node: env[b].interval() for b in t.inputs[skip:]}

    def _crown(self, t: Task, env: dict, tensors, box: Interval, lines: dict | None = None
               ) -> dict[str, Value]:
        node = t.nodes[0]
        iv = env[t.inputs[0]].interval()
        ctx = BackwardContext(self._bounds_of(t, env, 1), self.lower_slope, None, lines=lines)
        out = crown_node(self.graph, node, iv, box, tensors, ctx, sparse=self.sparse)
        return {t.outputs[0]: Value("lu", out.lower, out.upper)}

    def _forward(self, t: Task, env: dict, tensors, box: Interval) -> dict[str, Value]:
        """A ``forward`` task: forward-mode linear bounds of its node, each relaxed op's input
        interval tightened by the best one the plan has (what the task reads), the result
        intersected with the node's IBP interval."""
        node = t.nodes[0]
        iv = env[t.inputs[0]].interval()
        known = self._bounds_of(t, env, 1)

        def tighten(n: str, lo: torch.Tensor, hi: torch.Tensor):
            k = known.get(n)
            return (lo, hi) if k is None else (torch.maximum(lo, k.lower),
                                               torch.minimum(hi, k.upper))
        out = intersect(forward_bounds(self.graph, box, tensors, [node], tighten)[node], iv)
        return {t.outputs[0]: Value("lu", out.lower, out.upper)}

    def bound_task(self, t: Task, env: dict, tensors, box: Interval,
                   C: torch.Tensor | None = None, split: ReluSplit | None = None,
                   upper: bool = True, lines: dict | None = None) -> dict[str, Value]:
        """The outputs of a ``crown``, ``forward`` or ``final`` task (what a compiled backend
        calls back for the tasks it runs as torch ops), over the batch in chunks that keep
        its coefficients in cache (:mod:`boundflow.backend.chunks`). ``upper=False``: a
        final alpha-CROWN bound optimises its lower side only. ``lines``: the run's memo of
        the activations' default lines, shared by its tasks' backward passes (a dict made
        for one run and dropped after it; None: none kept)."""
        batch = env[t.inputs[0]].a.shape[0]
        beta = t.kind == "final" and split is not None and split.beta_iterations > 0
        size = batch if beta else self._chunk(      # beta-CROWN: a batch-wide optimisation
            t, tensors, batch, env[t.inputs[0]] if t.kind == "crown" else None)
        if size >= batch:
            return self._bound_task(t, env, tensors, box, C, split, upper, lines)
        parts = []
        for s in range(0, batch, size):
            part = slice(s, s + size)
            sub = {b: _part(env[b], s, size, lines) for b in t.inputs}
            parts.append(self._bound_task(
                t, sub, tensors,
                None if box is None else Interval(box.lower[part], box.upper[part]),
                None if C is None else C[part],
                None if split is None or t.kind != "final" else split.part(part), upper,
                None if not isinstance(lines, LinesMemo) else PartMemo(lines, f"@{s}:{size}")))
        return {name: Value(parts[0][name].form, torch.cat([p[name].a for p in parts]),
                            torch.cat([p[name].b for p in parts])) for name in parts[0]}

    def _chunk(self, t: Task, tensors, batch: int, bound: Value | None = None) -> int:
        """Samples per chunk of task ``t`` on ``batch`` samples (CPU only;
        :mod:`boundflow.backend.chunks`); a ``crown`` task's by the rows it will bound
        under its input's interval ``bound``, counted only where bounding every row would
        not fit the whole batch in one chunk."""
        whole = 1 << 62
        if self.device.type != "cpu" or batch <= 1:
            return whole
        budget = chunks.budget_bytes()
        elements = self._chunk_elements.get(t.name)
        if elements is None:
            elements = self._chunk_elements[t.name] = chunks.coefficient_elements(
                self.graph, t, tensors, self.bundle.workload.n_specs)
        if not elements:
            return whole
        if bound is not None:
            every = chunks.samples_per_chunk(elements * bound.a[0].numel(), self.itemsize,
                                             budget)
            if every >= batch:
                return whole
            elements *= chunks.crown_rows(self.graph, t.nodes[0], bound.interval(), self.sparse)
            if not elements:
                return whole
        return chunks.samples_per_chunk(elements, self.itemsize, budget)

    def _bound_task(self, t: Task, env: dict, tensors, box: Interval,
                    C: torch.Tensor | None = None, split: ReluSplit | None = None,
                    upper: bool = True, lines: dict | None = None) -> dict[str, Value]:
        if t.kind == "crown":
            return self._crown(t, env, tensors, box, lines)
        if t.kind == "forward":
            return self._forward(t, env, tensors, box)
        return self._final(t, env, tensors, box, C, split, upper, lines)

    def _final(self, t: Task, env: dict, tensors, box: Interval, C: torch.Tensor | None,
               split: ReluSplit | None = None, upper: bool = True, lines: dict | None = None
               ) -> dict[str, Value]:
        src = env[t.inputs[0]].interval()
        method = t.attr("method")
        bounds = self._bounds_of(t, env, 1) if method != "ibp" else {}
        done = split.proven_rows if split is not None and split.goal is not None \
            and C is not None else None
        out = final_bounds(self.graph, box, tensors, C, src, bool(t.attr("fold")), method,
                           bounds, self.domain_plan, self.lower_slope, self.alpha,
                           upper=upper, lines=lines, done=done)
        if split is not None and split.beta_iterations and method != "ibp" and C is not None:
            A = C.reshape((C.shape[0], C.shape[1]) + tuple(self.graph.output_node.shape))
            lower = beta_lower(self.graph, A, box, tensors, bounds, self.lower_slope,
                               split.signs, out.lower, split.beta_iterations, split.beta_lr,
                               split.proven)
            out = Interval(lower, torch.maximum(out.upper, lower))
        return {t.outputs[0]: Value("lu", out.lower, out.upper)}

    # --- a run -----------------------------------------------------------------------------

    def _check(self, x: InputSpec, C: LinearSpec | None) -> None:
        if not isinstance(x, InputSpec):
            raise SpecError(f"run() takes an InputSpec, got {type(x).__name__}")
        if x.sample_shape != self.graph.input_shape:
            raise ShapeError(f"input of shape {list(x.lower.shape)} does not fit the model, "
                             f"which takes [batch, {', '.join(map(str, self.graph.input_shape))}]")
        n_specs = self.bundle.workload.n_specs
        if C is None and n_specs:
            raise SpecError(f"this plan bounds {n_specs} specs: pass C")
        if C is not None:
            if not isinstance(C, LinearSpec):
                raise SpecError(f"C must be a LinearSpec, got {type(C).__name__}")
            if C.n_specs != n_specs:
                raise SpecError(f"C has {C.n_specs} specs; the plan was made for {n_specs}")
            C.check(x.batch, math.prod(self.graph.output_shape))

    def _key(self, t: Task, box: str, spec: str, split: str) -> CacheKey:
        entry = self.cache_entries[t.name]
        domain = t.attr("method") if t.kind == "final" else t.kind
        layout = ";".join(str(self.buffers[o].layout) + self.buffers[o].form for o in t.outputs)
        return CacheKey(self.plan_id, t.name, domain,
                        spec if "spec" in entry.key else "", box if "box" in entry.key else "",
                        split if "split" in entry.key else "",
                        layout if "layout" in entry.key else "")

    def run(self, x: InputSpec, C: LinearSpec | None = None, *, reuse_ibp: bool = False,
            cache_bounds: bool = False, split: Any = None, cache: BoundCache | None = None,
            measure_memory: bool = False, keep: Sequence[str] = (), upper: bool = True
            ) -> RunResult:
        """Bounds over the box ``x`` (of ``C·y`` when the plan has specs). With ``cache``,
        ``reuse_ibp`` reuses intermediate bounds of an earlier run on the same box and split
        state, ``cache_bounds`` whole final bounds of the same query; ``split`` is the
        branch-and-bound state (any value with a stable ``repr``), part of every key; a
        :class:`~boundflow.ir.split.ReluSplit` is also applied (each split ReLU input's
        bounds tightened as its task writes them). ``keep``: nodes whose bounds the stats
        return (``stats["bounds"][node]``, an Interval: the last, tightest, written).
        ``measure_memory`` adds the measured ``peak_bytes`` to the stats (it costs time).
        ``upper=False``, for a caller that reads only the lower bound (a verdict): an
        alpha-CROWN final bound optimises its lower side only, and the upper bound returned
        is the best that side's slopes gave (sound, never looser than CROWN's)."""
        self._check(x, C)
        relu_split = split if isinstance(split, ReluSplit) else None
        if relu_split is not None:
            relu_split.check(x.batch, self._bounded_shapes())
        kept: dict[str, Interval] = {}
        if (reuse_ibp or cache_bounds) and cache is None:
            raise BoundFlowError("reuse_ibp / cache_bounds need a BoundCache (cache=...)")
        start = time.perf_counter()
        batch = x.batch
        box = Interval(torch.as_tensor(x.lower).to(self.device, self.dtype),
                       torch.as_tensor(x.upper).to(self.device, self.dtype))
        cmat = None if C is None else torch.as_tensor(C.C).to(self.device, self.dtype)
        tensors = graph_tensors(self.graph, self.dtype, self.device)
        if cache is not None:
            box_id = array_hash(x.lower, x.upper)
            # a final alpha-CROWN bound of the lower side only is another result
            spec_id = array_hash(None if C is None else C.C) + (
                "|lower" if not upper and self._alpha_final else "")
            split_id = repr(split) if split is not None else ""

        def cacheable(t: Task) -> bool:
            if cache is None or self.cache_entries[t.name].scope != "persistent":
                return False
            return cache_bounds if t.kind == "final" else reuse_ibp

        # from the bounds backwards: which tasks must run, which outputs come from the cache
        # (or from a split state's reference bounds, with reuse)
        want, run, cached = {self.bundle.task_graph.output}, set(), {}
        reused = self._reused(relu_split)
        for t in reversed(self.tasks):
            if t.kind == "input" or not set(t.outputs) & want:
                continue
            if t.name in reused:
                cached[t.name] = reused[t.name]
                continue
            hit = cache.get(self._key(t, box_id, spec_id, split_id)) if cacheable(t) else None
            if hit is not None:
                cached[t.name] = hit
                continue
            run.add(t.name)
            want |= set(t.inputs)

        self._arena = {s: a for s, a in self._arena.items()
                       if a.numel() == self._slot_elems[s] * batch}
        env: dict[str, Value] = {}
        # the activations' default lines, shared by the run's tasks (within a byte budget)
        lines = LinesMemo(LINES_MEMO_BYTES)
        output = self.bundle.task_graph.output
        peak = 0
        with torch.no_grad():
            for i, t in enumerate(self.tasks):
                inflight = 0
                if t.kind == "input":
                    env[t.outputs[0]] = (box_value(box) if self._uniform_pays(batch)
                                         else Value("lu", box.lower, box.upper))
                    continue
                if t.name in cached:
                    outs = cached[t.name]
                elif t.name in run:
                    if t.kind == "layout":            # the write below converts it
                        outs = {t.outputs[0]: env[t.inputs[0]]}
                    elif t.kind == "ibp":
                        outs, inflight = self._ibp(t, env, tensors, measure_memory)
                    else:
                        outs = self.bound_task(t, env, tensors, box, cmat, relu_split, upper,
                                               lines)
                    if measure_memory:
                        inflight = max(inflight, _storages(outs.values(), self._arena_ptrs()))
                    if cacheable(t):
                        cache.put(self._key(t, box_id, spec_id, split_id), outs)
                else:
                    continue
                for name, value in outs.items():
                    node = self.buffers[name].node
                    if relu_split is not None and node in relu_split.signs:
                        value = Value("lu", *relu_split.tighten(node, *value.interval()))
                    if name == output and not measure_memory:
                        # the result: copied out below, so no slot of its own first
                        env[name] = value.as_form(self.buffers[name].form)
                    else:
                        # a layout task's output is its input until this write converts it
                        self._write(env, name, value, batch,
                                    adopt=not measure_memory and t.kind != "layout")
                    if node in keep:
                        kept[node] = Interval(*(t.to("cpu", copy=True)
                                                for t in env[name].interval()))
                if measure_memory:
                    arena = sum(a.untyped_storage().nbytes() for a in self._arena.values())
                    peak = max(peak, arena + inflight + _memo_bytes(lines, self._arena_ptrs()))
                for b in t.inputs:
                    root = self._root[b]
                    if root in self.last_use and self.last_use[root] <= i:
                        env.pop(b, None)
        out = env[output]
        if cache is not None:
            cache.end_run()
        stats = {
            "seconds": time.perf_counter() - start,
            "tasks_run": len(run), "tasks_cached": len(cached),
            "planned_bytes": self.bundle.peak_bytes(batch),
        }
        if measure_memory:
            stats["peak_bytes"] = peak
        if cache is not None:
            stats["cache"] = cache.stats()
        if keep:
            stats["bounds"] = kept
        # row-major copies: the output may be a permuted view (a layout's) of a slot
        return RunResult(*(v.to("cpu", copy=True, memory_format=torch.contiguous_format)
                           for v in (out.a, out.b)), stats)

    def _uniform_pays(self, batch: int) -> bool:
        """Whether :func:`box_value`'s check is worth making for a batch of ``batch``."""
        return (self.box_macs * batch >= UNIFORM_MACS
                and self.box_macs >= UNIFORM_MACS_PER_ELEMENT * self._box_elements)

    def _reused(self, split: ReluSplit | None) -> dict[str, dict[str, Value]]:
        """The outputs of the tasks a split state's reference bounds stand in for (with
        ``reuse``): those whose every output is a node with references, and which are not
        the final bound."""
        if split is None or not split.reuse:
            return {}
        ref = split.reference
        out = {}
        for t in self.tasks:
            if t.kind in ("input", "final") or not t.outputs:
                continue
            nodes = [self.buffers[o].node for o in t.outputs]
            if all(n in ref for n in nodes):
                out[t.name] = {o: Value("lu", *(r.to(self.device, self.dtype) for r in ref[n]))
                               for o, n in zip(t.outputs, nodes)}
        return out

    def _bounded_shapes(self) -> dict[str, tuple[int, ...]]:
        """The nodes whose bounds some task writes to a buffer, and their shapes."""
        shapes = {}
        for t in self.tasks:
            for name in t.outputs:
                buf = self.buffers[name]
                shapes[buf.node] = tuple(buf.shape)
        return shapes

    def _arena_ptrs(self) -> set[int]:
        return {a.untyped_storage().data_ptr() for a in self._arena.values()}
