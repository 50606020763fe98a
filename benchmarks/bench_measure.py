"""Local runner vs RPC runner (tracker + server on loopback) on the same compiled modules.

    python benchmarks/bench_measure.py [--repeat 10] [--number 20]

For the digits MLP and CNN, IBP and CROWN-IBP, at batch 1 and 32: the default plan compiled
once, then measured by the local runner and by the RPC runner through a tracker and one server
on 127.0.0.1 (the same protocol: warm-up, ``number`` × ``repeat``). Prints both medians, their
ratio and the larger of the two relative standard deviations: on one machine the two should
agree within that noise.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from boundflow.api import as_graph
from boundflow.examples import load
from boundflow.ir.spec import margin_spec
from boundflow.ir.workload import Workload
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput, RPCRunner
from boundflow.planner import plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--number", type=int, default=20)
    args = parser.parse_args()
    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9390, silent=True)
    server = Server(host="127.0.0.1", port=9400, port_end=9600, key="bench",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)
    while rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"] \
            .get("bench", {}).get("free", 0) < 1:
        time.sleep(0.2)
    inputs = []
    for name in ("digits_mlp", "digits_cnn"):
        ex = load(name)
        g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
        for batch in (1, 32):
            rows = np.arange(batch) % len(ex.inputs)
            x = ex.inputs[rows].astype(np.float32)
            C = margin_spec(rows % 10, 10).C
            for method in ("ibp", "crown-ibp"):
                b = plan(g, Workload.of(g, batch=batch, method=method))
                inputs.append((f"{name} B={batch} {method}",
                               MeasureInput(b, g, x - 0.01, x + 0.01, C, "relax")))
    config = MeasureConfig(number=args.number, repeat=args.repeat, warmup=2, timeout_s=300)
    with tempfile.TemporaryDirectory() as root:
        builder = LocalBuilder(root)
        builds = builder.build([i for _, i in inputs])
        local = LocalRunner(config).run([i for _, i in inputs], builds)
        remote = RPCRunner(("127.0.0.1", tracker.port), "bench", config).run(
            [i for _, i in inputs], builds)
    print(f"{'workload':<28} {'local ms':>9} {'rpc ms':>9} {'rpc/local':>9} {'max rel std':>11}")
    for (label, _), lo, re in zip(inputs, local, remote):
        if not (lo.ok and re.ok):
            print(f"{label:<28} failed: {lo.error or re.error}")
            continue
        noise = max(lo.std_s / lo.mean_s, re.std_s / re.mean_s)
        print(f"{label:<28} {lo.median_s * 1e3:>9.3f} {re.median_s * 1e3:>9.3f} "
              f"{re.median_s / lo.median_s:>9.2f} {noise:>11.2f}")
    server.terminate()
    tracker.terminate()


if __name__ == "__main__":
    main()
