"""What the builder and runners take and return: frozen, JSON round-trippable records.

A :class:`MeasureInput` is one candidate: a PlanBundle, the model graph it was planned on, the
query it is measured on (an input box and, when the workload has specs, ``C``) and the backend.
A :class:`BuildResult` is the builder's answer (an artifact path or an error), a
:class:`MeasureResult` the runner's: times of the whole call as ``verify`` makes it (host box
and ``C`` in, bounds out) and, beside them, of the kernels alone; memory, tightness, kernels,
compile seconds; or an error with its kind. Errors are values here, never exceptions, so a search goes on past them.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.spec import proven

ERROR_KINDS = ("build", "run", "timeout", "crash", "memory", "unsupported")


class WorkerError(Exception):
    """An exception inside a worker, carried to the parent as its type name and message."""


@dataclass(frozen=True)
class MeasureInput:
    """One candidate to build and measure."""

    bundle: PlanBundle
    graph: Graph
    lower: np.ndarray                 # the input box of the query, [batch, *input]
    upper: np.ndarray
    C: np.ndarray | None = None       # [batch, n_specs, n_out] when the workload has specs
    backend: str = "relax"
    # executor run options with a BoundCache: ("cache_bounds", True), ("reuse_ibp", True)
    run_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        from boundflow.backend import create

        create(self.backend)                    # names the registered backends if not one
        bad = [k for k, _ in self.run_options if k not in ("cache_bounds", "reuse_ibp")]
        if bad:
            raise BoundFlowError(f"run options {bad} are not cache_bounds / reuse_ibp")

    @property
    def target(self) -> str:
        return self.bundle.workload.target

    @property
    def key(self) -> str:
        """The candidate's identity: its plan (which holds the workload and knobs)."""
        return self.bundle.key


@dataclass(frozen=True)
class BuildResult:
    artifact: str | None              # compile-cache root holding the module (relax), or None
    compile_seconds: float = 0.0
    n_kernels: int = 0
    error_kind: str | None = None
    error: str | None = None
    # the build was stopped because the caller's time ran out (``build(..., seconds=)``), not
    # for anything the candidate did: a tuner records nothing for it
    cut: bool = False


def machine() -> str:
    """A short description of this machine (host, processor, Python)."""
    return f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()


@dataclass(frozen=True)
class MeasureResult:
    """One measured candidate. Times are seconds per call of the whole plan as ``verify``
    makes it (the host box and ``C`` in, the bounds out on the host, conversions included):
    ``times`` holds the ``repeat`` per-call means, ``median_s`` their median (what objectives
    use). ``kernel_s`` is the median time of the compiled code alone (the Relax VM's
    ``time_evaluator``; for a backend that compiles nothing, the call itself).
    ``peak_source`` says whether ``peak_bytes`` was measured (torch backend) or is the plan's
    planned storage (relax: the VM owns its memory)."""

    candidate: str                    # MeasureInput.key
    backend: str
    target: str
    error_kind: str | None = None     # one of ERROR_KINDS, None when measured
    error: str | None = None
    median_s: float | None = None
    mean_s: float | None = None
    std_s: float | None = None
    times: tuple[float, ...] = ()
    peak_bytes: int | None = None
    peak_source: str | None = None    # "measured" or "planned"
    mean_width: float | None = None   # mean of upper - lower over every bound
    verified_fraction: float | None = None   # samples whose every spec's lower bound > 0
    n_kernels: int | None = None
    compile_seconds: float | None = None
    kernel_s: float | None = None
    runner: str = "local"
    machine: str = field(default_factory=machine)
    timestamp: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.error_kind is not None and self.error_kind not in ERROR_KINDS:
            raise BoundFlowError(f"error kind {self.error_kind!r} is not one of {ERROR_KINDS}")
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @classmethod
    def failed(cls, inp_key: str, backend: str, target: str, kind: str, error: str,
               **extra: Any) -> "MeasureResult":
        return cls(inp_key, backend, target, error_kind=kind, error=error[-2000:], **extra)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["times"] = list(self.times)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "MeasureResult":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown or "candidate" not in d:
            raise BoundFlowError(f"not a measure result: unknown fields {sorted(unknown)}"
                                 if unknown else "not a measure result: no candidate")
        return cls(**{k: (tuple(v) if k == "times" else v) for k, v in d.items()})

    @classmethod
    def from_json(cls, text: str) -> "MeasureResult":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BoundFlowError(f"not a measure result: {e}") from None
        return cls.from_dict(d)


def summarise(times: list[float]) -> dict[str, Any]:
    arr = np.asarray(times, np.float64)
    return {"median_s": float(np.median(arr)), "mean_s": float(arr.mean()),
            "std_s": float(arr.std()) if len(arr) > 1 else 0.0, "times": tuple(arr.tolist())}


def tightness(lower, upper, has_specs: bool) -> dict[str, float | None]:
    """Mean bound width and, with specs, the fraction of samples all of whose specs are
    proved (lower bound > 0 beyond rounding: :func:`~boundflow.ir.spec.proven`, in the
    bound's own precision)."""
    ok = proven(np.asarray(lower), 0.0)
    lo = np.asarray(lower, np.float64)
    hi = np.asarray(upper, np.float64)
    width = float(np.mean(hi - lo))
    out: dict = {"mean_width": width if math.isfinite(width) else None}
    if has_specs:
        out["verified_fraction"] = float(np.mean(np.all(ok.reshape(ok.shape[0], -1), axis=1)))
    return out
