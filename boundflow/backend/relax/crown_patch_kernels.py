"""CROWN's patch ("window") form in TIR: the backward pass from a spatial start node, every
row keeping only its receptive field on each upstream map.

The torch rules' geometry (:mod:`boundflow.domains.crown_windows`, planned by
:mod:`boundflow.domains.crown_conv`) is reused as is: each node gets one :class:`Window`
(size ``R``, stride, offset per axis) joined over its readers; coefficients are TE stages
``[n or 1, S, C, Rh, Rw]`` whose row ``s`` is the start neuron ``(cs, ph, pw)`` (flat, as the
dense kernels' rows) and whose entry ``(c, rh, rw)`` stands for map element ``(c, ph·stride -
offset + rh, ...)``. Entries off the map are zeroed before a node's rule reads them (they
stand for nothing: a convolution's zero padding, or past the border), unless they already are
(a rule that keeps the map keeps them zero).

The rules are the dense ones (:mod:`boundflow.backend.relax.crown_kernels`) in window
coordinates:

- **conv2d**: the adjoint convolution without padding, on windows (``(R-1)·s + d·(k-1) + 1``
  entries per axis); for stride > 1 and no dilation only the kernel taps of the entry's phase
  are visited (``ky ≡ rh mod s``), so no multiply-add is spent on a tap that cannot land;
  the bias adds ``Σ A·b`` per channel;
- **avgpool2d**: the same with the weight ``1/(kh·kw)`` per channel;
- **relu**: the lines per neuron (one stage each, as in the dense walk), read at each entry's
  map element;
- **identity, batchnorm, mul / div / add / sub by a constant**: a scale and a shift per map
  element; **add / sub of two nodes**: the coefficients go to both (negated to the
  subtrahend); **concat** along channels: split along ``C``; **pad** (spatial, constant): the
  window shifts, the border adds ``value·Σ A`` there.

Where readers leave a node windows of different geometry (a residual block), each
contribution is read at its own entry of the node's joined window, zero outside it, and the
contributions are summed into one stage. ``coverage.patch_walk`` says which starts are covered:
those the torch walk takes in patch form whose ops all have a rule here
(``coverage.PATCH_KERNELS``).
"""

from __future__ import annotations

from typing import Mapping

from tvm import te, tirx

from boundflow.backend.relax.crown_kernels import Coef, summed, taps
from boundflow.backend.relax.kernels import Value, _broadcast
from boundflow.backend.relax.coverage import shape_tensors
from boundflow.domains.crown_conv import _order, _windows
from boundflow.domains.crown_patches import input_windows
from boundflow.domains.crown_windows import Window
from boundflow.ir.graph import Graph, Node

_REGROW = frozenset({"conv2d", "avgpool2d", "pad"})     # rules whose input map is another


def _clamp(e, n: int):
    return te.max(te.min(e, n - 1), 0)


