"""The domain plan: which method bounds each pre-activation, and the final output.

This is the planner's most valuable knob, so it is an explicit value rather than a mode
string: ``intermediate`` maps every pre-activation node (a node some relaxed op reads: an
activation, maxpool2d, softmax; :func:`boundflow.ir.analysis.preactivations`) to
``"ibp"``, ``"crown"`` or ``"forward"`` (forward-mode linear bounds in terms of the input,
:mod:`boundflow.domains.forward`: cheap where the input has few dimensions), and ``final`` is ``"ibp"``, ``"crown"`` or ``"alpha-crown"``. The
method names users know expand into plans with :meth:`DomainPlan.for_method`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from boundflow.errors import BoundFlowError
from boundflow.ir.analysis import preactivations
from boundflow.ir.graph import Graph

__all__ = ["DomainPlan", "FINAL", "INTERMEDIATE", "METHODS", "preactivations"]

INTERMEDIATE = ("ibp", "crown", "forward")
FINAL = ("ibp", "crown", "alpha-crown")
# method -> (domain of every pre-activation, final domain)
METHODS: dict[str, tuple[str, str]] = {
    "ibp": ("ibp", "ibp"),
    "crown-ibp": ("ibp", "crown"),
    "crown": ("crown", "crown"),
    "alpha-crown": ("crown", "alpha-crown"),
}


@dataclass(frozen=True)
class DomainPlan:
    """Per pre-activation node, the method that bounds it; and the final method."""

    intermediate: tuple[tuple[str, str], ...]
    final: str = "crown"

    def __post_init__(self):
        for node, domain in self.intermediate:
            if domain not in INTERMEDIATE:
                raise BoundFlowError(f"domain {domain!r} for node {node!r} is not one of "
                                     f"{INTERMEDIATE}")
        if self.final not in FINAL:
            raise BoundFlowError(f"final domain {self.final!r} is not one of {FINAL}")

    @classmethod
    def for_method(cls, graph: Graph, method: str) -> "DomainPlan":
        if method not in METHODS:
            raise BoundFlowError(f"method {method!r} is not one of {sorted(METHODS)}")
        inner, final = METHODS[method]
        return cls(tuple((p, inner) for p in preactivations(graph)), final)

    @classmethod
    def from_mapping(cls, graph: Graph, domains: Mapping[str, str], final: str = "crown"
                     ) -> "DomainPlan":
        """A plan for ``graph`` that names a domain for every pre-activation node."""
        pre = preactivations(graph)
        unknown = sorted(set(domains) - set(pre))
        missing = [p for p in pre if p not in domains]
        if unknown or missing:
            raise BoundFlowError(f"a domain plan must name each pre-activation node "
                                 f"{list(pre)} once; unknown {unknown}, missing {missing}")
        return cls(tuple((p, domains[p]) for p in pre), final)

    def check(self, graph: Graph) -> "DomainPlan":
        """Raise unless this plan names exactly the pre-activation nodes of ``graph``."""
        DomainPlan.from_mapping(graph, dict(self.intermediate), self.final)
        return self

    def domain(self, node: str) -> str:
        return dict(self.intermediate)[node]

    @property
    def n_crown(self) -> int:
        return sum(d == "crown" for _, d in self.intermediate)

    @property
    def needs_backward(self) -> bool:
        return self.final != "ibp" or self.n_crown > 0

    def to_json(self) -> str:
        return json.dumps({"intermediate": [list(p) for p in self.intermediate],
                           "final": self.final})

    @classmethod
    def from_json(cls, text: str) -> "DomainPlan":
        try:
            d = json.loads(text)
            return cls(tuple((str(n), str(m)) for n, m in d["intermediate"]), str(d["final"]))
        except (ValueError, KeyError, TypeError) as e:
            raise BoundFlowError(f"not a domain plan JSON: {e}") from None
