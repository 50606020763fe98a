"""ReLU-split branch-and-bound: unstable ReLUs are fixed to one side until every domain is
proven.

A domain is the input box with some unstable ReLUs fixed active (``z >= 0``) or inactive
(``z <= 0``): a :class:`~boundflow.ir.split.ReluSplit` row. Each iteration takes the
``batch / 2`` open domains closest to a violation, splits each on the ReLU the branching rule
picks (one child per side) and bounds the children in one plan run with the split state as
an input: the plan tightens each split ReLU's input bounds as it computes them, so the
neuron is linear (or zero) in every later bound and the bounds of every later layer tighten
with it. A child keeps the better of its bound and its parent's (which holds on it too).

Branching (an estimate of the bound improvement, in the spirit of BaBSR): among a domain's
free unstable ReLUs, the one with the largest ``|g| · u·(-l)/(u - l)``, the slack of its
triangle relaxation times the sensitivity of the spec row the domain is closest to proving
(its gradient with respect to the ReLU's output at the box centre).

The split constraints also enter the final bound as multipliers optimised per domain
(beta-CROWN, ``config.beta_iterations`` steps; :mod:`boundflow.domains.beta`); intermediate
bounds use them only through the fixed neurons. A child starts from its parent's
intermediate bounds (valid on its part of the box): with ``config.intermediate = "refine"``
it recomputes them and keeps the tighter of the two, with ``"reuse"`` it keeps them as they
are (the new split applied) and computes only the final bound. A domain whose every ReLU is fixed and
still unproven ends the search ``unknown``. The falsifier runs on the whole box every
``attack_every`` iterations; any counterexample is re-checked in float64.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from boundflow.attack import AttackConfig
from boundflow.bab.bounder import float_box
from boundflow.bab.common import Disjuncts, Progress, stop
from boundflow.bab.config import BabConfig, BabResult
from boundflow.domains.concrete import RULES as CONCRETE_RULES, evaluate
from boundflow.domains.traversal import apply_rule, graph_tensors
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.normalize import normalised
from boundflow.ir.spec import InputSpec, LinearSpec
from boundflow.ir.split import ReluSplit
from boundflow.target import target_kind

log = logging.getLogger("boundflow.bab")




def relu_inputs(graph: Graph) -> list[str]:
    """The input nodes of the graph's ReLUs, in graph order (the neurons a split fixes)."""
    return list(dict.fromkeys(n.inputs[0] for n in graph.nodes if n.op == "relu"))


def _sensitivity(graph: Graph, centre: torch.Tensor, C: torch.Tensor, nodes: list[str]
                 ) -> list[torch.Tensor]:
    """Per spec row, the gradient of ``C_row·y`` with respect to the output of the ReLU of
    each split node at ``centre`` (``[1, *in]``): ``[rows, *shape]`` per node."""
    relu_of = {n.inputs[0]: n for n in graph.nodes if n.op == "relu"}
    tensors = graph_tensors(graph, centre.dtype)
    x = centre.expand((C.shape[0],) + tuple(centre.shape[1:]))
    deltas = {relu_of[p].name: torch.zeros((C.shape[0],) + tuple(relu_of[p].shape),
                                           dtype=centre.dtype, requires_grad=True)
              for p in nodes}
    values = {graph.input.name: x}
    for node in graph.nodes[1:]:
        v = apply_rule(CONCRETE_RULES, node, tensors, [values[i] for i in node.inputs],
                       "evaluation")
        values[node.name] = v + deltas[node.name] if node.name in deltas else v
    s = (values[graph.output].flatten(1) * C).sum()
    grads = torch.autograd.grad(s, list(deltas.values()), allow_unused=True)
    return [torch.zeros_like(d) if g is None else g.detach()
            for d, g in zip(deltas.values(), grads)]


def _plan(graph: Graph, batch: int, rows: int, method: str, db):
    """The verifier of the bound workload: ``db``'s tuned plan if it runs on the torch
    backend (the one that takes a split state), else the default plan, with a log line."""
    from boundflow.api import lookup_tuned
    from boundflow.bab.bounder import _verifier
    from boundflow.verifier import Verifier

    default = _verifier(graph, batch, rows, method, "torch", None, "time@width")
    if db is None:
        return default
    tuned = lookup_tuned(graph, default.workload, db, "time@width")
    if tuned is None:
        return default                         # lookup_tuned said why
    if tuned.backend != "torch":
        log.warning("bab: the tuned plan of this workload runs on %s, which takes no ReLU "
                    "split state; ReLU splitting runs the default torch plan (tune with "
                    "--backend torch for one it can use)", tuned.backend)
        return default
    log.info("bab: ReLU splitting runs the tuned plan")
    return Verifier(graph, default.workload, tuned.bundle, "torch", tuned)


