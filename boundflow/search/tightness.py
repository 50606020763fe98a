"""What the tuner knows of a plan's bound width before measuring it.

The width of a plan's bounds depends only on its *bounds signature*: the pre-activations a
backward (CROWN) or forward pass tightens (those IBP does not bound exactly already), the
final method and the relaxation options. Fusion, layout, interval form, storage, lowering,
schedule and backend change how fast the same bounds come, not the bounds (up to float
rounding, which the objective's ``width_slack`` absorbs). So, for ``time@width``:

* a plan with the baseline's signature is exactly as tight as the baseline;
* a plan whose signature a measured plan shares is as tight as that plan was measured;
* any other plan gets the width head's prediction pooled (averaged) over the candidates of
  its signature scored together. The head's error between plans of one signature is large
  (on the digits CNN at batch 1, 117 sampled plans of the default's signature were
  predicted from -0.50 to +0.07 in log width around the default, though all are equally
  tight), so one plan's own prediction would let a looser plan pass as tight by chance.
  The pooled mean still errs (there by -0.12 to +0.26 in log width per signature), so a
  search that measures may be ``optimistic``: an unmeasured signature is taken as that
  much tighter, its best plan gets measured once, and from then on its width is known.
  A pick that is never measured (zero-shot) takes the pooled mean as it is.
* a signature that only gives up tightening the baseline does (an IBP final bound for a
  CROWN one, IBP intervals where the baseline's backward or forward passes tighten: "more
  CROWN is never looser" turned around) is at best as tight, and in practice looser: it
  counts as at least ``LOOSER`` looser than the baseline until measured, with no
  optimism (the width head once put ACAS Xu's IBP-final Relax plans as tight as the
  CROWN default's, and zero-shot picked one).

:class:`WidthPrior` applies these rules to the width head's predictions (in the model's
units: ``ref_log_width`` is its prediction for the baseline).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from boundflow.ir.analysis import ibp_exact_nodes
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle

Signature = tuple

LOOSER = 0.01          # log width a dominated, unmeasured signature is taken to lose at least
_FINAL_ORDER = {"ibp": 0, "crown": 1, "alpha-crown": 2}


def signature(bundle: PlanBundle, exact: frozenset[str]) -> Signature:
    """What determines ``bundle``'s bounds (``exact``: the pre-activations IBP bounds
    exactly, where every domain gives the same interval). ``sparse=True`` (IBP-unstable
    neurons only) may loosen later bounds, so it is part of it; auto and ``False`` are
    the same bounds. The nodes tightened are ``domains.crown``'s ``crown_nodes`` and
    ``forward_nodes`` with their domains, from ``exact`` computed once per search."""
    d = bundle.domain_plan
    tightened = tuple(sorted((n, dom) for n, dom in d.intermediate
                             if dom != "ibp" and n not in exact))
    return tightened, d.final, d.lower_slope, d.alpha, d.sparse is True


def dominated(sig: Signature, base: Signature) -> bool:
    """Whether ``sig`` differs from ``base`` only by tightening less: its final method no
    tighter, every pre-activation it tightens tightened the same way by ``base``, the same
    relaxation options."""
    tightened, final, slope, alpha, sparse = sig
    b_tightened, b_final, b_slope, b_alpha, b_sparse = base
    if sig == base or (slope, sparse) != (b_slope, b_sparse):
        return False
    rank = _FINAL_ORDER.get
    if rank(final) is None or rank(b_final) is None or rank(final) > rank(b_final):
        return False
    if final == b_final == "alpha-crown" and alpha != b_alpha:
        return False                 # other optimiser settings: no order
    return set(tightened) <= set(b_tightened)


def _usable(width: float | None) -> bool:
    return width is not None and math.isfinite(width) and width > 0


class WidthPrior:
    """Log widths of candidate plans from the width head's predictions, corrected by the
    signature rules above. ``graph``: the normalised graph the plans' node names refer to;
    ``baseline``: the plan every width is compared with, whose measured width
    :meth:`reference` sets (the objective's own floor)."""

    def __init__(self, graph: Graph, baseline: PlanBundle):
        self.exact = frozenset(ibp_exact_nodes(graph))
        self.baseline = signature(baseline, self.exact)
        self._own: dict[Signature, float] = {}       # this search's measurements
        self._others: dict[Signature, float] = {}    # read from the database (widest)
        self._baseline_width: float | None = None

    def signature(self, bundle: PlanBundle) -> Signature:
        return signature(bundle, self.exact)

    def reference(self, mean_width: float | None) -> None:
        """The baseline's measured mean width (ignored unless finite and > 0)."""
        if _usable(mean_width):
            self._baseline_width = float(mean_width)

    def observe(self, bundle: PlanBundle, mean_width: float | None, own: bool = True) -> None:
        """A measured plan's mean width (ignored unless finite and > 0). Plans of one
        signature differ by rounding only; per signature the widest is kept. ``own=False``:
        a row another run wrote to a shared database, used only for a signature this search
        has not measured itself (such a row may come from a bad writer)."""
        if not _usable(mean_width):
            return
        into = self._own if own else self._others
        sig = self.signature(bundle)
        into[sig] = max(into.get(sig, 0.0), float(mean_width))

    def measured(self, sig: Signature) -> float | None:
        """The measured mean width of signature ``sig``, if any (this search's first)."""
        return self._own.get(sig, self._others.get(sig))

    def log_widths(self, bundles: Sequence[PlanBundle], predicted: np.ndarray,
                   ref_log_width: float | None, optimistic: float = 0.0,
                   slack: float = 0.0) -> np.ndarray:
        """``predicted`` (the width head, one per bundle) with the baseline's signature at
        ``ref_log_width``, measured signatures at their measured width relative to the
        baseline's, signatures that only tighten less at least ``LOOSER`` beyond the
        objective's ``slack``, and the rest pooled per signature, less ``optimistic``."""
        predicted = np.asarray(predicted, dtype=float)
        out = predicted.copy()
        if ref_log_width is None or len(bundles) == 0:
            return out
        sigs = [self.signature(b) for b in bundles]
        pooled: dict[Signature, list[int]] = {}
        for i, sig in enumerate(sigs):
            pooled.setdefault(sig, []).append(i)
        for sig, idx in pooled.items():
            if sig == self.baseline:
                out[idx] = ref_log_width
            elif (w := self.measured(sig)) is not None and self._baseline_width is not None:
                out[idx] = ref_log_width + math.log(w / self._baseline_width)
            elif dominated(sig, self.baseline):
                out[idx] = max(float(np.mean(predicted[idx])),
                               ref_log_width + slack + LOOSER)
            else:
                out[idx] = float(np.mean(predicted[idx])) - optimistic
        return out
