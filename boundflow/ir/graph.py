"""The graph IR: typed nodes in topological order, constant parameters as numpy arrays.

A :class:`Graph` has one input node, nodes listed so that every input precedes its use, and
one output. Shapes are per-sample (the leading batch dimension is implicit, see ``ops``).
Graphs are values: build them with :class:`GraphBuilder`, which infers every shape as it
goes, and check any graph with :func:`verify_graph`, whose errors name the bad node.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from boundflow.errors import BoundFlowError, GraphError, ShapeError
from boundflow.ir import ops

DTYPES = ("float32", "float64")


def _freeze(value: Any) -> Any:
    """Attribute values as JSON-ready, immutable Python values (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise GraphError(f"attribute value {value!r} of type {type(value).__name__} is not allowed")


@dataclass(frozen=True)
class Node:
    """One operation. ``params`` maps a role (``weight``, ``bias``, ``other`` …) to a key of
    ``Graph.params``; ``source`` is where it came from (a module path), for error messages."""

    name: str
    op: str
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str = "float32"
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def describe(self) -> str:
        where = f" (from {self.source})" if self.source else ""
        return f"node {self.name!r} [{self.op}]{where}"


def memo(obj: Any, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per frozen ``obj``, kept in its ``__dict__`` under ``name`` (not a
    field: equality, ``asdict`` and JSON never see it)."""
    value = obj.__dict__.get(name)
    if value is None:
        value = compute()
        object.__setattr__(obj, name, value)
    return value


@dataclass(frozen=True, eq=False)
class Graph:
    """A bound-propagation graph. Equality is identity; compare graphs by their hashes."""

    nodes: tuple[Node, ...]
    params: Mapping[str, np.ndarray]
    output: str

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output_node(self) -> Node:
        return self.node(self.output)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.output_node.shape

    @property
    def dtype(self) -> str:
        return self.nodes[0].dtype

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"graph has no node {name!r}")

    def param(self, node: Node, role: str) -> np.ndarray | None:
        key = node.params.get(role)
        return None if key is None else self.params[key]

    def consumers(self) -> dict[str, list[str]]:
        """For each node name, the names of the nodes that read it (in order)."""
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n.name)
        return users

    def structural_hash(self) -> str:
        """Hash of structure and shapes; independent of node names and weight values
        (computed once per graph: graphs are immutable)."""
        return memo(self, "_structural_hash", self._structural_hash_now)

    def _structural_hash_now(self) -> str:
        index = {n.name: i for i, n in enumerate(self.nodes)}
        body = [
            [
                n.op,
                [index[i] for i in n.inputs],
                {k: n.attrs[k] for k in sorted(n.attrs)},
                list(n.shape),
                n.dtype,
                {r: [list(self.params[k].shape), str(self.params[k].dtype)]
                 for r, k in sorted(n.params.items())},
            ]
            for n in self.nodes
        ]
        text = json.dumps([body, index[self.output]], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def weights_hash(self) -> str:
        """Hash of every parameter's values, in node order (computed once per graph; the
        arrays are made read-only then, so the hash cannot go stale)."""
        return memo(self, "_weights_hash", self._weights_hash_now)

    def _weights_hash_now(self) -> str:
        for arr in self.params.values():
            if isinstance(arr, np.ndarray):
                arr.flags.writeable = False
        h = hashlib.sha256()
        for n in self.nodes:
            for role, key in sorted(n.params.items()):
                arr = np.ascontiguousarray(self.params[key])
                h.update(f"{role}:{arr.dtype}:{arr.shape};".encode())
                h.update(arr.tobytes())
        return h.hexdigest()

    def summary(self) -> str:
        """One line per node: name, op, inputs and shape."""
        lines = []
        for n in self.nodes:
            args = ", ".join(n.inputs)
            lines.append(f"{n.name:<24} {n.op:<10} ({args}) -> {list(n.shape)}")
        return "\n".join(lines)


def infer_shape(node_op: str, attrs: Mapping, in_shapes: Sequence[tuple[int, ...]],
                param_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The output shape of one op, or :class:`ShapeError` / :class:`GraphError` saying why not."""
    opdef = ops.get(node_op)
    lo, hi = opdef.arity
    if len(in_shapes) < lo or (hi is not None and len(in_shapes) > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
        raise GraphError(f"takes {want} node inputs, got {len(in_shapes)}")
    missing = [r for r in opdef.params if r not in param_shapes]
    unknown = [r for r in param_shapes if r not in opdef.params + opdef.optional_params]
    if missing or unknown:
        raise GraphError(f"parameter roles missing {missing} / unknown {unknown}")
    try:
        return tuple(int(s) for s in opdef.infer(attrs, list(in_shapes), param_shapes))
    except KeyError as e:
        raise GraphError(f"attribute {e.args[0]!r} is missing") from None


def _check_param(node: Node, role: str, arr: np.ndarray) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise GraphError(f"{node.describe()}: parameter {role!r} must be a float numpy array")
    if not np.all(np.isfinite(arr)):
        raise GraphError(f"{node.describe()}: parameter {role!r} contains NaN or inf")
    if node.op == "div" and role == "other" and np.any(arr == 0):
        raise GraphError(f"{node.describe()}: divides by a constant that contains 0")
    if node.op == "batchnorm" and role == "var" and np.any(arr + node.attrs["eps"] <= 0):
        raise GraphError(f"{node.describe()}: running variance + eps must be positive")


def verify_graph(graph: Graph) -> Graph:
    """Check every invariant of ``graph``; raise a :class:`GraphError` naming the bad node."""
    if not graph.nodes or graph.nodes[0].op != "input":
        raise GraphError("the first node of a graph must be its single 'input' node")
    seen: dict[str, Node] = {}
    for node in graph.nodes:
        if node.name in seen:
            raise GraphError(f"{node.describe()}: the name is used twice")
        if node.op == "input" and seen:
            raise GraphError(f"{node.describe()}: a graph has exactly one input node")
        if node.dtype not in DTYPES:
            raise GraphError(f"{node.describe()}: dtype {node.dtype!r} is not one of {DTYPES}")
        for i in node.inputs:
            if i not in seen:
                raise GraphError(f"{node.describe()}: input {i!r} is not defined before it")
            if seen[i].dtype != node.dtype:
                raise GraphError(f"{node.describe()}: input {i!r} has dtype {seen[i].dtype}")
        for role, key in node.params.items():
            if key not in graph.params:
                raise GraphError(f"{node.describe()}: parameter {role!r} -> {key!r} is missing")
            _check_param(node, role, graph.params[key])
        try:
            shape = infer_shape(node.op, node.attrs, [seen[i].shape for i in node.inputs],
                                {r: tuple(graph.params[k].shape) for r, k in node.params.items()})
        except BoundFlowError as e:
            raise type(e)(f"{node.describe()}: {e}") from None
        if shape != tuple(node.shape):
            raise ShapeError(f"{node.describe()}: recorded shape {node.shape}, inferred {shape}")
        seen[node.name] = node
    if graph.output not in seen:
        raise GraphError(f"output {graph.output!r} is not a node of the graph")
    return graph


def ancestors(graph: Graph, targets) -> set[str]:
    """The names of ``targets`` and every node they depend on."""
    need, stack = set(), list(targets)
    by_name = {n.name: n for n in graph.nodes}
    while stack:
        name = stack.pop()
        if name not in need:
            need.add(name)
            stack.extend(by_name[name].inputs)
    return need


def live_only(graph: Graph) -> Graph:
    """``graph`` without the nodes its output does not depend on (and their parameters);
    ``graph`` itself when every node is live."""
    live = ancestors(graph, [graph.output])
    if len(live) == len(graph.nodes):
        return graph
    nodes = tuple(n for n in graph.nodes if n.name in live)
    used = {k for n in nodes for k in n.params.values()}
    return Graph(nodes, {k: v for k, v in graph.params.items() if k in used}, graph.output)


class GraphBuilder:
    """Builds a :class:`Graph` node by node, inferring and checking shapes as it goes.

    >>> b = GraphBuilder()
    >>> x = b.input((2,))
    >>> y = b.add_node("linear", [x], params={"weight": np.eye(2, dtype=np.float32)})
    >>> g = b.build(b.add_node("relu", [y]))
    """

    def __init__(self, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise GraphError(f"dtype {dtype!r} is not one of {DTYPES}")
        self.dtype = dtype
        self._nodes: list[Node] = []
        self._by_name: dict[str, Node] = {}
        self._params: dict[str, np.ndarray] = {}

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._by_name or name in self._params:
            i += 1
            name = f"{base}_{i}"
        return name

    def input(self, shape: Sequence[int], name: str = "input") -> str:
        if self._nodes:
            raise GraphError("a graph has exactly one input node, and it comes first")
        if not shape or any(int(s) < 1 for s in shape):
            raise ShapeError(f"input shape {tuple(shape)} must be non-empty and positive")
        return self.add_node("input", [], attrs={"shape": tuple(int(s) for s in shape)},
                             name=name)

    def add_node(self, op: str, inputs: Sequence[str], *, params: Mapping[str, Any] = (),
                 attrs: Mapping[str, Any] = (), name: str | None = None,
                 source: str = "") -> str:
        """Append a node and return its name. ``params`` maps role -> array (stored under a
        fresh key) or -> the key of a parameter already added (shared weights)."""
        params, attrs = dict(params), {k: _freeze(v) for k, v in dict(attrs).items()}
        name = self._fresh(name or op)
        keys = {}
        for role, value in params.items():
            if isinstance(value, str):
                if value not in self._params:
                    raise GraphError(f"node {name!r}: no parameter named {value!r}")
                keys[role] = value
            else:
                key = self._fresh(f"{name}.{role}")
                self._params[key] = np.ascontiguousarray(np.asarray(value, dtype=self.dtype))
                keys[role] = key
        for i in inputs:
            if i not in self._by_name:
                raise GraphError(f"node {name!r} [{op}]: input {i!r} is not defined yet")
        node = Node(name, op, tuple(inputs), (), self.dtype, attrs, keys, source)
        try:
            shape = infer_shape(op, attrs, [self._by_name[i].shape for i in inputs],
                                {r: tuple(self._params[k].shape) for r, k in keys.items()})
            for role, key in keys.items():
                _check_param(node, role, self._params[key])
        except BoundFlowError as e:
            raise type(e)(f"{node.describe()}: {e}") from None
        node = Node(name, op, tuple(inputs), shape, self.dtype, attrs, keys, source)
        self._nodes.append(node)
        self._by_name[name] = node
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._by_name[name].shape

    def build(self, output: str) -> Graph:
        used = {k for n in self._nodes for k in n.params.values()}
        params = {k: v for k, v in self._params.items() if k in used}
        return verify_graph(Graph(tuple(self._nodes), params, output))


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)

