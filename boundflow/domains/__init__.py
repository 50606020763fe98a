"""The mathematics of bound propagation: one table of per-op rules per method."""

from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.driver import final_bounds, reference_bounds
from boundflow.domains.interval import Interval, ibp

__all__ = ["AlphaConfig", "Interval", "final_bounds", "ibp", "reference_bounds"]
