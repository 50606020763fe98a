"""The backend interface and its registry.

A backend turns a :class:`~boundflow.ir.plan.PlanBundle` into an executor (``run(box, C)``
returning bounds), and says what it can tune and lower: its schedule knobs per target and
which tasks it compiles. Everything outside ``backend/`` reaches a backend through
:func:`create` (``register`` / ``create`` / ``names``, as in the house style); no other code
tests backend names.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle


class Backend(Protocol):
    """What the API, the measurement harness and the tuner ask of a backend."""

    name: str
    targets: tuple[str, ...]    # target kinds it runs on
    tunes_schedules: bool       # whether the plan's schedule / lowering knobs change its code
    needs_build: bool           # whether a plan is compiled (in a builder) before it runs

    def start_seconds(self) -> float:
        """What a process that has not used this backend yet pays before its first call
        (importing a compiler runtime); 0 once paid. Weighs a tuned plan's per-call saving
        against it."""

    def check_target(self, target: str) -> None:
        """Raise a :class:`BoundFlowError` naming the problem unless plans for ``target`` can
        run on this machine."""

    def executor(self, bundle: PlanBundle, graph: Graph, target: str = "llvm",
                 cache: Any = None) -> Any:
        """An object whose ``run(box, C, ...)`` gives the bounds of ``bundle`` on ``graph``
        (``cache``: where compiled code is kept, for backends that compile). A caller that
        reads only the lower bounds runs it with ``upper=False`` where ``run`` takes that
        keyword (:func:`run_bounds`): the upper bounds may then be looser (never unsound)."""

    def schedule_space(self, target: str = "llvm") -> dict[str, tuple[Any, ...]]:
        """Per-task schedule knobs and their legal values (the default first); empty when
        the backend has none."""

    def schedule_presets(self, target: str = "llvm") -> tuple[dict[str, Any], ...]:
        """Known-good settings of the schedule knobs, measured early by the tuner."""

    def compiles(self, bundle: PlanBundle, task: Any, graph: Graph | None = None) -> bool:
        """Whether ``task`` of ``bundle`` becomes compiled code (else it runs as torch ops);
        with the model ``graph`` the ops the task holds are asked too (a task holding an op
        the backend has no kernel for runs as torch ops)."""


def cache_root() -> Path:
    """Where backends keep what they compile or measure (``$BOUNDFLOW_CACHE``, else the
    user's cache folder)."""
    env = os.environ.get("BOUNDFLOW_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME",
                                                     Path.home() / ".cache")) / "boundflow"


def import_seconds(module: str, here: bool = True) -> float:
    """Seconds a fresh Python process here takes to import ``module``: 0 when this process
    has it already (``here``); else measured once per machine and interpreter, in a child
    process, and kept in the cache folder (``tune`` measures it, so ``verify`` finds it)."""
    if here and module in sys.modules:
        return 0.0
    path = cache_root() / "start" / f"{module}.json"
    if path in _IMPORT_SECONDS:
        return _IMPORT_SECONDS[path]
    _IMPORT_SECONDS[path] = seconds = _import_seconds(module, path)
    return seconds


_IMPORT_SECONDS: dict[Path, float] = {}      # read or measured once per process


def _import_seconds(module: str, path: Path) -> float:
    try:
        d = json.loads(path.read_text())
        if d.get("python") == sys.executable and float(d["seconds"]) >= 0:
            return float(d["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                   timeout=300)
    seconds = time.perf_counter() - start
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"python": sys.executable, "seconds": seconds}))
        os.replace(tmp, path)
    except OSError:
        pass
    return seconds


