"""The TVM Relax backend: a TIR PrimFunc per task, called from one Relax function (work in
progress: interval tasks lower; CROWN tasks, schedules, the compile cache and CUDA follow)."""
