"""Checking a VNN-LIB property on a model, with VNN-COMP verdicts.

First the bounds of each input box (one plan run per box), then the falsifier on the
disjuncts left open, then branch-and-bound on them (``boundflow.bab``; input splitting where
the input is low-dimensional). ``unsat``: bounds prove every disjunct of the unsafe region
empty (on the whole box or on every sub-box). ``sat``: an input of the box whose output,
recomputed on the model, lies in the unsafe region. ``unknown`` otherwise, ``timeout`` when
the budget ran out first. A wrong verdict is never given: ``unsat`` rests on sound bounds
over boxes rounded outward to the bound's precision, ``sat`` on a checked counterexample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from boundflow.api import BoundOptions, bound_spec
from boundflow.attack import AttackConfig, find_counterexample
from boundflow.bab import BabConfig, choose_strategy, input_split, relu_split
from boundflow.bab.bounder import float_box
from boundflow.ir.spec import InputSpec, proven
from boundflow.domains.concrete import evaluate
from boundflow.errors import BoundFlowError
from boundflow.frontend.vnnlib import Property
from boundflow.ir.graph import Graph

log = logging.getLogger("boundflow.vnncomp")


@dataclass(frozen=True)
class PropertyResult:
    status: str                                  # unsat / sat / unknown / timeout
    counterexample: tuple[np.ndarray, np.ndarray] | None = None   # (x, y) flattened
    seconds: float = 0.0
    refuted: int = 0                             # disjuncts proven empty
    disjuncts: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    strategy: str = "none"                       # the branch-and-bound that ran, if any
    domains: int = 0                             # domains it bounded
    bound_calls: int = 0                         # plan runs it made
    refined: int = 0                             # domains input splitting bounded again

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
                   confirm: Callable[[np.ndarray], np.ndarray] | None = None,
                   bab: BabConfig | None = BabConfig(), db=None) -> PropertyResult:
    """Decide ``prop`` on ``graph`` (:func:`_decide`). Under strict input bounds (the boxes
    hold them closed, and a falsifier clips to the box) a ``sat`` answer's input is checked
    as the model reads it (rounded to its input precision), then one step of that precision
    inside the strict bounds it lies on; if neither violates the property: ``unknown``."""
    result = _decide(graph, prop, options, timeout, attack, confirm, bab, db)
    if result.status != "sat" or not prop.strict_bounds or result.counterexample is None:
        return result
    # the input as the model reads it (a float32 model reads 1 - 2^-30 as 1), then inside
    dtype = np.float64 if graph.dtype == "float64" else np.float32
    with np.errstate(over="ignore"):
        read = np.asarray(result.counterexample[0], np.float64).astype(dtype).astype(np.float64)
    inside = prop.strictly_inside(read, dtype)
    for x in (read,) if np.array_equal(inside, read) else (read, inside):
        y = _output(graph, x, confirm)
        if prop.admits(x, y):
            return replace(result, counterexample=(x, y))
    return replace(result, status="unknown", counterexample=None, notes=result.notes + (
        "a counterexample lay on a strict input bound, and one step inside it is none",))


def _decide(graph: Graph, prop: Property, options: BoundOptions, timeout: float | None,
            attack: AttackConfig | None, confirm: Callable[[np.ndarray], np.ndarray] | None,
            bab: BabConfig | None, db) -> PropertyResult:
    """Decide ``prop`` on ``graph``, strict input bounds read as closed. ``confirm`` maps a
    flat input to the model's flat output (e.g. the ONNX reference runtime) to re-check a
    counterexample on the original model.
    Each input box is bounded once by ``options`` and the falsifier tries the disjuncts left
    open; with ReLU splitting the search (by ``bab.method``) then takes what is still open.
    Where the strategy resolves to input splitting the search does it all: its first plan
    run bounds each whole box and its falsifier starts there. ``bab`` None (or strategy
    ``none``): no search. ``db``: a tuning database holding
    a plan for the search's bound workload."""
    start = time.perf_counter()
    n_in, n_out = int(np.prod(graph.input_shape)), int(np.prod(graph.output_shape))
    if prop.n_inputs != n_in or prop.n_outputs != n_out:
        raise BoundFlowError(f"the property has {prop.n_inputs} inputs and {prop.n_outputs} "
                             f"outputs; the model has {n_in} and {n_out}")
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    refuted = sum(d.empty_box for d in prop.disjuncts)
    n_disjuncts = len(prop.disjuncts)
    dtype = torch.float64 if graph.dtype == "float64" else torch.float32
    groups = prop.groups()
    for box, _, ranges in groups:
        if any(a == b for a, b in ranges):
            # a disjunct without output constraints: every point of its box violates it
            hit = _checker(graph, confirm, elapsed, refuted, n_disjuncts)(
                box.center.reshape(-1), np.zeros((0, n_out)), np.zeros(0))
            if hit is not None:
                return hit
    has_relu = any(n.op == "relu" for n in graph.nodes)
    strategy = "none" if bab is None else choose_strategy(bab, n_in, has_relu)
    if strategy == "input" and all(spec is not None for _, spec, _ in groups):
        # the search's first plan run bounds each whole box and its falsifier starts there
        everything = [(box, spec, a, b) for box, spec, ranges in groups for a, b in ranges]
        return _branch(graph, "input", everything, bab, db, timeout, elapsed,
                       _checker(graph, confirm, elapsed, refuted, n_disjuncts), refuted,
                       n_disjuncts)
    by_whole_box, open_disjuncts, expired = whole_boxes(
        graph, groups, options, dtype, None if timeout is None else lambda: elapsed() > timeout)
    refuted += by_whole_box
    if expired:
        return PropertyResult("timeout", seconds=elapsed(), refuted=refuted,
                              disjuncts=n_disjuncts)
    if not open_disjuncts:
        return PropertyResult("unsat", seconds=elapsed(), refuted=refuted,
                              disjuncts=n_disjuncts)

    found = _checker(graph, confirm, elapsed, refuted, n_disjuncts)
    if attack is not None:
        for box, spec, a, b in open_disjuncts:
            if timeout is not None and elapsed() > timeout:
                break
            C = spec.C[0, a:b] if spec is not None else np.zeros((0, n_out))
            thr = spec.threshold[0, a:b] if spec is not None else np.zeros(0)
            x = find_counterexample(graph, box.lower[0], box.upper[0], C, thr, attack)
            if x is not None and (res := found(x, C, thr)) is not None:
                return res
    if strategy == "relu" and has_relu and all(spec is not None for _, spec, _, _ in
                                               open_disjuncts):
        return _branch(graph, "relu", open_disjuncts, bab, db, timeout, elapsed, found,
                       refuted, n_disjuncts)
    status = "timeout" if timeout is not None and elapsed() > timeout else "unknown"
    return PropertyResult(status, seconds=elapsed(), refuted=refuted, disjuncts=n_disjuncts)


