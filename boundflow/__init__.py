"""BoundFlow: certified bounds of neural networks, computed by plans a compiler can tune.

What users import lives here; everything else may change between versions.
"""

from boundflow.api import BoundOptions, Bounds, VerifyResult, as_graph, compute_bounds, verify
from boundflow.domains.alpha import AlphaConfig
from boundflow.errors import (BoundFlowError, GraphError, ModelLoadError, ShapeError,
                              SpecError, UnsupportedOpError)
from boundflow.frontend import from_torch, load_model
from boundflow.ir import (DomainPlan, Graph, GraphBuilder, InputSpec, LinearSpec, margin_spec,
                          preactivations)
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload

__version__ = "0.1.0"

__all__ = [
    "Bounds", "BoundOptions", "VerifyResult", "as_graph", "compute_bounds", "verify",
    "AlphaConfig", "Knobs", "PlanBundle", "Workload",
    "DomainPlan", "preactivations",
    "BoundFlowError", "GraphError", "ModelLoadError", "ShapeError", "SpecError",
    "UnsupportedOpError",
    "from_torch", "load_model",
    "Graph", "GraphBuilder", "InputSpec", "LinearSpec", "margin_spec",
]
