"""The exceptions BoundFlow raises on bad input.

Every error a user can provoke derives from :class:`BoundFlowError`, so callers need one
``except`` clause; messages name the object, the bad value and, where there is one, the fix.
"""

from __future__ import annotations


class BoundFlowError(Exception):
    """Root of every error BoundFlow raises on purpose."""


class UnsupportedOpError(BoundFlowError):
    """A model uses an operator BoundFlow has no rule for."""


class GraphError(BoundFlowError):
    """A graph is malformed: a dangling input, a shape that does not match, a bad attribute."""


class ShapeError(GraphError):
    """A tensor's shape does not match what an operator or a spec expects."""


class SpecError(BoundFlowError):
    """An input box or a linear output spec is invalid (eps < 0, lower > upper, NaN, wrong width)."""


class ModelLoadError(BoundFlowError):
    """A model file could not be read, or is not a kind BoundFlow loads."""


class DatabaseError(BoundFlowError):
    """A tuning database cannot be used: corrupt, foreign, of another schema version, or
    unreachable."""


class MeasureError(BoundFlowError):
    """A measurement could not be set up (the measuring itself records its errors instead)."""