def whole_boxes(graph: Graph, groups, options: BoundOptions, dtype: torch.dtype,
                expired: Callable[[], bool] | None = None) -> tuple[int, list, bool]:
    """Each input box of ``groups`` (:meth:`Property.groups`) bounded once by ``options``:
    (disjuncts refuted, the open ones as ``(box, spec, a, b)`` in the property's order,
    whether ``expired()`` said between boxes that the time was up: then the first two are
    of the boxes bounded before)."""
    refuted, open_disjuncts = 0, []
    for box, spec, ranges in groups:
        if expired is not None and expired():
            return refuted, open_disjuncts, True
        refutes = np.zeros(0, dtype=bool)
        if spec is not None:
            lo, hi = float_box(box.lower, box.upper, dtype)
            shaped = InputSpec.box(lo.numpy().reshape((1,) + graph.input_shape),
                                   hi.numpy().reshape((1,) + graph.input_shape))
            bounds = bound_spec(graph, shaped, spec, options, dtype, upper=False)
            refutes = proven(bounds.lower.numpy()[0], spec.threshold[0])
        for a, b in ranges:
            if b > a and refutes[a:b].any():
                refuted += 1
            else:
                open_disjuncts.append((box, spec, a, b))
    return refuted, open_disjuncts, False


def searches(open_disjuncts) -> list[tuple]:
    """The open disjuncts as one search per input box: ``(box, C, threshold, ranges)``,
    the rows of the box's open disjuncts in order, ``ranges`` each disjunct's rows in ``C``
    (the bound workload of that box's branch-and-bound has ``len(C)`` rows)."""
    by_box: dict[int, list] = {}
    for item in open_disjuncts:
        by_box.setdefault(id(item[0]), []).append(item)
    out = []
    for items in by_box.values():
        box, spec = items[0][0], items[0][1]
        C = np.concatenate([spec.C[0, a:b] for _, _, a, b in items])
        thr = np.concatenate([spec.threshold[0, a:b] for _, _, a, b in items])
        ranges, start = [], 0
        for _, _, a, b in items:
            ranges.append((start, start + b - a))
            start += b - a
        out.append((box, C, thr, ranges))
    return out


