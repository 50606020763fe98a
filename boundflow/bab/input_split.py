"""Input-split branch-and-bound: the input box is bisected until every sub-box is proven.

A disjunct of the unsafe region (rows ``a:b`` of the spec: ``C_r·y <= thr_r`` for every row
``r``) is ruled out on a box when one of its rows has a lower bound above its threshold; a
box is done when every open disjunct is ruled out on it. Each iteration takes the
``batch / 2`` open boxes closest to a violation, bisects each along the dimension the
branching rule picks (:mod:`boundflow.bab.branching`: by default from the row's gradient at
the box centre and its CROWN coefficients, which each box keeps from its bound), bounds the
children in one plan run (a child keeps the better of its own bound and its parent's, which
holds on it too), drops the proven ones and queues the rest. The centre of every queued box
is evaluated (that gives the branching rule its gradient) and checked as a counterexample;
every ``attack_every`` iterations the falsifier also searches the boxes closest to a
violation. Boxes the plan leaves open may be bounded again with alpha-CROWN, once the search
has spent a second in bound calls, in the rounds where that has closed more of the box per
second (:mod:`boundflow.bab.escalate`, ``BabConfig.escalate``). Any counterexample is
re-checked in float64 inside the original box before it is reported.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from boundflow.attack import AttackConfig
from boundflow.bab.bounder import ForwardScreen, PlanBounder, float_box
from boundflow.bab.branching import NEEDS_COEFFICIENTS, coefficients, split_dims
from boundflow.bab.common import Disjuncts, Progress, stop
from boundflow.bab.config import BabConfig, BabResult
from boundflow.bab.escalate import Escalation
from boundflow.bab.threads import ThreadChoice
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors
from boundflow.ir.analysis import preactivations
from boundflow.ir.graph import Graph
from boundflow.ir.normalize import normalised


log = logging.getLogger("boundflow.bab")

_ATTACK = AttackConfig(samples=64, restarts=2, steps=15)
# the escalation's bound: alpha-CROWN, 8 steps on every layer's slopes. Measured with
# alpha on every open box after 1 s (`boundflow vnncomp`, ACAS Xu 1_1, this 2-core host),
# seconds to the verdict of property 5 / property 6 by steps: 1: 7.6 / 55, 2: 6.3 / 42,
# 3: 6.8 / 36, 5: 7.7 / 24, 8: 8.7 / 20, 12: 10.5 / 18, 20: 14.0 / 25 (property 3, never
# escalated: 0.95-1.25 throughout)
ESCALATE_ALPHA = AlphaConfig(iterations=8)


class _Lazy:
    """A bound call made on first use (``calls``: 0 until then)."""

    def __init__(self, make: Callable[[], PlanBounder]):
        self._make, self._inner = make, None

    @property
    def calls(self) -> int:
        return 0 if self._inner is None else self._inner.calls

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if self._inner is None:
            self._inner = self._make()
        return self._inner(lo, hi)


def _centres(graph: Graph, lo: torch.Tensor, hi: torch.Tensor, spec: Disjuncts, lb: torch.Tensor,
             shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model at each box's centre: (centres, outputs, gradient of the row the branching
    follows). That row is the best-bounded row of the box's worst disjunct: the one whose
    bound is closest to proving the box."""
    x = ((lo + hi) / 2).requires_grad_(True)
    y = evaluate(graph, x.reshape((-1,) + shape)).flatten(1)
    rows = spec.closest_rows(lb)
    s = (y @ spec.C.T).gather(1, rows[:, None]).sum()
    (g,) = torch.autograd.grad(s, x)
    return x.detach(), y.detach(), g