def run_bounds(exe: Any, box: Any, C: Any = None, upper: bool = True, **options: Any) -> Any:
    """``exe.run(box, C, **options)``; ``upper=False`` (the caller reads the lower bounds
    only), a ``split`` option (a search's state, which only speeds the torch backend up)
    and ``keep`` (nodes whose bounds the result's stats return, ``stats["bounds"]``)
    passed on where the executor's ``run`` takes them (a registered backend's may not)."""
    if not upper:
        options["upper"] = False
    if any(k in options for k in _OPTIONAL):
        takes = _TAKES.get(type(exe))
        if takes is None:
            params = inspect.signature(exe.run).parameters.values()
            anything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            takes = _TAKES[type(exe)] = {
                n for n in _OPTIONAL if anything or any(p.name == n for p in params)}
        options = {k: v for k, v in options.items() if k not in _OPTIONAL or k in takes}
    return exe.run(box, C, **options)


_OPTIONAL = ("upper", "split", "keep")   # run options an executor may not take


_TAKES: dict[type, set[str]] = {}
_FACTORIES: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``create(name)`` build a backend with ``factory`` (called once, on first use)."""
    _FACTORIES[name] = factory


def names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def create(name: str) -> Backend:
    """The backend called ``name``; a :class:`BoundFlowError` listing the valid ones if none."""
    if name not in _FACTORIES:
        raise BoundFlowError(f"backend {name!r} is not one of {', '.join(_FACTORIES)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


class TorchBackend:
    """Runs any plan with torch ops: on the CPU (target llvm) or a CUDA GPU (target cuda,
    where torch sees one)."""

    name = "torch"
    targets = ("llvm", "cuda")
    tunes_schedules = False
    needs_build = False

    def start_seconds(self):
        return 0.0                         # torch is what every bound already runs on

    def check_target(self, target):
        from boundflow.target import target_kind

        kind = target_kind(target)
        if kind not in self.targets:
            raise BoundFlowError(f"the torch backend runs on the CPU (target llvm) or a CUDA "
                                 f"GPU (target cuda), not {target!r}")
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else \
                    f"built for CUDA {torch.version.cuda}"
                raise BoundFlowError(f"target cuda: torch sees no CUDA device on this machine "
                                     f"(torch {torch.__version__}, {build})")

    def executor(self, bundle, graph, target="llvm", cache=None):
        from boundflow.backend.torch import TorchExecutor
        from boundflow.target import target_kind

        self.check_target(target)
        return TorchExecutor(bundle, graph, "cuda" if target_kind(target) == "cuda" else "cpu")

    def schedule_space(self, target="llvm"):
        return {}

    def schedule_presets(self, target="llvm"):
        return ()

    def compiles(self, bundle, task, graph=None):
        return False


class RelaxBackend:
    """TVM Relax: a TIR PrimFunc per task under ``call_tir``, torch callbacks for the rest."""

    name = "relax"
    targets = ("llvm", "cuda")
    tunes_schedules = True
    needs_build = True

    def __init__(self):
        self._cache = None

    def start_seconds(self):
        return import_seconds("tvm")

    def check_target(self, target):
        from boundflow.backend.relax.target import run_device

        run_device(target)

    def executor(self, bundle, graph, target="llvm", cache=None):
        """Compiled once per plan and target: in memory and in the on-disk compile cache
        (``$BOUNDFLOW_CACHE``) unless ``cache`` names another."""
        from boundflow.backend.relax.cache import CompileCache
        from boundflow.backend.relax.executor import RelaxExecutor

        if cache is None:
            self._cache = self._cache or CompileCache()
            cache = self._cache
        return RelaxExecutor(bundle, graph, target, cache=cache)

    def schedule_space(self, target="llvm"):
        from boundflow.backend.relax.schedule_space import space

        return space(target)

    def schedule_presets(self, target="llvm"):
        """Known-good schedules to measure early (as MetaSchedule seeds its search)."""
        from boundflow.backend.relax.schedule_space import presets

        return presets(target)

    def compiles(self, bundle, task, graph=None):
        """Whether ``task`` becomes a kernel (else a torch callback); pass the model as
        ``graph`` to have the ops the task holds asked too."""
        from boundflow.backend.relax.coverage import lowers_to_tir

        return lowers_to_tir(bundle, task, graph)


register("torch", TorchBackend)
register("relax", RelaxBackend)
