"""Compare two results tables value by value (a refactor must not change the numbers).

Usage::

    python benchmarks/compare_results.py runs/before runs/after [--rtol 1e-9]

Rows are matched on (run, step, layer, view, quantity); timings (``measure_time_s``,
``wall_time_s``) are ignored. Prints the largest relative difference per quantity and
exits 1 when a value differs by more than ``rtol`` (relative to max(|a|, |b|), with NaN
equal to NaN), a row is missing on one side, or ``bounds_hold`` differs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

KEY = ["run", "step", "layer", "view", "quantity"]
TIMINGS = {"measure_time_s"}


def load(folder: str) -> pd.DataFrame:
    df = pd.read_csv(f"{folder}/results.csv")
    df = df[~df.quantity.isin(TIMINGS)]
    return df.assign(**{k: df[k].astype("object").where(df[k].notna(), "") for k in KEY})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rtol", type=float, default=1e-9)
    args = parser.parse_args()
    a, b = load(args.before), load(args.after)
    merged = a.merge(b, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    missing = merged[merged["_merge"] != "both"]
    both = merged[merged["_merge"] == "both"]
    va, vb = both["value_a"].to_numpy(float), both["value_b"].to_numpy(float)
    nan_same = np.isnan(va) & np.isnan(vb)
    scale = np.maximum(np.abs(va), np.abs(vb))
    rel = np.where(nan_same, 0.0, np.abs(va - vb) / np.where(scale > 0, scale, 1.0))
    rel = np.where(np.isnan(rel), np.inf, rel)
    both = both.assign(rel=rel)
    print(f"{len(a)} rows before, {len(b)} after, {len(both)} matched, {len(missing)} unmatched")
    print(both.groupby("quantity").rel.max().sort_values(ascending=False).to_string())
    holds = both["bounds_hold_a"].astype(str) != both["bounds_hold_b"].astype(str)
    bad = both[both.rel > args.rtol]
    print(
        f"max relative difference {rel.max() if len(rel) else 0.0:.3g} (rtol {args.rtol:g}); "
        f"{len(bad)} values above it; bounds_hold differs in {int(holds.sum())} rows"
    )
    if len(missing):
        print(missing[[*KEY, "_merge"]].head(20).to_string())
    return int(bool(len(bad) or len(missing) or holds.any()))


if __name__ == "__main__":
    sys.exit(main())
