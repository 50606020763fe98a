"""Graph analysis every layer asks about, answered from the op traits of ``ir/ops.py``.

``preactivations``: the nodes whose intervals a relaxed op (an activation, maxpool2d,
softmax) reads, so bound methods must bound them; ``ibp_exact_nodes``: the nodes whose IBP
interval is already exact (CROWN cannot tighten them); ``ancestors`` re-exported from
``ir/graph.py`` so that analyses are found in one place.
"""

from __future__ import annotations

import math

from boundflow.ir import ops
from boundflow.ir.graph import Graph, ancestors

__all__ = ["ancestors", "ibp_exact_nodes", "preactivations"]


def preactivations(graph: Graph) -> tuple[str, ...]:
    """The nodes some relaxed op reads (its relaxation needs their bounds), in graph order."""
    relaxed = ops.having("relaxed")
    read = {n.inputs[0] for n in graph.nodes if n.op in relaxed}
    return tuple(n.name for n in graph.nodes if n.name in read)


def ibp_exact_nodes(graph: Graph) -> set[str]:
    """Nodes whose IBP interval is already exact: affine in the input through at most one
    op that mixes elements (a linear map of a box is bounded exactly by centre/radius, a
    composition of two is not; neither is one mixing op over an element held twice), with no
    nonlinearity before them. CROWN cannot tighten them, so it is not run there."""
    mixes: dict[str, float] = {}
    for node in graph.nodes:
        ins = [mixes[i] for i in node.inputs]
        op = ops.get(node.op)
        if node.op == "input":
            mixes[node.name] = 0
        elif not op.linear:
            mixes[node.name] = math.inf
        elif op.mixing:
            mixes[node.name] = ins[0] + 1
        elif _may_repeat(node):
            # exact itself, but a later mixing op may sum copies of one input element,
            # which centre/radius overestimates (|w1| + |w2| >= |w1 + w2|)
            mixes[node.name] = max(max(ins), 1)
        elif len(ins) >= 2:            # two input-dependent terms combine like a mixing op
            mixes[node.name] = max(ins) + 2
        else:
            mixes[node.name] = max(ins)
    return {name for name, m in mixes.items() if m <= 1}


def _may_repeat(node) -> bool:
    """Whether the op may hold one element of its inputs more than once: a concat of
    several inputs (they may overlap) or a gather with a repeated index."""
    if node.op == "concat":
        return len(node.inputs) >= 2
    if node.op == "gather":
        indices = tuple(node.attrs["indices"])
        return len(set(indices)) < len(indices)
    return False
