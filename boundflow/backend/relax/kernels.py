"""TIR PrimFuncs for the tasks of a plan, one PrimFunc per task.

A task's nodes are lowered together: every value is an *accessor* (a function from a batch
index and a logical element index to a TIR expression), so elementwise ops and views
(flatten, reshape, permute) and selections (pad, slice, gather) compose into index arithmetic
and never materialise; only reductions (linear, conv2d, conv_transpose2d, avgpool2d,
maxpool2d) and the task's outputs become stages. Every op but softmax has an IBP kernel here
(``coverage.IBP_KERNELS``); a task holding softmax runs as a torch callback. Inputs and outputs
are buffers in their physical layout and interval form, each as two tensors (lower/upper or
centre/radius) with a symbolic batch dimension, so one compile serves every batch size.

The PrimFuncs are built with TE compute definitions turned into TIR by ``te.create_prim_func``
(no TE schedules); ``schedules.py`` schedules them with ``tvm.s_tir.Schedule``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tvm import te, tirx

from boundflow.errors import UnsupportedOpError
from boundflow.ir.graph import Graph, Node
from boundflow.ir.task_graph import Buffer, Task

Access = Callable[..., "tirx.PrimExpr"]


@dataclass
class Value:
    """An interval over a per-sample ``shape``: ``form`` "lu" (a, b = lower, upper) or "cr"
    (centre, radius), each an accessor ``f(batch, *index)``."""

    form: str
    a: Access
    b: Access
    shape: tuple[int, ...]

    def lu(self) -> "Value":
        if self.form == "lu":
            return self
        m, r = self.a, self.b
        return Value("lu", lambda *i: m(*i) - r(*i), lambda *i: m(*i) + r(*i), self.shape)

    def cr(self) -> "Value":
        if self.form == "cr":
            return self
        lo, hi = self.a, self.b
        half = lambda e: e * tirx.const(0.5, str(e.ty))  # noqa: E731
        return Value("cr", lambda *i: half(hi(*i) + lo(*i)), lambda *i: half(hi(*i) - lo(*i)),
                     self.shape)


def _tensor_access(t: te.Tensor) -> Access:
    return lambda *i: t[i]


def _unravel(flat, shape: Sequence[int]) -> list:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat = flat // s
    return list(reversed(idx))


def _ravel(idx: Sequence, shape: Sequence[int]):
    flat = idx[0] if idx else 0
    for i, s in zip(idx[1:], shape[1:]):
        flat = flat * s + i
    return flat


PAD_ROWS = 4     # a symbolic batch is padded to a multiple of this in GEMM-shaped stages, so
                 # a register tile of 4 rows needs no bounds check (schedules.py)
PANEL = 16       # columns per panel of a packed weight (AVX-512's float32 lanes)
PACKED_T = "|T"  # parameter key suffixes: a 2-D weight transposed at compile time, and
PACKED_P = "|P"  # panelled: [R, C] stored as [ceil(C / PANEL), R, PANEL], zero-padded, so
# a register tile's columns are contiguous (rows of a weight whose row length is a power of
# two map to one cache set: read column block by column block, they evict each other)
PACKED_O = "|O"  # a conv weight [O, Cg, kh, kw] blocked by output channel:
# [ceil(O / ob), Cg, kh, kw, ob] (``conv_block``), zero-padded, so the output-channel loop of a
# register tile reads one contiguous vector per (input channel, tap)


def _padded(cols: int) -> int:
    return -(-cols // PANEL) * PANEL


def conv_block(out_channels: int) -> int:
    """Output channels per block of a blocked convolution: all of them up to ``PANEL``, else
    the largest of ``PANEL``, ``PANEL / 2``, ``PANEL / 4`` dividing them, else ``PANEL`` (the
    weight zero-padded)."""
    if out_channels <= PANEL:
        return out_channels
    return next((b for b in (PANEL, PANEL // 2, PANEL // 4) if out_channels % b == 0), PANEL)


def _packing(key: str) -> tuple[str, list[str]]:
    """``key`` as (graph parameter name, its packing suffixes in order); the name itself may
    hold ``|`` (normalisation's ``|folded``)."""
    packing: list[str] = []
    for suffix in (PACKED_O, PACKED_P, PACKED_T, "|abs"):
        if key.endswith(suffix):
            key = key.removesuffix(suffix)
            packing.insert(0, suffix[1:])
    return key, packing


def param_shape(graph: Graph, key: str) -> tuple[int, ...]:
    """The shape of parameter ``key``: a graph parameter's name, optionally followed by
    ``|abs`` (its absolute value), ``|T`` (a 2-D weight transposed), ``|P`` (panelled) or
    ``|O`` (a conv weight blocked by output channel)."""
    base, packing = _packing(key)
    shape = tuple(int(s) for s in graph.params[base].shape)
    if "T" in packing:
        shape = shape[::-1]
    if "P" in packing:
        shape = (_padded(shape[1]) // PANEL, shape[0], PANEL)
    if "O" in packing:
        ob = conv_block(shape[0])
        shape = (-(-shape[0] // ob),) + shape[1:] + (ob,)
    return shape


def param_tensor(tensors, key: str):
    """The tensor of parameter ``key`` (see :func:`param_shape`) from the graph's tensors
    (``domains.traversal.graph_tensors``), packed contiguous."""
    base, packing = _packing(key)
    t = tensors[base]
    if "abs" in packing:
        t = t.abs()
    if "T" in packing:
        t = t.t()
    if "P" in packing:
        rows, cols = t.shape
        t = torch.nn.functional.pad(t, (0, _padded(cols) - cols))
        t = t.reshape(rows, -1, PANEL).permute(1, 0, 2)
    if "O" in packing:
        ob = conv_block(t.shape[0])
        blocks = -(-t.shape[0] // ob)
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, blocks * ob - t.shape[0]))
        t = t.reshape((blocks, ob) + tuple(t.shape[1:])).movedim(1, -1)
    return t.contiguous()


def matrix(lowering: "TaskLowering", key: str, transposed: bool = False) -> Callable:
    """``m(r, c)``: element (r, c) of the 2-D weight ``key`` (transposed: of its transpose),
    read from a panelled copy (zero in the padding columns up to a multiple of ``PANEL``)."""
    t = lowering.param(key + (PACKED_T if transposed else "") + PACKED_P)
    return lambda r, c: t[c // PANEL, r, c % PANEL]


def _reshaped(v: Value, shape: tuple[int, ...]) -> Value:
    """A view of ``v`` in another shape with the same row-major order."""
    old = v.shape

    def remap(f):
        return lambda b, *i: f(b, *_unravel(_ravel(list(i), shape), old))
    return Value(v.form, remap(v.a), remap(v.b), tuple(shape))


def _permuted(v: Value, dims: Sequence[int]) -> Value:
    inverse = [list(dims).index(j) for j in range(len(dims))]

    def remap(f):
        return lambda b, *i: f(b, *(i[inverse[j]] for j in range(len(dims))))
    return Value(v.form, remap(v.a), remap(v.b), tuple(v.shape[d] for d in dims))


def _broadcast(t: te.Tensor, shape: tuple[int, ...]) -> Access:
    """``t`` (right-aligned, size-1 axes broadcast) indexed by an element of ``shape``."""
    tshape = [int(s) for s in t.shape]
    off = len(shape) - len(tshape)
    return lambda *i: t[tuple(0 if tshape[k] == 1 else i[off + k] for k in range(len(tshape)))]


class TaskLowering:
    """Builds the PrimFunc of one task. ``params`` maps a graph parameter key to the TE
    placeholder standing for it (the caller passes the same tensors to the Relax call)."""

    def __init__(self, graph: Graph, dtype: str, batch: tirx.Var):
        self.graph, self.dtype, self.n = graph, dtype, batch
        self.nodes = {n.name: n for n in graph.nodes}
        self.params: dict[str, te.Tensor] = {}
        self.zero = tirx.const(0, dtype)

    def param(self, key: str) -> te.Tensor:
        """The placeholder of parameter ``key``: a graph parameter, or one packed from it
        (see :func:`param_shape`)."""
        if key not in self.params:
            self.params[key] = te.placeholder(param_shape(self.graph, key), self.dtype,
                                              name=key.replace(".", "_").replace("|", "_"))
        return self.params[key]

    # --- buffers -------------------------------------------------------------------------

    def placeholder(self, buf: Buffer) -> tuple[Value, list[te.Tensor]]:
        phys = (self.n,) + tuple(buf.shape[a] for a in buf.layout)
        name = buf.name.replace("@", "_at_")
        ta = te.placeholder(phys, self.dtype, name=name + "_0")
        tb = te.placeholder(phys, self.dtype, name=name + "_1")
        lay = buf.layout

        def access(t):
            return lambda b, *i: t[(b,) + tuple(i[a] for a in lay)]
        return Value(buf.form, access(ta), access(tb), buf.shape), [ta, tb]

    def materialise(self, v: Value, buf: Buffer) -> list[te.Tensor]:
        v = v.lu() if buf.form == "lu" else v.cr()
        phys = (self.n,) + tuple(buf.shape[a] for a in buf.layout)
        lay = buf.layout

        def stage(f, name):
            def body(b, *p):
                return f(b, *(p[lay.index(j)] for j in range(len(lay))))
            return te.compute(phys, body, name=name)
        base = buf.name.replace("@", "_at_")
        return [stage(v.a, base + "_0"), stage(v.b, base + "_1")]

    # --- nodes ---------------------------------------------------------------------------

    def node(self, node: Node, ins: list[Value]) -> Value:
        fn = getattr(self, "_" + node.op, None)
        if fn is None:
            raise UnsupportedOpError(f"the relax backend has no kernel for op {node.op!r} "
                                     f"({node.describe()})")
        return fn(node, ins)

    def _stage_pair(self, shape, fa, fb, name, padded: bool = False) -> Value:
        """Two stages over the batch. ``padded`` (GEMM-shaped stages): the batch is rounded
        up to a multiple of ``PAD_ROWS`` (padding rows recompute the last sample) and the
        last axis to one of ``PANEL`` (padding columns read the weights' zero padding), so a
        register tile needs no bounds check (``schedules.py``); readers see ``shape``."""
        n = self.n
        full_shape = tuple(shape)
        if padded:
            last = n - 1
            fa0, fb0 = fa, fb
            fa = lambda b, *i: fa0(te.min(b, last), *i)  # noqa: E731
            fb = lambda b, *i: fb0(te.min(b, last), *i)  # noqa: E731
            n = (n + PAD_ROWS - 1) // PAD_ROWS * PAD_ROWS
            full_shape = full_shape[:-1] + (_padded(full_shape[-1]),)
        full = (n,) + full_shape
        ta = te.compute(full, lambda *i: fa(*i), name=name + "_a")
        tb = te.compute(full, lambda *i: fb(*i), name=name + "_b")
        return Value("cr", _tensor_access(ta), _tensor_access(tb), tuple(shape))

    def _linear(self, node: Node, ins: list[Value]) -> Value:
        v = self._materialised_cr(ins[0], node.name)
        # W and |W| pre-packed as [in, out], so the vectorised output loop reads them in order
        w = matrix(self, node.params["weight"], transposed=True)
        wa = matrix(self, node.params["weight"] + "|abs", transposed=True)
        bias = self.param(node.params["bias"]) if "bias" in node.params else None
        in_f = int(self.graph.params[node.params["weight"]].shape[1])

        def mid(b, *i):
            k = te.reduce_axis((0, in_f), name="k")
            return te.sum(v.a(b, *i[:-1], k) * w(k, i[-1]), axis=k)

        def rad(b, *i):
            k = te.reduce_axis((0, in_f), name="k")
            return te.sum(v.b(b, *i[:-1], k) * wa(k, i[-1]), axis=k)
        out = self._stage_pair(node.shape, mid, rad, node.name.replace(".", "_"),
                               padded=len(node.shape) == 1)
        if bias is not None:
            m = out.a
            out = Value("cr", lambda b, *i: m(b, *i) + bias[i[-1]], out.b, out.shape)
        return out

    def _conv2d(self, node: Node, ins: list[Value]) -> Value:
        """A direct convolution blocked by output channel: the input materialised once with
        its zero border (no bounds checks in the reduction), the weight pre-packed as
        ``[O / ob, Cg, kh, kw, ob]`` and the output computed as ``[n, O / ob, Y, X, ob]``, so
        the register tile of ``schedules.py`` is output positions × a vector of ``ob``
        channels (readers see ``(o, y, x)``). Groups whose size ``ob`` does not divide keep
        the plain channel-major form."""
        a = node.attrs
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        C, H, W = ins[0].shape
        O, cg, kh, kw = (int(s) for s in self.graph.params[node.params["weight"]].shape)
        og = O // g
        Y, X = node.shape[1:]
        ob = conv_block(O)
        if og % ob and g > 1:
            return self._conv2d_plain(node, ins)
        # the rows and columns the taps read, from -ph / -pw on
        Hp, Wp = (Y - 1) * sh + (kh - 1) * dh + 1, (X - 1) * sw + (kw - 1) * dw + 1
        c = ins[0].cr()
        base = node.name.replace(".", "_")

        def bordered(f):
            def get(b, ch, y, x):
                yy, xx = y - ph, x - pw
                inside = te.all(yy >= 0, yy < H, xx >= 0, xx < W)
                return te.if_then_else(inside, f(b, ch, te.max(te.min(yy, H - 1), 0),
                                                  te.max(te.min(xx, W - 1), 0)), self.zero)
            return get
        src = Value("cr", bordered(c.a), bordered(c.b), (C, Hp, Wp))
        src = self._stage_pair(src.shape, src.a, src.b, base + "_in")
        w = self.param(node.params["weight"] + PACKED_O)
        wa = self.param(node.params["weight"] + "|abs" + PACKED_O)
        blocks = -(-O // ob)

        def conv(f, wt, name):
            def body(b, oo, y, x, oi):
                rc = te.reduce_axis((0, cg), name="rc")
                ry = te.reduce_axis((0, kh), name="ry")
                rx = te.reduce_axis((0, kw), name="rx")
                ch = (oo * ob // og) * cg + rc if g > 1 else rc
                return te.sum(wt[oo, rc, ry, rx, oi] * f(b, ch, y * sh + ry * dh,
                                                         x * sw + rx * dw), axis=[rc, ry, rx])
            t = te.compute((self.n, blocks, Y, X, ob), body, name=name)
            return lambda b, o, y, x: t[b, o // ob, y, x, o % ob]
        mid, rad = conv(src.a, w, base + "_a"), conv(src.b, wa, base + "_b")
        if "bias" in node.params:
            bias = self.param(node.params["bias"])
            m = mid
            mid = lambda b, o, y, x: m(b, o, y, x) + bias[o]  # noqa: E731
        return Value("cr", mid, rad, tuple(node.shape))

    def _conv2d_plain(self, node: Node, ins: list[Value]) -> Value:
        v = self._materialised_cr(ins[0], node.name)
        w = self.param(node.params["weight"])
        wa = self.param(node.params["weight"] + "|abs")
        bias = self.param(node.params["bias"]) if "bias" in node.params else None
        a = node.attrs
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        C, H, W = ins[0].shape
        O, cg, kh, kw = (int(s) for s in w.shape)
        og = O // g

        def padded(f):
            def get(b, c, y, x):
                inside = te.all(y >= 0, y < H, x >= 0, x < W)
                return te.if_then_else(inside, f(b, c, te.max(te.min(y, H - 1), 0),
                                                  te.max(te.min(x, W - 1), 0)), self.zero)
            return get

        def conv(f, wt):
            src = padded(f)

            def body(b, o, y, x):
                rc = te.reduce_axis((0, cg), name="rc")
                ry = te.reduce_axis((0, kh), name="ry")
                rx = te.reduce_axis((0, kw), name="rx")
                return te.sum(wt[o, rc, ry, rx] * src(b, (o // og) * cg + rc, y * sh + ry * dh - ph,
                                                      x * sw + rx * dw - pw), axis=[rc, ry, rx])
            return body
        out = self._stage_pair(node.shape, conv(v.a, w), conv(v.b, wa), node.name)
        if bias is not None:
            m = out.a
            out = Value("cr", lambda b, o, y, x: m(b, o, y, x) + bias[o], out.b, out.shape)
        return out

    def _conv_transpose2d(self, node: Node, ins: list[Value]) -> Value:
        """Output ``(o, y, x)`` sums input ``(ci, iy, ix)`` times ``W[ci, o % og, ky, kx]``
        where ``y = iy·s - p + ky·d`` (and likewise for x): centre by ``W``, radius by
        ``|W|``."""
        v = self._materialised_cr(ins[0], node.name)
        w = self.param(node.params["weight"])
        wa = self.param(node.params["weight"] + "|abs")
        bias = self.param(node.params["bias"]) if "bias" in node.params else None
        a = node.attrs
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        C, H, W = ins[0].shape
        _, og, kh, kw = (int(s) for s in w.shape)
        cg = C // g

        def conv(f, wt):
            def body(b, o, y, x):
                rc = te.reduce_axis((0, cg), name="rc")
                ry = te.reduce_axis((0, kh), name="ry")
                rx = te.reduce_axis((0, kw), name="rx")
                ci = (o // og) * cg + rc
                yy, xx = y + ph - ry * dh, x + pw - rx * dw
                iy, ix = yy // sh, xx // sw
                ok = te.all(yy >= 0, xx >= 0, yy % sh == 0, xx % sw == 0, iy < H, ix < W)
                val = f(b, ci, te.max(te.min(iy, H - 1), 0), te.max(te.min(ix, W - 1), 0))
                return te.sum(te.if_then_else(ok, val * wt[ci, o % og, ry, rx], self.zero),
                              axis=[rc, ry, rx])
            return body
        out = self._stage_pair(node.shape, conv(v.a, w), conv(v.b, wa), node.name)
        if bias is not None:
            m = out.a
            out = Value("cr", lambda b, o, y, x: m(b, o, y, x) + bias[o], out.b, out.shape)
        return out

    def _materialised_cr(self, v: Value, name: str) -> Value:
        """Centre/radius of ``v`` as stages (read many times by a reduction)."""
        c = v.cr()
        return self._stage_pair(v.shape, c.a, c.b, name.replace(".", "_") + "_in")

    def _relu(self, node: Node, ins: list[Value]) -> Value:
        v = ins[0].lu()
        z = self.zero
        return Value("lu", lambda *i: te.max(v.a(*i), z), lambda *i: te.max(v.b(*i), z), v.shape)

    def _addsub(self, node: Node, ins: list[Value], sign: int) -> Value:
        x = ins[0].lu()
        if len(ins) == 2:
            y = ins[1].lu()
            if sign > 0:
                return Value("lu", lambda *i: x.a(*i) + y.a(*i), lambda *i: x.b(*i) + y.b(*i),
                             x.shape)
            return Value("lu", lambda *i: x.a(*i) - y.b(*i), lambda *i: x.b(*i) - y.a(*i),
                         x.shape)
        c = _broadcast(self.param(node.params["other"]), x.shape)
        if sign > 0:
            return Value("lu", lambda b, *i: x.a(b, *i) + c(*i),
                         lambda b, *i: x.b(b, *i) + c(*i), x.shape)
        return Value("lu", lambda b, *i: x.a(b, *i) - c(*i),
                     lambda b, *i: x.b(b, *i) - c(*i), x.shape)

    def _add(self, node, ins):
        return self._addsub(node, ins, 1)

    def _sub(self, node, ins):
        return self._addsub(node, ins, -1)

    def _scale(self, x: Value, s: Access) -> Value:
        x = x.lu()
        lo = lambda b, *i: te.min(x.a(b, *i) * s(*i), x.b(b, *i) * s(*i))  # noqa: E731
        hi = lambda b, *i: te.max(x.a(b, *i) * s(*i), x.b(b, *i) * s(*i))  # noqa: E731
        return Value("lu", lo, hi, x.shape)

    def _mul(self, node, ins):
        return self._scale(ins[0], _broadcast(self.param(node.params["other"]), ins[0].shape))

    def _div(self, node, ins):
        c = _broadcast(self.param(node.params["other"]), ins[0].shape)
        one = tirx.const(1, self.dtype)
        return self._scale(ins[0], lambda *i: one / c(*i))

    def _batchnorm(self, node, ins):
        x = ins[0].lu()
        p = {r: self.param(k) for r, k in node.params.items()}
        eps = tirx.const(float(node.attrs["eps"]), self.dtype)
        scale = lambda c: p["weight"][c] / te.sqrt(p["var"][c] + eps)  # noqa: E731
        shift = lambda c: p["bias"][c] - p["mean"][c] * scale(c)  # noqa: E731
        y = self._scale(x, lambda c, *rest: scale(c))
        return Value("lu", lambda b, c, *r: y.a(b, c, *r) + shift(c),
                     lambda b, c, *r: y.b(b, c, *r) + shift(c), x.shape)

    def _flatten(self, node, ins):
        return _reshaped(ins[0], node.shape)

    def _reshape(self, node, ins):
        return _reshaped(ins[0], node.shape)

    def _permute(self, node, ins):
        return _permuted(ins[0], node.attrs["dims"])

    def _identity(self, node, ins):
        return ins[0]

    def _avgpool2d(self, node, ins):
        x = ins[0].lu()
        (kh, kw), (sh, sw), (ph, pw) = (node.attrs[k] for k in ("kernel_size", "stride",
                                                                 "padding"))
        C, H, W = x.shape
        inv = tirx.const(1.0 / (kh * kw), self.dtype)

        def pool(f):
            def body(b, c, y, xx):
                ry = te.reduce_axis((0, kh), name="ry")
                rx = te.reduce_axis((0, kw), name="rx")
                yy, xw = y * sh + ry - ph, xx * sw + rx - pw
                inside = te.all(yy >= 0, yy < H, xw >= 0, xw < W)
                val = te.if_then_else(inside, f(b, c, te.max(te.min(yy, H - 1), 0),
                                                te.max(te.min(xw, W - 1), 0)), self.zero)
                return te.sum(val, axis=[ry, rx])
            return body
        full = (self.n,) + tuple(node.shape)
        ta = te.compute(full, pool(x.a), name=node.name + "_lo")
        tb = te.compute(full, pool(x.b), name=node.name + "_hi")
        return Value("lu", lambda *i: ta[i] * inv, lambda *i: tb[i] * inv, tuple(node.shape))

    def _maxpool2d(self, node, ins):
        """Max pooling is monotone: ``[maxpool(l), maxpool(u)]``; padding reads -inf."""
        x = ins[0].lu()
        (kh, kw), (sh, sw), (ph, pw) = (node.attrs[k] for k in ("kernel_size", "stride",
                                                                 "padding"))
        C, H, W = x.shape
        low = tirx.min_value(self.dtype)

        def pool(f):
            def body(b, c, y, xx):
                ry = te.reduce_axis((0, kh), name="ry")
                rx = te.reduce_axis((0, kw), name="rx")
                yy, xw = y * sh + ry - ph, xx * sw + rx - pw
                inside = te.all(yy >= 0, yy < H, xw >= 0, xw < W)
                val = te.if_then_else(inside, f(b, c, te.max(te.min(yy, H - 1), 0),
                                                te.max(te.min(xw, W - 1), 0)), low)
                return te.max(val, axis=[ry, rx])
            return body
        full = (self.n,) + tuple(node.shape)
        ta = te.compute(full, pool(x.a), name=node.name.replace(".", "_") + "_lo")
        tb = te.compute(full, pool(x.b), name=node.name.replace(".", "_") + "_hi")
        return Value("lu", _tensor_access(ta), _tensor_access(tb), tuple(node.shape))

    def _monotone(self, ins, f) -> Value:
        """A non-decreasing elementwise ``f``: ``[f(l), f(u)]``."""
        v = ins[0].lu()
        return Value("lu", lambda *i: f(v.a(*i)), lambda *i: f(v.b(*i)), v.shape)

    def _sigmoid(self, node, ins):
        return self._monotone(ins, tirx.sigmoid)

    def _tanh(self, node, ins):
        return self._monotone(ins, tirx.tanh)

    def _leaky_relu(self, node, ins):
        a, z = tirx.const(float(node.attrs["negative_slope"]), self.dtype), self.zero
        return self._monotone(ins, lambda e: te.max(e, z) + a * te.min(e, z))

    def _hardtanh(self, node, ins):
        lo = tirx.const(float(node.attrs["min_val"]), self.dtype)
        hi = tirx.const(float(node.attrs["max_val"]), self.dtype)
        return self._monotone(ins, lambda e: te.min(te.max(e, lo), hi))

    def _pad(self, node, ins):
        """The border reads the constant ``value`` in both bounds."""
        x = ins[0].lu()
        before = [int(p[0]) for p in node.attrs["pads"]]
        value = tirx.const(float(node.attrs["value"]), self.dtype)

        def get(f):
            def at(b, *i):
                src = [j - p for j, p in zip(i, before)]
                inside = te.all(*[e >= 0 for e in src], *[e < s for e, s in zip(src, x.shape)])
                return te.if_then_else(inside, f(b, *[te.max(te.min(e, s - 1), 0)
                                                       for e, s in zip(src, x.shape)]), value)
            return at
        return Value("lu", get(x.a), get(x.b), tuple(node.shape))

    def _slice(self, node, ins):
        x = ins[0]
        axis, start, step = (int(node.attrs[k]) for k in ("axis", "start", "step"))

        def get(f):
            return lambda b, *i: f(b, *(j * step + start if d == axis else j
                                        for d, j in enumerate(i)))
        return Value(x.form, get(x.a), get(x.b), tuple(node.shape))

    def _gather(self, node, ins):
        """Constant indices along ``axis``: the source index is picked by a chain of selects
        (``keepdim`` False: one index, the axis dropped)."""
        x = ins[0]
        axis, idx = int(node.attrs["axis"]), [int(i) for i in node.attrs["indices"]]

        def source(k):
            expr = tirx.const(idx[-1], "int64")
            for j in reversed(range(len(idx) - 1)):
                expr = te.if_then_else(k == j, tirx.const(idx[j], "int64"), expr)
            return expr

        def get(f):
            if not node.attrs["keepdim"]:
                return lambda b, *i: f(b, *i[:axis], tirx.const(idx[0], "int64"), *i[axis:])
            return lambda b, *i: f(b, *(source(j) if d == axis else j for d, j in enumerate(i)))
        return Value(x.form, get(x.a), get(x.b), tuple(node.shape))

    def _concat(self, node, ins):
        axis = node.attrs["axis"] % len(node.shape)
        parts = [v.lu() for v in ins]
        starts = [0]
        for v in parts:
            starts.append(starts[-1] + v.shape[axis])

        def pick(side):
            def get(b, *i):
                expr = None
                for k in reversed(range(len(parts))):
                    idx = list(i)
                    idx[axis] = i[axis] - starts[k]
                    f = parts[k].a if side == 0 else parts[k].b
                    val = f(b, *[te.max(te.min(j, s - 1), 0) if d == axis else j
                                 for d, (j, s) in enumerate(zip(idx, parts[k].shape))])
                    expr = val if expr is None else te.if_then_else(i[axis] < starts[k + 1],
                                                                    val, expr)
                return expr
            return get
        return Value("lu", pick(0), pick(1), tuple(node.shape))

    # --- tasks ---------------------------------------------------------------------------

    def ibp_task(self, task: Task, buffers: dict[str, Buffer]):
        """The PrimFunc of an ``ibp`` or ``layout`` task and its argument order."""
        values: dict[str, Value] = {}
        args: list[te.Tensor] = []
        for b in task.inputs:
            v, ts = self.placeholder(buffers[b])
            values[buffers[b].node] = v
            args += ts
        for name in task.nodes:
            node = self.nodes[name]
            values[name] = self.node(node, [values[i] for i in node.inputs])
        outs = []
        for o in task.outputs:
            src = values[buffers[o].node]
            outs += self.materialise(src, buffers[o])
        return args, outs

    def final_ibp(self, task: Task, buffers: dict[str, Buffer], n_specs: int):
        """The final task by IBP: bounds of ``C·y`` (``C`` folded into a last linear layer
        when the plan says so), or of the output itself without a spec."""
        src_buf = buffers[task.inputs[0]]
        v, args = self.placeholder(src_buf)
        if not n_specs:
            return args, [], self.materialise(v, buffers[task.outputs[0]])
        flat = _reshaped(v, (math.prod(v.shape),))
        n_in = flat.shape[0]
        out = self.graph.output_node
        n_out = math.prod(out.shape)
        C = te.placeholder((self.n, n_specs, n_out), self.dtype, name="C")
        if task.attr("fold"):
            w = self.param(out.params["weight"])
            o = te.reduce_axis((0, n_out), name="o")
            cw = te.compute((self.n, n_specs, n_in), lambda b, s, i: te.sum(
                C[b, s, o] * w[o, i], axis=o), name="cw")
            if "bias" in out.params:
                bias = self.param(out.params["bias"])
                o2 = te.reduce_axis((0, n_out), name="o2")
                off = te.compute((self.n, n_specs), lambda b, s: te.sum(C[b, s, o2] * bias[o2],
                                                                       axis=o2), name="off")
            else:
                off = None
        else:
            cw, off = C, None
        c = self._materialised_cr(flat, "src")
        k = te.reduce_axis((0, n_in), name="k")
        k2 = te.reduce_axis((0, n_in), name="k2")
        mid = te.compute((self.n, n_specs), lambda b, s: te.sum(cw[b, s, k] * c.a(b, k), axis=k),
                         name="mid")
        rad = te.compute((self.n, n_specs), lambda b, s: te.sum(
            te.abs(cw[b, s, k2]) * c.b(b, k2), axis=k2), name="rad")
        if off is not None:
            lo = te.compute((self.n, n_specs), lambda b, s: mid[b, s] + off[b, s] - rad[b, s],
                            name="lower")
            hi = te.compute((self.n, n_specs), lambda b, s: mid[b, s] + off[b, s] + rad[b, s],
                            name="upper")
        else:
            lo = te.compute((self.n, n_specs), lambda b, s: mid[b, s] - rad[b, s], name="lower")
            hi = te.compute((self.n, n_specs), lambda b, s: mid[b, s] + rad[b, s], name="upper")
        return args, [C], [lo, hi]
