"""Which tasks of a plan the Relax backend lowers to TIR, answered without importing TVM (the
cost model's features and the measurement worker ask too).

A task becomes a TIR PrimFunc when its lowering is ``tir``, its kind has a generator (``ibp``,
``layout``, ``crown`` without the sparse rule, IBP / CROWN ``final``) and the generators cover
every op it touches: an ``ibp`` task's own nodes need an IBP kernel (``IBP_KERNELS``,
``kernels.py``); a ``crown`` task or a CROWN ``final`` task walks back through every ancestor
of its start node, each needing a backward rule (``CROWN_KERNELS``, ``crown_kernels.py``). Every
other task runs as a torch callback (``call_dps_packed``), so a plan with any op builds.

A ``crown`` task from a spatial node keeps window ("patch") coefficients where the torch rules
would (``patch_walk``, ``crown_patch_kernels.py``).

``tests/backend/test_new_ops.py`` checks these sets against the generators' methods.
"""

from __future__ import annotations

import weakref

import torch

from boundflow.domains.crown_conv import conv_chain
from boundflow.ir.analysis import ancestors
from boundflow.ir.graph import Graph
from boundflow.ir.normalize import normalised
from boundflow.ir.plan import PlanBundle

# ops ``kernels.TaskLowering`` has an IBP kernel for (a method ``_<op>``)
IBP_KERNELS = frozenset({
    "linear", "conv2d", "conv_transpose2d", "avgpool2d", "maxpool2d", "relu", "leaky_relu", "hardtanh",
    "sigmoid", "tanh", "add", "sub", "mul", "div", "batchnorm", "flatten", "reshape",
    "permute", "identity", "concat", "pad", "slice", "gather",
})
# ops ``crown_kernels.BackwardLowering`` has a backward rule for (a method ``_back_<op>``);
# a walk ends at ``input``
CROWN_KERNELS = frozenset({
    "input", "linear", "conv2d", "conv_transpose2d", "avgpool2d", "relu", "add", "sub", "mul", "div", "batchnorm",
    "flatten", "reshape", "permute", "identity", "concat", "pad", "slice", "gather",
})
# ops ``crown_patch_kernels.PatchWalk`` has a window rule for (a method ``_<op>``): a
# ``crown`` task from a spatial node whose walk the torch rules keep in window form
# (``domains.crown_conv.conv_chain``) and whose ops all have one runs in window form
PATCH_KERNELS = frozenset({
    "conv2d", "avgpool2d", "relu", "identity", "batchnorm", "mul", "div", "add", "sub", "pad",
    "concat",
})
_FINALS = ("ibp", "crown")           # alpha-CROWN's final task needs autograd: a callback


def shape_tensors(graph: Graph) -> dict[str, torch.Tensor]:
    """Tensors of the graph's parameters' shapes (no data), for the walk's geometry."""
    return {k: torch.empty(tuple(v.shape), device="meta") for k, v in graph.params.items()}


def patch_walk(graph: Graph, start: str) -> bool:
    """Whether a ``crown`` task's walk from ``start`` (a node of the normalised ``graph``)
    runs in window form in TIR (``PATCH_KERNELS``), rather than on dense coefficients
    (answered once per graph and start: the planner asks for every plan)."""
    per_graph = _PATCH_WALKS.setdefault(graph, {})
    if start not in per_graph:
        chain = conv_chain(graph, start, shape_tensors(graph))
        per_graph[start] = chain is not None and all(n.op in PATCH_KERNELS for n in chain)
    return per_graph[start]


_PATCH_WALKS: "weakref.WeakKeyDictionary[Graph, dict[str, bool]]" = weakref.WeakKeyDictionary()


def uncovered_ops(task, graph: Graph) -> frozenset[str]:
    """The ops of the normalised ``graph`` that ``task`` needs a TIR kernel for and that have
    none (empty: the generators cover the task)."""
    op = {n.name: n.op for n in graph.nodes}
    if task.kind == "ibp":
        return frozenset(op[n] for n in task.nodes) - IBP_KERNELS
    if task.kind == "crown":
        start = list(task.nodes)
    elif task.kind == "final" and task.attr("method") != "ibp":
        start = [graph.output]
    else:
        return frozenset()
    return frozenset(op[n] for n in ancestors(graph, start)) - CROWN_KERNELS


def lowers_to_tir(bundle: PlanBundle, task, graph: Graph | None = None) -> bool:
    """Whether ``task`` of ``bundle`` becomes a TIR PrimFunc (else a torch callback).
    ``graph`` is the model (normalised here as the planner did); without it only the plan's
    own choices are asked (lowering knob, task kind, method), not which ops the task holds."""
    if task.kind == "input" or bundle.lowering_plan.lowering(task.name) != "tir":
        return False
    if task.kind == "crown" and bundle.domain_plan.sparse:
        return False                   # the sparse crown rule has no TIR kernel
    if not (task.kind in ("ibp", "layout", "crown")
            or (task.kind == "final" and task.attr("method") in _FINALS)):
        return False
    return graph is None or not uncovered_ops(task, normalised(graph)[0])
