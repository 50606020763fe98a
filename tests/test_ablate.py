"""``boundflow ablate``: one CSV row per configuration with every field, failures as rows,
plots, and the markdown report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from boundflow import ablate
from boundflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "boundflow", "examples", "data")
ARGS = ["ablate", "--model", os.path.join(DATA, "digits_mlp.pt2"), "--input",
        os.path.join(DATA, "digits_x.npy"), "--eps", "0.01", "--backend", "torch",
        "--number", "1", "--repeat", "2", "--no-progress"]


def test_ablation_rows_plots_and_report(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(ARGS + ["--toggle", "partition,domain,storage,cache", "--out", str(out)]) == 0
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [c.name for c in ablate.configurations(["partition", "domain", "storage", "cache"],
                                                     "torch")]
    assert [r["config"] for r in rows] == names                 # one row per configuration
    for r in rows:
        assert not r["error"], r
        assert all(r[c] != "" for c in ablate.COLUMNS if c != "error"), r
    by = {r["config"]: r for r in rows}
    assert float(by["final=ibp"]["width_vs_baseline"]) > 1          # IBP is looser
    assert int(by["partition=off"]["n_kernels"]) > int(by["baseline"]["n_kernels"])
    assert (out / "ablation.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "partition=off: time x" in printed
    report = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablation_report.py"),
                             str(out / "ablation.csv")], capture_output=True, text=True)
    assert report.returncode == 0 and "| partition=off |" in report.stdout


def test_failing_configurations_are_rows(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps([
        {"name": "bad-final", "changes": {"final": "nonsense"}},
        {"name": "no-reuse", "changes": {"storage": "none"}},
    ]))
    out = tmp_path / "abl"
    assert main(ARGS + ["--config", str(config), "--out", str(out)]) == 0
    with open(out / "ablation.csv", newline="") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"baseline", "bad-final", "no-reuse"}
    assert rows["bad-final"]["error"].startswith("plan:") and "nonsense" in rows["bad-final"]["error"]
    assert rows["no-reuse"]["error"] == "" and rows["no-reuse"]["median_ms"]
    assert main(ARGS + ["--toggle", "bogus", "--out", str(out)]) == 2
