"""Render a markdown report from an ablation CSV (``boundflow ablate``).

    python tools/ablation_report.py ablation/ablation.csv [--out report.md]

A table of every configuration (time, peak memory, width, kernels, compile time, each against
the baseline) and, per toggle, one line of its effect; failed configurations with their error.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def render(rows: list[dict[str, str]], title: str) -> str:
    lines = [f"# Ablation: {title}", "",
             "| configuration | setting | time ms | × base | peak KiB | × base | width | × base "
             "| kernels | compile s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['config']} | {r['setting']} | failed: {r['error'][:60]} "
                         f"| | | | | | | |")
            continue

        def f(col, fmt):
            v = _num(r.get(col))
            return "" if v is None else format(v, fmt)
        peak = _num(r["peak_bytes"])
        lines.append(f"| {r['config']} | {r['setting']} | {f('median_ms', '.3f')} | "
                     f"{f('time_vs_baseline', '.2f')} | "
                     f"{'' if peak is None else f'{peak / 1024:.1f}'} | "
                     f"{f('peak_vs_baseline', '.2f')} | {f('mean_width', '.4g')} | "
                     f"{f('width_vs_baseline', '.3f')} | {r['n_kernels']} | "
                     f"{f('compile_s', '.2f')} |")
    lines += ["", "## Effects against the baseline", ""]
    for r in rows[1:]:
        if r["toggle"] == "baseline":
            continue
        if r["error"]:
            lines.append(f"- **{r['config']}** failed: {r['error'][:120]}")
            continue
        t, p, w = (_num(r[c]) for c in ("time_vs_baseline", "peak_vs_baseline",
                                         "width_vs_baseline"))
        bits = []
        if t is not None:
            bits.append(f"time {(t - 1) * 100:+.0f}%")
        if p is not None:
            bits.append(f"peak memory {(p - 1) * 100:+.0f}%")
        if w is not None:
            bits.append(f"width {(w - 1) * 100:+.1f}%")
        base = next((b for b in rows if b["toggle"] == "baseline"
                     and b["backend"] == r["backend"]), rows[0])
        bits.append(f"kernels {base['n_kernels']} → {r['n_kernels']} ({r['backend']})")
        lines.append(f"- **{r['config']}** ({r['setting']}): " + ", ".join(bits))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or rows[0]["config"] != "baseline":
        sys.exit(f"{args.csv}: not an ablation CSV (its first row must be the baseline)")
    text = render(rows, args.csv.parent.name or str(args.csv))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
