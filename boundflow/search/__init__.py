"""Search: the tuning space of a workload, strategies over it, and the tuner loop."""

from boundflow.search.space import Decision, TuneSpace
from boundflow.search.strategies import STRATEGIES, make
from boundflow.search.tuner import COST_MODEL, DEFAULT_OBJECTIVE, Objective, Tuner, TuneReport

__all__ = ["Decision", "TuneSpace", "STRATEGIES", "make", "COST_MODEL", "DEFAULT_OBJECTIVE",
           "Objective", "Tuner", "TuneReport"]
