"""The bound call of a branch-and-bound search: a compiled plan run on a batch of domains.

The workload is (model, ``batch`` domains, ``len(C)`` spec rows, method): the plan comes from
the tuning database when one is given and holds a plan for it (``boundflow tune --bab``
records one), else it is the default plan; either way it is planned and compiled once and
every batch of domains is one run of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from boundflow.ir.graph import Graph
from boundflow.ir.spec import InputSpec, LinearSpec


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


class PlanBounder:
    """Lower bounds of ``C·y`` (rows of ``C``: ``[rows, n_out]``) over batches of boxes,
    each batch of up to ``batch`` boxes one run of the workload's plan (see the module
    docstring). ``db``: a tuning database to look the plan up in."""

    def __init__(self, graph: Graph, C: np.ndarray, *, method: str, batch: int,
                 backend: str = "torch", db: Any = None, objective: str = "time@width"):
        from boundflow.verifier import compile as compile_verifier

        self.graph, self.batch = graph, int(batch)
        self.rows = int(C.shape[0])
        self.verifier = compile_verifier(graph, batch=self.batch, n_specs=self.rows,
                                         method=method, backend=backend, db=db,
                                         objective=objective)
        self.dtype = torch.float64 if self.verifier.plan.workload.dtype == "float64" \
            else torch.float32
        self._C = np.ascontiguousarray(np.broadcast_to(
            np.asarray(C, np.float64).astype(self.dtype_np),
            (self.batch, self.rows, int(C.shape[1]))))
        self.calls = 0

    @property
    def dtype_np(self):
        return np.float64 if self.dtype == torch.float64 else np.float32

    @property
    def tuned(self) -> bool:
        return self.verifier.tuned is not None

    def __call__(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """``[N, rows]`` lower bounds of ``C·y`` over the boxes ``[N, *in]``."""
        out = []
        shape = (-1,) + tuple(self.graph.input_shape)
        for start in range(0, lower.shape[0], self.batch):
            lo = lower[start:start + self.batch].reshape(shape).numpy()
            hi = upper[start:start + self.batch].reshape(shape).numpy()
            spec = LinearSpec(self._C[:lo.shape[0]])
            out.append(self.verifier.run(InputSpec.box(lo, hi), spec).lower.to(self.dtype))
            self.calls += 1
        return torch.cat(out)
