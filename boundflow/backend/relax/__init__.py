"""The TVM Relax backend: a TIR PrimFunc per task, called from one Relax function
(``executor.py``), scheduled per target from the plan's schedule knobs (``schedules.py``,
legal values in ``schedule_space.py``), compiled once per plan (``cache.py``)."""
