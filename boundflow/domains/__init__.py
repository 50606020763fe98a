"""The mathematics of bound propagation: one table of per-op rules per method."""

from boundflow.domains.interval import Interval, ibp

__all__ = ["Interval", "ibp"]
