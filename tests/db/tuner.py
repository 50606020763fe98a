"""A tuner process for the concurrent-tuning test.

    python -m tests.db.tuner URL READY GO OUT   # touch READY once loaded, tune when GO
                                                # exists (6 trials, torch backend, the
                                                # cheapest protocol), write the report to OUT
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from boundflow.api import query
from boundflow.db import Database
from boundflow.measure import MeasureConfig
from boundflow.search import Tuner
from tests.helpers import example_graph

DATA = Path(__file__).resolve().parents[2] / "boundflow" / "examples" / "data"
TRIALS = 6


def main() -> None:
    url, ready, go, out = sys.argv[1:5]
    _, g = example_graph("digits_mlp")
    x = np.load(DATA / "digits_x.npy").astype(np.float32)[:2]
    g, spec, linear, _, _ = query(g, x, eps=0.01)
    with Database(url) as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="greedy", backend="torch", progress=False, batch_size=1,
                      config=MeasureConfig(number=1, repeat=1, warmup=0, timeout_s=60))
        try:
            Path(ready).write_text(str(os.getpid()))
            while not os.path.exists(go):
                time.sleep(0.02)
            report = tuner.tune(trials=TRIALS)
        finally:
            tuner.close()
    Path(out).write_text(json.dumps({"run": report.run_id, "now": report.measured_now,
                                     "before": report.measured_before,
                                     "others": report.measured_by_others,
                                     "best": report.best_bundle.key,
                                     "finalists": list(report.finalists)}))


if __name__ == "__main__":
    main()