def relu_split(graph: Graph, lower: np.ndarray, upper: np.ndarray, C: np.ndarray,
               threshold: np.ndarray, ranges: Sequence[tuple[int, int]],
               config: BabConfig = BabConfig(), *, deadline: float | None = None,
               confirm: Callable[[np.ndarray], bool] | None = None, db=None) -> BabResult:
    """Decide, by ReLU splitting, whether some point of the box ``[lower, upper]`` (flat)
    meets every row of one of the disjuncts (arguments as :func:`input_split`'s). Every
    bound call is a run of the workload's plan on the torch backend (the backend that takes
    a split state): the plan tuned for it in ``db`` when there is one on that backend, else
    the default plan."""
    start = time.monotonic()
    shape = tuple(graph.input_shape)
    # the split state names the ReLU inputs of the graph plans run on (BatchNorm folded,
    # identities dropped: other names than the source graph's)
    norm = normalised(graph)[0]
    nodes = relu_inputs(norm)
    if target_kind(config.target) != "llvm":
        log.warning("bab: ReLU splitting runs its plans on the CPU (torch), not on %s",
                    config.target)
    batch = config.batch_for("relu")
    log.info("bab: ReLU splitting, %d domains per plan run", batch)
    verifier = _plan(graph, batch, int(C.shape[0]), config.method, db)
    executor = verifier._executor
    bounded = executor._bounded_shapes()
    missing = [n for n in nodes if n not in bounded]
    if missing:
        raise BoundFlowError(f"the {config.method} plan does not bound the ReLU inputs "
                             f"{missing}; ReLU splitting needs a plan that does (crown)")
    dtype = torch.float64 if verifier.plan.workload.dtype == "float64" else torch.float32
    spec = Disjuncts(C, threshold, ranges, dtype)
    lo64 = np.asarray(lower, np.float64).reshape(-1)
    hi64 = np.asarray(upper, np.float64).reshape(-1)
    lo, hi = float_box(lo64, hi64, dtype)
    lo, hi = lo.reshape((1,) + shape), hi.reshape((1,) + shape)
    shapes = {n: tuple(bounded[n]) for n in nodes}
    sizes = [int(np.prod(shapes[n])) for n in nodes]
    grads = _sensitivity(norm, ((lo + hi) / 2), spec.C, nodes)       # [rows, *shape] per node
    grads = [g.reshape(g.shape[0], -1).abs() for g in grads]
    stats = {"domains": 0, "calls": 0, "max_queue": 1}
    # beta's steps stop once a batch is proven; alpha's drop each domain once it is
    goal = (spec.thr, tuple(spec.ranges))
    elapsed = lambda: time.monotonic() - start  # noqa: E731

    def result(status, cex=None, reason=""):
        return BabResult(status, cex, stats["domains"], stats["calls"], elapsed(),
                         stats["max_queue"], reason)

    def bound(signs: list[torch.Tensor], parent: list[torch.Tensor] | None = None):
        """Lower bounds of the rows and the ReLU inputs' bounds (``[2, domains, size]`` per
        node) of each domain; ``parent``: bounds known to hold on each domain."""
        lbs, inter = [], [[] for _ in nodes]
        n = signs[0].shape[0]
        for s0 in range(0, n, batch):
            part = [s[s0:s0 + batch] for s in signs]
            m = part[0].shape[0]
            ref = None if parent is None else {
                nd: (p[0, s0:s0 + m].reshape((m,) + shapes[nd]),
                     p[1, s0:s0 + m].reshape((m,) + shapes[nd])) for nd, p in zip(nodes, parent)}
            split = ReluSplit({nd: p.reshape((m,) + shapes[nd]) for nd, p in zip(nodes, part)},
                              beta_iterations=int(config.beta_iterations), reference=ref,
                              reuse=ref is not None and config.intermediate == "reuse",
                              goal=goal)
            box = InputSpec.box(lo.expand((m,) + shape).numpy(), hi.expand((m,) + shape).numpy())
            cs = LinearSpec(spec.C.expand((m,) + tuple(spec.C.shape)).numpy())
            out = executor.run(box, cs, split=split, keep=nodes, upper=False)
            lbs.append(out.lower.to(dtype))
            for k, nd in enumerate(nodes):
                iv = out.stats["bounds"][nd]
                inter[k].append(torch.stack([iv.lower.reshape(m, -1), iv.upper.reshape(m, -1)]))
            stats["calls"] += 1
        stats["domains"] += n
        return torch.cat(lbs), [torch.cat(t, 1) for t in inter]

    def choose(lb, inter, signs) -> tuple[torch.Tensor, torch.Tensor]:
        """(node index, neuron index) of each domain's split; node -1 where none is left."""
        rows = spec.closest_rows(lb)
        best_score = torch.full((lb.shape[0],), -1.0, dtype=lb.dtype)
        best_node = torch.full((lb.shape[0],), -1, dtype=torch.long)
        best_idx = torch.zeros(lb.shape[0], dtype=torch.long)
        for k in range(len(nodes)):
            low, up = inter[k][0], inter[k][1]
            free = (low < 0) & (up > 0) & (signs[k] == 0)
            slack = torch.where(free, up * (-low) / (up - low).clamp_min(1e-12),
                                torch.zeros_like(up))
            score = torch.where(free, slack * (grads[k][rows] + 1e-6), torch.full_like(up, -1))
            s, i = score.max(1)
            better = s > best_score
            best_score = torch.where(better, s, best_score)
            best_node = torch.where(better, torch.full_like(best_node, k), best_node)
            best_idx = torch.where(better, i, best_idx)
        return best_node, best_idx

    signs = [torch.zeros((1, n), dtype=torch.int8) for n in sizes]
    lb, inter = bound(signs)
    node, idx = choose(lb, inter, signs)
    iteration, progress = 0, Progress()
    while True:
        open_ = ~(spec.margins(lb).min(1).values > 0)      # NaN: open
        signs = [s[open_] for s in signs]
        inter = [t[:, open_] for t in inter]
        lb, node, idx = lb[open_], node[open_], idx[open_]
        n = lb.shape[0]
        if n == 0:
            return result("unsat")
        if config.attack_every and iteration % config.attack_every == 0:
            x = spec.falsify(graph, lo64, hi64, AttackConfig(samples=256, restarts=4, steps=30,
                                                            seed=config.seed + iteration),
                             lo64, hi64, confirm)
            if x is not None:
                return result("sat", x)
        # signs, the ReLU inputs' bounds, the rows' bounds, the branch
        per_domain = sum(sizes) * (1 + 2 * inter[0].element_size()) + 8 * (lb.shape[1] + 2)
        if (ended := stop(n, deadline, config, per_domain)) is not None:
            return result(ended[0], reason=ended[1])
        order = spec.margins(lb).min(1).values.argsort()
        stuck = node[order] < 0
        if stuck.all():
            return result("unknown", reason="domains with every ReLU fixed are still not "
                                            "proven")
        order = order[~stuck]
        take = min(order.shape[0], max(1, batch // 2))
        pick, rest = order[:take], torch.cat([order[take:], torch.nonzero(node < 0)[:, 0]])
        children = []
        for k in range(len(nodes)):
            s = signs[k][pick].clone()
            pos, neg = s.clone(), s.clone()
            mine = node[pick] == k
            rows = torch.nonzero(mine)[:, 0]
            pos[rows, idx[pick][rows]] = 1
            neg[rows, idx[pick][rows]] = -1
            children.append(torch.cat([pos, neg]))
        clb, cinter = bound(children, [torch.cat([t[:, pick], t[:, pick]], 1) for t in inter])
        clb = torch.maximum(clb, torch.cat([lb[pick], lb[pick]]))
        cnode, cidx = choose(clb, cinter, children)
        signs = [torch.cat([s[rest], c]) for s, c in zip(signs, children)]
        inter = [torch.cat([t[:, rest], c], 1) for t, c in zip(inter, cinter)]
        lb = torch.cat([lb[rest], clb])
        node, idx = torch.cat([node[rest], cnode]), torch.cat([idx[rest], cidx])
        stats["max_queue"] = max(stats["max_queue"], lb.shape[0])
        iteration += 1
        progress.tick(stats["domains"], lb.shape[0], float(spec.margins(lb).min()))
