"""The settings of a branch-and-bound search and what it reports."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from boundflow.bab.branching import RULES
from boundflow.errors import BoundFlowError
from boundflow.ir.workload import METHODS

INPUT_SPLIT_MAX_DIMS = 16     # ``auto`` splits the input box up to this many input dimensions
STRATEGIES = ("auto", "input", "relu", "none")
BRANCHINGS = RULES          # input splitting's branching rules (boundflow.bab.branching)
INTERMEDIATES = ("refine", "reuse")
SCREENS = ("forward", "none")
ESCALATIONS = ("alpha", "none")
# domains per plan run by default: ReLU splitting 1024; input splitting 512 per core, 1024 to
# 8192 (ACAS Xu on 16 cores, benchmarks/results/gpu_bab_h200.txt: 8192 boxes a call decided
# 8 of 10 instances faster than 1024, one as fast, property 5 slower, 2.59 s against 2.19;
# property 6 in 5.6 s instead of 12.8)
RELU_BATCH = 1024
INPUT_BATCH_PER_CORE = 512
INPUT_BATCH_RANGE = (1024, 8192)


def machine_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS tells it, fewer
    where a cgroup (v2) CPU quota allows less (a container started with ``--cpus``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_batch(strategy: str, cores: int | None = None) -> int:
    """Domains per plan run when none is given: for input splitting
    :data:`INPUT_BATCH_PER_CORE` per core of ``cores`` (default: this machine's), within
    :data:`INPUT_BATCH_RANGE`; for ReLU splitting (whose domains hold every layer's bounds)
    :data:`RELU_BATCH`. The machine's cores, not the thread setting, so ``tune`` and
    ``verify`` on one machine plan the same workload whatever ``--threads`` each got."""
    if strategy == "relu":
        return RELU_BATCH
    if strategy != "input":
        raise BoundFlowError(f"no default batch for strategy {strategy!r} (input or relu)")
    lo, hi = INPUT_BATCH_RANGE
    return min(max(INPUT_BATCH_PER_CORE * (machine_cores() if cores is None else cores), lo),
               hi)


@dataclass(frozen=True)
class BabConfig:
    """``strategy``: ``input`` (split input boxes), ``relu`` (split unstable ReLUs),
    ``none`` (bound the whole box only) or ``auto`` (:func:`choose_strategy`). ``batch``:
    domains bounded per plan run (a knob of the bound workload; None: :func:`default_batch`
    for the strategy, :meth:`batch_for`). ``branching``: input splitting's rule for the
    dimension to bisect (:mod:`boundflow.bab.branching`): ``combined`` (default) the largest
    width times the row's slope at the box centre and its CROWN coefficient (each as its
    share of the box's sum, their geometric mean), ``sensitivity`` the slope alone,
    ``coefficients`` the coefficient alone, ``widest`` the widest dimension.
    ``max_domains``: the queue's limit (the search answers ``unknown`` rather than outgrow
    it). ``method``: the bound of
    each domain (a method of ``compute_bounds``). ``backend``: the bound plan's backend;
    ``target``: where its plans run (``cuda``: input splitting's plan runs on the GPU, the
    queue, branching and falsifier stay on the CPU, each batch's boxes go over and their
    bounds come back; ReLU splitting runs on the CPU).
    ``attack_every``: iterations between falsifier runs from the domains closest to a
    violation (0: only the check of every domain's centre). ``beta_iterations``: ReLU
    splitting's steps on the split constraints' multipliers per bound (beta-CROWN; 0:
    the constraints only fix their neurons). ``queue_mb``: the open domains' memory at most
    (with ``max_domains``, whichever binds first: a ReLU-split domain holds a sign per
    neuron). ``intermediate``: how a ReLU-split child gets the bounds of the ReLU inputs:
    ``refine`` recomputes them on its domain (the split tightens every later layer) and
    intersects them with its parent's, ``reuse`` takes its parent's with the new split
    applied and computes only the final bound (one backward pass per domain, not one per
    layer). ``screen``: input splitting bounds each batch of boxes with the full plan alone
    (``none``, default) or first with forward-mode intermediate bounds and the plan's final
    bound (``forward``, :class:`~boundflow.bab.bounder.ForwardScreen`, where it covers the
    model and the method is crown or crown-ibp) and in full only the boxes that leaves
    open: faster with ``widest`` branching, not with ``sensitivity``. ``escalate``: input
    splitting may bound the children the plan leaves open a second time, with alpha-CROWN,
    once the search has spent 1 s in bound calls, in the rounds where that has closed more
    of the box per second (``alpha``, default, for a method other than alpha-crown;
    :mod:`boundflow.bab.escalate`), or never (``none``)."""

    strategy: str = "auto"
    batch: int | None = None
    branching: str = "combined"
    max_domains: int = 1_000_000
    method: str = "crown"
    backend: str = "torch"
    attack_every: int = 20
    seed: int = 0
    beta_iterations: int = 20
    queue_mb: int = 2048
    intermediate: str = "reuse"
    screen: str = "none"
    escalate: str = "alpha"
    target: str = "llvm"

    def __post_init__(self):
        from boundflow.target import canonical_target

        object.__setattr__(self, "target", canonical_target(self.target))
        if self.strategy not in STRATEGIES:
            raise BoundFlowError(f"unknown BaB strategy {self.strategy!r}; choose from "
                                 f"{', '.join(STRATEGIES)}")
        if self.method not in METHODS:
            raise BoundFlowError(f"BaB method {self.method!r} is not one of {sorted(METHODS)}")
        if self.branching not in BRANCHINGS:
            raise BoundFlowError(f"unknown branching {self.branching!r}; choose from "
                                 f"{', '.join(BRANCHINGS)}")
        if self.screen not in SCREENS:
            raise BoundFlowError(f"unknown screen {self.screen!r}; choose from "
                                 f"{', '.join(SCREENS)}")
        if self.escalate not in ESCALATIONS:
            raise BoundFlowError(f"unknown escalation {self.escalate!r}; choose from "
                                 f"{', '.join(ESCALATIONS)}")
        if self.intermediate not in INTERMEDIATES:
            raise BoundFlowError(f"unknown intermediate-bounds rule {self.intermediate!r}; "
                                 f"choose from {', '.join(INTERMEDIATES)}")
        for name in ("batch", "max_domains", "queue_mb"):
            v = getattr(self, name)
            if v is None and name == "batch":
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 2:
                raise BoundFlowError(f"BaB {name} must be an integer >= 2, got {v!r}")
        if not isinstance(self.beta_iterations, (int, np.integer)) or \
                isinstance(self.beta_iterations, bool) or self.beta_iterations < 0:
            raise BoundFlowError(f"beta_iterations must be an integer >= 0, got "
                                 f"{self.beta_iterations!r}")
        if not isinstance(self.attack_every, (int, np.integer)) or self.attack_every < 0:
            raise BoundFlowError(f"attack_every must be an integer >= 0, got "
                                 f"{self.attack_every!r}")

    def batch_for(self, strategy: str) -> int:
        """Domains per plan run of a search by ``strategy`` (``input`` or ``relu``): ``batch``
        where given, else :func:`default_batch`."""
        return int(self.batch) if self.batch is not None else default_batch(strategy)


def choose_strategy(config: BabConfig, n_inputs: int, has_relu: bool = True) -> str:
    """The strategy ``config`` asks for, ``auto`` resolved by the input's dimension: input
    splitting for few dimensions, ReLU splitting for more (none without ReLUs)."""
    if config.strategy != "auto":
        return config.strategy
    if n_inputs <= INPUT_SPLIT_MAX_DIMS:
        return "input"
    return "relu" if has_relu else "none"


@dataclass(frozen=True)
class BabResult:
    """``status``: ``unsat`` (every domain proven), ``sat`` (``counterexample`` is an input
    whose output violates the property, checked in float64), ``unknown`` (``reason`` says
    why) or ``timeout``. ``domains``: domains bounded; ``bound_calls``: plan runs (the
    escalation's alpha-CROWN runs included); ``refined``: boxes it bounded again."""

    status: str
    counterexample: np.ndarray | None = None
    domains: int = 0
    bound_calls: int = 0
    seconds: float = 0.0
    max_queue: int = 0
    reason: str = ""
    refined: int = 0

    @property
    def domains_per_second(self) -> float:
        return self.domains / self.seconds if self.seconds > 0 else 0.0
