"""Backends turn a PlanBundle into something that runs: ``torch`` (torch ops, any plan)."""
