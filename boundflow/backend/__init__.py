"""Backends turn a PlanBundle into something that runs: ``torch`` (torch ops, any plan) and
``relax`` (TVM Relax with TIR kernels). Reach one through ``create(name)`` (``base.py``)."""

from boundflow.backend.base import Backend, create, names, register, run_bounds

__all__ = ["Backend", "create", "names", "register", "run_bounds"]
