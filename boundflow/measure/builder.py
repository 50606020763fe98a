"""The builder: candidates → compiled artifacts, each compile in a worker process.

Candidates of a backend that compiles (``create(backend).needs_build``: Relax) are compiled into
a compile cache directory (``export_library``; the runner's workers, and later verification,
load them from there); the others need no build. A
compile that raises, crashes or passes the timeout becomes a :class:`BuildResult` with an error.
"""

from __future__ import annotations

from pathlib import Path

from boundflow.measure.pool import Pool, failure
from boundflow.measure.result import BuildResult, MeasureInput
from boundflow.measure.worker import MeasureConfig, build, guarded


class LocalBuilder:
    """``build(inputs)`` compiles in ``n_workers`` worker processes into ``root`` (default:
    the user's compile cache, so tuned plans load at verification time without a compile)."""

    def __init__(self, root: str | Path | None = None, n_workers: int = 1,
                 timeout_s: float = MeasureConfig.timeout_s):
        from boundflow.backend.relax.cache import default_root

        self.root = str(root if root is not None else default_root())
        self.timeout_s = timeout_s
        self._pool = Pool(n_workers, timeout_s)

    def build(self, inputs: list[MeasureInput]) -> list[BuildResult]:
        from boundflow.backend import create

        futures = [self._pool.submit(guarded, build, None, inp, self.root)
                   if create(inp.backend).needs_build else None for inp in inputs]
        results = []
        for fut in futures:
            if fut is None:
                results.append(BuildResult(artifact=None))
                continue
            try:
                seconds, kernels = fut.result()
                results.append(BuildResult(self.root, float(seconds), int(kernels)))
            except BaseException as e:          # noqa: BLE001 - every failure is a result
                kind, text = failure(e, self.timeout_s)
                results.append(BuildResult(None, error_kind="build" if kind == "run" else kind,
                                           error=text))
        return results

    def close(self) -> None:
        self._pool.close()
