"""Normalisation: rewrites that leave a graph's function unchanged and its bounds no looser.

* BatchNorm (inference form, a per-channel affine map) is folded into the linear or conv2d
  that feeds it when nothing else reads that layer's output: ``W' = s·W``, ``b' = s·b + t``
  with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean·s``. Interval bounds of the
  folded layer are never looser than of the two layers apart, and usually tighter.
* ``identity`` nodes are removed.
"""

from __future__ import annotations

import weakref

import numpy as np

from boundflow.ir.graph import Graph, GraphBuilder, Node, live_only


def _bn_scale_shift(graph: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray]:
    p = {role: graph.params[key].astype(np.float64) for role, key in bn.params.items()}
    scale = p["weight"] / np.sqrt(p["var"] + float(bn.attrs["eps"]))
    return scale, p["bias"] - p["mean"] * scale


def _foldable(graph: Graph, bn: Node, users: dict[str, list[str]]) -> bool:
    prev = graph.node(bn.inputs[0])
    # folding scales the weight's axis 0, which must be the output channel: so linear and
    # conv2d by name, not every ``weighted`` op (conv_transpose2d's axis 0 is its input)
    if prev.op not in ("linear", "conv2d") or users[prev.name] != [bn.name]:
        return False
    return prev.name != graph.output and (prev.op == "conv2d" or len(prev.shape) == 1)


def normalize(graph: Graph) -> Graph:
    """Fold BatchNorm into the preceding affine layer where possible; drop identities."""
    users = graph.consumers()
    folded = {bn.inputs[0]: bn for bn in graph.nodes
              if bn.op == "batchnorm" and _foldable(graph, bn, users)}
    if not folded and not any(n.op == "identity" for n in graph.nodes):
        return graph
    b = GraphBuilder(graph.dtype)
    rename: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "input":
            rename[node.name] = b.input(node.shape, name=node.name)
            continue
        if node.op == "identity" or (node.op == "batchnorm" and node.inputs[0] in folded):
            rename[node.name] = rename[node.inputs[0]]
            continue
        params: dict = {role: graph.params[key] for role, key in node.params.items()}
        if node.name in folded:
            scale, shift = _bn_scale_shift(graph, folded[node.name])
            w = params["weight"].astype(np.float64)
            params["weight"] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            bias = params.get("bias")
            bias = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64)
            params["bias"] = bias * scale + shift
        rename[node.name] = b.add_node(node.op, [rename[i] for i in node.inputs], params=params,
                                       attrs=node.attrs, name=node.name, source=node.source)
    return b.build(rename[graph.output])


_NORMALISED: "weakref.WeakKeyDictionary[Graph, tuple[Graph, tuple[str, ...]]]" = \
    weakref.WeakKeyDictionary()


def normalised(graph: Graph) -> tuple[Graph, tuple[str, ...]]:
    """``graph`` with dead nodes dropped, BatchNorm folded, identities dropped and permutes
    simplified (see ``rewrite``); and the rewrites made. Exact and knob-independent, so the
    planner and every backend binding a plan to a model derive the same graph; cached per
    graph."""
    from boundflow.ir.rewrite import simplify_permutes

    cached = _NORMALISED.get(graph)
    if cached is None:
        g = normalize(live_only(graph))
        g, log = simplify_permutes(g)
        _NORMALISED[graph] = cached = (g, log)
    return cached
