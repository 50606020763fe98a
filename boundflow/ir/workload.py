"""A workload: what one tuned plan is for.

Two queries share a workload when their graphs have the same structure and shapes and they
ask for the same thing: batch size, number of output specs, method, dtype and target, and which
sides of the bounds are read (``bounds``: ``"lower"`` for a verdict, which reads lower bounds
only and lets alpha-CROWN optimise that side alone, about half the work; ``"both"`` otherwise).
Weights do not enter the key (a retrained model keeps its tuned plan); their hash is kept
beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from boundflow.errors import BoundFlowError
from boundflow.ir.domain_plan import METHODS
from boundflow.ir.graph import DTYPES, Graph, memo
from boundflow.target import canonical_target

BOUNDS = ("both", "lower")        # which sides of the bounds a query reads
OPTIMISED = ("alpha-crown",)      # final methods whose work depends on it


@dataclass(frozen=True)
class Workload:
    """``graph_hash`` is the structural hash of the graph as given (before the planner
    normalises it); ``n_specs`` 0 means bounds of the raw output rather than of ``C·y``.
    ``bounds`` is ``"lower"`` only where it changes the work: a method whose final bound is
    optimised (alpha-CROWN); for any other it is ``"both"``, whatever was asked, so the two
    queries share their tuned plans. A ``"both"`` workload's key and record are those of
    releases before the field, so their databases keep their plans."""

    graph_hash: str
    input_shape: tuple[int, ...]
    batch: int
    n_specs: int
    method: str
    dtype: str = "float32"
    target: str = "llvm"
    weights_hash: str = ""
    bounds: str = "both"

    def __post_init__(self):
        if self.method not in METHODS:
            raise BoundFlowError(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if self.dtype not in DTYPES:
            raise BoundFlowError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        object.__setattr__(self, "target", canonical_target(self.target))
        if self.batch < 1 or self.n_specs < 0:
            raise BoundFlowError(f"batch {self.batch} must be >= 1 and n_specs {self.n_specs} "
                                 f">= 0")
        if self.bounds not in BOUNDS:
            raise BoundFlowError(f"bounds {self.bounds!r} is not one of {BOUNDS}")
        if METHODS[self.method][1] not in OPTIMISED:
            object.__setattr__(self, "bounds", "both")

    @classmethod
    def of(cls, graph: Graph, *, batch: int = 1, n_specs: int | None = None,
           method: str = "crown", dtype: str | None = None, target: str = "llvm",
           bounds: str = "both") -> "Workload":
        """The workload of bounding ``graph``; ``n_specs`` defaults to a margin spec
        (one row per other class); ``bounds="lower"`` for a verdict's query."""
        if n_specs is None:
            n = 1
            for s in graph.output_shape:
                n *= s
            n_specs = n - 1
        return cls(graph.structural_hash(), tuple(graph.input_shape), int(batch), int(n_specs),
                   method, dtype or graph.dtype, target, graph.weights_hash(), bounds)

    @property
    def upper(self) -> bool:
        """Whether the upper bounds are asked for (the executors' ``upper=`` argument)."""
        return self.bounds == "both"

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
        if self.bounds == "both":          # as records were before the field: same keys
            d.pop("bounds")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        """A workload read from a plan file or a database row (untrusted): whole numbers
        where they belong (``8.5`` or ``true`` as a batch was read as 8 or 1), a batch and
        dimensions of at most ``2**31``."""
        def whole(v, name: str, least: int) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= 2 ** 31:
                raise ValueError(f"{name} {v!r} is not a whole number in [{least}, 2**31]")
            return v
        try:
            shape = d["input_shape"]
            if not isinstance(shape, (list, tuple)):
                raise ValueError(f"input_shape {shape!r} is not a list of dimensions")
            return cls(str(d["graph_hash"]), tuple(whole(s, "a dimension", 1) for s in shape),
                       whole(d["batch"], "batch", 1), whole(d["n_specs"], "n_specs", 0),
                       str(d["method"]), str(d["dtype"]), str(d["target"]),
                       str(d.get("weights_hash", "")), str(d.get("bounds", "both")))
        except (KeyError, TypeError, ValueError) as e:
            raise BoundFlowError(f"not a workload record: {e}") from None

    def check_graph(self, graph: Graph) -> None:
        if graph.structural_hash() != self.graph_hash:
            raise BoundFlowError("the plan was made for a model of another structure "
                                 f"(workload graph {self.graph_hash[:12]}, this model "
                                 f"{graph.structural_hash()[:12]})")
