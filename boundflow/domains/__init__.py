"""The mathematics of bound propagation: one table of per-op rules per method."""

from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.crown import crown
from boundflow.domains.interval import Interval, ibp

__all__ = ["AlphaConfig", "Interval", "crown", "ibp"]