class PatchWalk:
    """One backward walk in window form from ``start`` (see the module docstring), building
    stages through ``low`` (a ``BackwardLowering``)."""

    def __init__(self, low, graph: Graph, start: Node):
        self.low, self.graph, self.start = low, graph, start
        self.tensors = shape_tensors(graph)
        self.order = _order(graph, start.name)
        self.windows: dict[str, Window] = _windows(graph, self.order, self.tensors)
        self.nodes = {n.name: n for n in graph.nodes}
        Cs, H, W = start.shape
        self.H, self.W, self.S = H, W, Cs * H * W
        self.zero = low.zero
        self.eye: Coef | None = None          # the start's identity, once ``run`` made it

    # --- geometry ------------------------------------------------------------------------

    def _base(self, win: Window, s):
        """The map element of entry (0, 0) of row ``s``'s window, per axis."""
        pos = ((s % (self.H * self.W)) // self.W, s % self.W)
        return tuple(pos[a] * win.stride[a] - win.offset[a] for a in (0, 1))

    def _element(self, win: Window, shape, s, c, rh, rw):
        """Map element ``(c, h, w)`` of entry ``(c, rh, rw)`` (clamped onto the map) and
        whether it lies on the map (None: every entry does)."""
        bh, bw = self._base(win, s)
        h, w = bh + rh, bw + rw
        _, H, W = shape
        on = None if win.inside((H, W)) else te.all(h >= 0, h < H, w >= 0, w < W)
        return (c, _clamp(h, H), _clamp(w, W)), on

    def _masked(self, c: Coef, win: Window, shape) -> Coef:
        if win.inside(tuple(shape[1:])):
            return c

        def mask(f):
            def get(b, s, ch, rh, rw):
                _, on = self._element(win, shape, s, ch, rh, rw)
                return te.if_then_else(on, f(b, s, ch, rh, rw), self.zero)
            return get
        same = c.la is c.ua
        la = mask(c.la)
        return Coef(la, la if same else mask(c.ua), c.batched)

    def _placed(self, c: Coef, src: Window, dst: Window) -> Coef:
        """Coefficients on windows ``src`` read on windows ``dst`` of the same map (zero where
        ``dst``'s entry is outside ``src``'s window)."""
        if src == dst:
            return c

        def place(f):
            def get(b, s, ch, rh, rw):
                bs, bd = self._base(src, s), self._base(dst, s)
                jh, jw = rh + bd[0] - bs[0], rw + bd[1] - bs[1]
                ok = te.all(jh >= 0, jh < src.size[0], jw >= 0, jw < src.size[1])
                return te.if_then_else(ok, f(b, s, ch, _clamp(jh, src.size[0]),
                                             _clamp(jw, src.size[1])), self.zero)
            return get
        same = c.la is c.ua
        la = place(c.la)
        return Coef(la, la if same else place(c.ua), c.batched)

    def _stage(self, batched: bool, shape, fn, name: str, rows: int | None = None):
        """A stage ``[n or 1, *shape, rows]``, rows innermost (each rule's arithmetic is the
        same for every row, so the rows are the vector lanes; rows first where the lowering
        does not vectorise rows: GPU), as an accessor
        ``f(b, s, *index)``; ``rows`` (default S) smaller than S: a stage per start channel,
        read at row ``s // (H·W)``."""
        low = self.low
        rows = rows or self.S
        per = self.S // rows
        lead = (low.n if batched else 1,)
        z = low.zero_i
        row = (lambda s: s // per) if per > 1 else (lambda s: s)
        if not low.vector_rows:                        # rows first (GPU schedules)
            t = te.compute(lead + (rows,) + tuple(shape),
                           lambda b, r, *i: fn(b, r * per, *i), name=low._name(name))
            return lambda b, s, *i: t[((b if batched else z), row(s)) + tuple(i)]
        t = te.compute(lead + tuple(shape) + (rows,),
                       lambda b, *i: fn(b, i[-1] * per, *i[:-1]), name=low._name(name))
        return lambda b, s, *i: t[((b if batched else z),) + tuple(i) + (row(s),)]

    def _coef(self, la, ua, batched, shape, name, same=False, rows=None) -> Coef:
        a = self._stage(batched, shape, la, name + "_plA", rows)
        return Coef(a, a if same else self._stage(batched, shape, ua, name + "_puA", rows),
                    batched)

    def _wshape(self, name: str, win: Window | None = None) -> tuple[int, int, int]:
        win = win or self.windows[name]
        return (self.nodes[name].shape[0],) + tuple(win.size)

    # --- the walk ------------------------------------------------------------------------

    def run(self, box: Value, pre: Mapping[str, Value]):
        """``[n, S]`` stages (lower, upper) bounding every neuron of the start over the box."""
        one, HW = tirx.const(1, self.low.dtype), self.H * self.W

        def eye(b, s, c, rh, rw):
            return te.if_then_else(c == s // HW, one, self.zero)
        self.eye = Coef(eye, eye, False)     # the start's identity: a rule may special-case it
        # per node: (coefficients, their window, whether they are already zero off the map)
        pending: dict[str, list[tuple[Coef, Window, bool]]] = {
            self.start.name: [(self.eye, self.windows[self.start.name], True)]}
        terms: list = []
        for node in self.order:
            parts = pending.pop(node.name, None)
            if parts is None:
                continue
            win = self.windows[node.name]
            wshape = self._wshape(node.name)
            c = summed([self._placed(c, w, win) for c, w, _ in parts],
                       lambda la, ua, batched, same: self._coef(
                           la, ua, batched, wshape, node.name + "_psum", same))
            if not all(clean for *_, clean in parts):
                c = self._masked(c, win, node.shape)
            if node.op == "input":
                return self._concretise(c, win, node.shape, box, terms)
            ins, new_terms = getattr(self, "_" + node.op)(node, c, win, pre)
            terms += new_terms
            for name, coef, w in zip(node.inputs, ins,
                                     input_windows(node, win, self.tensors)):
                # a rule that keeps the map (not a convolution-like op or a pad) keeps
                # zero what was zero off it: the input's map is the node's
                pending.setdefault(name, []).append((coef, w, node.op not in _REGROW))
        raise AssertionError(f"the walk from {self.start.name!r} never reached the input")

    def _concretise(self, c: Coef, win: Window, shape, box: Value, terms):
        low, S, x = self.low, self.S, box.cr()
        wshape = (shape[0],) + tuple(win.size)

        def at(acc, b, s, *i):
            return acc(b, *self._element(win, shape, s, *i)[0])
        lo = low._total(True, S, wshape, lambda b, s, *i: c.la(b, s, *i) * at(x.a, b, s, *i)
                        - te.abs(c.la(b, s, *i)) * at(x.b, b, s, *i), "pconc_lo")
        hi = low._total(True, S, wshape, lambda b, s, *i: c.ua(b, s, *i) * at(x.a, b, s, *i)
                        + te.abs(c.ua(b, s, *i)) * at(x.b, b, s, *i), "pconc_hi")

        def add(base, k):
            return lambda b, s: base(b, s) + sum(t[k](b, s) for t in terms) if terms \
                else base(b, s)
        return add(lo, 0), add(hi, 1)

    def _terms(self, c: Coef, win: Window, node: Node, k):
        """``Σ A·k`` over each row's window, ``k(s, c, rh, rw)`` a constant per entry."""
        wshape = self._wshape(node.name, win)
        low = self.low
        lo = low._total(c.batched, self.S, wshape,
                        lambda b, s, *i: c.la(b, s, *i) * k(s, *i), node.name + "_plb")
        hi = lo if c.la is c.ua else low._total(
            c.batched, self.S, wshape, lambda b, s, *i: c.ua(b, s, *i) * k(s, *i),
            node.name + "_pub")
        return lo, hi, c.batched

    def _per_element(self, win: Window, node: Node, f):
        """A constant per map element of ``node`` (``f(c, h, w)``) read per window entry."""
        return lambda s, *i: f(*self._element(win, node.shape, s, *i)[0])

    # --- rules: _<op>(node, coef, window, pre) -> ([coef per input], terms) --------------

    def _conv2d(self, node, c: Coef, win: Window, pre):
        low = self.low
        w = low.param(node.params["weight"])
        a = node.attrs
        (sh, sw), (dh, dw), g = a["stride"], a["dilation"], a["groups"]
        O, cg, kh, kw = (int(x) for x in w.shape)
        return self._adjoint(node, c, win, lambda o, ci, ky, kx: w[o, ci % cg, ky, kx],
                             O, O // g, cg, (kh, kw), (sh, sw), (dh, dw),
                             node.params.get("bias"))

    def _avgpool2d(self, node, c: Coef, win: Window, pre):
        (kh, kw), stride = node.attrs["kernel_size"], node.attrs["stride"]
        inv = tirx.const(1.0 / (kh * kw), self.low.dtype)
        C = node.shape[0]
        return self._adjoint(node, c, win, lambda o, ci, ky, kx: inv, C, 1, 1, (kh, kw),
                             tuple(stride), (1, 1), None)

    def _grown(self, node, win: Window) -> Window:
        """The window a convolution-like ``node`` leaves on its input."""
        return input_windows(node, win, self.tensors)[0]

    def _adjoint(self, node, c: Coef, win: Window, weight, O, og, cg, kernel, stride,
                 dilation, bias_key):
        """Window coefficients through a convolution-like op: entry ``rh`` of the input
        window gathers entries ``(rh - ky·d) / s`` of the output window."""
        low, S = self.low, self.S
        (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
        R = win.size
        grown = self._grown(node, win)
        in_shape = (self.nodes[node.inputs[0]].shape[0],) + tuple(grown.size)

        def through(f):
            def body(b, s, ci, rh, rw):
                ro = te.reduce_axis((0, og), name="ro")
                jy, ky = taps(rh, kh, sh, dh, "jy", low.vector_rows)
                jx, kx = taps(rw, kw, sw, dw, "jx", low.vector_rows)
                yy, xx = rh - ky * dh, rw - kx * dw
                ay, ax = yy // sh, xx // sw
                ok = te.all(ky < kh, kx < kw, yy >= 0, xx >= 0, yy % sh == 0, xx % sw == 0,
                            ay < R[0], ax < R[1])
                o = (ci // cg) * og + ro
                val = f(b, s, o, _clamp(ay, R[0]), _clamp(ax, R[1])) * \
                    weight(o, ci, _clamp(ky, kh), _clamp(kx, kw))
                return te.sum(te.if_then_else(ok, val, self.zero), axis=[ro, jy, jx])
            return body
        if c is self.eye:                   # the identity's windows: the weight itself, alike
            new = self._through_identity(node, weight, og, cg, kernel, dilation, in_shape)
        else:
            new = self._coef(through(c.la), through(c.ua), c.batched, in_shape, node.name,
                             c.la is c.ua)
        terms = []
        if bias_key is not None:
            bias = low.param(bias_key)
            terms.append(self._terms(c, win, node, lambda s, o, rh, rw: bias[o]))
        return [new], terms

    def _through_identity(self, node, weight, og, cg, kernel, dilation, in_shape) -> Coef:
        """The start's identity through the convolution it is the output of: row ``s`` of
        start channel ``o`` is the kernel of ``o`` (entry ``rh`` tap ``rh / d``), the same for
        every position: one stage per start channel."""
        (kh, kw), (dh, dw) = kernel, dilation
        HW = self.H * self.W

        def body(b, s, ci, rh, rw):
            o = s // HW
            ok = te.all((o // og) == (ci // cg), rh % dh == 0, rw % dw == 0)
            return te.if_then_else(ok, weight(o, ci, _clamp(rh // dh, kh), _clamp(rw // dw, kw)),
                                   self.zero)
        return self._coef(body, body, False, in_shape, node.name + "_eye", True,
                          rows=self.start.shape[0])

    def _relu(self, node, c: Coef, win: Window, pre):
        low = self.low
        lines = low._relu_lines(node, pre[node.inputs[0]].lu())
        lo_s, up_s, up_b = (
            (lambda b, s, *i, f=f: f(b, *self._element(win, node.shape, s, *i)[0]))
            for f in lines)
        return low._lines_back(node.name, c, self.S, self._wshape(node.name, win),
                               lo_s, up_s, up_b, coef=self._coef)

    def _affine(self, node, c: Coef, win: Window, scale, shift):
        """``y = scale·x + shift`` per map element (either None)."""
        terms = []
        if shift is not None:
            terms.append(self._terms(c, win, node, self._per_element(win, node, shift)))
        if scale is not None:
            k = self._per_element(win, node, scale)
            same = c.la is c.ua

            def scaled(f):
                return lambda b, s, *i: f(b, s, *i) * k(s, *i)
            la = scaled(c.la)
            c = Coef(la, la if same else scaled(c.ua), c.batched)
        return [c], terms

    def _identity(self, node, c, win, pre):
        return [c], []

    def _batchnorm(self, node, c, win, pre):
        low = self.low
        p = {r: low.param(k) for r, k in node.params.items()}
        eps = tirx.const(float(node.attrs["eps"]), low.dtype)
        scale = lambda ch, *_: p["weight"][ch] / te.sqrt(p["var"][ch] + eps)  # noqa: E731
        shift = lambda ch, *_: p["bias"][ch] - p["mean"][ch] * scale(ch)  # noqa: E731
        return self._affine(node, c, win, scale, shift)

    def _constant(self, node):
        return _broadcast(self.low.param(node.params["other"]), node.shape)

    def _mul(self, node, c, win, pre):
        return self._affine(node, c, win, self._constant(node), None)

    def _div(self, node, c, win, pre):
        k, one = self._constant(node), tirx.const(1, self.low.dtype)
        return self._affine(node, c, win, lambda *i: one / k(*i), None)

    def _addsub(self, node, c: Coef, win, sign: float):
        if len(node.inputs) == 2:
            if sign > 0:
                return [c, c], []
            return [c, Coef(lambda *i: -c.la(*i), lambda *i: -c.ua(*i), c.batched)], []
        k, sg = self._constant(node), tirx.const(sign, self.low.dtype)
        return self._affine(node, c, win, None, lambda *i: k(*i) * sg)

    def _add(self, node, c, win, pre):
        return self._addsub(node, c, win, 1.0)

    def _sub(self, node, c, win, pre):
        return self._addsub(node, c, win, -1.0)

    def _concat(self, node, c: Coef, win, pre):
        outs, start = [], 0
        for name in node.inputs:
            def part(f, off=start):
                return lambda b, s, ch, *r: f(b, s, ch + off, *r)
            same = c.la is c.ua
            la = part(c.la)
            outs.append(Coef(la, la if same else part(c.ua), c.batched))
            start += self.nodes[name].shape[0]
        return outs, []

    def _pad(self, node, c: Coef, win, pre):
        """The same coefficients on the shifted window; the border adds ``value·Σ A``."""
        value = float(node.attrs["value"])
        if value == 0.0:
            return [c], []
        before = [int(p[0]) for p in node.attrs["pads"]]
        _, H, W = self.nodes[node.inputs[0]].shape
        v = tirx.const(value, self.low.dtype)

        def border(ch, h, w):
            y, x = h - before[1], w - before[2]
            return te.if_then_else(te.all(y >= 0, y < H, x >= 0, x < W), self.zero, v)
        return [c], [self._terms(c, win, node, self._per_element(win, node, border))]

