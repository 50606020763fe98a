"""VNN-LIB properties: input boxes and linear output constraints.

A VNN-LIB file declares inputs ``X_i`` and outputs ``Y_j`` and asserts the *unsafe* region:
the property holds (``unsat``) when no input in the box reaches an output satisfying the
assertions. The assertions are brought to disjunctive normal form; each disjunct is an input
box (bounds on single ``X_i``) and a conjunction of linear output constraints
``c·y + d <= 0``. A disjunct is refuted when bounds prove ``c·y + d > 0`` for one of its
constraints, so each becomes a row of a :class:`LinearSpec` (``C = c``, ``threshold = -d``).
Errors name the line and the reason.

Reading is linear in the size of the file plus the size of the DNF it expands to, and uses
explicit stacks, so any nesting depth parses: tokens and s-expressions in one pass; nested
``and`` / ``or`` flattened; each atom compiled once into an input bound or an output row; an
``and`` conjoins its runs of single-disjunct operands once and distributes only over the
operands with several disjuncts. Disjuncts that share an input box share its arrays (the
common VNN-COMP shape: a box of top-level asserts and one ``or`` over output constraints).
Files may be gzip-compressed (``.vnnlib.gz``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.frontend.files import read_bytes
from boundflow.frontend.sexpr import Expr, describe, head, parse
from boundflow.ir.spec import InputSpec, LinearSpec

MAX_DISJUNCTS = 100_000


class VnnlibError(BoundFlowError):
    """A VNN-LIB file that cannot be read, with the line and the reason."""


@dataclass(frozen=True)
class Disjunct:
    """One way to violate the property: an input box and output constraints ``C·y <= -thr``
    (each row to refute: proving ``C_row·y > threshold_row`` rules the disjunct out).
    Disjuncts with the same box may share the ``lower`` / ``upper`` arrays: do not write
    into them."""

    lower: np.ndarray        # [n_inputs]
    upper: np.ndarray
    C: np.ndarray            # [n_constraints, n_outputs]
    threshold: np.ndarray    # [n_constraints]

    @property
    def empty_box(self) -> bool:
        return bool(np.any(self.lower > self.upper))


@dataclass(frozen=True)
class Property:
    """``strict_bounds``: every strict input bound of the file, ``(index, upper, value)``
    (``X_index < value`` where ``upper``, else ``> value``). The boxes hold them closed,
    which proofs may (the box only grows); a counterexample must not lie on one
    (``strictly_inside``)."""

    n_inputs: int
    n_outputs: int
    disjuncts: tuple[Disjunct, ...]
    strict_bounds: tuple[tuple[int, bool, float], ...] = ()

    def strictly_inside(self, x: np.ndarray, dtype=np.float64) -> np.ndarray:
        """``x`` (flat, float64) moved off every strict bound it lies on or beyond (a
        falsifier clips its points to the closed box) to the nearest value of ``dtype``
        (the model's input precision: a float32 model reads 1 - 2^-53 as 1) strictly
        inside."""
        x = np.array(x, np.float64).reshape(-1)
        for i, upper, v in self.strict_bounds:
            with np.errstate(over="ignore"):      # beyond float32: inf, never admitted
                f = np.asarray(v, dtype)
            if upper and x[i] >= v:
                x[i] = float(f if f < v else np.nextafter(f, dtype(-np.inf)))
            elif not upper and x[i] <= v:
                x[i] = float(f if f > v else np.nextafter(f, dtype(np.inf)))
        return x

    def admits(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Whether input ``x`` with output ``y`` (flat) violates the property: inside a
        disjunct's box, off every strict bound, every row of that disjunct met."""
        x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
        if any((x[i] >= v) if upper else (x[i] <= v) for i, upper, v in self.strict_bounds):
            return False
        return any(bool(np.all(d.lower <= x) and np.all(x <= d.upper)
                        and np.all(d.C @ y <= d.threshold)) for d in self.disjuncts)

    def groups(self) -> list[tuple[InputSpec, LinearSpec, list[tuple[int, int]]]]:
        """Disjuncts sharing an input box, as (box, all their rows as one spec, row ranges
        per disjunct). Disjuncts with an empty box are left out (they are unsatisfiable)."""
        by_box: dict[bytes, list[Disjunct]] = {}
        keys: dict[tuple[int, int], bytes] = {}     # shared arrays are hashed once
        for d in self.disjuncts:
            if not d.empty_box:
                ids = (id(d.lower), id(d.upper))
                if ids not in keys:
                    keys[ids] = d.lower.tobytes() + d.upper.tobytes()
                by_box.setdefault(keys[ids], []).append(d)
        out = []
        for ds in by_box.values():
            rows, thr, ranges, start = [], [], [], 0
            for d in ds:
                rows.append(d.C)
                thr.append(d.threshold)
                ranges.append((start, start + len(d.C)))
                start += len(d.C)
            C = np.concatenate(rows) if start else np.zeros((0, self.n_outputs))
            box = InputSpec.box(ds[0].lower[None], ds[0].upper[None])
            spec = LinearSpec(C[None], np.concatenate(thr)[None] if start else 0.0) \
                if start else None
            out.append((box, spec, ranges))
        return out


# --- variables and linear terms ------------------------------------------------------------

_VARIABLE = re.compile(r"([XY])_(\d+)")
_Linear = tuple[dict[str, float], float]        # (coefficient per variable, constant)


class _Variables:
    """The declared inputs ``X_i`` and outputs ``Y_j`` by name."""

    def __init__(self) -> None:
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self.strict: set[tuple[int, bool, float]] = set()   # strict input bounds, see Property

    def declare(self, e: Expr) -> None:
        if len(e) != 3 or not all(isinstance(t, str) for t in e[1:]):
            raise VnnlibError(f"line {e.line}: expected (declare-const NAME Real)")
        name, kind = e[1], e[2]
        if kind != "Real":
            raise VnnlibError(f"line {e.line}: {name} has sort {kind}; only Real is supported")
        m = _VARIABLE.fullmatch(name)
        if not m:
            raise VnnlibError(f"line {e.line}: variable {name!r} must be named X_i or Y_j")
        if name in self.inputs or name in self.outputs:     # an error in SMT-LIB too
            raise VnnlibError(f"line {e.line}: {name} is declared a second time")
        (self.inputs if m.group(1) == "X" else self.outputs)[name] = int(m.group(2))

    def leaf(self, tok: str, line: int) -> _Linear:
        """A variable or a finite number as a linear term."""
        if tok in self.inputs or tok in self.outputs:
            return {tok: 1.0}, 0.0
        try:
            value = float(tok)
        except ValueError:
            raise VnnlibError(f"line {line}: {tok!r} is neither a declared variable nor "
                              f"a number") from None
        if not np.isfinite(value):
            raise VnnlibError(f"line {line}: {tok!r} is not a finite number")
        return {}, value

    def linear(self, term, line: int) -> _Linear:
        """``term`` (a leaf or nested ``+``, ``-``, ``*``) as a linear term, evaluated
        bottom-up with an explicit stack; ``line`` is the line of the enclosing atom."""
        if isinstance(term, str):
            return self.leaf(term, line)
        values: list[_Linear] = []
        stack: list[tuple[object, int, bool]] = [(term, line, False)]
        while stack:
            e, at, ready = stack.pop()
            if isinstance(e, str):
                values.append(self.leaf(e, at))
            elif ready:
                n = len(e) - 1
                args = values[-n:]
                del values[-n:]
                values.append(_ARITHMETIC[e[0]](args, e.line))
            elif head(e) in _ARITHMETIC and len(e) >= 2:
                stack.append((e, at, True))
                stack.extend((x, e.line, False) for x in reversed(e[1:]))
            else:
                raise VnnlibError(f"line {e.line}: unsupported term {describe(e)} (expected "
                                  f"+, -, * with at least one argument, a variable or a number)")
        return values[0]


def _sum(terms: list[_Linear], signs: list[float]) -> _Linear:
    """``Σ sign·term``. The largest coefficient dict (each term owns its dict) takes the
    others in, so a long chain of nested sums costs time linear in its length."""
    big = max(range(len(terms)), key=lambda i: len(terms[i][0]))
    coef = terms[big][0]
    if signs[big] < 0:
        coef = {k: -v for k, v in coef.items()}
    for i, (c, _) in enumerate(terms):
        if i != big:
            for k, v in c.items():
                coef[k] = coef.get(k, 0.0) + signs[i] * v
    const = 0.0
    for (_, k), s in zip(terms, signs):
        const += s * k
    return coef, const


def _product(terms: list[_Linear], line: int) -> _Linear:
    """A product with at most one factor that is not a constant."""
    scale, factor = 1.0, None
    for coef, const in terms:
        if not coef:
            scale *= const
        elif factor is None:
            factor = coef, const
        else:
            raise VnnlibError(f"line {line}: product of two variables is not linear")
    if factor is None:
        return {}, scale
    return {k: v * scale for k, v in factor[0].items()}, factor[1] * scale


def _minus(terms: list[_Linear], line: int) -> _Linear:
    return _sum(terms, [-1.0] if len(terms) == 1 else [1.0] + [-1.0] * (len(terms) - 1))


_ARITHMETIC = {"+": lambda terms, line: _sum(terms, [1.0] * len(terms)),
               "-": _minus, "*": _product}


# --- atoms: input bounds and output rows ---------------------------------------------------

@dataclass(frozen=True)
class _Bound:
    """``X_index <= value`` (``upper``) or ``X_index >= value``."""

    index: int
    upper: bool
    value: float


@dataclass(frozen=True)
class _Row:
    """``Σ vals·Y[cols] + const <= 0``; refuted by proving the sum ``> thr = -const`` (a
    strict row's ``thr``: the float64 just below ``-const``, see ``_constraint``)."""

    cols: tuple[int, ...]
    vals: tuple[float, ...]
    thr: float


_Constraint = Union[_Bound, _Row, bool]          # a bool: a constant atom, True or False
_COMPARISONS = ("<=", ">=", "<", ">")


def _constraint(e: Expr, variables: _Variables) -> _Constraint:
    """An atom ``(op lhs rhs)`` as ``coef·v + const <= 0``, classified. A strict output
    row ``Σ < thr`` keeps the float64 just below ``thr`` as its threshold: in float64, ``Σ
    <= that`` is ``Σ < thr`` (equality is no counterexample: ``relu(x) < 0`` never holds,
    though ``x = 0`` meets ``<=``), and a lower bound above it is at least ``thr``, which
    refutes the row. A strict input bound is read as non-strict (the box only grows) and
    recorded (``Property.strict_bounds``: a counterexample on it is moved inside or
    dropped)."""
    if len(e) != 3:
        raise VnnlibError(f"line {e.line}: {e[0]} takes two arguments")
    a, b = variables.linear(e[1], e.line), variables.linear(e[2], e.line)
    if e[0] in ("<=", "<"):
        a, b = b, a
    coef = b[0]                                  # b - a <= 0 for (>= a b)
    for k, v in a[0].items():
        coef[k] = coef.get(k, 0.0) - v
    coef = {k: v for k, v in coef.items() if v != 0}
    const = b[1] - a[1]
    strict = e[0] in ("<", ">")
    xs = [k for k in coef if k in variables.inputs]
    if xs and len(xs) != len(coef):
        raise VnnlibError(f"line {e.line}: a constraint mixing inputs and outputs "
                          f"is not supported")
    if xs:
        if len(xs) != 1:
            raise VnnlibError(f"line {e.line}: input constraints must bound one "
                              f"variable (a box)")
        a_i = coef[xs[0]]
        bound = _Bound(variables.inputs[xs[0]], a_i > 0, -const / a_i)
        if strict:
            variables.strict.add((bound.index, bound.upper, bound.value))
        return bound
    if coef:
        thr = float(np.nextafter(-const, -np.inf)) if strict else -const
        return _Row(tuple(variables.outputs[k] for k in coef), tuple(coef.values()), thr)
    return const < 0 if strict else const <= 0


# --- disjunctive normal form ---------------------------------------------------------------

@dataclass(frozen=True)
class _Conj:
    """A compiled conjunction: the input box (``None``: no input bound; arrays may be shared
    and are never written), the output rows in order, and whether an atom is constant
    false."""

    lower: np.ndarray | None
    upper: np.ndarray | None
    rows: tuple[_Row, ...]
    false: bool


def _conjoin(items: Iterable[_Conj | _Constraint], nx: int) -> _Conj:
    """The conjunction of compiled conjunctions and constraints, rows kept in order."""
    rows: list[_Row] = []
    boxes: list[_Conj] = []
    bounds: list[_Bound] = []
    false = False
    for it in items:
        if isinstance(it, _Conj):
            rows.extend(it.rows)
            false = false or it.false
            if it.lower is not None:
                boxes.append(it)
        elif isinstance(it, _Row):
            rows.append(it)
        elif isinstance(it, _Bound):
            bounds.append(it)
        elif it is False:
            false = True
    lower, upper = _box(boxes, bounds, nx)
    return _Conj(lower, upper, tuple(rows), false)


def _box(boxes: list[_Conj], bounds: list[_Bound], nx: int
         ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The intersection of boxes and single-variable bounds; one box alone is shared."""
    if not bounds and len(boxes) <= 1:
        return (boxes[0].lower, boxes[0].upper) if boxes else (None, None)
    lower, upper = np.full(nx, -np.inf), np.full(nx, np.inf)
    for c in boxes:
        np.maximum(lower, c.lower, out=lower)
        np.minimum(upper, c.upper, out=upper)
    for b in bounds:
        if b.upper:
            upper[b.index] = min(upper[b.index], b.value)
        else:
            lower[b.index] = max(lower[b.index], b.value)
    return lower, upper


def _operands(items: Iterable, op: str, line: int) -> list[tuple[object, int]]:
    """``items`` with nested ``op`` expressions spliced in, in order (iterative), each with
    the line of the expression it was written in (``line`` for ``items`` themselves)."""
    out, todo = [], [(e, line) for e in reversed(list(items))]
    while todo:
        e, at = todo.pop()
        if head(e) == op:
            todo.extend((x, e.line) for x in reversed(e[1:]))
        else:
            out.append((e, at))
    return out


class _Frame:
    """An ``and`` / ``or`` being converted: its operands and the values of those done."""

    __slots__ = ("op", "line", "operands", "values")

    def __init__(self, op: str, line: int, operands: list[tuple[object, int]]) -> None:
        self.op, self.line, self.operands = op, line, operands
        self.values: list[_Constraint | list[_Conj]] = []


def _dnf(formulas: list[tuple[object, int]], variables: _Variables) -> list[_Conj]:
    """The conjunction of ``formulas`` (each with its line) as a list of compiled
    conjunctions, depth-first with an explicit stack of frames."""
    nx = len(variables.inputs)
    stack = [_Frame("and", 0, [])]
    for e, line in formulas:
        stack[0].operands.extend(_operands([e], "and", line))
    while True:
        frame = stack[-1]
        if len(frame.values) < len(frame.operands):
            e, line = frame.operands[len(frame.values)]
            op = head(e)
            if op in ("and", "or"):
                stack.append(_Frame(op, e.line, _operands(e[1:], op, e.line)))
            elif op in _COMPARISONS:
                frame.values.append(_constraint(e, variables))
            else:
                line = e.line if isinstance(e, Expr) else line
                raise VnnlibError(f"line {line}: unsupported connective {describe(e)} "
                                  f"(expected and, or, <=, >=, <, >)")
            continue
        stack.pop()
        conjs = (_distribute if frame.op == "and" else _union)(frame, nx)
        if not stack:
            return conjs
        stack[-1].values.append(conjs)


def _too_many(line: int) -> VnnlibError:
    return VnnlibError(f"line {line}: the formula expands to more than {MAX_DISJUNCTS} disjuncts "
                       f"in disjunctive normal form; split the property into several files")


def _union(frame: _Frame, nx: int) -> list[_Conj]:
    """An ``or``: the disjuncts of its operands, in order."""
    out: list[_Conj] = []
    for v in frame.values:
        if isinstance(v, list):
            out.extend(v)
        else:
            out.append(_conjoin([v], nx))
        if len(out) > MAX_DISJUNCTS:
            raise _too_many(frame.line)
    return out


def _distribute(frame: _Frame, nx: int) -> list[_Conj]:
    """An ``and``: each run of operands with one disjunct is conjoined once; the product is
    taken over the rest only, its size checked (naming the operand that passes the cap)
    before it is built."""
    parts: list[list[_Conj]] = []
    run: list = []
    size = 1
    for v, (e, line) in zip(frame.values, frame.operands):
        if isinstance(v, list) and len(v) != 1:
            size *= len(v)
            if size > MAX_DISJUNCTS:
                raise _too_many(e.line if isinstance(e, Expr) else line)
            if run:
                parts.append([_conjoin(run, nx)])
                run = []
            parts.append(v)
        else:
            run.append(v[0] if isinstance(v, list) else v)
    if size == 0:
        return []                                # an empty ``or`` is false
    if run or not parts:
        parts.append([_conjoin(run, nx)])
    if len(parts) == 1:
        return parts[0]
    return [_conjoin(combo, nx) for combo in itertools.product(*parts)]


# --- the property --------------------------------------------------------------------------

def _disjunct(c: _Conj, variables: _Variables, ny: int) -> Disjunct:
    """A compiled conjunction as a :class:`Disjunct`; every input must be bounded."""
    nx = len(variables.inputs)
    lower = np.full(nx, -np.inf) if c.lower is None else c.lower
    upper = np.full(nx, np.inf) if c.upper is None else c.upper
    for side, arr, missing in (("lower", lower, -np.inf), ("upper", upper, np.inf)):
        unbounded = np.flatnonzero(arr == missing)
        if unbounded.size:
            raise VnnlibError(f"every input needs a lower and an upper bound in each "
                              f"disjunct: X_{unbounded[0]} has no {side} bound")
    if c.false:                                  # a constant false atom: the box is empty
        lower = np.full(nx, np.inf)
    C = np.zeros((len(c.rows), ny))
    for r, row in enumerate(c.rows):
        C[r, list(row.cols)] = row.vals
    return Disjunct(lower, upper, C, np.array([row.thr for row in c.rows], dtype=float))


def _read(text: str) -> tuple[_Variables, list]:
    """The declarations and the asserted formulas of ``text``."""
    variables, asserts = _Variables(), []
    for e in parse(text, VnnlibError):
        command = head(e)
        if command == "declare-const":
            variables.declare(e)
        elif command == "assert":
            if len(e) != 2:
                raise VnnlibError(f"line {e.line}: assert takes one formula")
            asserts.append((e[1], e.line))
        else:
            raise VnnlibError(f"line {e.line}: expected declare-const or assert, got "
                              f"{describe(e)}")
    return variables, asserts


def parse_vnnlib(text: str, n_inputs: int | None = None, n_outputs: int | None = None
                 ) -> Property:
    """Parse VNN-LIB text; sizes are checked against ``n_inputs`` / ``n_outputs`` if given.
    Raises :class:`VnnlibError` naming the line and the reason for anything it cannot read,
    including a formula of more than :data:`MAX_DISJUNCTS` disjuncts."""
    variables, asserts = _read(text)
    nx, ny = len(variables.inputs), len(variables.outputs)
    for kind, names, n in (("X", variables.inputs, nx), ("Y", variables.outputs, ny)):
        if sorted(names.values()) != list(range(n)):
            raise VnnlibError(f"{kind} variables must be numbered 0..{n - 1} without gaps")
    if n_inputs is not None and nx != n_inputs:
        raise VnnlibError(f"the property declares {nx} inputs but the model takes {n_inputs}")
    if n_outputs is not None and ny != n_outputs:
        raise VnnlibError(f"the property declares {ny} outputs but the model has {n_outputs}")
    if not asserts:
        raise VnnlibError("the property has no assert")
    conjs = _dnf(asserts, variables)
    return Property(nx, ny, tuple(_disjunct(c, variables, ny) for c in conjs),
                    tuple(sorted(variables.strict)))


def load_vnnlib(path: str | Path, n_inputs: int | None = None, n_outputs: int | None = None
                ) -> Property:
    """Read a VNN-LIB file, plain or gzip-compressed (see :func:`parse_vnnlib`); every
    error is a :class:`VnnlibError` whose message starts with the path."""
    path = Path(path)
    data = read_bytes(path, VnnlibError, "property file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VnnlibError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    try:
        return parse_vnnlib(text, n_inputs, n_outputs)
    except VnnlibError as e:
        raise VnnlibError(f"{path}: {e}") from None