def _output(graph: Graph, x: np.ndarray, confirm) -> np.ndarray:
    """The model's flat output at ``x`` in float64 (``confirm``'s, on the original model,
    where given)."""
    x = np.asarray(x, np.float64)
    if confirm is not None:
        return np.asarray(confirm(x.reshape(-1)), dtype=np.float64).reshape(-1)
    return evaluate(graph, torch.as_tensor(x.reshape((1,) + graph.input_shape))
                    ).flatten().numpy()


def _checker(graph: Graph, confirm, elapsed, refuted: int, n_disjuncts: int):
    """``found(x, C, thr)``: the ``sat`` result of input ``x`` when its output, in float64
    (and on the original model by ``confirm``), meets every row ``C·y <= thr``; else None."""
    def found(x: np.ndarray, C: np.ndarray, thr: np.ndarray) -> PropertyResult | None:
        x = np.asarray(x, np.float64)
        y = _output(graph, x, confirm)
        if np.all(C @ y <= thr):
            return PropertyResult("sat", (x.reshape(-1), y), elapsed(), refuted, n_disjuncts)
        return None
    return found


def _branch(graph: Graph, strategy: str, open_disjuncts, bab: BabConfig, db, timeout, elapsed,
            found, refuted: int, n_disjuncts: int) -> PropertyResult:
    """Branch-and-bound (``input`` or ``relu`` splitting) on the open disjuncts, one search
    per input box."""
    domains = calls = refined = 0
    deadline = None if timeout is None else time.monotonic() + timeout - elapsed()
    for box, C, thr, ranges in searches(open_disjuncts):
        hits: list[PropertyResult] = []       # the confirmed counterexample, checked once

        def confirm(x: np.ndarray) -> bool:
            hit = next((h for a, b in ranges if (h := found(x, C[a:b], thr[a:b])) is not None),
                       None)
            if hit is not None:
                hits.append(hit)
            return hit is not None
        if strategy == "input":
            res = input_split(graph, box.lower[0], box.upper[0], C, thr, ranges, bab,
                              deadline=deadline, confirm=confirm, db=db)
        else:
            res = relu_split(graph, box.lower[0], box.upper[0], C, thr, ranges, bab,
                             deadline=deadline, confirm=confirm, db=db)
        domains, calls = domains + res.domains, calls + res.bound_calls
        refined += res.refined
        stats = dict(strategy=strategy, domains=domains, bound_calls=calls, refined=refined)
        if res.status == "sat" and hits:
            return PropertyResult("sat", hits[-1].counterexample, elapsed(), refuted,
                                  n_disjuncts, **stats)
        if res.status != "unsat":
            notes = (res.reason,) if res.reason else ()
            return PropertyResult(res.status if res.status != "sat" else "unknown",
                                  seconds=elapsed(), refuted=refuted, disjuncts=n_disjuncts,
                                  notes=notes, **stats)
        refuted += len(ranges)
    return PropertyResult("unsat", seconds=elapsed(), refuted=refuted, disjuncts=n_disjuncts,
                          strategy=strategy, domains=domains, bound_calls=calls,
                          refined=refined)


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


@dataclass(frozen=True)
class InstanceResult:
    """One row of a benchmark run: the verdict, and where the time went (``load_s``: reading
    the model and property; ``solve_s``: deciding it)."""

    onnx: str
    vnnlib: str
    expected: str
    result: PropertyResult
    load_s: float
    total_s: float

    @property
    def wrong(self) -> bool:
        decided = {"sat", "unsat"}
        return self.result.status in decided and self.expected in decided and \
            self.result.status != self.expected


