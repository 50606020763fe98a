"""The schedule knobs of the Relax backend and their legal values, per target kind; kept
apart from ``schedules.py`` (which applies them with TVM) so the planner's search and the cost
model's features can read them without importing TVM. See ``schedules.py`` for what each does.
"""

from __future__ import annotations

from typing import Any, Mapping

AUTO = "auto"                # the rule in schedules.py picks the value per stage
LLVM: dict[str, tuple[Any, ...]] = {      # first value of each: the default
    "inline": (False, True),     # inlining a conversion into a conv re-computes it per tap
    "parallel": (True, False),
    "vectorize": (AUTO, 0, 4, 8, 16),
    "tile": (AUTO, 0, 4, 8, 16, 32, 64),
    "tile_rows": (AUTO, 1, 2, 3, 4, 8),
    "cache_write": (True, False),
    "unroll": (64, 0, 16),
}
CUDA: dict[str, tuple[Any, ...]] = {
    "threads": (0, 64, 128, 256, 512),
    # reduction chunk staged in shared memory (0: off). Default 16: on an H200 it ran every
    # CROWN / CROWN-IBP row of benchmarks/bench_gpu.py 2.6-14x faster than dlight alone and
    # 1.1-2.9x faster than plain binding (benchmarks/results/gpu_h200.txt)
    "shared": (16, 0, 8, 32),
}


# Known-good starting points per target kind (the tuner measures them early, as MetaSchedule
# and Ansor seed their searches with rule-based schedules); each a dict of non-default knobs.
PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "llvm": ({"tile": 32, "tile_rows": 2},
             {"tile": 16, "tile_rows": 8},
             {"parallel": False},
             {"inline": True}),
    "cuda": ({"shared": 0}, {"threads": 128, "shared": 0}, {"threads": 256}, {"shared": 32}),
}


def presets(target: Any = "llvm") -> tuple[dict[str, Any], ...]:
    return PRESETS.get(_kind(target), ())


def _kind(target: Any) -> str:
    if isinstance(target, str):
        return target.split()[0]
    if isinstance(target, Mapping):
        return str(target["kind"])
    return target.kind.name


def space(target: Any = "llvm") -> dict[str, tuple[Any, ...]]:
    """The schedule knobs of ``target`` (a ``tvm.target.Target``, its kind name or dict) and
    their legal values, the default first."""
    kind = _kind(target)
    if kind == "cuda":
        return dict(CUDA)
    if kind == "llvm":
        return dict(LLVM)
    from boundflow.errors import BoundFlowError
    raise BoundFlowError(f"the relax backend has no schedules for target kind {kind!r} "
                         f"(llvm or cuda)")


def check(knobs: Mapping[str, Any], target: Any = "llvm") -> dict[str, Any]:
    """The knobs with defaults filled in; an unknown name or value raises."""
    from boundflow.errors import BoundFlowError

    legal = space(target)
    out = {name: choices[0] for name, choices in legal.items()}
    for name, value in knobs.items():
        if name not in legal:
            raise BoundFlowError(f"schedule knob {name!r} is not one of {sorted(legal)} "
                                 f"for target {_kind(target)}")
        if value not in legal[name]:
            raise BoundFlowError(f"schedule knob {name}={value!r} is not one of {legal[name]}")
        out[name] = value
    return out


def sample(rng, target: Any = "llvm") -> tuple[tuple[str, Any], ...]:
    """Random legal schedule knobs of one task (``rng``: a ``random.Random``), as the
    (name, value) pairs ``Knobs.schedule`` holds."""
    return tuple(sorted((name, rng.choice(choices))
                        for name, choices in space(target).items()))
