"""Checking a VNN-LIB property on a model, with VNN-COMP verdicts.

``unsat``: bounds prove every disjunct of the unsafe region empty. ``sat``: the falsifier
found an input of the box whose output, recomputed on the model, lies in the unsafe region.
``unknown`` otherwise, ``timeout`` when the budget ran out first. A wrong verdict is never
given: ``unsat`` rests on sound bounds, ``sat`` on a checked counterexample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from boundflow.api import BoundOptions, bound_spec
from boundflow.attack import AttackConfig, find_counterexample
from boundflow.domains.concrete import evaluate
from boundflow.errors import BoundFlowError
from boundflow.frontend.vnnlib import Property
from boundflow.ir.graph import Graph


@dataclass(frozen=True)
class PropertyResult:
    status: str                                  # unsat / sat / unknown / timeout
    counterexample: tuple[np.ndarray, np.ndarray] | None = None   # (x, y) flattened
    seconds: float = 0.0
    refuted: int = 0                             # disjuncts proven empty
    disjuncts: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def vnncomp(self) -> str:
        """The result file of VNN-COMP: the status, and for ``sat`` the assignment."""
        if self.status != "sat" or self.counterexample is None:
            return self.status + "\n"
        x, y = self.counterexample
        lines = [f"(X_{i} {v!r})" for i, v in enumerate(x.tolist())]
        lines += [f"(Y_{j} {v!r})" for j, v in enumerate(y.tolist())]
        return "sat\n(" + "\n ".join(lines) + ")\n"


def check_property(graph: Graph, prop: Property, options: BoundOptions = BoundOptions("crown"),
                   timeout: float | None = None, attack: AttackConfig | None = AttackConfig(),
                   confirm: Callable[[np.ndarray], np.ndarray] | None = None) -> PropertyResult:
    """Decide ``prop`` on ``graph``. ``confirm`` maps a flat input to the model's flat output
    (e.g. the ONNX reference runtime) to re-check a counterexample on the original model."""
    start = time.perf_counter()
    n_in, n_out = int(np.prod(graph.input_shape)), int(np.prod(graph.output_shape))
    if prop.n_inputs != n_in or prop.n_outputs != n_out:
        raise BoundFlowError(f"the property has {prop.n_inputs} inputs and {prop.n_outputs} "
                             f"outputs; the model has {n_in} and {n_out}")
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    refuted = sum(d.empty_box for d in prop.disjuncts)
    open_disjuncts = []
    dtype = torch.float64 if graph.dtype == "float64" else torch.float32
    for box, spec, ranges in prop.groups():
        if timeout is not None and elapsed() > timeout:
            return PropertyResult("timeout", seconds=elapsed(), refuted=refuted,
                                  disjuncts=len(prop.disjuncts))
        shaped = type(box)(box.lower.reshape((1,) + graph.input_shape),
                           box.upper.reshape((1,) + graph.input_shape))
        proven = np.zeros(0, dtype=bool)
        if spec is not None:
            bounds = bound_spec(graph, shaped, spec, options, dtype)
            proven = bounds.lower.numpy()[0] > spec.threshold[0]
        for a, b in ranges:
            if b > a and proven[a:b].any():
                refuted += 1
            else:
                open_disjuncts.append((shaped, spec, a, b))
    if not open_disjuncts:
        return PropertyResult("unsat", seconds=elapsed(), refuted=refuted,
                              disjuncts=len(prop.disjuncts))
    if attack is not None:
        for box, spec, a, b in open_disjuncts:
            if timeout is not None and elapsed() > timeout:
                break
            C = spec.C[0, a:b] if spec is not None else np.zeros((0, n_out))
            thr = spec.threshold[0, a:b] if spec is not None else np.zeros(0)
            x = find_counterexample(graph, box.lower[0], box.upper[0], C, thr, attack)
            if x is None:
                continue
            y = evaluate(graph, torch.as_tensor(x[None])).flatten().numpy()
            if confirm is not None:
                y = np.asarray(confirm(x.reshape(-1)), dtype=np.float64).reshape(-1)
            if np.all(C @ y <= thr):
                return PropertyResult("sat", (x.reshape(-1), y), elapsed(), refuted,
                                      len(prop.disjuncts))
    status = "timeout" if timeout is not None and elapsed() > timeout else "unknown"
    return PropertyResult(status, seconds=elapsed(), refuted=refuted,
                          disjuncts=len(prop.disjuncts))


def onnx_runner(path) -> Callable[[np.ndarray], np.ndarray]:
    """The model's own output at a flat input, by ONNX's reference evaluator (the file, plain
    or gzip, is read and the evaluator built on first use: only a counterexample needs it)."""
    state: dict = {}

    def load() -> dict:
        import onnx
        from onnx.reference import ReferenceEvaluator

        from boundflow.frontend.onnx import read_model

        model = read_model(path)
        inits = {t.name for t in model.graph.initializer}
        inp = [i for i in model.graph.input if i.name not in inits][0]
        state.update(
            sess=ReferenceEvaluator(model), name=inp.name,
            shape=[d.dim_value or 1 for d in inp.type.tensor_type.shape.dim],
            elem=onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        return state

    def run(x: np.ndarray) -> np.ndarray:
        s = state or load()
        (y, *_) = s["sess"].run(None, {s["name"]: x.reshape(s["shape"]).astype(s["elem"])})
        return np.asarray(y).reshape(-1)
    return run
