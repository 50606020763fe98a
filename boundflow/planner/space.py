"""The search space of one workload: every legal :class:`Knobs`, as lists of decisions.

The space is read off the normalised graph (see :func:`boundflow.planner.passes.normalise`):

* ``fusible``: edges ``producer -> reader`` where the producer has that one reader (so a
  fused group is an in-tree and runs as one task);
* ``preactivations``: the nodes a relaxed op (an activation, maxpool2d, softmax) reads, each
  bounded by ``ibp`` or ``crown`` (``boundflow.ir.analysis.preactivations``);
* ``finals``: the final methods up to the workload's own;
* ``regions``: connected (C, H, W) regions holding a ``spatial`` op (conv2d, avgpool2d), each
  ``NCHW`` or ``NHWC``;
* ``affine``: the ``weighted`` nodes (linear, conv2d, conv_transpose2d) whose interval may be
  kept as centre/radius.

Which op is which is asked of the op traits in ``boundflow.ir.ops``, never listed here.

``default_knobs`` is the heuristic plan the tuner starts from.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from boundflow.errors import BoundFlowError
from boundflow.domains import forward
from boundflow.ir import ops
from boundflow.ir.analysis import preactivations
from boundflow.ir.domain_plan import METHODS
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import LAYOUTS, LOWERINGS, STORAGE, Knobs
from boundflow.ir.workload import Workload

FINAL_ORDER = ("ibp", "crown", "alpha-crown")


def folds_output(graph: Graph, workload: Workload) -> bool:
    """With a spec, a final 1-D linear layer is folded into ``C`` by the final task."""
    out = graph.output_node
    return workload.n_specs > 0 and out.op == "linear" and len(out.shape) == 1


def fusible_edges(graph: Graph, workload: Workload) -> tuple[tuple[str, str], ...]:
    users = graph.consumers()
    skip = {graph.input.name}
    if folds_output(graph, workload):
        skip.add(graph.output)
    edges = []
    for node in graph.nodes:
        if node.name in skip:
            continue
        for i in dict.fromkeys(node.inputs):
            if i not in skip and users[i] == [node.name] and i != graph.output:
                edges.append((i, node.name))
    return tuple(edges)


def conv_regions(graph: Graph) -> tuple[tuple[str, ...], ...]:
    """Connected sets of (C, H, W) nodes joined by every op but views, holding at least one
    ``spatial`` op (conv2d, avgpool2d). A view op's output joins its readers' region, never
    its input's (the view can change layout for free); the input node keeps the caller's
    layout. Other (C, H, W) ops (maxpool2d, pad, slice, gather, softmax, activations,
    conv_transpose2d) join the region they touch and run in its layout: both backends read a
    buffer through its logical axes, so a layout is a cost, never a change of meaning."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    three_d = [n for n in graph.nodes[1:] if len(n.shape) == 3]
    for n in three_d:
        parent[n.name] = n.name
    for n in three_d:
        if ops.has(n.op, "view"):        # trait ``view``: flatten, reshape, permute (identity
            continue                     # is normalised away)
        for i in n.inputs:
            if i in parent:
                parent[find(i)] = find(n.name)
    groups: dict[str, list[str]] = {}
    for n in three_d:
        groups.setdefault(find(n.name), []).append(n.name)
    op_of = {n.name: n.op for n in graph.nodes}
    spatial = ops.having("spatial")      # conv2d, avgpool2d
    return tuple(tuple(g) for g in groups.values() if any(op_of[m] in spatial for m in g))


