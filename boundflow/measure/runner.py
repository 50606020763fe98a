"""Runners: built candidates → :class:`MeasureResult`, each measured in a worker process.

``LocalRunner`` times candidates on this machine; ``RPCRunner`` through TVM's RPC tracker on
whichever server registered under its key (a farm of GPU machines can serve one tuner). Both
record a candidate that raises, crashes or passes the timeout as a result with its error and go
on with the rest of the batch. ``measure(inputs, builder, runner)`` builds then runs.
``LocalRunner.compare`` times several candidates interleaved in one worker (the tuner's final
comparison of its best plan with the default verify path, under the same load).

By default one worker measures at a time, so candidates do not share the CPU while timed.
"""

from __future__ import annotations

from typing import Callable

from boundflow.measure.pool import Pool, failure
from boundflow.measure.result import BuildResult, MeasureInput, MeasureResult
from boundflow.measure.worker import MeasureConfig, guarded, measure_interleaved, \
    measure_local, measure_rpc


class LocalRunner:
    """``run(inputs, builds)`` measures each built candidate with ``f_run(inp, build, config)``
    (default :func:`measure_local`) in one of ``n_workers`` worker processes."""

    name = "local"

    def __init__(self, config: MeasureConfig = MeasureConfig(), n_workers: int = 1,
                 f_run: Callable[..., MeasureResult] = measure_local):
        self.config, self.f_run = config, f_run
        self._pool = Pool(n_workers, config.timeout_s)

    def _submit(self, inp: MeasureInput, build: BuildResult, config: MeasureConfig):
        return self._pool.submit(guarded, self.f_run, config.memory_limit_mb, inp, build,
                                 config)

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult],
            config: MeasureConfig | None = None) -> list[MeasureResult]:
        """One result per input, in order, under ``config`` (default: the runner's; its
        ``timeout_s`` is the pool's whatever the config says)."""
        if len(inputs) != len(builds):
            raise ValueError("one build per input")
        config = config or self.config
        futures = [None if b.error_kind else self._submit(inp, b, config)
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

    def compare(self, inputs: list[MeasureInput], builds: list[BuildResult],
                config: MeasureConfig | None = None) -> list[MeasureResult]:
        """Measure ``inputs`` interleaved in one worker (see
        :func:`~boundflow.measure.worker.measure_interleaved`) under ``config`` (default:
        the runner's); a build failure, or a failure of any of them, is every one's result,
        with its error."""
        if len(inputs) != len(builds):
            raise ValueError("one build per input")
        config = config or self.config
        bad = next((b for b in builds if b.error_kind), None)
        if bad is None:
            fut = self._pool.submit(guarded, measure_interleaved, config.memory_limit_mb,
                                    list(inputs), list(builds), config, self.name)
            try:
                return fut.result()
            except BaseException as e:          # noqa: BLE001 - every failure is a result
                kind, text = failure(e, self.config.timeout_s)
        else:
            kind, text = bad.error_kind, bad.error or ""
        return [MeasureResult.failed(i.key, i.backend, i.target, kind, text, runner=self.name)
                for i in inputs]

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

    def _submit(self, inp: MeasureInput, build: BuildResult, config: MeasureConfig):
        from boundflow.backend import create

        if not create(inp.backend).needs_build:
            from concurrent.futures import Future

            from boundflow.errors import MeasureError
            fut: Future = Future()
            fut.set_exception(MeasureError(f"the RPC runner measures compiled candidates "
                                           f"only, not the {inp.backend} backend's"))
            return fut
        return self._pool.submit(guarded, measure_rpc, config.memory_limit_mb, inp, build,
                                 config, self.tracker, self.key, self.session_timeout)

    def compare(self, inputs: list[MeasureInput], builds: list[BuildResult],
                config: MeasureConfig | None = None) -> list[MeasureResult]:
        """One after another (an RPC session times one module at a time)."""
        return self.run(inputs, builds, config)


def measure(inputs: list[MeasureInput], builder, runner) -> list[MeasureResult]:
    """Build then run ``inputs``: one result per input, in order."""
    return runner.run(inputs, builder.build(inputs))
