"""What is being verified: an input box and a linear property of the output.

An :class:`InputSpec` is a box ``lower <= x <= upper`` per sample (batch first). A
:class:`LinearSpec` asks for bounds of ``C·y`` (``C`` of shape ``[batch, n_specs, n_out]``,
``y`` the flattened output) and holds when ``C·y > threshold`` for every ``y`` in the image of
the box. Both are plain values that validate themselves on construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from boundflow.errors import SpecError


def _float_array(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a CUDA tensor or a ragged list
        raise SpecError(f"{what} could not be read as an array: {e}") from None
    if arr.dtype.kind not in "fiub":
        raise SpecError(f"{what} must hold numbers, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(arr.sum()) or np.isfinite(arr).all()     # the sum: cheap test
    if not finite:
        raise SpecError(f"{what} contains NaN or inf")
    return arr


@dataclass(frozen=True, eq=False)
class InputSpec:
    """The input region: ``lower <= x <= upper`` elementwise, arrays of shape ``[batch, *in]``.

    Build it with :meth:`box` or :meth:`linf`; the constructor checks shapes, finiteness and
    ``lower <= upper``.
    """

    lower: np.ndarray
    upper: np.ndarray

    def __post_init__(self):
        lower = _float_array(self.lower, "input lower bound")
        upper = _float_array(self.upper, "input upper bound")
        if lower.shape != upper.shape:
            raise SpecError(f"lower bound shape {lower.shape} != upper bound shape {upper.shape}")
        if lower.ndim < 2:
            raise SpecError(f"input box of shape {lower.shape} needs a batch dimension first")
        if lower.shape[0] == 0 or lower.size == 0:
            raise SpecError(f"input box of shape {lower.shape} is empty: give at least one "
                            f"sample")
        if (lower > upper).any():
            bad = np.argwhere(lower > upper)
            i = tuple(int(v) for v in bad[0])
            raise SpecError(f"lower > upper at index {i}: {lower[i]} > {upper[i]} "
                            f"({len(bad)} entries in all)")
        dtype = np.result_type(lower, upper)
        object.__setattr__(self, "lower", lower.astype(dtype, copy=False))
        object.__setattr__(self, "upper", upper.astype(dtype, copy=False))

    @classmethod
    def box(cls, lower: Any, upper: Any) -> "InputSpec":
        return cls(lower, upper)

    @classmethod
    def linf(cls, center: Any, eps: Any, clip: tuple[float, float] | None = None) -> "InputSpec":
        """The L∞ ball of radius ``eps`` (a scalar or an array broadcastable to ``center``)
        around ``center``, intersected with ``[clip[0], clip[1]]`` when ``clip`` is given."""
        if clip is None and type(center) is np.ndarray and center.dtype.kind == "f" \
                and center.ndim >= 2 and np.ndim(eps) == 0 \
                and isinstance(eps, (float, int, np.floating, np.ndarray)) \
                and not isinstance(eps, bool) and np.asarray(eps).dtype.kind in "fiu":
            # the common query (a float batch and one radius), checked in one pass: a box
            # whose ends sum to a finite number has finite entries; anything else takes the
            # checks that name the problem. The radius enters in the centre's precision.
            e = float(eps)
            if e >= 0:
                with np.errstate(over="ignore", invalid="ignore"):   # checked just below
                    lower, upper = center - e, center + e
                box = cls._ordered(lower, upper, full_check=False)
                if box is not None:
                    return box
        return cls._checked_linf(center, eps, clip)

    @classmethod
    def _checked_linf(cls, center: Any, eps: Any, clip: tuple[float, float] | None
                      ) -> "InputSpec":
        center = _float_array(center, "input center")
        eps_arr = _float_array(eps, "eps")
        if np.any(eps_arr < 0):
            raise SpecError(f"eps must be >= 0, got {eps_arr.min()}")
        try:
            lower, upper = center - eps_arr, center + eps_arr
        except ValueError:
            raise SpecError(f"eps of shape {eps_arr.shape} does not broadcast onto the "
                            f"input of shape {center.shape}") from None
        if lower.shape != center.shape:
            raise SpecError(f"eps of shape {eps_arr.shape} changes the input shape "
                            f"{center.shape} to {lower.shape}")
        if clip is not None:
            lo, hi = float(clip[0]), float(clip[1])
            if not lo <= hi:
                raise SpecError(f"clip range {clip} has lower > upper")
            if np.any(center < lo) or np.any(center > hi):
                raise SpecError(f"the input center lies outside the clip range {clip}")
            lower, upper = np.clip(lower, lo, hi), np.clip(upper, lo, hi)
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow fails _ordered
            lower = lower.astype(center.dtype, copy=False)
            upper = upper.astype(center.dtype, copy=False)
        return cls._ordered(lower, upper)

    @classmethod
    def _ordered(cls, lower: np.ndarray, upper: np.ndarray, full_check: bool = True
                 ) -> "InputSpec | None":
        """A box whose ``lower <= upper`` holds by construction (and whose arrays are float
        arrays of one dtype): only what can still be wrong is checked, cheaply; anything
        unusual takes the full check of the constructor, which names the problem (with
        ``full_check=False``: None, for a caller whose own checks name it better)."""
        with np.errstate(over="ignore", invalid="ignore"):
            ok = (lower.ndim >= 2 and lower.shape[0] > 0 and lower.size > 0
                  and np.isfinite(lower.sum() + upper.sum()))
        if not ok:
            return cls(lower, upper) if full_check else None
        box = object.__new__(cls)
        object.__setattr__(box, "lower", lower)
        object.__setattr__(box, "upper", upper)
        return box

    @property
    def batch(self) -> int:
        return self.lower.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.lower.shape[1:])

    @property
    def center(self) -> np.ndarray:
        return (self.lower + self.upper) / 2


@dataclass(frozen=True, eq=False)
class LinearSpec:
    """Bound ``C·y``; the property holds where ``C·y > threshold``.

    ``C`` has shape ``[batch, n_specs, n_out]``; ``threshold`` broadcasts to
    ``[batch, n_specs]`` (default 0).
    """

    C: np.ndarray
    threshold: np.ndarray | float = 0.0

    def __post_init__(self):
        C = _float_array(self.C, "spec matrix C")
        if C.ndim != 3:
            raise SpecError(f"C must have shape [batch, n_specs, n_out], got {C.shape}")
        t = self.threshold
        if (type(t) is float and math.isfinite(t)) or (type(t) is int and -2**63 <= t < 2**63):
            # the common one number: no array to check
            object.__setattr__(self, "C", C)
            object.__setattr__(self, "threshold", np.full(C.shape[:2], float(t)))
            return
        thr = _float_array(t, "spec threshold")
        try:
            thr = np.broadcast_to(thr, C.shape[:2]).copy()
        except ValueError:
            raise SpecError(f"threshold of shape {thr.shape} does not broadcast to "
                            f"[batch, n_specs] = {C.shape[:2]}") from None
        object.__setattr__(self, "C", C)
        object.__setattr__(self, "threshold", thr)

    @property
    def n_specs(self) -> int:
        return self.C.shape[1]

    def check(self, batch: int, n_out: int) -> None:
        """Raise :class:`SpecError` unless this spec fits ``batch`` samples of ``n_out`` outputs."""
        b, _, width = self.C.shape
        if width != n_out:
            raise SpecError(f"C has width {width} but the model has {n_out} outputs; "
                            f"C must have shape [batch, n_specs, {n_out}]")
        if b != batch:
            raise SpecError(f"C has batch {b} but the input box has batch {batch}")


# The bound arithmetic rounds to nearest, not outward: a lower bound computed in float32 may
# exceed the true one by a few units in the last place of the values it sums (a CROWN bound
# 1.3e-7 above a threshold that a point of the box misses by 1e-7 was seen). A spec counts as
# proven only by a margin above that: this many units of the bound's precision, relative to
# the bound's and the threshold's magnitude (at least 1).
ROUNDING_ULPS = 64


def proof_margin(lower: Any, threshold: Any) -> Any:
    """``lower - threshold`` less the rounding allowance of ``lower``'s precision (see
    ``ROUNDING_ULPS``): > 0 proves ``C·y > threshold``. Numpy arrays or torch tensors (the
    dtype read from ``lower``)."""
    return lower - threshold - ROUNDING_ULPS * _eps(lower.dtype) * (
        abs(lower) + abs(threshold) + 1.0)


def _eps(dtype: Any) -> float:
    """The unit roundoff of a float dtype, numpy's or torch's (float64's for any other)."""
    if getattr(dtype, "is_floating_point", False):           # a torch dtype
        import torch

        return float(torch.finfo(dtype).eps)
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def proven(lower: Any, threshold: Any) -> Any:
    """Whether each lower bound proves its spec (``C·y > threshold``) beyond rounding."""
    return proof_margin(lower, threshold) > 0


def margin_spec(labels: Sequence[int] | np.ndarray, n_classes: int) -> LinearSpec:
    """The robustness margin: ``y[label] - y[j] > 0`` for every other class ``j`` (ascending).

    Gives ``C`` of shape ``[batch, n_classes - 1, n_classes]``.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iu":
        raise SpecError(f"labels must be integers, got dtype {labels.dtype}")
    if n_classes < 2:
        raise SpecError(f"a margin spec needs at least 2 classes, got {n_classes}")
    if np.any(labels < 0) or np.any(labels >= n_classes):
        raise SpecError(f"labels {labels.tolist()} must lie in [0, {n_classes})")
    C = np.zeros((len(labels), n_classes - 1, n_classes))
    for b, label in enumerate(labels):
        others = [j for j in range(n_classes) if j != label]
        C[b, :, label] = 1.0
        C[b, np.arange(n_classes - 1), others] = -1.0
    return LinearSpec(C)
