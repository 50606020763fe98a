"""ThreadChoice: a search's bound calls drop to one thread when their threads get too little
of the cores (another process holds them), and go back when a core is idle; torch's own
count comes back at the end. A fake machine: each call advances the wall clock, the
process's CPU time (threads × share) and the machine's idle time as the test says."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from boundflow.bab import BabConfig, input_split
from boundflow.bab.threads import ThreadChoice, idle_seconds
from boundflow.errors import BoundFlowError
from tests.bab.test_input_split import _net


@pytest.fixture
def two_threads():
    import boundflow.bab.threads as module

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    module._LAST.clear()
    yield
    module._LAST.clear()
    torch.set_num_threads(before)


class Machine:
    """``share``: the CPU a thread of ours gets (1: a core each); ``idle_cores``: cores
    nobody uses while a call runs; ``known``: whether idle time can be read."""

    def __init__(self, share=1.0, idle_cores=0.0, known=True):
        self.share, self.idle_cores, self.known = share, idle_cores, known
        self.wall = self.cpu_s = self.idle_s = 0.0
        self.log = []

    def call(self, boxes):
        n = torch.get_num_threads()
        self.log.append(n)
        self.wall += 1.0
        self.cpu_s += n * self.share
        self.idle_s += self.idle_cores
        return ("bounds", boxes)

    def choice(self, **kw):
        return ThreadChoice(clock=lambda: self.wall, cpu=lambda: self.cpu_s,
                            idle=lambda: self.idle_s if self.known else None, **kw)


def _calls(choice, machine, k, boxes=100):
    for _ in range(k):
        assert choice.run(lambda: machine.call(boxes), boxes) == ("bounds", boxes)


def test_an_idle_machine_keeps_the_default_count(two_threads):
    m = Machine(share=0.85)
    choice = m.choice()
    _calls(choice, m, 50)
    assert m.log == [2] * 50
    choice.close()
    assert torch.get_num_threads() == 2


def test_a_contended_machine_drops_to_one_thread_at_once_and_comes_back(two_threads):
    m = Machine(share=0.5)
    choice = m.choice()
    _calls(choice, m, 20)
    assert m.log[0] == 2 and m.log[1:] == [1] * 19        # one call told it
    m.idle_cores = 0.1                                     # still busy: stays
    _calls(choice, m, 20)
    assert m.log[-20:] == [1] * 20
    m.share, m.idle_cores = 0.85, 1.0                      # the other process ended
    _calls(choice, m, 10)
    assert m.log[-1] == 2 and m.log[-10:].count(1) <= 5       # as the average moves


def test_threads_waiting_beside_idle_cores_are_no_contention(two_threads):
    m = Machine(share=0.3, idle_cores=1.4)          # small tensors, or a GPU: cores idle
    choice = m.choice()
    _calls(choice, m, 20)
    assert m.log == [2] * 20


def test_without_idle_times_one_thread_stays(two_threads):
    m = Machine(share=0.5, known=False)
    choice = m.choice()
    _calls(choice, m, 5)
    m.share, m.idle_cores = 0.85, 1.0
    _calls(choice, m, 20)
    assert m.log[1:] == [1] * 24


def test_small_calls_are_not_measured(two_threads):
    m = Machine(share=0.5)
    choice = m.choice(min_boxes=50)
    _calls(choice, m, 10, boxes=10)
    assert m.log == [2] * 10 and choice.share is None


def test_the_next_search_starts_where_the_last_ended(two_threads):
    m = Machine(share=0.5)
    first = m.choice()
    _calls(first, m, 3)
    first.close()
    assert torch.get_num_threads() == 2
    second = m.choice()
    _calls(second, m, 3)
    assert m.log[3:] == [1, 1, 1]


def test_one_core_changes_nothing():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = Machine(share=0.1)
        choice = m.choice()
        _calls(choice, m, 10)
        assert set(m.log) == {1} and choice.share is None
    finally:
        torch.set_num_threads(before)


def test_idle_seconds_reads_the_machine_or_says_it_cannot():
    got = idle_seconds()
    assert got is None or got >= 0.0


def test_a_search_restores_the_thread_count_however_it_ends(two_threads, monkeypatch):
    g = _net(0, n_in=2, hidden=8)
    lo, hi, C = -np.ones(2), np.ones(2), np.ones((1, 3))
    res = input_split(g, lo, hi, C, np.array([-100.0]), [(0, 1)],
                      BabConfig(batch=4, escalate="none"))
    assert res.status == "unsat" and torch.get_num_threads() == 2

    module = sys.modules["boundflow.bab.input_split"]

    def fails(*a, **k):
        torch.set_num_threads(1)
        raise BoundFlowError("boom")
    monkeypatch.setattr(module, "_search", fails)
    with pytest.raises(BoundFlowError):
        input_split(g, lo, hi, C, np.array([-100.0]), [(0, 1)], BabConfig(batch=4))
    assert torch.get_num_threads() == 2
