"""What every branch-and-bound strategy shares: the disjuncts it must rule out, checking a
counterexample, the falsifier on a box, and when a search must stop."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch

from boundflow.attack import AttackConfig, find_counterexample
from boundflow.bab.config import BabConfig
from boundflow.domains.concrete import evaluate
from boundflow.ir.graph import Graph
from boundflow.ir.spec import proof_margin

log = logging.getLogger("boundflow.bab")


class Disjuncts:
    """The disjuncts a search must rule out: their rows ``C`` [rows, n_out], thresholds
    ``thr`` [rows] (in the bound's dtype, and in float64 as ``C64`` / ``thr64``) and each
    disjunct's ``ranges`` of rows (``C_r·y <= thr_r`` for every row of one disjunct is a
    violation)."""

    def __init__(self, C: np.ndarray, thr: np.ndarray, ranges: Sequence[tuple[int, int]],
                 dtype: torch.dtype):
        self.C64 = torch.as_tensor(np.asarray(C, np.float64))
        self.thr64 = torch.as_tensor(np.asarray(thr, np.float64))
        self.C, self.thr = self.C64.to(dtype), self.thr64.to(dtype)
        self.ranges = [(int(a), int(b)) for a, b in ranges]

    def margins(self, lb: torch.Tensor) -> torch.Tensor:
        """``[N, disjuncts]``: per disjunct, its best row's ``lb - thr`` less the rounding
        allowance (> 0: ruled out; :func:`~boundflow.ir.spec.proof_margin`)."""
        gap = proof_margin(lb, self.thr)
        return torch.stack([gap[:, a:b].max(1).values for a, b in self.ranges], 1)

    def closest_rows(self, lb: torch.Tensor) -> torch.Tensor:
        """``[N]``: per domain, the best-bounded row of its worst disjunct (the row whose
        bound is closest to proving the domain)."""
        worst = self.margins(lb).argmin(1)
        gap = proof_margin(lb, self.thr)
        rows = torch.empty_like(worst)
        for d, (a, b) in enumerate(self.ranges):
            pick = worst == d
            if pick.any():
                rows[pick] = a + gap[pick, a:b].argmax(1)
        return rows

    def violated(self, y: torch.Tensor) -> torch.Tensor:
        """``[N]``: whether the outputs ``y`` [N, n_out] satisfy every row of a disjunct."""
        ok = (y @ self.C.T) <= self.thr
        return torch.stack([ok[:, a:b].all(1) for a, b in self.ranges], 1).any(1)

    def counterexample(self, graph: Graph, x, lower: np.ndarray, upper: np.ndarray,
                       confirm: Callable[[np.ndarray], bool] | None = None
                       ) -> np.ndarray | None:
        """``x`` clipped into the box ``[lower, upper]`` (flat, float64) when the model's
        float64 output there violates a disjunct (and ``confirm`` agrees), else None."""
        if x is None:
            return None
        x = np.clip(np.asarray(x, np.float64).reshape(-1), lower, upper)
        y = evaluate(graph, torch.from_numpy(x).reshape((1,) + tuple(graph.input_shape)))
        ok = (self.C64 @ y.flatten()) <= self.thr64
        if any(bool(ok[a:b].all()) for a, b in self.ranges) and (confirm is None or confirm(x)):
            return x
        return None

    def falsify(self, graph: Graph, lower: np.ndarray, upper: np.ndarray, config: AttackConfig,
                box_lower: np.ndarray, box_upper: np.ndarray,
                confirm: Callable[[np.ndarray], bool] | None = None) -> np.ndarray | None:
        """The falsifier on ``[lower, upper]`` for each disjunct; a counterexample checked
        in the original box ``[box_lower, box_upper]``, or None."""
        shape = tuple(graph.input_shape)
        for a, b in self.ranges:
            found = find_counterexample(graph, np.asarray(lower, np.float64).reshape(shape),
                                        np.asarray(upper, np.float64).reshape(shape),
                                        self.C64[a:b].numpy(), self.thr64[a:b].numpy(), config)
            x = self.counterexample(graph, found, box_lower, box_upper, confirm)
            if x is not None:
                return x
        return None


def stop(open_domains: int, deadline: float | None, config: BabConfig,
         domain_bytes: int = 0) -> tuple[str, str] | None:
    """(status, reason) when a search must end now: past its deadline, its queue past
    ``max_domains``, or past ``queue_mb`` at ``domain_bytes`` per domain; else None."""
    if deadline is not None and time.monotonic() > deadline:
        return "timeout", ""
    if open_domains > config.max_domains:
        return "unknown", f"more than {config.max_domains} open domains (max_domains)"
    if open_domains * domain_bytes > config.queue_mb * 2 ** 20:
        return "unknown", (f"the open domains need more than {config.queue_mb} MiB "
                           f"(queue_mb)")
    return None


class Progress:
    """A log line every ``every`` seconds (``-v`` shows them): domains bounded, open,
    domains per second, and the margin of the domain closest to a violation."""

    def __init__(self, every: float = 2.0):
        self.start = self.last = time.monotonic()
        self.every = every

    def tick(self, domains: int, open_domains: int, worst_margin: float) -> None:
        now = time.monotonic()
        if now - self.last > self.every:
            self.last = now
            log.info("bab: %d domains bounded, %d open, %.0f domains/s, worst margin %.4g",
                     domains, open_domains, domains / max(now - self.start, 1e-9),
                     worst_margin)
