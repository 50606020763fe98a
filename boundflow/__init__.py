"""BoundFlow: certified bounds of neural networks, computed by plans a compiler can tune.

What users import lives here; everything else may change between versions.

Names are resolved on first use (PEP 562), so ``import boundflow`` and ``boundflow --help``
load neither torch nor TVM; ``boundflow.compute_bounds`` imports what it needs when called.
Importing it sets glibc malloc's thresholds for the process (:mod:`boundflow.heap`; opt out
with ``BOUNDFLOW_STEADY_HEAP=0``).
"""

from __future__ import annotations

import importlib
from typing import Any

from boundflow import heap

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BoundOptions", "Bounds", "VerifyResult", "as_graph", "compute_bounds",
                     "verify"], "boundflow.api"),
    "AlphaConfig": "boundflow.domains.alpha",
    **dict.fromkeys(["BoundFlowError", "GraphError", "ModelLoadError", "ShapeError",
                     "SpecError", "UnsupportedOpError"], "boundflow.errors"),
    **dict.fromkeys(["from_torch", "load_model"], "boundflow.frontend"),
    **dict.fromkeys(["DomainPlan", "Graph", "GraphBuilder", "InputSpec", "LinearSpec",
                     "margin_spec", "preactivations"], "boundflow.ir"),
    "Knobs": "boundflow.ir.knobs",
    **dict.fromkeys(["compile", "Verifier"], "boundflow.verifier"),
    "PlanBundle": "boundflow.ir.plan",
    "Workload": "boundflow.ir.workload",
}

__all__ = sorted(_EXPORTS)

heap.steady()           # glibc malloc keeps bound tensors' memory for reuse (see heap.py)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'boundflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value                 # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