def input_split(graph: Graph, lower: np.ndarray, upper: np.ndarray, C: np.ndarray,
                threshold: np.ndarray, ranges: Sequence[tuple[int, int]],
                config: BabConfig = BabConfig(), *, deadline: float | None = None,
                confirm: Callable[[np.ndarray], bool] | None = None,
                bounder: PlanBounder | None = None, db=None,
                refiner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> BabResult:
    """Decide whether some point of the box ``[lower, upper]`` (flat, float64) has an output
    meeting every row of one of the disjuncts (``C`` [rows, n_out], ``threshold`` [rows],
    ``ranges``: each disjunct's rows). ``deadline``: a ``time.monotonic()`` time.
    ``confirm(x)``: a further check of a counterexample (e.g. on the original model).
    ``bounder``: the bound call (default: a :class:`PlanBounder` for ``config`` and
    ``db``). ``refiner``: the escalation's bound call (default, where ``config.escalate``
    is ``alpha`` and the method is not alpha-crown already: the default alpha-CROWN plan of
    ``ESCALATE_ALPHA``'s steps, on the torch backend).
    Bound calls drop to one thread while other work holds the cores
    (:class:`~boundflow.bab.threads.ThreadChoice`; torch's own count restored at the end)."""
    threads = ThreadChoice()
    try:
        return _search(graph, lower, upper, C, threshold, ranges, config, deadline=deadline,
                       confirm=confirm, bounder=bounder, db=db, refiner=refiner,
                       threads=threads)
    finally:
        threads.close()


def _search(graph: Graph, lower: np.ndarray, upper: np.ndarray, C: np.ndarray,
            threshold: np.ndarray, ranges: Sequence[tuple[int, int]],
            config: BabConfig = BabConfig(), *, deadline: float | None = None,
            confirm: Callable[[np.ndarray], bool] | None = None,
            bounder: PlanBounder | None = None, db=None,
            refiner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            threads: ThreadChoice | None = None) -> BabResult:
    """:func:`input_split`'s search."""
    start = time.monotonic()
    shape = tuple(graph.input_shape)
    batch = config.batch_for("input")
    log.info("bab: input splitting, %d boxes per plan run (%s)", batch,
             "given" if config.batch is not None else "the default for this machine's cores")
    # the branching rule's CROWN coefficients come from the plan's ReLU-input bounds, on the
    # graph plans run on (BatchNorm folded, identities dropped: other node names); an
    # activation of the input itself reads the box
    norm = normalised(graph)[0]
    wants = config.branching in NEEDS_COEFFICIENTS and config.screen == "none" and \
        config.method != "ibp"
    keep = tuple(n for n in preactivations(norm) if n != norm.input.name) if wants else ()
    if bounder is None:
        # alpha-CROWN's optimisation drops each box once it is proven (the search's goal)
        goal = (torch.as_tensor(np.asarray(threshold, np.float64).reshape(-1)), tuple(ranges)) \
            if config.method == "alpha-crown" else None
        bounder = PlanBounder(graph, np.asarray(C), method=config.method, batch=batch,
                              backend=config.backend, db=db, goal=goal, target=config.target,
                              keep=keep)
    dtype = bounder.dtype
    spec = Disjuncts(C, threshold, ranges, dtype)
    lo64 = np.asarray(lower, np.float64).reshape(-1)
    hi64 = np.asarray(upper, np.float64).reshape(-1)
    lo0, hi0 = float_box(lo64, hi64, dtype)
    lo, hi = lo0[None], hi0[None]
    stats = {"domains": 0, "max_queue": 1}
    elapsed = lambda: time.monotonic() - start  # noqa: E731

    def result(status, cex=None, reason=""):
        calls = bounder.calls + (screen.calls if screen is not None else 0) + \
            getattr(refiner, "calls", 0)
        refined = escalation.refined if escalation is not None else 0
        if escalation is not None and escalation.time[False] > 0:
            log.info("bab: %d open boxes bounded again by alpha-CROWN, %d of them proven; "
                     "rounds with it %.1f s, without %.1f s (box volume closed per s %.3g "
                     "vs %.3g)", refined, escalation.proven, escalation.time[True],
                     escalation.time[False], escalation.rate[True] or 0.0,
                     escalation.rate[False] or 0.0)
        return BabResult(status, cex, stats["domains"], calls, elapsed(),
                         stats["max_queue"], reason, refined)

    def counterexample(points: torch.Tensor) -> np.ndarray | None:
        """The first of ``points`` that is a counterexample in the original box."""
        for p in points:
            x = spec.counterexample(graph, p.detach().double().numpy(), lo64, hi64, confirm)
            if x is not None:
                return x
        return None

    screen = ForwardScreen(graph, np.asarray(C), method=config.method, batch=batch,
                           dtype=dtype, target=config.target) \
        if config.screen == "forward" and ForwardScreen.usable(graph, config.method) else None

    if refiner is None and config.escalate == "alpha" and config.method != "alpha-crown":
        # made on first use: a search that ends before escalating never plans it
        refiner = _Lazy(lambda: PlanBounder(graph, np.asarray(C), method="alpha-crown",
                                            batch=batch, alpha=ESCALATE_ALPHA,
                                            goal=(spec.thr, spec.ranges),
                                            target=config.target))
    escalation = None if refiner is None else \
        Escalation(refiner, lambda lb: spec.margins(lb).min(1).values, deadline=deadline)

    tensors = graph_tensors(norm, dtype) if wants else None

    def slopes(lo: torch.Tensor, hi: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        """``[N, n_in]``: each box's CROWN coefficients of its row (:mod:`~boundflow.bab.
        branching`), from the bounder's last call (on these boxes); zero where unknown."""
        kept = (getattr(bounder, "kept", None) if keep else {}) if wants else None
        if kept is not None:
            kept = {**kept, norm.input.name: Interval(lo.reshape((-1,) + shape),
                                                      hi.reshape((-1,) + shape))}
        out = None if kept is None else \
            coefficients(norm, tensors, kept, spec.C[spec.closest_rows(lb)])
        return torch.zeros(lb.shape[0], lo64.size, dtype=dtype) if out is None else \
            out.to(dtype)

    def bound(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """The boxes' lower bounds: the screen's first, if any, and the plan's for the boxes
        it leaves open (the better of the two kept)."""
        t0 = time.perf_counter()
        if threads is not None:
            return threads.run(lambda: _bound(lo, hi, t0), lo.shape[0])
        return _bound(lo, hi, t0)

    def _bound(lo: torch.Tensor, hi: torch.Tensor, t0: float) -> torch.Tensor:
        if screen is None:
            lb = bounder(lo, hi)
        else:
            lb = screen(lo, hi)
            todo = ~(spec.margins(lb).min(1).values > 0)       # NaN: open
            if todo.any():
                lb[todo] = torch.maximum(lb[todo], bounder(lo[todo], hi[todo]))
        if escalation is not None:
            escalation.timed(time.perf_counter() - t0, lo.shape[0])
        return lb

    lb = bound(lo, hi)
    co = slopes(lo, hi, lb)
    # each box's volume as a share of the whole box's (the escalation's measure of progress)
    flat = hi0 - lo0 > 0
    log_w0 = torch.log2((hi0 - lo0).double()[flat])

    def volume(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.exp2((torch.log2((hi - lo).double()[:, flat]) - log_w0).sum(1))

    stats["domains"] += 1
    iteration, progress = 0, Progress()
    while True:
        open_ = ~(spec.margins(lb).min(1).values > 0)      # NaN: open
        lo, hi, lb, co = lo[open_], hi[open_], lb[open_], co[open_]
        n = lo.shape[0]
        if n == 0:
            return result("unsat")
        centres, y, grad = _centres(graph, lo, hi, spec, lb, shape)
        bad = spec.violated(y)
        if bad.any():
            x = counterexample(centres[bad][:8])
            if x is not None:
                return result("sat", x)
        if config.attack_every and iteration % config.attack_every == 0:
            attack = AttackConfig(_ATTACK.samples, _ATTACK.restarts, _ATTACK.steps,
                                  config.seed + iteration)
            for i in spec.margins(lb).min(1).values.argsort()[:2].tolist():
                x = spec.falsify(graph, lo[i].numpy(), hi[i].numpy(), attack, lo64, hi64,
                                 confirm)
                if x is not None:
                    return result("sat", x)
        per_domain = (3 * lo.shape[1] + lb.shape[1] + 2) * lo.element_size()
        if (ended := stop(n, deadline, config, per_domain)) is not None:
            return result(ended[0], reason=ended[1])
        dims = split_dims(config.branching, lo, hi, grad, co)
        # the boxes closest to a violation first
        take = min(n, max(1, batch // 2))
        order = spec.margins(lb).min(1).values.argsort()
        pick, rest = order[:take], order[take:]
        plo, phi, plb, pd = lo[pick], hi[pick], lb[pick], dims[pick]
        rows = torch.arange(take)
        mid = plo[rows, pd] + (phi[rows, pd] - plo[rows, pd]) / 2
        left_hi, right_lo = phi.clone(), plo.clone()
        left_hi[rows, pd] = mid
        right_lo[rows, pd] = mid
        clo, chi = torch.cat([plo, right_lo]), torch.cat([left_hi, phi])
        t0 = time.perf_counter()
        # the parent's bound holds on its children too (a NaN bound is no bound)
        clb = torch.fmax(bound(clo, chi), torch.cat([plb, plb]))
        cco = slopes(clo, chi, clb)
        if escalation is not None:
            clb = escalation.round(clo, chi, clb, t0, volume)
        stats["domains"] += clo.shape[0]
        lo, hi, lb = torch.cat([lo[rest], clo]), torch.cat([hi[rest], chi]), \
            torch.cat([lb[rest], clb])
        co = torch.cat([co[rest], cco])
        stats["max_queue"] = max(stats["max_queue"], lo.shape[0])
        iteration += 1
        progress.tick(stats["domains"], lo.shape[0], float(spec.margins(lb).min()))
