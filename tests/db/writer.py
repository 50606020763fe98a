"""A separate writer process for the concurrency and crash tests.

    python -m tests.db.writer URL WRITER N        # N measurements of 5 shared candidates
    python -m tests.db.writer URL --hang MARKER   # a candidate inside an open transaction, then
                                                  # touch MARKER and wait to be killed
    python -m tests.db.writer URL --claim MARKER  # a tuning run claiming 2 plans, then touch
                                                  # MARKER and wait to be killed
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from boundflow.db import Database
from boundflow.measure import MeasureResult
from tests.db.conftest import sample_bundles


def main() -> None:
    url = sys.argv[1]
    db = Database(url)
    if sys.argv[2] == "--hang":
        (bundle,), g = sample_bundles(1, seed=99)

        def hang(s):
            wrow = db._get_workload(s, bundle.workload, g)
            db._get_candidate(s, wrow, bundle)
            s.flush()
            Path(sys.argv[3]).write_text("in transaction")
            time.sleep(600)
        db._tx("hang", hang)
        return
    if sys.argv[2] == "--claim":
        bundles, g = sample_bundles(2)
        run = db.start_run(bundles[0].workload, "greedy", {}, g, backend="torch",
                           machine="test-machine", heartbeat_timeout=600)
        assert db.claim(run, [b.key for b in bundles], budget=2) == [b.key for b in bundles]
        Path(sys.argv[3]).write_text("claimed")
        time.sleep(600)
        return
    writer, n = int(sys.argv[2]), int(sys.argv[3])
    bundles, g = sample_bundles(5)
    for i in range(n):
        b = bundles[i % len(bundles)]
        db.add_measurement(b, MeasureResult(b.key, "torch", "llvm", median_s=1e-3 * (1 + i),
                                            mean_s=1e-3, std_s=0.0, times=(1e-3,),
                                            machine=f"writer{writer}", timestamp=float(i)),
                           graph=g)
    db.close()


if __name__ == "__main__":
    main()
