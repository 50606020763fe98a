"""The bound call of a branch-and-bound search: a compiled plan run on a batch of domains.

The workload is (model, ``batch`` domains, ``len(C)`` spec rows, method): the plan comes from
the tuning database when one is given and holds a plan for it (``boundflow tune --vnnlib``
records one), else it is the default plan; either way it is planned and compiled once and
every batch of domains is one run of it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from boundflow.domains.interval import Interval
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.spec import InputSpec, LinearSpec

log = logging.getLogger("boundflow.bab")


def float_box(lower: np.ndarray, upper: np.ndarray, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lower, upper]`` in ``dtype``, rounded outward where the conversion rounds, so the
    box bounded contains the box given (a float32 box rounded to nearest may lose its edge,
    and a counterexample there)."""
    lo64, hi64 = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    lo, hi = torch.from_numpy(lo64).to(dtype), torch.from_numpy(hi64).to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    lo = torch.where(lo.double() > torch.from_numpy(lo64), torch.nextafter(lo, -inf), lo)
    hi = torch.where(hi.double() < torch.from_numpy(hi64), torch.nextafter(hi, inf), hi)
    return lo, hi


_VERIFIERS: dict[tuple, tuple[Graph, Any]] = {}
_KEEP = 16


def _verifier(graph: Graph, batch: int, rows: int, method: str, backend: str, db: Any,
              objective: str, alpha: Any = None, target: str = "llvm"):
    """The compiled verifier of the workload, made once per process (a run of many
    instances on one model compiles and looks up its plan once)."""
    from boundflow.verifier import compile as compile_verifier

    key = (id(graph), batch, rows, method, backend, db if isinstance(db, (str, type(None)))
           else id(db), objective, alpha, target)
    hit = _VERIFIERS.get(key)
    if hit is not None and hit[0] is graph:
        return hit[1]
    v = compile_verifier(graph, batch=batch, n_specs=rows, method=method, backend=backend,
                         db=db, objective=objective, alpha=alpha, target=target)
    if len(_VERIFIERS) >= _KEEP:
        _VERIFIERS.pop(next(iter(_VERIFIERS)))
    _VERIFIERS[key] = (graph, v)
    return v


