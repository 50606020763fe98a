"""When an input-split search bounds its open boxes a second time, with alpha-CROWN.

CROWN's lower relu lines (slope 0 or 1 per neuron) can leave a margin that splitting closes
only slowly: on ACAS Xu 1_1 property 5 the 512 boxes closest to a violation, a few
thousandths of the box wide, had CROWN margins of -0.034 (median) where the true minimum is
+0.02, and 700,000 boxes later the search had not closed them; one alpha-CROWN step on the
slopes of every layer (``AlphaConfig(iterations=1)``) proved all 512, at 5.6x CROWN's cost
per box (property 6, whose true margins are smaller still, needs more steps). On properties whose margins do close under splitting (ACAS Xu 1_1 and 1_9,
properties 1-4, each decided within 1.02 s by CROWN alone on this 2-core host) bounding
the open boxes twice only costs: alpha on every box took 2.3-3.6x as long to the verdict.

Which kind a search is shows only as it runs, so the choice is a rent-or-buy rule, as for
loading a tuned plan (:class:`~boundflow.bab.bounder.PlanBounder`): the search bounds with
its plan alone until it has spent ``after`` seconds in bound calls, and from then on every
box the plan leaves open is bounded again by alpha-CROWN (the search's ``refiner``;
``input_split.ESCALATE_ALPHA``: 8 steps), the larger of the two lower bounds kept (both
sound); the boxes queued by then get theirs at once. A search that ends sooner never pays
for the second bound; one that runs longer pays for having waited: the boxes split in the
meantime. Measured with one alpha step (``boundflow vnncomp``, ACAS Xu 1_1 properties 5
and 6, which CROWN alone did not decide in 116 s; properties 1-4 of 1_1 and 1_9 unchanged
at ``after`` >= 1 s): property 5 in 5.0 / 5.9 / 7.6 / 20.3 s with ``after`` 0 / 0.5 / 1 /
2 s, property 6 in 53 / 52 / 55 / 39 s (its two input boxes are two searches); with 8
steps and ``after`` 1 s, 7.9 s and 20.1 s. The price shows on a search CROWN would have
finished soon after the switch: property 6 on network 1_9, 5.6 s with CROWN alone, 20.2 s
escalated (no signal measured before the switch told the two kinds apart: neither the
share of children CROWN proves nor the share of refined boxes alpha proves).

Tried first and dropped: a per-box rule from the search's own measurements (refine where
the expected alpha gain exceeds the deficit and splitting's expected gain per bisection
would need more than the cost ratio's worth of levels): both gains are bimodal and shrink
with the boxes, their medians swung by two orders of magnitude between rounds, and on
property 5 it refined too little to finish in 30 s (alpha on every box: 5 s). So was
refining only the boxes whose margin improved on their parent's by less than 10% (or 30%)
of their deficit: property 6 timed out (10%) or took as long (30%).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

ESCALATE_AFTER_S = 1.0    # bound-call seconds before the open boxes get the second bound


class Escalation:
    """``refine(lo, hi) -> lb`` applied to the open boxes (``margins(lb) -> [N]``, the worst
    disjunct's margin of each box; > 0 proven) once ``after`` seconds of bound calls are
    spent (module docstring; :data:`ESCALATE_AFTER_S` where ``after`` is None)."""

    def __init__(self, refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 margins: Callable[[torch.Tensor], torch.Tensor], after: float | None = None):
        self.refine, self.margins = refine, margins
        self.after = float(ESCALATE_AFTER_S if after is None else after)
        self.spent = 0.0                     # seconds in bound calls so far (both kinds)
        self.refined = self.proven = 0
        self._switched = False

    @property
    def active(self) -> bool:
        return self.spent >= self.after

    def switching(self) -> bool:
        """True once: at the first call after the search became active (the boxes queued
        until then, bounded by the plan alone, are due their second bound)."""
        if self.active and not self._switched:
            self._switched = True
            return True
        return False

    def timed(self, seconds: float) -> None:
        """A bound call of the search took ``seconds``."""
        self.spent += seconds

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        """``lb`` with every open box's bound tightened, once active (a new tensor where
        any is)."""
        if not self.active:
            return lb
        pick = ~(self.margins(lb) > 0)                      # NaN: open
        n = int(pick.sum())
        if n == 0:
            return lb
        t0 = time.perf_counter()
        tight = torch.maximum(lb[pick], self.refine(lo[pick], hi[pick]).to(lb.dtype))
        self.spent += time.perf_counter() - t0
        self.refined += n
        self.proven += int((self.margins(tight) > 0).sum())
        lb = lb.clone()
        lb[pick] = tight
        return lb


__all__ = ["ESCALATE_AFTER_S", "Escalation"]
