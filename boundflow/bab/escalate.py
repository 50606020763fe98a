"""When an input-split search bounds its open boxes a second time, with alpha-CROWN.

CROWN's lower relu lines (slope 0 or 1 per neuron) can leave a margin that splitting closes
only slowly: on ACAS Xu 1_1 property 5 the 512 boxes closest to a violation, a few
thousandths of the box wide, had CROWN margins of -0.034 (median) where the true minimum
is +0.02, and 700,000 boxes later the search had not closed them; one alpha-CROWN step on
the slopes of every layer (``AlphaConfig(iterations=1)``) proved all 512, at 5.6x CROWN's
cost per box (property 6, whose true margins are smaller still, gains from more steps). On
properties whose margins do close under splitting (ACAS Xu 1_1 and 1_9, properties 1-4,
each decided within 1.02 s by CROWN alone on this 2-core host) bounding the open boxes
twice only costs: alpha on every box took 2.3-3.6x as long to the verdict.

Which kind a search is shows only as it runs, so the choice is made from what the search
measures, in two steps:

1. Rent or buy, as for loading a tuned plan (:class:`~boundflow.bab.bounder.PlanBounder`):
   the search bounds with its plan alone until it has spent ``after`` seconds in bound
   calls. A search that ends sooner (properties 1-4 here) never pays for a second bound.
2. Then each round (one batch of children) runs in one of two modes, the plan alone or the
   plan and alpha-CROWN on the children it leaves open (the larger lower bound kept: both
   are sound). Each mode is tried once, the plan alone first; after that the mode that has
   closed more of the input box's volume per second (proven boxes' volume over the
   round's time, a running average; a tie goes to the plan alone) runs, with two floors:
   the plan alone gets a share ``EXPLORE`` (10%) of the time where alpha looks better,
   and alpha a share ``ALPHA_SHARE`` (half) where the plan alone looks better.

The rate is myopic: a round of the plan alone closes volume a few rounds after its splits
(often in an alpha round), so the comparison can favour either mode wrongly, and on
property 5 the two rates came within 2% of each other: with no floor for alpha, one run
under load let the plan alone starve it and timed out at 100 s where others took 5 s.
Measured (``boundflow vnncomp``, this host; ACAS Xu 1_1 properties 5 and 6 time out at
116 s with CROWN alone; property 6 is two searches, one per input box), seconds to the
verdict:

=======================================  ==========  ==========  ===========
rule                                     1_1 prop 5  1_1 prop 6  1_9 prop 6
=======================================  ==========  ==========  ===========
CROWN alone                              > 116       > 116       5.6
alpha on every open box after 1 s        7.9         20.1        20.2
by rate, floors 10% / 0 (4 runs)         4.9-5.5     18.0-20.0   12.6-15.1
by rate, floors 10% / 50% (3 runs)       5.2-6.5     21.5-22.5   12.8-15.2
the same, ``verify`` (3-5 runs)          4.9-5.7     24.3-25.2   13.4-15.9
and alpha stops on proven boxes          3.3-3.5     13.0-16.5   11.2-12.8
=======================================  ==========  ==========  ===========

(The last two rows: ``boundflow verify --json``'s seconds, one process per instance, on
2026-11-28 15:00-15:10; the row above them includes torch.optim's 1.1-1.7 s import, gone
since :mod:`boundflow.domains.adam`. In the last, alpha's optimisation drops each box it
has proven, ``PlanBounder(goal=...)``: of the boxes it proves on property 5, 278 of 335
were proven after its first step. The same searches in one process, with and without the
goal interleaved, 3 rounds, medians: 4.66 -> 3.65 s, 23.2 -> 14.2 s, 14.6 -> 10.5 s. CROWN
alone on 1_9 property 6, the same hour: 7.4-10.6 s, escalated 11.1-13.7 s.)

So a search CROWN would have finished soon after the first second still pays (1_9
property 6 is no VNN-COMP pairing). Tried and dropped: a per-box rule from measured gains
(refine where alpha's expected gain exceeds the deficit and splitting would need more than
the cost ratio's worth of levels: both gains are bimodal and shrink with the boxes, their
medians swung by two orders of magnitude between rounds, and property 5 was not decided in
30 s); refining only the boxes whose margin improved on their parent's by less than 10%
(30%) of their deficit (property 6 timed out, or took as long); epochs of 0.3 s per mode
instead of rounds (slower on all three); re-bounding the whole queue at the switch (no
faster).

A refinement that fails (an op alpha-CROWN does not cover, memory) ends escalation for the
search with a log line; the plan's bounds stand. A round is not escalated where its
refinement, estimated per box (from the last one, or before any at ``COST_RATIO`` times the
plan's time per box), would end past the search's deadline (alpha on 1,024 sub-boxes of
property 5 takes 6.7 s here, CROWN 0.30 s: 22x). A round that chose alpha but had no open
children counts as a round of the plan alone; equal rates choose the plan alone.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from boundflow.errors import BoundFlowError
from boundflow.measure.worker import out_of_memory

log = logging.getLogger("boundflow.bab")

ESCALATE_AFTER_S = 1.0    # bound-call seconds before the second bound is considered
EXPLORE = 0.1             # the share of time the plan alone gets when it looks worse
ALPHA_SHARE = 0.5         # the share of time alpha gets when it looks worse
EMA = 0.3                 # weight of a round's rate in its mode's running rate
COST_RATIO = 25.0         # alpha's time per box over the plan's, until one is measured


class Escalation:
    """``refine(lo, hi) -> lb`` applied to the open boxes of the rounds that choose it
    (``margins(lb) -> [N]``: the worst disjunct's margin of each box, > 0 proven; module
    docstring; :data:`ESCALATE_AFTER_S` where ``after`` is None). ``deadline``: the
    search's, a ``time.monotonic()`` time."""

    def __init__(self, refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 margins: Callable[[torch.Tensor], torch.Tensor], after: float | None = None,
                 deadline: float | None = None):
        self.refine, self.margins, self.deadline = refine, margins, deadline
        self.box_s = 0.0                     # seconds per box: the last refinement's
        self.plan_box_s = 0.0                # the plan's, its latest call
        self.after = float(ESCALATE_AFTER_S if after is None else after)
        self.spent = 0.0                     # seconds in bound calls so far (both kinds)
        self.refined = self.proven = 0
        self.rate: dict[bool, float | None] = {True: None, False: None}
        self.time = {True: 0.0, False: 0.0}  # seconds of rounds in each mode
        self.failed = False

    @property
    def active(self) -> bool:
        return self.spent >= self.after and not self.failed

    def timed(self, seconds: float, boxes: int = 0) -> None:
        """A bound call of the plan took ``seconds`` for ``boxes`` boxes."""
        self.spent += seconds
        if boxes:
            self.plan_box_s = seconds / boxes

    def estimate(self, boxes: int) -> float:
        """Seconds a refinement of ``boxes`` boxes is expected to take."""
        per_box = self.box_s if self.box_s > 0 else COST_RATIO * self.plan_box_s
        return per_box * boxes

    def choose(self) -> bool:
        """Whether this round's children get the second bound (module docstring, step 2)."""
        for mode in (False, True):
            if self.rate[mode] is None:
                return mode
        best = self.rate[True] > self.rate[False]
        total = self.time[True] + self.time[False]
        if not best and self.time[True] < ALPHA_SHARE * total:
            return True                   # alpha's floor: its rate may misjudge (docstring)
        return (not best) if self.time[not best] < EXPLORE * total else best

    def observe(self, mode: bool, seconds: float, closed: float) -> None:
        """A round in ``mode`` took ``seconds`` and proved boxes of ``closed`` volume."""
        rate = closed / max(seconds, 1e-9)
        old = self.rate[mode]
        self.rate[mode] = rate if old is None else (1 - EMA) * old + EMA * rate
        self.time[mode] += seconds

    def round(self, lo: torch.Tensor, hi: torch.Tensor, lb: torch.Tensor, started: float,
              volume: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One round's children ``[lo, hi]`` with their bounds ``lb`` (bounded since the
        ``time.perf_counter()`` time ``started``): their bounds after this round's mode,
        its rate recorded (``volume(lo, hi) -> [N]``: each box's share of the input box)."""
        if not self.active:
            return lb
        mode = self.choose()
        if mode and self.deadline is not None and time.monotonic() + self.estimate(
                int((~(self.margins(lb) > 0)).sum())) > self.deadline:
            mode = False                                    # it would end past the deadline
        if mode:
            before = self.refined
            lb = self(lo, hi, lb)
            mode = self.refined > before                    # no open child: the plan's round
        closed = float(volume(lo, hi)[self.margins(lb) > 0].sum())
        self.observe(mode, time.perf_counter() - started, closed)
        return lb

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        """``lb`` with every open box's bound tightened (a new tensor where any is)."""
        pick = ~(self.margins(lb) > 0)                      # NaN: open
        n = int(pick.sum())
        if n == 0 or self.failed:
            return lb
        t0 = time.perf_counter()
        try:
            tight = self.refine(lo[pick], hi[pick]).to(lb.dtype)
        except (BoundFlowError, MemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not out_of_memory(e):
                raise
            log.warning("bab: the second bound failed (%s); the search goes on without it", e)
            self.failed = True
            return lb
        tight = torch.fmax(lb[pick], tight)                 # a NaN bound is no bound
        seconds = time.perf_counter() - t0
        self.box_s = seconds / n
        self.spent += seconds
        self.refined += n
        self.proven += int((self.margins(tight) > 0).sum())
        lb = lb.clone()
        lb[pick] = tight
        return lb


__all__ = ["ALPHA_SHARE", "COST_RATIO", "ESCALATE_AFTER_S", "EXPLORE", "Escalation"]
