"""The builder: candidates → compiled artifacts, each compile in a worker process.

Candidates of a backend that compiles (``create(backend).needs_build``: Relax) are compiled into
a compile cache directory (``export_library``; the runner's workers, and later verification,
load them from there); the others need no build. A
compile that raises, crashes or passes the timeout becomes a :class:`BuildResult` with an error.
A caller with a time budget passes ``seconds``: a compile still running then is stopped (its
worker killed) and comes back ``cut``, which says nothing about the candidate.
"""

from __future__ import annotations

import concurrent.futures
import time
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

    def build(self, inputs: list[MeasureInput], seconds: float | None = None
              ) -> list[BuildResult]:
        """Compile ``inputs``; with ``seconds``, whatever is not compiled that long after the
        call comes back ``cut`` (its compile stopped, its worker killed)."""
        from boundflow.backend import create

        end = None if seconds is None else time.monotonic() + max(0.0, float(seconds))
        futures = [self._pool.submit(guarded, build, None, inp, self.root)
                   if create(inp.backend).needs_build else None for inp in inputs]
        results: list[BuildResult] = []
        for i, fut in enumerate(futures):
            if fut is None:
                results.append(BuildResult(artifact=None))
                continue
            if end is not None:
                try:
                    fut.result(timeout=max(0.0, end - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    rest = [f for f in futures[i:] if f is not None and not f.cancel()]
                    self._pool.stop(rest)
                    cut = BuildResult(None, error_kind="timeout", cut=True,
                                      error=f"stopped after {seconds:g} s: the time budget "
                                            f"ran out")
                    results += [cut if f is not None else BuildResult(artifact=None)
                                for f in futures[i:]]
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:           # noqa: BLE001 - read again below
                    pass
            try:
                took, kernels = fut.result()
                results.append(BuildResult(self.root, float(took), int(kernels)))
            except BaseException as e:          # noqa: BLE001 - every failure is a result
                kind, text = failure(e, self.timeout_s)
                results.append(BuildResult(None, error_kind="build" if kind == "run" else kind,
                                           error=text))
        return results

    def close(self) -> None:
        self._pool.close()
