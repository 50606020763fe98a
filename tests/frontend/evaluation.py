"""Point evaluation of a converted graph for the frontend tests: the graph must compute what
the model computes. Tests of ops whose concrete rules have not landed in
``boundflow.domains.concrete`` skip, naming the ops (their structure is still checked)."""

from __future__ import annotations

import pytest
import torch

from boundflow.domains import concrete
from boundflow.ir.graph import Graph


def missing_rules(graph: Graph) -> list[str]:
    return sorted({n.op for n in graph.nodes if n.op != "input"} - set(concrete.RULES))


def run_ir(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """``concrete.evaluate(graph, x)``, or skip the test where a rule is still missing."""
    missing = missing_rules(graph)
    if missing:
        pytest.skip(f"boundflow.domains.concrete has no rule for {missing} yet")
    return concrete.evaluate(graph, x)
