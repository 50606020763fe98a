"""TIR for CROWN tasks: the backward pass as TE stages, one PrimFunc per task.

Coefficients ``[batch or 1, S, *node_shape]`` flow from the start node back to the input, one
stage per node (fan-out contributions summed there): ``A·W`` through a linear layer, a
transposed convolution through conv2d and avgpool, per-channel scales through batchnorm, the
ReLU relaxation (the same lines as ``domains/crown.py``: chord above, adaptive / zero / one
below) which also makes coefficients per sample, index remaps through views, concat, pad,
slice and gather, a convolution through conv_transpose2d, and constant terms accumulated per
spec. The other relaxed ops (leaky_relu, hardtanh, sigmoid, tanh, maxpool2d, softmax) have no
rule here: a task crossing one runs as a torch callback (``coverage.py``).
At the input they are concretised against the box. A ``crown`` task intersects the rows with
its pre-activation's IBP interval; a CROWN ``final`` task intersects ``C·y`` with the IBP bound
of the final task. Identity starts are batch-free until the first ReLU, as in the torch code.
A ``crown`` task from a spatial node whose walk the window rules cover keeps each row's
receptive field only (``crown_patch_kernels.py``, as the torch rules' patches); other walks
keep dense coefficients, their rows innermost through convolutions on CPU (the rows are the
vector lanes there: a convolution's taps gather along the map, the arithmetic is the same for
every row), and visit only the kernel taps of each element's stride phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tvm import te, tirx

from boundflow.backend.relax.coverage import patch_walk
from boundflow.backend.relax.kernels import (TaskLowering, Value, _broadcast, _ravel, _unravel,
                                             matrix)
from boundflow.ir.analysis import ancestors
from boundflow.errors import UnsupportedOpError
from boundflow.ir.task_graph import Buffer, Task


def summed(parts: list[Coef], stage: Callable) -> Coef:
    """One node's pending contributions as one: the only one, or their sum made a stage by
    ``stage(la, ua, batched, same)`` (``same``: every part's sides are one accessor)."""
    if len(parts) == 1:
        return parts[0]
    return stage(lambda *i: sum(p.la(*i) for p in parts[1:]) + parts[0].la(*i),
                 lambda *i: sum(p.ua(*i) for p in parts[1:]) + parts[0].ua(*i),
                 any(p.batched for p in parts), all(p.la is p.ua for p in parts))


_SPATIAL = frozenset({"conv2d", "conv_transpose2d", "avgpool2d"})


def taps(r, k: int, stride: int, dilation: int, name: str, phase: bool = True):
    """The kernel taps of one axis that can reach element ``r`` (offset by the padding) of a
    convolution's input from its output, as (reduce axis, tap index): with ``phase``, for
    stride > 1 and no dilation, only the taps of ``r``'s phase (``ky ≡ r mod stride``), so no
    multiply-add is spent on a tap that cannot land (the index may pass ``k - 1``: the caller
    checks it); else every tap (the GPU schedules stage affine reads only)."""
    if phase and dilation == 1 and stride > 1:
        j = te.reduce_axis((0, -(-k // stride)), name=name)
        return j, r % stride + j * stride
    j = te.reduce_axis((0, k), name=name)
    return j, j


@dataclass
class Coef:
    """Lower and upper coefficients as accessors ``f(b, s, *index)``; ``batched`` False: the
    same for every sample (accessors ignore ``b``)."""

    la: Callable
    ua: Callable
    batched: bool


class BackwardLowering(TaskLowering):
    """Lowers ``crown`` tasks and CROWN ``final`` tasks (see the module docstring)."""

    def __init__(self, graph, dtype, batch, lower_slope: str = "adaptive",
                 vector_rows: bool = True):
        super().__init__(graph, dtype, batch)
        self.lower_slope = lower_slope
        self.zero_i = tirx.const(0, "int64")
        self._count = 0
        # rows innermost through convolutions (CPU: the rows are the vector lanes); the GPU
        # schedules bind rows-first stages
        self.vector_rows = vector_rows
        self.rows_last = False

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base.replace('.', '_')}_{self._count}"

    # --- stages --------------------------------------------------------------------------

    def _stage(self, batched: bool, S: int, shape, fn, name: str) -> Callable:
        """A ``[n or 1, S, *shape]`` stage as an accessor ``f(b, s, *index)``; laid out
        ``[n or 1, *shape, S]`` (rows innermost, the vector lanes) while ``rows_last`` is on:
        the walk turns it on through convolutions, whose taps gather along the map's axes but
        do the same arithmetic for every row."""
        z = self.zero_i
        if self.rows_last:
            full = (self.n if batched else 1,) + tuple(shape) + (S,)
            t = te.compute(full, lambda b, *i: fn(b, i[-1], *i[:-1]), name=self._name(name))
            return lambda b, s, *i: t[((b if batched else z),) + tuple(i) + (s,)]
        full = (self.n if batched else 1, S) + tuple(shape)
        t = te.compute(full, lambda b, s, *i: fn(b, s, *i), name=self._name(name))
        if batched:
            return lambda b, s, *i: t[(b, s) + tuple(i)]
        return lambda b, s, *i: t[(z, s) + tuple(i)]

    def _coef(self, la, ua, batched, S, shape, name, same=False) -> Coef:
        a = self._stage(batched, S, shape, la, name + "_lA")
        return Coef(a, a if same else self._stage(batched, S, shape, ua, name + "_uA"), batched)

    def _total(self, batched: bool, S: int, shape, fn, name: str) -> Callable:
        """``sum over index of fn(b, s, *index)`` as a ``[batch or 1, S]`` stage."""
        def body(b, s):
            axes = [te.reduce_axis((0, d), name=f"r{k}") for k, d in enumerate(shape)]
            return te.sum(fn(b, s, *axes), axis=axes)
        t = te.compute((self.n if batched else 1, S), body, name=self._name(name))
        if batched:
            return lambda b, s: t[b, s]
        z = self.zero_i
        return lambda b, s: t[z, s]

    # --- backward rules: _back_<op>(node, coef, S, pre) -> ([coef per input], terms) -------
    # terms: [(lo, hi, batched)] constant terms per spec; ``pre`` holds the intervals of the
    # relaxed ops' inputs. ``coverage.CROWN_KERNELS`` lists the ops with a rule here.

    def _back(self, node, c: Coef, S: int, pre: dict[str, Value]):
        fn = getattr(self, "_back_" + node.op, None)
        if fn is None:
            raise UnsupportedOpError(f"the relax CROWN kernels have no rule for op {node.op!r} "
                                     f"({node.describe()})")
        return fn(node, c, S, pre)

    def _in_shape(self, node, k: int = 0):
        return self.nodes[node.inputs[k]].shape

    def _back_linear(self, node, c: Coef, S, pre):
        w = matrix(self, node.params["weight"])          # packed in panels where they fit
        out_f = int(self.graph.params[node.params["weight"]].shape[0])

        def through(f):
            def body(b, s, *i):
                o = te.reduce_axis((0, out_f), name="o")
                return te.sum(f(b, s, *i[:-1], o) * w(o, i[-1]), axis=o)
            return body
        new = self._coef(through(c.la), through(c.ua), c.batched, S, self._in_shape(node),
                         node.name, c.la is c.ua)
        terms = []
        if "bias" in node.params:
            bias = self.param(node.params["bias"])
            terms.append(self._const_terms(c, S, node.shape, lambda *i: bias[i[-1]],
                                           node.name))
        return [new], terms

    def _back_conv2d(self, node, c: Coef, S, pre):
        return self._conv_back(node, c, S, self._in_shape(node))

    def _back_conv_transpose2d(self, node, c: Coef, S, pre):
        """The adjoint of a transposed convolution is a convolution: input ``(ci, iy, ix)``
        gathers output ``(o, iy·s - p + ky·d, ...)`` times ``W[ci, o % og, ky, kx]`` over the
        output channels of its group."""
        w = self.param(node.params["weight"])
        a = node.attrs
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        cin, og, kh, kw = (int(x) for x in w.shape)
        cg = cin // g
        _, Ho, Wo = node.shape

        def through(f):
            def body(b, s, ci, y, x):
                ro = te.reduce_axis((0, og), name="ro")
                ky = te.reduce_axis((0, kh), name="ky")
                kx = te.reduce_axis((0, kw), name="kx")
                oy, ox = y * sh - ph + ky * dh, x * sw - pw + kx * dw
                ok = te.all(oy >= 0, ox >= 0, oy < Ho, ox < Wo)
                val = f(b, s, (ci // cg) * og + ro, te.max(te.min(oy, Ho - 1), 0),
                        te.max(te.min(ox, Wo - 1), 0))
                return te.sum(te.if_then_else(ok, val * w[ci, ro, ky, kx], self.zero),
                              axis=[ro, ky, kx])
            return body
        new = self._coef(through(c.la), through(c.ua), c.batched, S, self._in_shape(node),
                         node.name, c.la is c.ua)
        terms = []
        if "bias" in node.params:
            bias = self.param(node.params["bias"])
            terms.append(self._const_terms(c, S, node.shape, lambda o, y, x: bias[o],
                                           node.name))
        return [new], terms

    def _back_avgpool2d(self, node, c: Coef, S, pre):
        return self._pool_back(node, c, S, self._in_shape(node))

    def _back_relu(self, node, c: Coef, S, pre):
        return self._relu_back(node, c, S, pre[node.inputs[0]].lu())

    def _addsub_back(self, node, c: Coef, S, sign: float):
        if len(node.inputs) == 2:
            if sign > 0:
                return [c, c], []
            return [c, Coef(lambda *i: -c.la(*i), lambda *i: -c.ua(*i), c.batched)], []
        k = _broadcast(self.param(node.params["other"]), node.shape)
        return [c], [self._const_terms(c, S, node.shape,
                                       lambda *i: k(*i) * tirx.const(sign, self.dtype),
                                       node.name)]

    def _back_add(self, node, c: Coef, S, pre):
        return self._addsub_back(node, c, S, 1.0)

    def _back_sub(self, node, c: Coef, S, pre):
        return self._addsub_back(node, c, S, -1.0)

    def _scaled(self, c: Coef, f) -> Coef:
        return Coef(lambda b, s, *i: c.la(b, s, *i) * f(*i),
                    lambda b, s, *i: c.ua(b, s, *i) * f(*i), c.batched)

    def _back_mul(self, node, c: Coef, S, pre):
        k = _broadcast(self.param(node.params["other"]), node.shape)
        return [self._scaled(c, lambda *i: k(*i))], []

    def _back_div(self, node, c: Coef, S, pre):
        k = _broadcast(self.param(node.params["other"]), node.shape)
        one = tirx.const(1, self.dtype)
        return [self._scaled(c, lambda *i: one / k(*i))], []

    def _back_batchnorm(self, node, c: Coef, S, pre):
        """``y = s·x + t`` per channel (axis 0): coefficients times ``s``, ``A·t`` a term."""
        p = {r: self.param(k) for r, k in node.params.items()}
        eps = tirx.const(float(node.attrs["eps"]), self.dtype)
        scale = lambda ch: p["weight"][ch] / te.sqrt(p["var"][ch] + eps)  # noqa: E731
        shift = lambda ch: p["bias"][ch] - p["mean"][ch] * scale(ch)  # noqa: E731
        return [self._scaled(c, lambda ch, *rest: scale(ch))], \
            [self._const_terms(c, S, node.shape, lambda ch, *rest: shift(ch), node.name)]

    def _remapped(self, c: Coef, remap) -> Coef:
        return Coef(remap(c.la), remap(c.ua), c.batched)

    def _back_flatten(self, node, c: Coef, S, pre):
        in_shape, out_shape = self._in_shape(node), node.shape

        def remap(f):
            return lambda b, s, *i: f(b, s, *_unravel(_ravel(list(i), in_shape), out_shape))
        return [self._remapped(c, remap)], []

    _back_reshape = _back_flatten

    def _back_permute(self, node, c: Coef, S, pre):
        dims = node.attrs["dims"]

        def remap(f):
            return lambda b, s, *j: f(b, s, *(j[d] for d in dims))
        return [self._remapped(c, remap)], []

    def _back_identity(self, node, c: Coef, S, pre):
        return [c], []

    def _back_concat(self, node, c: Coef, S, pre):
        axis = node.attrs["axis"] % len(node.shape)
        outs, start = [], 0
        for i in node.inputs:
            def part(f, off=start):
                return lambda b, s, *j: f(b, s, *(x + off if d == axis else x
                                                  for d, x in enumerate(j)))
            outs.append(self._remapped(c, part))
            start += self.nodes[i].shape[axis]
        return outs, []

    def _back_pad(self, node, c: Coef, S, pre):
        """Input element ``j`` is output element ``j + before``; the border, a constant,
        adds ``A·value`` over the border elements."""
        before = [int(p[0]) for p in node.attrs["pads"]]

        def remap(f):
            return lambda b, s, *j: f(b, s, *(x + p for x, p in zip(j, before)))
        terms = []
        value = float(node.attrs["value"])
        if value != 0.0:
            in_shape = self._in_shape(node)
            v, z = tirx.const(value, self.dtype), self.zero

            def border(*i):
                src = [e - p for e, p in zip(i, before)]
                inside = te.all(*[e >= 0 for e in src],
                                *[e < n for e, n in zip(src, in_shape)])
                return te.if_then_else(inside, z, v)
            terms.append(self._const_terms(c, S, node.shape, border, node.name))
        return [self._remapped(c, remap)], terms

    def _back_slice(self, node, c: Coef, S, pre):
        """Input element ``j`` is output ``(j - start) / step`` when that is a whole index
        in range, else has coefficient zero."""
        axis, start, step = (int(node.attrs[k]) for k in ("axis", "start", "step"))
        n_out, z = node.shape[axis], self.zero

        def remap(f):
            def get(b, s, *j):
                rel = j[axis] - start
                k = te.max(te.min(rel // step, n_out - 1), 0)
                ok = te.all(rel >= 0, rel % step == 0, rel // step < n_out)
                return te.if_then_else(ok, f(b, s, *(k if d == axis else x
                                                     for d, x in enumerate(j))), z)
            return get
        return [self._remapped(c, remap)], []

    def _back_gather(self, node, c: Coef, S, pre):
        """Input element ``j`` sums the coefficients of every output position whose index
        is ``j`` along ``axis`` (indices may repeat)."""
        axis, idx, z = int(node.attrs["axis"]), [int(i) for i in node.attrs["indices"]], \
            self.zero
        keep = bool(node.attrs["keepdim"])

        def remap(f):
            def get(b, s, *j):
                rest = lambda k: (*j[:axis], *((k,) if keep else ()), *j[axis + 1:])  # noqa
                total = None
                for k, at in enumerate(idx):
                    term = te.if_then_else(j[axis] == at, f(b, s, *rest(k)), z)
                    total = term if total is None else total + term
                return total
            return get
        return [self._remapped(c, remap)], []

    def _const_terms(self, c: Coef, S, shape, k, name):
        lo = self._total(c.batched, S, shape, lambda b, s, *i: c.la(b, s, *i) * k(*i),
                         name + "_lb")
        hi = lo if c.la is c.ua else self._total(
            c.batched, S, shape, lambda b, s, *i: c.ua(b, s, *i) * k(*i), name + "_ub")
        return lo, hi, c.batched

    def _conv_back(self, node, c: Coef, S, in_shape):
        w = self.param(node.params["weight"])
        a = node.attrs
        (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
        O, cg, kh, kw = (int(x) for x in w.shape)
        og = O // g
        _, Ho, Wo = node.shape

        def through(f):
            def body(b, s, ci, y, x):
                ro = te.reduce_axis((0, og), name="ro")
                jy, ky = taps(y + ph, kh, sh, dh, "jy", self.vector_rows)
                jx, kx = taps(x + pw, kw, sw, dw, "jx", self.vector_rows)
                yy, xx = y + ph - ky * dh, x + pw - kx * dw
                oy, ox = yy // sh, xx // sw
                ok = te.all(ky < kh, kx < kw, yy >= 0, xx >= 0, yy % sh == 0, xx % sw == 0,
                            oy < Ho, ox < Wo)
                o = (ci // cg) * og + ro
                val = f(b, s, o, te.max(te.min(oy, Ho - 1), 0), te.max(te.min(ox, Wo - 1), 0))
                wt = w[o, ci % cg, te.min(ky, kh - 1), te.min(kx, kw - 1)]
                return te.sum(te.if_then_else(ok, val * wt, self.zero), axis=[ro, jy, jx])
            return body
        new = self._coef(through(c.la), through(c.ua), c.batched, S, in_shape, node.name,
                         c.la is c.ua)
        terms = []
        if "bias" in node.params:
            bias = self.param(node.params["bias"])
            terms.append(self._const_terms(c, S, node.shape, lambda o, y, x: bias[o],
                                           node.name))
        return [new], terms

    def _pool_back(self, node, c: Coef, S, in_shape):
        (kh, kw), (sh, sw), (ph, pw) = (node.attrs[k] for k in ("kernel_size", "stride",
                                                                 "padding"))
        _, Ho, Wo = node.shape
        inv = tirx.const(1.0 / (kh * kw), self.dtype)

        def through(f):
            def body(b, s, ci, y, x):
                ky = te.reduce_axis((0, kh), name="ky")
                kx = te.reduce_axis((0, kw), name="kx")
                yy, xx = y + ph - ky, x + pw - kx
                oy, ox = yy // sh, xx // sw
                ok = te.all(yy >= 0, xx >= 0, yy % sh == 0, xx % sw == 0, oy < Ho, ox < Wo)
                val = f(b, s, ci, te.max(te.min(oy, Ho - 1), 0), te.max(te.min(ox, Wo - 1), 0))
                return te.sum(te.if_then_else(ok, val, self.zero), axis=[ky, kx])
            return body
        raw = self._coef(through(c.la), through(c.ua), c.batched, S, in_shape, node.name,
                         c.la is c.ua)
        return [Coef(lambda *i: raw.la(*i) * inv, lambda *i: raw.ua(*i) * inv,
                     raw.batched)], []

    def _relu_back(self, node, c: Coef, S, pre: Value):
        lines = self._relu_lines(node, pre)
        lo_s, up_s, up_b = (lambda b, s, *i, f=f: f(b, *i) for f in lines)
        return self._lines_back(node.name, c, S, node.shape, lo_s, up_s, up_b)

    def _relu_lines(self, node, pre: Value):
        """The relaxation's lower slope, upper slope and upper bias per neuron, accessors
        ``f(b, *index)`` of ``[n, *shape]`` stages, computed once per neuron rather than per
        spec row (each holds a division)."""
        l0, u0 = pre.a, pre.b
        zero, one = self.zero, tirx.const(1, self.dtype)
        per_neuron = (self.n,) + tuple(node.shape)
        name = node.name.replace(".", "_")
        lo_t = te.compute(per_neuron, lambda b, *i: l0(b, *i), name=self._name(name + "_l"))
        up_t = te.compute(per_neuron, lambda b, *i: u0(b, *i), name=self._name(name + "_u"))
        l = lambda b, *i: lo_t[(b,) + tuple(i)]  # noqa: E731
        u = lambda b, *i: up_t[(b,) + tuple(i)]  # noqa: E731

        def unstable(b, *i):
            return te.all(l(b, *i) < zero, u(b, *i) > zero)

        def up_slope(b, *i):
            width = te.if_then_else(unstable(b, *i), u(b, *i) - l(b, *i), one)
            return te.if_then_else(unstable(b, *i), u(b, *i) / width,
                                   te.if_then_else(l(b, *i) >= zero, one, zero))

        def up_bias(b, *i):
            width = te.if_then_else(unstable(b, *i), u(b, *i) - l(b, *i), one)
            return te.if_then_else(unstable(b, *i), -l(b, *i) * u(b, *i) / width, zero)

        def lo_slope(b, *i):
            mode = {"adaptive": te.if_then_else(u(b, *i) > -l(b, *i), one, zero),
                    "zero": zero, "one": one}[self.lower_slope]
            return te.if_then_else(unstable(b, *i), mode,
                                   te.if_then_else(l(b, *i) >= zero, one, zero))

        def per(fn, key):
            t = te.compute(per_neuron, fn, name=self._name(f"{name}_{key}"))
            return lambda b, *i: t[(b,) + tuple(i)]
        return per(lo_slope, "ls"), per(up_slope, "us"), per(up_bias, "ub")

    def _lines_back(self, name: str, c: Coef, S, shape, lo_s, up_s, up_b, coef=None):
        """Coefficients (indexed by ``shape``) through lines ``y >= lo_s·x``, ``y <= up_s·x
        + up_b`` (accessors ``f(b, s, *index)``), and the upper bias's constant terms;
        ``coef(la, ua, batched, shape, name)`` makes the new coefficients' stages (default
        rows first)."""
        zero = self.zero

        def la(b, s, *i):
            a = c.la(b, s, *i)
            return te.max(a, zero) * lo_s(b, s, *i) + te.min(a, zero) * up_s(b, s, *i)

        def ua(b, s, *i):
            a = c.ua(b, s, *i)
            return te.max(a, zero) * up_s(b, s, *i) + te.min(a, zero) * lo_s(b, s, *i)
        lb = self._total(True, S, shape, lambda b, s, *i: te.min(c.la(b, s, *i), zero)
                         * up_b(b, s, *i), name + "_lb")
        ub = self._total(True, S, shape, lambda b, s, *i: te.max(c.ua(b, s, *i), zero)
                         * up_b(b, s, *i), name + "_ub")
        if coef is None:
            return [self._coef(la, ua, True, S, shape, name)], [(lb, ub, True)]
        return [coef(la, ua, True, shape, name)], [(lb, ub, True)]

    # --- the walk ------------------------------------------------------------------------

    def backward(self, start: str, A: Coef, S: int, box: Value, pre: dict[str, Value]):
        """``[n, S]`` stages bounding ``A·start`` over the box."""
        need = ancestors(self.graph, [start])
        order = [n for n in self.graph.nodes if n.name in need]
        pending: dict[str, list[Coef]] = {start: [A]}
        terms: list = []
        spatial = {n.name for n in order if n.op in _SPATIAL}
        for node in reversed(order):
            parts = pending.pop(node.name, None)
            if parts is None:
                continue
            # rows innermost from where a convolution lies ahead (a linear layer's product
            # keeps its own layout: rows first, the weight packed in panels)
            self.rows_last = self.vector_rows and node.op != "linear" and bool(
                spatial & set(ancestors(self.graph, [node.name])))
            c = summed(parts, lambda la, ua, batched, same: self._coef(
                la, ua, batched, S, node.shape, node.name + "_sum"))
            if node.op == "input":
                self.rows_last = False
                return self._concretise(c, S, node.shape, box, terms)
            ins, new_terms = self._back(node, c, S, pre)
            terms += new_terms
            for i, coef in zip(node.inputs, ins):
                pending.setdefault(i, []).append(coef)
        raise UnsupportedOpError(f"node {start!r} does not depend on the input")

    def _concretise(self, c: Coef, S, shape, box: Value, terms):
        x = box.cr()
        lo = self._total(True, S, shape, lambda b, s, *i: c.la(b, s, *i) * x.a(b, *i)
                         - te.abs(c.la(b, s, *i)) * x.b(b, *i), "conc_lo")
        hi = self._total(True, S, shape, lambda b, s, *i: c.ua(b, s, *i) * x.a(b, *i)
                         + te.abs(c.ua(b, s, *i)) * x.b(b, *i), "conc_hi")

        def add(base, k):
            return lambda b, s: base(b, s) + sum(t[k](b, s) for t in terms) if terms \
                else base(b, s)
        return add(lo, 0), add(hi, 1)

    def _identity(self, S: int, shape) -> Coef:
        one, zero = tirx.const(1, self.dtype), self.zero
        a = self._stage(False, S, shape, lambda b, s, *i: te.if_then_else(
            _ravel(list(i), shape) == s, one, zero), "identity")
        return Coef(a, a, False)

    # --- tasks ---------------------------------------------------------------------------

    def _inputs(self, task: Task, buffers: dict[str, Buffer], skip: int):
        args, values = [], {}
        for b in task.inputs[skip:]:
            v, ts = self.placeholder(buffers[b])
            values[buffers[b].node] = v
            args += ts
        return args, values

    def crown_task(self, task: Task, buffers: dict[str, Buffer]):
        node = self.nodes[task.nodes[0]]
        ibp, args = self.placeholder(buffers[task.inputs[0]])
        more, values = self._inputs(task, buffers, 1)
        box = values[self.graph.input.name]
        S = math.prod(node.shape)
        if patch_walk(self.graph, node.name):                  # receptive-field windows
            from boundflow.backend.relax.crown_patch_kernels import PatchWalk
            lo, hi = PatchWalk(self, self.graph, node).run(box, values)
        else:
            lo, hi = self.backward(node.name, self._identity(S, node.shape), S, box, values)
        iv = ibp.lu()
        shape = node.shape
        rows = Value("lu", lambda b, *i: te.max(iv.a(b, *i), lo(b, _ravel(list(i), shape))),
                     lambda b, *i: te.min(iv.b(b, *i), hi(b, _ravel(list(i), shape))), shape)
        return args + more, self.materialise(rows, buffers[task.outputs[0]])

    def final_crown(self, task: Task, buffers: dict[str, Buffer], n_specs: int):
        args, extra, by_ibp = self.final_ibp(task, buffers, n_specs)
        more, values = self._inputs(task, buffers, 1)
        box = values[self.graph.input.name]
        out = self.graph.output_node
        shape = out.shape
        n_out = math.prod(shape)
        if n_specs:
            C = extra[0]
            A = Coef(lambda b, s, *i: C[b, s, _ravel(list(i), shape)],
                     lambda b, s, *i: C[b, s, _ravel(list(i), shape)], True)
            S = n_specs
        else:
            A, S = self._identity(n_out, shape), n_out
        lo, hi = self.backward(out.name, A, S, box, values)
        ibp_lo, ibp_hi = by_ibp
        full = (self.n,) + tuple(ibp_lo.shape[1:])

        def index(i):                      # an element of the bounds -> its spec row
            return i[0] if n_specs else _ravel(list(i), shape)
        lower = te.compute(full, lambda b, *i: te.max(ibp_lo[(b,) + i], lo(b, index(i))),
                           name="crown_lower")
        upper = te.compute(full, lambda b, *i: te.min(ibp_hi[(b,) + i], hi(b, index(i))),
                           name="crown_upper")
        return args + more, extra, [lower, upper]
