"""The task graph: what a backend runs, as a DAG of tasks joined by named buffers.

A :class:`Buffer` holds one value per sample: the interval of a graph node (as lower/upper or
centre/radius, in a physical axis order), the input box, or the final bounds. A :class:`Task`
reads buffers and writes buffers: ``ibp`` runs interval rules over a group of graph nodes,
``crown`` tightens one pre-activation by a backward pass, ``layout`` converts a buffer to
another physical layout, ``final`` bounds the output (or ``C·y``) and ``input`` stands for
the box the caller gives. Tasks are listed in the order a backend runs them.

Everything here is a plain frozen value (tuples, strings, numbers), so plans hash, compare
and round-trip through JSON exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from boundflow.errors import BoundFlowError

TASK_KINDS = ("input", "ibp", "crown", "forward", "layout", "final")
FORMS = ("lu", "cr")          # interval as lower/upper, or as centre/radius
ITEMSIZE = {"float32": 4, "float64": 8}


class PlanError(BoundFlowError):
    """A plan (task graph, storage, ...) breaks one of its invariants."""


def freeze(value: Any) -> Any:
    """JSON values back into plan values: lists become tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        raise PlanError("plan values are tuples of pairs, not dicts")
    return value


def thaw(value: Any) -> Any:
    """Plan values as JSON values: tuples become lists, dataclasses dicts, recursively."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: thaw(getattr(value, f.name)) for f in fields(value)}
    return value


def record(cls, d: Any, nested: dict | None = None):
    """A frozen dataclass ``cls`` from its :func:`thaw`-ed dict; ``nested`` maps a field to
    the dataclass of its items (a tuple of records)."""
    if not isinstance(d, dict):
        raise PlanError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise PlanError(f"{cls.__name__}: unknown fields {unknown}")
    kwargs = {}
    for k, v in d.items():
        if nested and k in nested:
            kwargs[k] = tuple(record(nested[k], item) for item in v)
        else:
            kwargs[k] = freeze(v)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PlanError(f"{cls.__name__}: {e}") from None


def parse_json(text: str, problem: str) -> Any:
    """``json.loads`` whose failure is a :class:`BoundFlowError` saying ``problem: why``."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise BoundFlowError(f"{problem}: {e}") from None


def attr(attrs: tuple[tuple[str, Any], ...], key: str, default: Any = None) -> Any:
    for k, v in attrs:
        if k == key:
            return v
    return default


@dataclass(frozen=True)
class Buffer:
    """One value per sample. ``node`` is the graph node it bounds ('' for the final bounds);
    ``layout`` the physical order of the per-sample axes (identity = row-major logical
    order; ``(1, 2, 0)`` on a (C, H, W) tensor is NHWC); ``alias_of`` names the buffer whose
    memory it views (a permute or reshape that moves no data)."""

    name: str
    node: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    form: str = "lu"
    layout: tuple[int, ...] = ()
    alias_of: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_sample(self) -> int:
        """Two tensors (lower/upper or centre/radius) of ``shape``."""
        return 2 * self.numel * ITEMSIZE[self.dtype]

    @property
    def identity_layout(self) -> bool:
        return self.layout == tuple(range(len(self.shape)))


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        return attr(self.attrs, key, default)


