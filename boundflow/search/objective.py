"""What a tuning run minimises: ``Objective.parse("time@width")`` and friends.

``time`` (fastest, whatever the tightness), ``time@width`` (fastest among plans whose mean
bound width is no worse than the default plan's: the default), ``time@mem:BYTES`` (fastest
within a peak-memory budget of BYTES > 0), ``mix:A,B`` (minimise log time + A·log width +
B·log peak bytes; A and B finite, >= 0, not both 0). An objective is validated whole when it is
made, so a bad one fails before any measuring, naming the valid forms.

:func:`beats_default` is the one test of whether a tuned plan replaces the default path of
``verify``: measured in the same runner pass, its objective must be better and its whole call
faster by ``MIN_SPEEDUP`` (3%), whatever the objective (``verify --db`` never runs a plan
slower than the default path), so that a tie within the noise never hands over a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.measure.result import MeasureResult

KINDS = ("time", "time@width", "time@mem", "mix")
MIN_SPEEDUP = 1.03              # a tuned plan must be 3% faster than the default path
VALID_FORMS = ("time, time@width, time@mem:BYTES (BYTES a finite number >= 1) or mix:A,B "
               "(A, B finite and >= 0, not both 0)")


class ObjectiveError(BoundFlowError):
    """An objective that is not one of the valid forms."""


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Objective:
    kind: str = "time@width"              # one of KINDS
    memory_budget: int | None = None      # bytes, time@mem
    width_weight: float = 0.0             # A, mix
    memory_weight: float = 0.0            # B, mix
    width_slack: float = 1e-4             # float32 plans differ by rounding

    def __post_init__(self):
        def bad(why: str) -> ObjectiveError:
            return ObjectiveError(f"objective {self.name!r}: {why}; valid forms: {VALID_FORMS}")
        if self.kind not in KINDS:
            raise ObjectiveError(f"objective kind {self.kind!r} is not one of {KINDS}; valid "
                                 f"forms: {VALID_FORMS}")
        if self.kind == "time@mem":
            b = self.memory_budget
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise bad(f"the memory budget must be a whole number of bytes >= 1, not {b!r}")
        elif self.memory_budget is not None:
            raise bad("only time@mem takes a memory budget")
        weights = (self.width_weight, self.memory_weight)
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                   for w in weights):
            raise bad(f"mix weights must be finite and >= 0, not {weights}")
        if self.kind == "mix" and not any(weights):
            raise bad("mix weights must not both be 0 (that is the objective time)")
        if self.kind != "mix" and any(weights):
            raise bad("only mix takes weights")
        if not (isinstance(self.width_slack, (int, float)) and math.isfinite(self.width_slack)
                and self.width_slack >= 0):
            raise bad(f"width_slack must be finite and >= 0, not {self.width_slack!r}")

    @classmethod
    def parse(cls, text: str) -> "Objective":
        """The objective ``text`` names; :class:`ObjectiveError` (one line, listing the valid
        forms) when it names none."""
        if not isinstance(text, str):
            raise ObjectiveError(f"objective {text!r} is not a string; valid forms: "
                                 f"{VALID_FORMS}")
        t = text.strip()
        if t in ("time", "time@width"):
            return cls(t)
        if t.startswith("time@mem:"):
            v = _number(t.split(":", 1)[1])
            if v is None or not math.isfinite(v) or v < 1:
                raise ObjectiveError(f"objective {text!r}: the memory budget must be a finite "
                                     f"number of bytes >= 1; valid forms: {VALID_FORMS}")
            return cls("time@mem", memory_budget=int(v))
        if t.startswith("mix:"):
            parts = [_number(p) for p in t.split(":", 1)[1].split(",")]
            if len(parts) != 2 or None in parts:
                raise ObjectiveError(f"objective {text!r}: mix takes two numbers A,B; valid "
                                     f"forms: {VALID_FORMS}")
            a, b = parts
            if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0) or a == b == 0:
                raise ObjectiveError(f"objective {text!r}: mix weights must be finite, >= 0 and "
                                     f"not both 0; valid forms: {VALID_FORMS}")
            return cls("mix", width_weight=a, memory_weight=b)
        raise ObjectiveError(f"objective {text!r} is not one of the valid forms: {VALID_FORMS}")

    @property
    def name(self) -> str:
        if self.kind == "time@mem":
            return f"time@mem:{self.memory_budget}"
        if self.kind == "mix":
            return f"mix:{self.width_weight:g},{self.memory_weight:g}"
        return self.kind

    def measured(self, r: MeasureResult, reference: MeasureResult | None) -> float:
        """The objective of a measurement (lower is better; ``inf`` when it failed or breaks a
        constraint)."""
        if not r.ok or r.median_s is None or r.median_s <= 0:
            return math.inf
        value = math.log(r.median_s)
        if self.kind == "time@width":
            ref = None if reference is None else reference.mean_width
            if ref is not None and (r.mean_width is None
                                    or r.mean_width > ref * (1 + self.width_slack) + 1e-12):
                return math.inf
        elif self.kind == "time@mem":
            if r.peak_bytes is None or r.peak_bytes > self.memory_budget:
                return math.inf
        elif self.kind == "mix":
            if r.mean_width is None or r.peak_bytes is None:
                return math.inf
            value += self.width_weight * math.log(max(r.mean_width, 1e-30)) + \
                self.memory_weight * math.log(max(r.peak_bytes, 1))
        return value

    def predicted(self, heads: dict[str, np.ndarray], ref_log_width: float | None
                  ) -> np.ndarray:
        """The objective from predicted heads; a predicted constraint violation is a
        penalty (so the ranking still orders the violators)."""
        value = heads["log_time"].copy()
        if self.kind == "time@width" and ref_log_width is not None:
            excess = heads["log_width"] - (ref_log_width + self.width_slack)
            value += np.where(excess > 0, 5.0 + 50.0 * excess, 0.0)
        elif self.kind == "time@mem":
            excess = heads["log_mem"] - math.log(self.memory_budget)
            value += np.where(excess > 0, 5.0 + excess, 0.0)
        elif self.kind == "mix":
            value += self.width_weight * heads["log_width"] + \
                self.memory_weight * heads["log_mem"]
        return value


def beats_default(value: float | None, baseline_value: float | None, best_s: float | None,
                  baseline_s: float | None, min_speedup: float = MIN_SPEEDUP) -> bool:
    """Whether a plan replaces the default path of ``verify``, measured together in one
    runner pass: its objective ``value`` below the default's ``baseline_value``, and its
    whole call (``best_s``) at least ``min_speedup`` times faster than the default's
    (``baseline_s``)."""
    known = [v for v in (value, baseline_value, best_s, baseline_s) if v is not None]
    if len(known) < 4 or not all(math.isfinite(v) for v in known) or best_s <= 0:
        return False
    return value < baseline_value and baseline_s / best_s >= min_speedup