@dataclass(frozen=True)
class SearchSpace:
    fusible: tuple[tuple[str, str], ...]
    preactivations: tuple[str, ...]
    domain_choices: tuple[str, ...]
    finals: tuple[str, ...]
    regions: tuple[tuple[str, ...], ...]
    affine: tuple[str, ...]
    lowerings: tuple[str, ...] = LOWERINGS
    storage: tuple[str, ...] = STORAGE

    @classmethod
    def of(cls, graph: Graph, workload: Workload) -> "SearchSpace":
        """The space of ``graph`` (already normalised) for ``workload``."""
        method_final = METHODS[workload.method][1]
        finals = FINAL_ORDER[: FINAL_ORDER.index(method_final) + 1]
        domain_choices = ("ibp",) if workload.method == "ibp" else \
            ("ibp", "crown", "forward") if forward.offered(graph) else ("ibp", "crown")
        fold = folds_output(graph, workload)
        weighted = ops.having("weighted")          # linear, conv2d, conv_transpose2d
        affine = tuple(n.name for n in graph.nodes if n.op in weighted
                       and not (fold and n.name == graph.output))
        return cls(fusible_edges(graph, workload), preactivations(graph), domain_choices,
                   finals, conv_regions(graph), affine)

    def decisions(self) -> list[tuple[str, int, tuple[Any, ...]]]:
        """Every decision as ``(field, position, choices)``; per-task lowering and schedule
        are decided once tasks exist (see ``plan``)."""
        out: list[tuple[str, int, tuple[Any, ...]]] = []
        out += [("partition", i, (False, True)) for i in range(len(self.fusible))]
        out += [("domains", i, self.domain_choices) for i in range(len(self.preactivations))]
        out += [("final", 0, self.finals)]
        out += [("layouts", i, LAYOUTS) for i in range(len(self.regions))]
        out += [("forms", i, ("lu", "cr")) for i in range(len(self.affine))]
        out += [("lowering", 0, self.lowerings), ("storage", 0, self.storage),
                ("fuse_passes", 0, (False, True))]
        return out

    @property
    def size(self) -> int:
        return math.prod(len(c) for _, _, c in self.decisions())

    def check(self, knobs: Knobs) -> Knobs:
        """Raise a :class:`BoundFlowError` naming the first knob that does not fit."""
        lengths = {"partition": len(self.fusible), "domains": len(self.preactivations),
                   "layouts": len(self.regions), "forms": len(self.affine)}
        for name, n in lengths.items():
            if len(getattr(knobs, name)) != n:
                raise BoundFlowError(f"knobs.{name} has {len(getattr(knobs, name))} entries; "
                                     f"this workload has {n}")
        for field, i, choices in self.decisions():
            value = getattr(knobs, field)
            value = value[i] if isinstance(value, tuple) else value
            if value not in choices:
                why = ""
                if field == "domains" and value == "forward" and "crown" in choices:
                    why = (f" (forward-mode bounds are offered for models whose every op "
                           f"they cover and whose input has at most {forward.MAX_INPUTS} "
                           f"elements)")
                raise BoundFlowError(f"knobs.{field}[{i}] = {value!r} is not one of "
                                     f"{choices}{why}")
        return knobs

    def from_choices(self, values: dict[tuple[str, int], Any], base: Knobs | None = None
                     ) -> Knobs:
        """Knobs with the given ``(field, position) -> choice`` set, the rest from ``base``
        (default: the first choice of every decision)."""
        fields: dict[str, Any] = {}
        for field, i, choices in self.decisions():
            v = values.get((field, i))
            if v is None:
                v = choices[0] if base is None else _get(base, field, i)
            if field in ("final", "lowering", "storage", "fuse_passes"):
                fields[field] = v
            else:
                fields.setdefault(field, []).append(v)
        return Knobs(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def sample(self, rng: random.Random) -> Knobs:
        """A uniformly random legal Knobs."""
        return self.from_choices({(f, i): rng.choice(c) for f, i, c in self.decisions()})


def _get(knobs: Knobs, field: str, i: int) -> Any:
    value = getattr(knobs, field)
    return value[i] if isinstance(value, tuple) else value


def default_knobs(graph: Graph, workload: Workload) -> Knobs:
    """The heuristic plan: fuse every fusible edge (fewer buffers, nothing lost: a CROWN
    pre-activation is cut out by the planner anyway), the method's own domains, NHWC only where a permute into the region becomes free, centre/radius where
    an affine output feeds another affine op, each task's lowering by the planner's cost rule
    (``auto``), buffers reused."""
    space = SearchSpace.of(graph, workload)
    op_of = {n.name: n.op for n in graph.nodes}
    weighted = ops.having("weighted")
    partition = tuple(True for _ in space.fusible)
    inner, final = METHODS[workload.method]
    layouts = tuple("NHWC" if _fed_by_nhwc_permute(graph, region) else "NCHW"
                    for region in space.regions)
    users = graph.consumers()
    forms = tuple("cr" if users[a] and all(op_of[u] in weighted for u in users[a]) else "lu"
                  for a in space.affine)
    return space.check(Knobs(partition, tuple(inner for _ in space.preactivations), final,
                             layouts, forms, lowering="auto"))


def _fed_by_nhwc_permute(graph: Graph, region: tuple[str, ...]) -> bool:
    """A permute ``(H, W, C) -> (C, H, W)`` of row-major data enters the region: under NHWC
    it moves no data."""
    members = set(region)
    for name in region:
        node = graph.node(name)
        if node.op == "permute" and tuple(node.attrs["dims"]) == (2, 0, 1) \
                and not set(node.inputs) & members:
            return True
    return False


def knobs_for(graph: Graph, workload: Workload, knobs: Knobs | None) -> Knobs:
    if knobs is None:
        return default_knobs(graph, workload)
    if not isinstance(knobs, Knobs):
        raise BoundFlowError(f"knobs must be a Knobs, got {type(knobs).__name__}")
    return SearchSpace.of(graph, workload).check(knobs)
