"""Graph rewrites that remove data movement whatever the knobs: permute algebra.

* two permutes in a row compose into one, and a permute that keeps every axis in place is
  dropped (a transpose pair cancels);
* a permute read only by a one-input ``elementwise`` op whose only constant is an ``other``
  operand (an activation, or a constant add/sub/mul/div; not batchnorm, whose constants are
  per channel) sinks below it, the constant permuted to match, so it can meet the next
  permute or a flatten;
* a permute whose only reader flattens every axis for a ``linear`` layer is folded into that
  layer's weight columns and disappears.

Each rewrite is exact (a permutation of values), so bounds do not change. Rewrites keep node
names: a sunk op keeps its name, the permute keeps its own.
"""

from __future__ import annotations

import numpy as np

from boundflow.ir import ops
from boundflow.ir.graph import Graph, Node, verify_graph


def _commutes_with_permute(node: Node) -> bool:
    """Trait ``elementwise``, one node input, and no constant but a broadcast ``other``:
    then ``f(permute(x)) = permute(f'(x))`` with the constant permuted."""
    return (ops.has(node.op, "elementwise") and len(node.inputs) == 1
            and set(node.params) <= {"other"})


def _inverse(dims) -> tuple[int, ...]:
    return tuple(dims.index(j) for j in range(len(dims)))


class _Editor:
    def __init__(self, graph: Graph):
        self.nodes = list(graph.nodes)
        self.params = dict(graph.params)
        self.output = graph.output

    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def readers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def single_reader(self, name: str) -> Node | None:
        r = self.readers(name)
        return r[0] if len(r) == 1 and name != self.output else None

    def replace(self, old: Node, new: Node) -> None:
        self.nodes[self.nodes.index(old)] = new

    def remove(self, node: Node) -> None:
        """Drop ``node`` (one input); its readers read its input instead."""
        (src,) = node.inputs
        self.nodes.remove(node)
        for i, n in enumerate(self.nodes):
            if node.name in n.inputs:
                self.nodes[i] = _with(n, inputs=tuple(src if x == node.name else x
                                                      for x in n.inputs))
        if self.output == node.name:
            self.output = src

    def graph(self) -> Graph:
        used = {k for n in self.nodes for k in n.params.values()}
        return verify_graph(Graph(tuple(self.nodes), {k: v for k, v in self.params.items()
                                                      if k in used}, self.output))


def _with(node: Node, **changes) -> Node:
    d = dict(name=node.name, op=node.op, inputs=node.inputs, shape=node.shape, dtype=node.dtype,
             attrs=node.attrs, params=node.params, source=node.source)
    d.update(changes)
    return Node(**d)


def _compose(ed: _Editor, p: Node, by: dict[str, Node], log: list[str]) -> bool:
    inner = by.get(p.inputs[0])
    if inner is None or inner.op != "permute" or ed.single_reader(inner.name) is not p:
        return False
    d1, d2 = inner.attrs["dims"], p.attrs["dims"]
    dims = tuple(d1[d2[i]] for i in range(len(d2)))
    ed.replace(p, _with(p, inputs=inner.inputs, attrs={"dims": dims}))
    ed.remove(inner)
    log.append(f"composed permute {inner.name!r} into {p.name!r}")
    return True


def _drop_identity(ed: _Editor, p: Node, log: list[str]) -> bool:
    if tuple(p.attrs["dims"]) != tuple(range(len(p.shape))):
        return False
    ed.remove(p)
    log.append(f"removed permute {p.name!r} (it keeps every axis in place)")
    return True


def _sink(ed: _Editor, p: Node, log: list[str]) -> bool:
    e = ed.single_reader(p.name)
    if e is None or not _commutes_with_permute(e):
        return False
    dims = tuple(p.attrs["dims"])
    x_shape = ed.by_name()[p.inputs[0]].shape
    params = dict(e.params)
    if "other" in e.params:            # the constant, aligned with p's output, moved to x's
        c = ed.params[e.params["other"]]
        full = c.reshape((1,) * (len(p.shape) - c.ndim) + c.shape)
        key = e.params["other"] + "|sunk"
        ed.params[key] = np.ascontiguousarray(np.transpose(full, _inverse(dims)))
        params["other"] = key
    moved = _with(e, inputs=p.inputs, shape=x_shape, params=params)
    perm = _with(p, inputs=(e.name,))
    ed.nodes.remove(p)
    ed.replace(e, moved)
    ed.nodes.insert(ed.nodes.index(moved) + 1, perm)
    for i, n in enumerate(ed.nodes):
        if n is not perm and e.name in n.inputs:
            ed.nodes[i] = _with(n, inputs=tuple(p.name if x == e.name else x for x in n.inputs))
    if ed.output == e.name:
        ed.output = p.name
    log.append(f"sank permute {p.name!r} below {e.op} {e.name!r}")
    return True


def _fold_into_linear(ed: _Editor, p: Node, log: list[str]) -> bool:
    flat = ed.single_reader(p.name)
    if flat is None or not (ops.has(flat.op, "view") and ops.has(flat.op, "row_major")) \
            or len(flat.shape) != 1:                     # flatten or reshape to 1-D
        return False
    lin = ed.single_reader(flat.name)
    if lin is None or lin.op != "linear":
        return False
    x_shape = ed.by_name()[p.inputs[0]].shape
    # flatten(permute(x))[k] = flatten(x)[index[k]]
    index = np.arange(int(np.prod(x_shape))).reshape(x_shape).transpose(p.attrs["dims"]).ravel()
    w = ed.params[lin.params["weight"]]
    folded = np.empty_like(w)
    folded[:, index] = w
    key = lin.params["weight"] + "|folded"
    ed.params[key] = folded
    ed.replace(lin, _with(lin, params={**lin.params, "weight": key}))
    ed.replace(flat, _with(flat, inputs=p.inputs))
    ed.nodes.remove(p)
    log.append(f"folded permute {p.name!r} into the weight of linear {lin.name!r}")
    return True


def simplify_permutes(graph: Graph) -> tuple[Graph, tuple[str, ...]]:
    """``graph`` with permutes composed, cancelled, sunk and folded; and what was done."""
    ed, log = _Editor(graph), []
    changed = True
    while changed:
        changed = False
        by = ed.by_name()
        for p in [n for n in ed.nodes if n.op == "permute"]:
            if (_compose(ed, p, by, log) or _drop_identity(ed, p, log)
                    or _fold_into_linear(ed, p, log) or _sink(ed, p, log)):
                changed = True
                break
    return (ed.graph() if log else graph), tuple(log)
