#!/usr/bin/env python3
"""Summarises out/sweeps/*/results.csv (from scripts/bench-sweeps.sh) as the markdown tables of
docs/benchmarks.md: per grid point, mean TTFT of every policy and hotprefix's ratios to the
baselines, hit ratios against the offline bound, and bytes moved against lru-offload.
Standard library only."""
import collections
import csv
import sys


def f(row, key):
    return float(row[key])


def summarise(name):
    rows = list(csv.DictReader(open(f"out/sweeps/{name}/results.csv")))
    bound = {r["device_tokens"]: f(r, "hit_ratio") for r in rows if r["policy"] == "optimal"}
    points = collections.defaultdict(dict)
    for r in rows:
        if r["policy"] != "optimal":
            points[(int(r["device_tokens"]), float(r["time_scale"]))][r["policy"]] = r
    out = [f"#### {name}", "",
           "| device tokens | time scale | TTFT hotprefix | lru | lru-offload | reuse-offload "
           "| hp / lru | hp / lru-offload | hp / reuse-offload | hit hotprefix | hit lru-offload "
           "| hit bound | hp / bound | bytes hp / lru-offload |",
           "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (dev, ts), p in sorted(points.items()):
        hp, lru, off, reuse = p["hotprefix"], p["lru"], p["lru-offload"], p["reuse-offload"]
        t = lambda r: f(r, "ttft_mean_s")
        moved = lambda r: f(r, "h2d_bytes") + f(r, "d2h_bytes")
        b = bound[str(dev)]
        out.append(
            f"| {dev} | {ts:g} | {t(hp):.3g} | {t(lru):.3g} | {t(off):.3g} | {t(reuse):.3g} "
            f"| {t(hp) / t(lru):.2f} | {t(hp) / t(off):.2f} | {t(hp) / t(reuse):.2f} "
            f"| {f(hp, 'hit_ratio'):.3f} | {f(off, 'hit_ratio'):.3f} | {b:.3f} "
            f"| {f(hp, 'hit_ratio') / b:.2f} | {moved(hp) / moved(off):.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    names = sys.argv[1:] or ["conversation-1", "conversation-4", "synthetic-1", "synthetic-4"]
    print("\n".join(summarise(n) for n in names))
