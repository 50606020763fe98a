"""Search: the tuning space of a workload, strategies over it, objectives, and the tuner
loop.

Names are resolved on first use (PEP 562), so ``boundflow.search.lookup`` (verification time)
and ``boundflow.search.objective`` load neither XGBoost nor OR-Tools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Objective", "ObjectiveError"], "boundflow.search.objective"),
    **dict.fromkeys(["Decision", "TuneSpace"], "boundflow.search.space"),
    **dict.fromkeys(["STRATEGIES", "make"], "boundflow.search.strategies"),
    **dict.fromkeys(["COST_MODEL", "DEFAULT_OBJECTIVE", "Tuner", "TuneReport"],
                    "boundflow.search.tuner"),
}

__all__ = ["Decision", "TuneSpace", "STRATEGIES", "make", "COST_MODEL", "DEFAULT_OBJECTIVE",
           "Objective", "ObjectiveError", "Tuner", "TuneReport"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'boundflow.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
