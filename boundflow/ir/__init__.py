"""The intermediate representation: graphs of typed nodes and the specs they are checked against."""

from boundflow.ir import ops
from boundflow.ir.domain_plan import DomainPlan, preactivations
from boundflow.ir.graph import Graph, GraphBuilder, Node, infer_shape, verify_graph
from boundflow.ir.normalize import normalize
from boundflow.ir.spec import InputSpec, LinearSpec, margin_spec

__all__ = ["DomainPlan", "preactivations", "Graph", "GraphBuilder", "Node", "InputSpec", "LinearSpec", "margin_spec",
           "infer_shape", "normalize", "ops", "verify_graph"]
