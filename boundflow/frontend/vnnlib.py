"""VNN-LIB properties: input boxes and linear output constraints.

A VNN-LIB file declares inputs ``X_i`` and outputs ``Y_j`` and asserts the *unsafe* region:
the property holds (``unsat``) when no input in the box reaches an output satisfying the
assertions. The assertions are brought to disjunctive normal form; each disjunct is an input
box (bounds on single ``X_i``) and a conjunction of linear output constraints
``c·y + d <= 0``. A disjunct is refuted when bounds prove ``c·y + d > 0`` for one of its
constraints, so each becomes a row of a :class:`LinearSpec` (``C = c``, ``threshold = -d``).
Errors name the line and the reason.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.ir.spec import InputSpec, LinearSpec

MAX_DISJUNCTS = 100_000


class VnnlibError(BoundFlowError):
    """A VNN-LIB file that cannot be read, with the line and the reason."""


@dataclass(frozen=True)
class Disjunct:
    """One way to violate the property: an input box and output constraints ``C·y <= -thr``
    (each row to refute: proving ``C_row·y > threshold_row`` rules the disjunct out)."""

    lower: np.ndarray        # [n_inputs]
    upper: np.ndarray
    C: np.ndarray            # [n_constraints, n_outputs]
    threshold: np.ndarray    # [n_constraints]

    @property
    def empty_box(self) -> bool:
        return bool(np.any(self.lower > self.upper))


@dataclass(frozen=True)
class Property:
    n_inputs: int
    n_outputs: int
    disjuncts: tuple[Disjunct, ...]

    def groups(self) -> list[tuple[InputSpec, LinearSpec, list[tuple[int, int]]]]:
        """Disjuncts sharing an input box, as (box, all their rows as one spec, row ranges
        per disjunct). Disjuncts with an empty box are left out (they are unsatisfiable)."""
        by_box: dict[bytes, list[Disjunct]] = {}
        for d in self.disjuncts:
            if not d.empty_box:
                by_box.setdefault(d.lower.tobytes() + d.upper.tobytes(), []).append(d)
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


_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def _tokens(text: str):
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        for tok in _TOKEN.findall(line):
            yield tok, lineno


def _parse_sexprs(text: str) -> list:
    """Nested lists of (token, line) leaves; each list carries its opening line."""
    stack: list[list] = [[]]
    lines: list[int] = []
    for tok, lineno in _tokens(text):
        if tok == "(":
            stack.append([])
            lines.append(lineno)
        elif tok == ")":
            if len(stack) == 1:
                raise VnnlibError(f"line {lineno}: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(_Expr(done, lines.pop()))
        else:
            stack[-1].append((tok, lineno))
    if len(stack) != 1:
        raise VnnlibError(f"line {lines[-1]}: '(' is never closed")
    return stack[0]


class _Expr(list):
    def __init__(self, items, line):
        super().__init__(items)
        self.line = line


def _head(e) -> str:
    return e[0][0] if isinstance(e, _Expr) and e and isinstance(e[0], tuple) else ""


def _line(e) -> int:
    return e.line if isinstance(e, _Expr) else e[1]


class _Reader:
    def __init__(self):
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}

    def declare(self, e) -> None:
        if len(e) != 3 or not all(isinstance(t, tuple) for t in e[1:]):
            raise VnnlibError(f"line {e.line}: expected (declare-const NAME Real)")
        name, kind = e[1][0], e[2][0]
        if kind != "Real":
            raise VnnlibError(f"line {e.line}: {name} has sort {kind}; only Real is supported")
        m = re.fullmatch(r"([XY])_(\d+)", name)
        if not m:
            raise VnnlibError(f"line {e.line}: variable {name!r} must be named X_i or Y_j")
        (self.inputs if m.group(1) == "X" else self.outputs)[name] = int(m.group(2))

    def linear(self, e) -> tuple[dict[str, float], float]:
        """A term as (coefficients by variable, constant)."""
        if isinstance(e, tuple):
            tok, line = e
            if tok in self.inputs or tok in self.outputs:
                return {tok: 1.0}, 0.0
            try:
                return {}, float(tok)
            except ValueError:
                raise VnnlibError(f"line {line}: {tok!r} is neither a declared variable nor "
                                  f"a number") from None
        op = _head(e)
        terms = [self.linear(t) for t in e[1:]]
        if op == "+" or (op == "-" and len(terms) >= 1):
            coef, const = dict(terms[0][0]), terms[0][1]
            sign = -1.0 if op == "-" else 1.0
            if op == "-" and len(terms) == 1:
                return {k: -v for k, v in coef.items()}, -const
            for c2, k2 in terms[1:]:
                for k, v in c2.items():
                    coef[k] = coef.get(k, 0.0) + sign * v
                const += sign * k2
            return coef, const
        if op == "*":
            coef, const = {}, 1.0
            for c2, k2 in terms:
                if c2 and coef:
                    raise VnnlibError(f"line {e.line}: product of two variables is not linear")
                if c2:
                    coef = {k: v * const for k, v in c2.items()}
                    const = None
                elif const is None:
                    coef = {k: v * k2 for k, v in coef.items()}
                else:
                    const *= k2
            return (coef, 0.0) if const is None else ({}, const)
        raise VnnlibError(f"line {_line(e)}: unsupported term {op or e!r}")

    def dnf(self, e) -> list[list]:
        """The formula as a list of conjunctions of atoms."""
        op = _head(e)
        if op == "and":
            parts = [self.dnf(x) for x in e[1:]]
            out = [sum(combo, []) for combo in itertools.product(*parts)]
        elif op == "or":
            out = [c for x in e[1:] for c in self.dnf(x)]
        elif op in ("<=", ">=", "<", ">"):
            if len(e) != 3:
                raise VnnlibError(f"line {e.line}: {op} takes two arguments")
            out = [[e]]
        else:
            raise VnnlibError(f"line {_line(e)}: unsupported connective {op or e!r} "
                              f"(expected and, or, <=, >=, <, >)")
        if len(out) > MAX_DISJUNCTS:
            raise VnnlibError(f"line {_line(e)}: more than {MAX_DISJUNCTS} disjuncts")
        return out

    def atom(self, e) -> tuple[dict[str, float], float]:
        """``lhs op rhs`` as ``coef·v + const <= 0``."""
        a, b = self.linear(e[1]), self.linear(e[2])
        if e[0][0] in ("<=", "<"):
            a, b = b, a
        coef = dict(b[0])                      # b - a <= 0 for (>= a b)
        for k, v in a[0].items():
            coef[k] = coef.get(k, 0.0) - v
        return {k: v for k, v in coef.items() if v != 0}, b[1] - a[1]


def parse_vnnlib(text: str, n_inputs: int | None = None, n_outputs: int | None = None
                 ) -> Property:
    """Parse VNN-LIB text; sizes are checked against ``n_inputs`` / ``n_outputs`` if given."""
    reader = _Reader()
    asserts = []
    for e in _parse_sexprs(text):
        head = _head(e)
        if head == "declare-const":
            reader.declare(e)
        elif head == "assert":
            if len(e) != 2:
                raise VnnlibError(f"line {e.line}: assert takes one formula")
            asserts.append(e[1])
        else:
            raise VnnlibError(f"line {_line(e)}: expected declare-const or assert, got "
                              f"{head or e!r}")
    nx, ny = len(reader.inputs), len(reader.outputs)
    for kind, names, n in (("X", reader.inputs, nx), ("Y", reader.outputs, ny)):
        if sorted(names.values()) != list(range(n)):
            raise VnnlibError(f"{kind} variables must be numbered 0..{n - 1} without gaps")
    if n_inputs is not None and nx != n_inputs:
        raise VnnlibError(f"the property declares {nx} inputs but the model takes {n_inputs}")
    if n_outputs is not None and ny != n_outputs:
        raise VnnlibError(f"the property declares {ny} outputs but the model has {n_outputs}")
    if not asserts:
        raise VnnlibError("the property has no assert")
    formula = reader.dnf(_Expr([("and", 0), *asserts], 0))
    disjuncts = []
    for conj in formula:
        lo, hi = np.full(nx, -np.inf), np.full(nx, np.inf)
        rows, thr = [], []
        for atom in conj:
            coef, const = reader.atom(atom)
            xs = [k for k in coef if k in reader.inputs]
            ys = [k for k in coef if k in reader.outputs]
            if xs and ys:
                raise VnnlibError(f"line {atom.line}: a constraint mixing inputs and outputs "
                                  f"is not supported")
            if xs:
                if len(xs) != 1:
                    raise VnnlibError(f"line {atom.line}: input constraints must bound one "
                                      f"variable (a box)")
                i, a = reader.inputs[xs[0]], coef[xs[0]]
                bound = -const / a                      # a·x + const <= 0
                if a > 0:
                    hi[i] = min(hi[i], bound)
                else:
                    lo[i] = max(lo[i], bound)
            elif ys:
                row = np.zeros(ny)
                for k, v in coef.items():
                    row[reader.outputs[k]] = v
                rows.append(row)
                thr.append(-const)              # refute c·y + const <= 0 by c·y > -const
            elif const > 0:                     # a constant false atom: disjunct is empty
                lo[:] = np.inf
        if np.any(lo == -np.inf) or np.any(hi == np.inf):
            raise VnnlibError("every input needs a lower and an upper bound in each disjunct")
        disjuncts.append(Disjunct(lo, hi, np.array(rows).reshape(len(rows), ny),
                                  np.array(thr, dtype=float)))
    return Property(nx, ny, tuple(disjuncts))


def load_vnnlib(path: str | Path, n_inputs: int | None = None, n_outputs: int | None = None
                ) -> Property:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VnnlibError(f"{path}: cannot read the property file: {e}") from None
    try:
        return parse_vnnlib(text, n_inputs, n_outputs)
    except VnnlibError as e:
        raise VnnlibError(f"{path}: {e}") from None
