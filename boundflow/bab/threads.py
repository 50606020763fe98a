"""How many threads a search's torch bound calls use, chosen by what they measure.

A search makes hundreds of bound calls of small tensors (ACAS Xu: 50 neurons a layer), each
many short parallel regions. On an idle machine torch's default (a thread per core) is the
fastest, but when another process keeps a core busy, a region waits for whichever of its
threads the scheduler left out, every time: on this 2-core host, ACAS Xu 1_9 property 6
(``--bab-escalate none``) took 7.1 s idle on two threads and 9.9 s on one; beside one busy
process, 24.8 s and once past 40 s on two, 10.9 s on one (``OMP_WAIT_POLICY=PASSIVE``:
15.5 s idle, 10.5-12.1 s busy; a shorter ``GOMP_SPINCOUNT`` no cure either).

So the search watches what its threads get. Over each bound call :class:`ThreadChoice`
reads the process's CPU time and the wall time: on the default count ``n``, a share below
``CONTENDED`` of ``n`` cores per thread (a running average, ``EMA``) while the machine has
no idle core (``/proc/stat``, under ``FREE``) means other work holds the cores, and the
search drops to one thread (a low share beside idle cores is threads waiting: on small
tensors, or on a GPU). On one thread it reads the machine's idle
time (``/proc/stat``): once about a core (``FREE``) stays idle, it goes back to ``n``.
(Measured over that search: idle, 19.6 s of CPU in 12.4 s, 0.79 a thread with the
single-threaded start-up in it; beside the busy process 60.3 s in 60.2 s, 0.50.) No call
is spent at the losing count to find out: the first bound call under contention tells.
A search starts on the count the process's last search ended on. Where ``/proc/stat`` is
missing, the share alone decides, and a search that dropped to one thread stays there.
Threads change speed only: every count computes the same bounds up to float rounding.

Measured (``boundflow verify``, this host, 2026-11-29): beside one busy process, 1_9
property 6 (``--bab-escalate none``) 12.2 s, against past 60 s before; 1_1 properties 1,
3, 5 and 6 (default settings) 2.2 / 4.7 / 3.9 / 5.1 s, each past its 30 s timeout before.
Idle, nothing changes: the 12 ACAS Xu instances of ``branching.py`` took 16.2 s against
16.4 s, and 1_9 property 6 6.8-7.2 s against 7-8 s.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("boundflow.bab")

EMA = 0.3         # weight of a call's measurement in the running averages
CONTENDED = 0.65  # CPU share per thread below which the default count is contended
FREE = 0.7        # idle cores (on one thread) above which the default count comes back


_LAST: dict[int, int] = {}      # by default count: the count the last search ended on


def idle_seconds() -> float | None:
    """Seconds the machine's CPUs have been idle (summed over CPUs), or None where
    ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ThreadChoice:
    """Runs bound calls (:meth:`run`) on torch's default thread count or one thread, by the
    CPU share the calls get (module docstring); :meth:`close` restores the count it found.
    Calls of fewer than ``min_boxes`` boxes are not measured (too short to tell).
    ``clock``, ``cpu`` and ``idle``: wall seconds, the process's CPU seconds and the
    machine's idle CPU seconds (None: unknown)."""

    def __init__(self, min_boxes: int = 1, clock: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.process_time,
                 idle: Callable[[], float | None] = idle_seconds):
        self.clock, self.cpu, self.idle = clock, cpu, idle
        self.min_boxes = max(1, int(min_boxes))
        self.default = torch.get_num_threads()
        # where the last search ended (a process that runs many searches on one machine)
        self.current = _LAST.get(self.default, self.default)
        self.share: float | None = None         # CPU share per thread on the default count
        self.free: float | None = None          # idle cores, on one thread
        self.seen = {self.default: 0, 1: 0}

    def run(self, call: Callable[[], T], boxes: int) -> T:
        """``call()`` on the current count; its CPU share (or the machine's idle cores)
        recorded, and the count changed when they say so."""
        if self.default <= 1:
            return call()
        torch.set_num_threads(self.current)
        t0, c0 = self.clock(), self.cpu()
        i0 = self.idle()
        out = call()
        wall = self.clock() - t0
        self.seen[self.current] += 1
        if boxes < self.min_boxes or wall <= 0:
            return out
        i1 = None if i0 is None else self.idle()
        idle = None if i1 is None else (i1 - i0) / wall          # idle cores over the call
        if self.current == self.default:
            share = (self.cpu() - c0) / wall / self.current
            self.share = share if self.share is None else \
                (1 - EMA) * self.share + EMA * share
            # a low share on a machine with idle cores is our threads waiting (for small
            # tensors, a GPU), not contention
            if self.share < CONTENDED and (idle is None or idle < FREE):
                log.info("bab: the bound calls get %.2f of a core a thread: one thread "
                         "from here", self.share)
                self.current, self.share, self.free = 1, None, None
        elif idle is not None:
            self.free = idle if self.free is None else (1 - EMA) * self.free + EMA * idle
            if self.free > FREE:
                log.info("bab: %.1f cores idle: %d threads from here", self.free,
                         self.default)
                self.current, self.share, self.free = self.default, None, None
        return out

    def close(self) -> None:
        _LAST[self.default] = self.current
        if self.default > 1 and self.seen[1]:
            log.info("bab: bound calls on %d threads %d, on one thread %d", self.default,
                     self.seen[self.default], self.seen[1])
        torch.set_num_threads(self.default)


__all__ = ["CONTENDED", "EMA", "FREE", "ThreadChoice", "idle_seconds"]