def _batched_rows(C: np.ndarray, batch: int, dtype: torch.dtype) -> np.ndarray:
    """The spec rows ``C`` ``[rows, n_out]`` repeated for ``batch`` domains, in ``dtype``:
    the ``C`` of a plan run (a batch of fewer domains takes its first rows)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return np.ascontiguousarray(np.broadcast_to(np.asarray(C, np.float64).astype(np_dtype),
                                                (batch,) + tuple(np.shape(C))))


SWITCH_AFTER_S = 3.0   # bound-call seconds on the default plan before a tuned one is loaded


class PlanBounder:
    """Lower bounds of ``C·y`` (rows of ``C``: ``[rows, n_out]``) over batches of boxes,
    each batch of up to ``batch`` boxes one run of the workload's plan (see the module
    docstring). ``db``: a tuning database to look the plan up in.

    A tuned plan costs a set-up the default plan does not: the look-up, and for a compiled
    plan the import of TVM and the load of its module (about 1.5 s here). A search that
    ends sooner would only wait for it, so with ``switch_after`` seconds (the default) the
    default plan bounds first and the tuned plan is loaded once the search has spent that
    long in bound calls: a short search never pays for it, a long one pays once and runs
    the tuned plan from then on (a rent-or-buy rule: at worst the set-up is added to a
    search that ends right after). ``switch_after=0`` loads it at once. A look-up that
    fails leaves the default plan running, with a log line. ``alpha``: alpha-CROWN's
    settings (:class:`~boundflow.domains.alpha.AlphaConfig`; its default where None).
    ``goal``: the search's (thresholds ``[rows]``, each disjunct's row range), with which
    alpha-CROWN stops optimising the boxes it has proven (``ReluSplit.goal``). ``keep``:
    nodes whose bounds each call keeps, ``kept`` (by node, an Interval over the call's
    boxes; None after a call whose plan's backend does not return them)."""

    def __init__(self, graph: Graph, C: np.ndarray, *, method: str, batch: int,
                 backend: str = "torch", db: Any = None, objective: str = "time@width",
                 switch_after: float = SWITCH_AFTER_S, alpha: Any = None,
                 goal: tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None = None,
                 target: str = "llvm", keep: Sequence[str] = ()):
        self.graph, self.batch = graph, int(batch)
        self.rows = int(C.shape[0])
        self.keep = tuple(keep)
        self.kept: dict[str, Interval] | None = None
        self._args = (graph, self.batch, self.rows, method, backend)
        self._alpha, self._target = alpha, target
        self._later = (db, objective) if db is not None and switch_after > 0 else None
        self.verifier = _verifier(*self._args, None if self._later else db, objective, alpha,
                                  target)
        self.switch_after = float(switch_after)
        self.dtype = torch.float64 if self.verifier.plan.workload.dtype == "float64" \
            else torch.float32
        self._C = _batched_rows(C, self.batch, self.dtype)
        self._run = {}                # what each run takes besides the box and spec
        if goal is not None:
            from boundflow.ir.split import ReluSplit
            self._run = {"split": ReluSplit({}, goal=(goal[0], tuple(goal[1])))}
        self.calls = 0
        self.seconds = 0.0

    def _switch(self) -> None:
        """Load the tuned plan, and run it from the next call when there is one."""
        db, objective = self._later
        self._later = None
        try:
            tuned = _verifier(*self._args, db, objective, self._alpha, self._target)
        except BoundFlowError as e:
            log.warning("the tuned plan could not be loaded (%s); the default plan runs on", e)
            return
        if tuned.tuned is not None and tuned.plan.workload == self.verifier.plan.workload:
            self.verifier = tuned
            log.info("bab: the tuned plan (%s) runs from bound call %d on", tuned.backend,
                     self.calls + 1)

    @property
    def dtype_np(self):
        return np.float64 if self.dtype == torch.float64 else np.float32

    @property
    def tuned(self) -> bool:
        return self.verifier.tuned is not None

    def __call__(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """``[N, rows]`` lower bounds of ``C·y`` over the boxes ``[N, *in]``."""
        out, kept = [], []
        shape = (-1,) + tuple(self.graph.input_shape)
        for start in range(0, lower.shape[0], self.batch):
            lo = lower[start:start + self.batch].reshape(shape).numpy()
            hi = upper[start:start + self.batch].reshape(shape).numpy()
            spec = LinearSpec(self._C[:lo.shape[0]])
            if self._later is not None and self.seconds >= self.switch_after:
                self._switch()
            t0 = time.perf_counter()
            box = InputSpec.box(lo, hi)
            if self.keep:
                bounds, nodes = self.verifier.run_keeping(box, spec, self.keep, upper=False,
                                                          **self._run)
                kept.append(nodes)
            else:
                bounds = self.verifier.run(box, spec, upper=False, **self._run)
            out.append(bounds.lower.to(self.dtype))
            self.calls += 1
            self.seconds += time.perf_counter() - t0
        self.kept = None
        if self.keep and all(set(self.keep) <= k.keys() for k in kept):
            self.kept = {n: Interval(torch.cat([k[n].lower for k in kept]),
                                     torch.cat([k[n].upper for k in kept])) for n in self.keep}
        return torch.cat(out)


def sample_domains(lower: np.ndarray, upper: np.ndarray, batch: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` sub-boxes of ``[lower, upper]`` (flat, float64) like those an input-split
    search bounds: each dimension halved 0-6 times, at a random one of the pieces (what
    ``boundflow tune --vnnlib`` measures the search's bound workload on)."""
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    depth = rng.integers(0, 7, size=(batch, lo.size))
    piece = np.floor(rng.random((batch, lo.size)) * 2.0 ** depth)
    width = (hi - lo) / 2.0 ** depth
    sub_lo = lo + piece * width
    return sub_lo, np.minimum(sub_lo + width, hi)


class ForwardScreen:
    """A cheap first bound of a batch of boxes, for low-dimensional inputs: the ReLU inputs
    bounded by forward-mode linear bounds (:mod:`boundflow.domains.forward`, ``n`` forward
    passes for ``n`` input dimensions), then the workload's torch plan run with them as its
    intermediate bounds (a :class:`~boundflow.ir.split.ReluSplit` of reference bounds,
    reused), so only its final backward bound runs: 20-25x cheaper than a CROWN bound of
    ACAS Xu's boxes, as tight on small boxes, much looser on wide ones. The boxes it leaves
    open are bounded by the plan in full (:func:`~boundflow.bab.input_split.input_split`).

    Measured (ACAS Xu 1_1, one thread): with sensitivity branching, the default, the search
    bounds boxes at the decision boundary, where the screen proves about 1% of them, and
    the search is no faster (prop 3: 2.65 s both); with widest-dimension branching, whose
    boxes are more uniform, it is 1.26x faster (prop 4: 9.95 vs 12.59 s). Hence opt-in
    (``BabConfig.screen``)."""

    def __init__(self, graph: Graph, C: np.ndarray, *, method: str, batch: int,
                 dtype: torch.dtype, target: str = "llvm"):
        from boundflow.bab.relu_split import relu_inputs
        from boundflow.domains.traversal import graph_tensors
        from boundflow.ir.normalize import normalised

        self.graph, self.batch = graph, int(batch)
        self.verifier = _verifier(graph, self.batch, int(C.shape[0]), method, "torch", None,
                                  "time@width", target=target)
        # the reference bounds name the nodes of the graph plans run on (BatchNorm folded)
        self.norm = normalised(graph)[0]
        self.nodes = relu_inputs(self.norm)
        self.tensors = graph_tensors(self.norm, dtype)
        self.dtype = dtype
        self._C = _batched_rows(C, self.batch, dtype)
        self.calls, self.seconds = 0, 0.0

    @staticmethod
    def usable(graph: Graph, method: str) -> bool:
        """Whether the screen applies: forward-mode covers every op, there are ReLUs, and
        the method's final bound is a backward one."""
        from boundflow.bab.relu_split import relu_inputs
        from boundflow.domains.forward import supported
        from boundflow.ir.normalize import normalised

        norm = normalised(graph)[0]
        return method in ("crown", "crown-ibp") and bool(relu_inputs(norm)) and \
            supported(norm)

    def __call__(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """``[N, rows]`` lower bounds of ``C·y`` over the boxes ``[N, *in]``."""
        from boundflow.domains.forward import forward_bounds
        from boundflow.domains.interval import Interval
        from boundflow.ir.split import ReluSplit

        t0 = time.perf_counter()
        out = []
        shape = (-1,) + tuple(self.graph.input_shape)
        for start in range(0, lower.shape[0], self.batch):
            lo = lower[start:start + self.batch].reshape(shape).to(self.dtype)
            hi = upper[start:start + self.batch].reshape(shape).to(self.dtype)
            fb = forward_bounds(self.norm, Interval(lo, hi), self.tensors, self.nodes)
            split = ReluSplit({}, reference={nd: (iv.lower, iv.upper) for nd, iv in fb.items()},
                              reuse=True)
            spec = LinearSpec(self._C[:lo.shape[0]])
            run = self.verifier._executor.run(InputSpec.box(lo.numpy(), hi.numpy()), spec,
                                              split=split, upper=False)
            out.append(run.lower.to(self.dtype))
            self.calls += 1
        self.seconds += time.perf_counter() - t0
        return torch.cat(out)
