"""TIR for CROWN tasks: the backward pass as TE stages, one PrimFunc per task.

Coefficients ``[batch or 1, S, *node_shape]`` flow from the start node back to the input, one
stage per node (fan-out contributions summed there): ``A·W`` through a linear layer, a
transposed convolution through conv2d and avgpool, the ReLU relaxation (the same lines as
``domains/crown.py``: chord above, adaptive / zero / one below) which also makes coefficients
per sample, index remaps through views and concat, and constant terms accumulated per spec.
At the input they are concretised against the box. A ``crown`` task intersects the rows with
its pre-activation's IBP interval; a CROWN ``final`` task intersects ``C·y`` with the IBP bound
of the final task. Identity starts are batch-free until the first ReLU, as in the torch code.
Coefficients are dense (the torch backend's conv "patches" are a later schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tvm import te, tirx

from boundflow.backend.relax.kernels import TaskLowering, Value, _broadcast, _ravel, _unravel
from boundflow.domains.traversal import ancestors
from boundflow.errors import UnsupportedOpError
from boundflow.ir.task_graph import Buffer, Task


@dataclass
class Coef:
    """Lower and upper coefficients as accessors ``f(b, s, *index)``; ``batched`` False: the
    same for every sample (accessors ignore ``b``)."""

    la: Callable
    ua: Callable
    batched: bool


class BackwardLowering(TaskLowering):
    """Lowers ``crown`` tasks and CROWN ``final`` tasks (see the module docstring)."""

    def __init__(self, graph, dtype, batch, lower_slope: str = "adaptive"):
        super().__init__(graph, dtype, batch)
        self.lower_slope = lower_slope
        self.zero_i = tirx.const(0, "int64")
        self._count = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base.replace('.', '_')}_{self._count}"

    # --- stages --------------------------------------------------------------------------

    def _stage(self, batched: bool, S: int, shape, fn, name: str) -> Callable:
        full = (self.n if batched else 1, S) + tuple(shape)
        t = te.compute(full, lambda b, s, *i: fn(b, s, *i), name=self._name(name))
        if batched:
            return lambda b, s, *i: t[(b, s) + tuple(i)]
        z = self.zero_i
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

    # --- backward rules: (node, coef, S, pre) -> ([coef per input], [(lo, hi, batched)]) --

    def _back(self, node, c: Coef, S: int, pre: dict[str, Value]):
        shapes = {i: self.nodes[i].shape for i in node.inputs}
        op = node.op
        same = c.la is c.ua
        if op == "linear":
            w = self.param(node.params["weight"])
            out_f = int(w.shape[0])
            in_shape = shapes[node.inputs[0]]

            def through(f):
                def body(b, s, *i):
                    o = te.reduce_axis((0, out_f), name="o")
                    return te.sum(f(b, s, *i[:-1], o) * w[o, i[-1]], axis=o)
                return body
            new = self._coef(through(c.la), through(c.ua), c.batched, S, in_shape, node.name,
                             same)
            terms = []
            if "bias" in node.params:
                bias = self.param(node.params["bias"])
                terms.append(self._const_terms(c, S, node.shape,
                                               lambda *i: bias[i[-1]], node.name))
            return [new], terms
        if op == "conv2d":
            return self._conv_back(node, c, S, shapes[node.inputs[0]])
        if op == "avgpool2d":
            return self._pool_back(node, c, S, shapes[node.inputs[0]])
        if op == "relu":
            return self._relu_back(node, c, S, pre[node.inputs[0]].lu())
        if op in ("add", "sub"):
            if len(node.inputs) == 2:
                if op == "add":
                    return [c, c], []
                neg = Coef(lambda *i: -c.la(*i), lambda *i: -c.ua(*i), c.batched)
                return [c, neg], []
            other = self.param(node.params["other"])
            k = _broadcast(other, node.shape)
            sign = 1.0 if op == "add" else -1.0
            return [c], [self._const_terms(c, S, node.shape,
                                           lambda *i: k(*i) * tirx.const(sign, self.dtype),
                                           node.name)]
        if op in ("mul", "div"):
            k = _broadcast(self.param(node.params["other"]), node.shape)
            one = tirx.const(1, self.dtype)
            f = (lambda *i: k(*i)) if op == "mul" else (lambda *i: one / k(*i))
            return [Coef(lambda b, s, *i: c.la(b, s, *i) * f(*i),
                         lambda b, s, *i: c.ua(b, s, *i) * f(*i), c.batched)], []
        if op in ("flatten", "reshape"):
            in_shape = shapes[node.inputs[0]]
            out_shape = node.shape

            def remap(f):
                return lambda b, s, *i: f(b, s, *_unravel(_ravel(list(i), in_shape), out_shape))
            return [Coef(remap(c.la), remap(c.ua), c.batched)], []
        if op == "permute":
            dims = node.attrs["dims"]

            def remap(f):
                return lambda b, s, *j: f(b, s, *(j[d] for d in dims))
            return [Coef(remap(c.la), remap(c.ua), c.batched)], []
        if op == "identity":
            return [c], []
        if op == "concat":
            axis = node.attrs["axis"] % len(node.shape)
            outs, start = [], 0
            for i in node.inputs:
                off = start

                def part(f, off=off):
                    return lambda b, s, *j: f(b, s, *(x + off if d == axis else x
                                                      for d, x in enumerate(j)))
                outs.append(Coef(part(c.la), part(c.ua), c.batched))
                start += shapes[i][axis]
            return outs, []
        raise UnsupportedOpError(f"the relax CROWN kernels have no rule for op {op!r} "
                                 f"({node.describe()})")

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
                ky = te.reduce_axis((0, kh), name="ky")
                kx = te.reduce_axis((0, kw), name="kx")
                yy, xx = y + ph - ky * dh, x + pw - kx * dw
                oy, ox = yy // sh, xx // sw
                ok = te.all(yy >= 0, xx >= 0, yy % sh == 0, xx % sw == 0, oy < Ho, ox < Wo)
                o = (ci // cg) * og + ro
                val = f(b, s, o, te.max(te.min(oy, Ho - 1), 0), te.max(te.min(ox, Wo - 1), 0))
                return te.sum(te.if_then_else(ok, val * w[o, ci % cg, ky, kx], self.zero),
                              axis=[ro, ky, kx])
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
        l, u = pre.a, pre.b
        zero, one = self.zero, tirx.const(1, self.dtype)

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

        def la(b, s, *i):
            a = c.la(b, s, *i)
            return te.max(a, zero) * lo_slope(b, *i) + te.min(a, zero) * up_slope(b, *i)

        def ua(b, s, *i):
            a = c.ua(b, s, *i)
            return te.max(a, zero) * up_slope(b, *i) + te.min(a, zero) * lo_slope(b, *i)
        shape = node.shape
        lb = self._total(True, S, shape, lambda b, s, *i: te.min(c.la(b, s, *i), zero)
                         * up_bias(b, *i), node.name + "_lb")
        ub = self._total(True, S, shape, lambda b, s, *i: te.max(c.ua(b, s, *i), zero)
                         * up_bias(b, *i), node.name + "_ub")
        return [self._coef(la, ua, True, S, shape, node.name)], [(lb, ub, True)]

    # --- the walk ------------------------------------------------------------------------

    def backward(self, start: str, A: Coef, S: int, box: Value, pre: dict[str, Value]):
        """``[n, S]`` stages bounding ``A·start`` over the box."""
        need = ancestors(self.graph, [start])
        order = [n for n in self.graph.nodes if n.name in need]
        pending: dict[str, list[Coef]] = {start: [A]}
        terms: list = []
        for node in reversed(order):
            parts = pending.pop(node.name, None)
            if parts is None:
                continue
            if len(parts) == 1:
                c = parts[0]
            else:
                batched = any(p.batched for p in parts)
                c = self._coef(lambda *i: sum(p.la(*i) for p in parts[1:]) + parts[0].la(*i),
                               lambda *i: sum(p.ua(*i) for p in parts[1:]) + parts[0].ua(*i),
                               batched, S, node.shape, node.name + "_sum")
            if node.op == "input":
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