_MAX_CSV_BYTES = 16 << 20
_EXPECTED = ("", "sat", "unsat", "unknown")


def read_instances(path) -> list[tuple[str, str, float, str]]:
    """``instances.csv`` rows as (onnx, vnnlib, timeout, expected); with or without the
    header line of the shared benchmarks, expected optional (VNN-COMP's own files have
    three columns)."""
    import csv
    from pathlib import Path

    from boundflow.frontend.files import read_text

    rows = []
    text = read_text(path, BoundFlowError, "instances file", _MAX_CSV_BYTES)
    for i, row in enumerate(csv.reader(text.splitlines()), 1):
        row = [c.strip() for c in row]
        if not row or not any(row) or (i == 1 and row[0] == "onnx"):
            continue
        if len(row) < 3:
            raise BoundFlowError(f"{path}, line {i}: expected onnx,vnnlib,timeout[,expected]"
                                 f", got {len(row)} fields")
        try:
            timeout = float(row[2])
        except ValueError:
            raise BoundFlowError(f"{path}, line {i}: timeout {row[2]!r} is not a number"
                                 ) from None
        if not timeout > 0 or timeout != timeout or timeout == float("inf"):
            raise BoundFlowError(f"{path}, line {i}: timeout must be positive and finite")
        expected = row[3].lower() if len(row) > 3 else ""
        if expected not in _EXPECTED:        # a typo ("unsta") turned the WRONG check off
            raise BoundFlowError(f"{path}, line {i}: expected verdict {row[3]!r} is not one "
                                 f"of sat, unsat, unknown (or empty)")
        rows.append((row[0], row[1], timeout, expected))
    if not rows:
        raise BoundFlowError(f"{path} lists no instances")
    return rows


def run_instances(rows, root, options: BoundOptions, bab: BabConfig | None, db=None,
                  results_dir=None, on_result: Callable[[InstanceResult], None] | None = None
                  ) -> list[InstanceResult]:
    """Decide every instance in one process (imports, loaded models and compiled plans
    shared), each within its own timeout, counted from when its files are read; writes each
    VNN-COMP result file to ``results_dir`` when given. An instance whose files are bad gets
    status ``error`` (the message in its notes) and the run goes on."""
    from pathlib import Path

    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib

    root = Path(root)
    graphs: dict[str, Graph] = {}
    out = []
    for onnx_path, vnnlib_path, timeout, expected in rows:
        start = time.perf_counter()
        load_s = 0.0
        try:
            if onnx_path not in graphs:
                graphs[onnx_path] = load_onnx(root / onnx_path)
            graph = graphs[onnx_path]
            prop = load_vnnlib(root / vnnlib_path, int(np.prod(graph.input_shape)),
                               int(np.prod(graph.output_shape)))
            load_s = time.perf_counter() - start
            result = check_property(graph, prop, options, timeout=max(timeout - load_s, 1e-3),
                                    confirm=onnx_runner(root / onnx_path), bab=bab, db=db)
        except BoundFlowError as e:         # a bad instance: said, and the run goes on
            result = PropertyResult("error", seconds=time.perf_counter() - start,
                                    notes=(str(e),))
        except Exception as e:  # noqa: BLE001 - a fault of ours on one instance spares the rest
            log.exception("internal error on %s %s", onnx_path, vnnlib_path)
            result = PropertyResult("error", seconds=time.perf_counter() - start,
                                    notes=(f"internal error: {type(e).__name__}: {e}",))
        row = InstanceResult(onnx_path, vnnlib_path, expected, result, load_s,
                             time.perf_counter() - start)
        if results_dir is not None:
            name = f"{Path(onnx_path).stem}__{Path(vnnlib_path).stem}.txt"
            target = Path(results_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            # a bad instance's file says unknown: never a verdict it did not reach
            target.write_text(result.vnncomp() if result.status != "error" else "unknown\n")
        out.append(row)
        if on_result is not None:
            on_result(row)
    return out
