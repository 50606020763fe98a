"""The one generic walk that every bound method drives with its own table of per-op rules.

A rule is ``rule(node, params, *input_values) -> value``; ``params`` maps the node's
parameter roles to tensors. The walk visits only the ancestors of the requested nodes, in
graph order, and drops each value once its last reader has run.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from boundflow.errors import UnsupportedOpError
from boundflow.ir import ops
from boundflow.ir.graph import Graph, Node, ancestors

Rule = Callable[..., Any]

_PARAM_CACHE: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def graph_tensors(graph: Graph, dtype: torch.dtype, device: torch.device | str = "cpu"
                  ) -> dict[str, torch.Tensor]:
    """The graph's parameters as tensors of ``dtype`` on ``device``, converted once per graph,
    with ``|W|`` beside the weight of every ``weighted`` op (key ``weight + ABS``) and, for a
    ``mul``/``div`` by a constant whose multiplier (``other``, or ``1 / other``) is nowhere
    negative, that multiplier (key ``other + NONNEG[op]``: its interval rule needs no
    min/max, e.g. an input normalisation's division by the std)."""
    per_graph = _PARAM_CACHE.setdefault(graph, {})
    key = (dtype, str(device))
    if key not in per_graph:
        tensors = {k: torch.tensor(np.asarray(v), device=device, dtype=dtype)
                   for k, v in graph.params.items()}
        weighted = ops.having("weighted")
        for node in graph.nodes:       # |W| of every weight, for centre/radius rules
            if "weight" in node.params and node.op in weighted:
                k = node.params["weight"]
                tensors[k + ABS] = tensors[k].abs()
            elif node.op in NONNEG and "other" in node.params:
                k = node.params["other"]
                scale = tensors[k] if node.op == "mul" else 1 / tensors[k]
                if bool((scale >= 0).all()):
                    tensors[k + NONNEG[node.op]] = scale
        per_graph[key] = tensors
    return per_graph[key]


ABS = "|abs"
NONNEG = {"mul": "|mul>=0", "div": "|div>=0"}


def propagate(graph: Graph, rules: Mapping[str, Rule], init: Any,
              tensors: Mapping[str, torch.Tensor], targets: Sequence[str],
              method: str = "this method") -> dict[str, Any]:
    """Run ``rules`` forward from ``init`` (the input node's value); return the targets' values."""
    need = ancestors(graph, targets)
    nodes = [n for n in graph.nodes if n.name in need]
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            last_use[name] = i
    keep = set(targets)
    env: dict[str, Any] = {}
    for i, node in enumerate(nodes):
        if node.op == "input":
            env[node.name] = init
        else:
            env[node.name] = apply_rule(rules, node, tensors, [env[x] for x in node.inputs],
                                        method)
        for name in set(node.inputs):
            if last_use[name] == i and name not in keep:
                del env[name]
    return {t: env[t] for t in targets}


def apply_rule(rules: Mapping[str, Rule], node: Node, tensors: Mapping[str, torch.Tensor],
               inputs: list, method: str) -> Any:
    rule = rules.get(node.op)
    if rule is None:
        raise UnsupportedOpError(f"{method} has no rule for op {node.op!r} ({node.describe()})")
    params = {role: tensors[key] for role, key in node.params.items()}
    if "weight" in node.params and node.params["weight"] + ABS in tensors:
        params["weight_abs"] = tensors[node.params["weight"] + ABS]
    elif node.op in NONNEG and "other" in node.params:
        scale = tensors.get(node.params["other"] + NONNEG[node.op])
        if scale is not None:
            params["nonneg_scale"] = scale
    return rule(node, params, *inputs)
