"""Runners: built candidates → :class:`MeasureResult`, each measured in a worker process.

``LocalRunner`` times candidates on this machine; ``RPCRunner`` through TVM's RPC tracker on
whichever server registered under its key (a farm of GPU machines can serve one tuner). Both
record a candidate that raises, crashes or passes the timeout as a result with its error and go
on with the rest of the batch. ``measure(inputs, builder, runner)`` builds then runs.

By default one worker measures at a time, so candidates do not share the CPU while timed.
"""

from __future__ import annotations

from typing import Callable

from boundflow.measure.pool import Pool, failure
from boundflow.measure.result import BuildResult, MeasureInput, MeasureResult
from boundflow.measure.worker import MeasureConfig, guarded, measure_local, measure_rpc


class LocalRunner:
    """``run(inputs, builds)`` measures each built candidate with ``f_run(inp, build, config)``
    (default :func:`measure_local`) in one of ``n_workers`` worker processes."""

    name = "local"

    def __init__(self, config: MeasureConfig = MeasureConfig(), n_workers: int = 1,
                 f_run: Callable[..., MeasureResult] = measure_local):
        self.config, self.f_run = config, f_run
        self._pool = Pool(n_workers, config.timeout_s)

    def _submit(self, inp: MeasureInput, build: BuildResult):
        return self._pool.submit(guarded, self.f_run, self.config.memory_limit_mb, inp, build,
                                 self.config)

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]:
        if len(inputs) != len(builds):
            raise ValueError("one build per input")
        futures = [None if b.error_kind else self._submit(inp, b)
                   for inp, b in zip(inputs, builds)]
        results = []
        for inp, build, fut in zip(inputs, builds, futures):
            if fut is None:
                results.append(MeasureResult.failed(inp.key, inp.backend, inp.target,
                                                    build.error_kind, build.error or "",
                                                    runner=self.name))
                continue
            try:
                results.append(fut.result())
            except BaseException as e:          # noqa: BLE001 - every failure is a result
                kind, text = failure(e, self.config.timeout_s)
                results.append(MeasureResult.failed(inp.key, inp.backend, inp.target, kind, text,
                                                    compile_seconds=build.compile_seconds,
                                                    runner=self.name))
        return results

    def close(self) -> None:
        self._pool.close()


class RPCRunner(LocalRunner):
    """Measures relax candidates on RPC servers registered with the tracker at
    ``tracker = (host, port)`` under ``key``; ``n_workers`` sessions at a time (one per
    server is the honest setting). The compiled module goes up with the session."""

    def __init__(self, tracker: tuple[str, int], key: str,
                 config: MeasureConfig = MeasureConfig(), n_workers: int = 1,
                 session_timeout: float | None = None):
        super().__init__(config, n_workers, measure_rpc)
        self.tracker, self.key = (str(tracker[0]), int(tracker[1])), key
        self.session_timeout = session_timeout or config.timeout_s
        self.name = f"rpc:{key}"

    def _submit(self, inp: MeasureInput, build: BuildResult):
        if inp.backend != "relax":
            from concurrent.futures import Future

            from boundflow.errors import MeasureError
            fut: Future = Future()
            fut.set_exception(MeasureError("the RPC runner measures relax candidates only"))
            return fut
        return self._pool.submit(guarded, measure_rpc, self.config.memory_limit_mb, inp, build,
                                 self.config, self.tracker, self.key, self.session_timeout)


def measure(inputs: list[MeasureInput], builder, runner) -> list[MeasureResult]:
    """Build then run ``inputs``: one result per input, in order."""
    return runner.run(inputs, builder.build(inputs))
