"""A workload: what one tuned plan is for.

Two queries share a workload when their graphs have the same structure and shapes and they
ask for the same thing: batch size, number of output specs, method, dtype and target. Weights
do not enter the key (a retrained model keeps its tuned plan); their hash is kept beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from boundflow.errors import BoundFlowError
from boundflow.ir.domain_plan import METHODS
from boundflow.ir.graph import DTYPES, Graph, memo
from boundflow.target import canonical_target


@dataclass(frozen=True)
class Workload:
    """``graph_hash`` is the structural hash of the graph as given (before the planner
    normalises it); ``n_specs`` 0 means bounds of the raw output rather than of ``C·y``."""

    graph_hash: str
    input_shape: tuple[int, ...]
    batch: int
    n_specs: int
    method: str
    dtype: str = "float32"
    target: str = "llvm"
    weights_hash: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise BoundFlowError(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if self.dtype not in DTYPES:
            raise BoundFlowError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        object.__setattr__(self, "target", canonical_target(self.target))
        if self.batch < 1 or self.n_specs < 0:
            raise BoundFlowError(f"batch {self.batch} must be >= 1 and n_specs {self.n_specs} "
                                 f">= 0")

    @classmethod
    def of(cls, graph: Graph, *, batch: int = 1, n_specs: int | None = None,
           method: str = "crown", dtype: str | None = None, target: str = "llvm") -> "Workload":
        """The workload of bounding ``graph``; ``n_specs`` defaults to a margin spec
        (one row per other class)."""
        if n_specs is None:
            n = 1
            for s in graph.output_shape:
                n *= s
            n_specs = n - 1
        return cls(graph.structural_hash(), tuple(graph.input_shape), int(batch), int(n_specs),
                   method, dtype or graph.dtype, target, graph.weights_hash())

    @property
    def key(self) -> str:
        """The lookup key: everything but the weights hash (computed once)."""
        return memo(self, "_key", self._key_now)

    def _key_now(self) -> str:
        d = self.to_dict()
        d.pop("weights_hash")
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        try:
            return cls(str(d["graph_hash"]), tuple(int(s) for s in d["input_shape"]),
                       int(d["batch"]), int(d["n_specs"]), str(d["method"]), str(d["dtype"]),
                       str(d["target"]), str(d.get("weights_hash", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise BoundFlowError(f"not a workload record: {e!r}") from None

    def check_graph(self, graph: Graph) -> None:
        if graph.structural_hash() != self.graph_hash:
            raise BoundFlowError("the plan was made for a model of another structure "
                                 f"(workload graph {self.graph_hash[:12]}, this model "
                                 f"{graph.structural_hash()[:12]})")