@dataclass(frozen=True)
class TaskGraph:
    tasks: tuple[Task, ...]
    buffers: tuple[Buffer, ...]
    output: str
    _index: dict = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "_index", ({b.name: b for b in self.buffers},
                                            {t.name: t for t in self.tasks}))

    def buffer(self, name: str) -> Buffer:
        try:
            return self._index[0][name]
        except KeyError:
            raise PlanError(f"the task graph has no buffer {name!r}") from None

    def task(self, name: str) -> Task:
        try:
            return self._index[1][name]
        except KeyError:
            raise PlanError(f"the task graph has no task {name!r}") from None

    def has_buffer(self, name: str) -> bool:
        return name in self._index[0]

    def producer(self) -> dict[str, str]:
        """Buffer name -> the task that writes it."""
        return {b: t.name for t in self.tasks for b in t.outputs}

    def readers(self) -> dict[str, list[str]]:
        """Buffer name -> the tasks that read it, in order."""
        out: dict[str, list[str]] = {b.name: [] for b in self.buffers}
        for t in self.tasks:
            for b in t.inputs:
                out.setdefault(b, []).append(t.name)
        return out

    def root(self, name: str) -> str:
        """The buffer whose memory ``name`` lives in (following aliases)."""
        seen = set()
        while self.buffer(name).alias_of:
            if name in seen:
                raise PlanError(f"buffer {name!r} aliases itself")
            seen.add(name)
            name = self.buffer(name).alias_of
        return name

    def replace(self, tasks: Iterable[Task] | None = None,
                buffers: Iterable[Buffer] | None = None, output: str | None = None
                ) -> "TaskGraph":
        return TaskGraph(tuple(self.tasks if tasks is None else tasks),
                         tuple(self.buffers if buffers is None else buffers),
                         self.output if output is None else output)

    def topological_order(self) -> list[str]:
        """Task names in an order where every buffer is written before it is read (Kahn's
        algorithm, ties broken by listed order); a cycle raises :class:`PlanError`."""
        producer = self.producer()
        deps = {t.name: {producer[b] for b in t.inputs if b in producer} for t in self.tasks}
        order, done = [], set()
        pending = [t.name for t in self.tasks]
        while pending:
            ready = [n for n in pending if deps[n] <= done]
            if not ready:
                raise PlanError(f"the task graph has a cycle through {sorted(pending)}")
            order.append(ready[0])
            done.add(ready[0])
            pending.remove(ready[0])
        return order

    def validate(self, node_shapes: dict[str, tuple[int, ...]] | None = None,
                 dtype: str | None = None) -> "TaskGraph":
        """Check names, producers, readers, order, aliases, forms and layouts; with
        ``node_shapes`` (and ``dtype``) also that every buffer has its node's shape."""
        names = [b.name for b in self.buffers]
        if len(set(names)) != len(names):
            raise PlanError("two buffers share a name")
        tnames = [t.name for t in self.tasks]
        if len(set(tnames)) != len(tnames):
            raise PlanError("two tasks share a name")
        writers: dict[str, list[str]] = {}
        for t in self.tasks:
            if t.kind not in TASK_KINDS:
                raise PlanError(f"task {t.name!r} has unknown kind {t.kind!r}")
            for b in t.inputs + t.outputs:
                if not self.has_buffer(b):
                    raise PlanError(f"task {t.name!r} uses undeclared buffer {b!r}")
            for b in t.outputs:
                writers.setdefault(b, []).append(t.name)
        for b in self.buffers:
            w = writers.get(b.name, [])
            if len(w) != 1:
                raise PlanError(f"buffer {b.name!r} is written by {len(w)} tasks {w}; "
                                f"it must be written by exactly one")
        readers = self.readers()
        for b in self.buffers:
            if not readers[b.name] and b.name != self.output:
                raise PlanError(f"buffer {b.name!r} is written but never read (dangling)")
        if not self.has_buffer(self.output):
            raise PlanError(f"the output buffer {self.output!r} is not declared")
        position = {n: i for i, n in enumerate(tnames)}
        producer = self.producer()
        for t in self.tasks:
            for b in t.inputs:
                if position[producer[b]] >= position[t.name]:
                    raise PlanError(f"task {t.name!r} reads {b!r} before task "
                                    f"{producer[b]!r} writes it")
        self.topological_order()
        for b in self.buffers:
            if b.form not in FORMS:
                raise PlanError(f"buffer {b.name!r} has unknown form {b.form!r}")
            if sorted(b.layout) != list(range(len(b.shape))):
                raise PlanError(f"buffer {b.name!r}: layout {b.layout} is not a permutation "
                                f"of its {len(b.shape)} axes")
            if b.alias_of:
                root = self.buffer(self.root(b.name))
                if root.numel != b.numel or root.form != b.form or root.dtype != b.dtype:
                    raise PlanError(f"buffer {b.name!r} aliases {root.name!r} of another "
                                    f"size, form or dtype")
            if dtype is not None and b.dtype != dtype:
                raise PlanError(f"buffer {b.name!r} has dtype {b.dtype}, the graph {dtype}")
            if node_shapes is not None and b.node and b.node in node_shapes \
                    and tuple(node_shapes[b.node]) != b.shape:
                raise PlanError(f"buffer {b.name!r} has shape {b.shape}, its node "
                                f"{b.node!r} {tuple(node_shapes[b.node])}")
        return self
