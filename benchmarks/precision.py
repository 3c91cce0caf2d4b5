"""The float32 analysis against the float64 reference: its error, and its fused kernel's speed.

(error)  The same seeded training run (SmallCNN(3, 10, width=16), 10 SGD steps with momentum,
         batch 64, probe 128, ``ICSMonitor(every=3)``) measured once with
         ``precision="float32"`` and once with ``precision="float64"``, for BatchNorm and for
         Unitization layers. Per quantity: the largest difference between the twin rows,
         relative to the float64 value, or to the layer's ``scale`` for the two differences
         of nearly equal numbers (L2, drift_norm_var), as tests/test_precision.py measures
         it; beside it the documented tolerance (``ics_toolkit._vocab.FLOAT32_ERROR``,
         ``FLOAT32_ERROR_U3``), and whether every bound check held in both runs.
(kernel) ``_norm_snapshot.batchnorm_hat`` with ``fast=False`` (``torch.var_mean``, then the
         subtraction and the scaling) against ``fast=True`` (torch's fused batch-norm
         kernel, the float32 analysis' choice) on a 128x32x32x32 float32 input: medians of
         interleaved rounds, their ratio, and the largest difference of the outputs.

Timings are ratios within one run (no goal is asserted); the error part is deterministic.

    python benchmarks/precision.py                  # both parts (under a minute on 2 cores)
    python benchmarks/precision.py --part kernel --rounds 10
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch

import ics_toolkit as ics
from ics_toolkit import _vocab
from ics_toolkit._norm_snapshot import batchnorm_hat
from ics_toolkit.models import SmallCNN

# row kinds that carry a measured value (the rest are timings, counts, flags)
KINDS = ("estimate", "floor", "lower", "upper", "interval", "stat", "term", "drift", "relative")
# as tests/test_precision.py: differences of nearly equal numbers, measured against the scale
SCALED = {"L2", "drift_norm_var"}
# as tests/test_precision.py: U3's core amplifies float32 rounding, FLOAT32_ERROR_U3
U3_FAMILY = {"U3", "relative_U3"}
# as tests/test_precision.py: U3's eps part carries U3's error, measured against U3
U3_PARTS = {"U3_eps"}
# the numbers the docs quote (docs/benchmarks.md, docs/theory.md section 5, _vocab.py)
QUOTED = ("exact", "sliced", "max_sliced", "L3", "U1", "U3", "L2", "drift_norm_var")
KEY = ["step", "layer", "view", "quantity"]


def train(precision: str, norm: str, steps: int = 10) -> pd.DataFrame:
    """The monitor's rows of a short seeded training run, analysed in ``precision``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    probe = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    model = SmallCNN(3, 10, width=16, norm=norm, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = ics.ICSMonitor(model, probe, every=3, precision=precision).attach(opt)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    monitor.detach()
    return monitor.results()


def tolerance(quantity: str, dim: int = 0) -> float:
    """The documented largest float32 error of ``quantity`` (relative, or of the scale).

    The resolution is a bound, not an estimate: in float32 it adds the a priori error of
    its float32 row norms, 2 (d + 1) u (as tests/test_precision.py), so it may exceed
    the float64 one by that much.
    """
    if quantity == _vocab.RESOLUTION:
        return _vocab.FLOAT32_ERROR + 2 * (dim + 1) * 2.0**-24
    return _vocab.FLOAT32_ERROR_U3 if quantity in U3_FAMILY | U3_PARTS else _vocab.FLOAT32_ERROR


def twins(f32: pd.DataFrame, f64: pd.DataFrame) -> pd.DataFrame:
    """The measured rows of both runs side by side (``value_32``, ``value_64``)."""
    both = f32.merge(f64, on=KEY, suffixes=("_32", "_64"))
    return both[both.kind_64.isin(KINDS)]


def row_errors(both: pd.DataFrame, f64: pd.DataFrame) -> pd.DataFrame:
    """One row per twin pair: the float32 error, its tolerance, and whether it is within.

    ``within`` is the test's criterion (``|a - b| <= limit + 1e-12``); ``error`` is
    ``|a - b|`` over ``|b|`` (over the layer's scale for SCALED quantities, over U3 for
    U3_PARTS), 0 where both are 0 and infinite where only the float64 value is 0 or only
    one is finite.
    """
    scale = f64[f64.quantity == _vocab.SCALE].set_index(["step", "layer", "view"]).value
    u3 = f64[f64.quantity == "U3"].set_index(["step", "layer", "view"]).value
    out = []
    for row in both.itertuples():
        a, b = float(row.value_32), float(row.value_64)
        if not (math.isfinite(a) and math.isfinite(b)):
            if math.isfinite(a) != math.isfinite(b):
                out.append((row.quantity, math.inf, tolerance(row.quantity), False))
            continue  # both non-finite: nothing to compare, as in the test
        tol = tolerance(row.quantity, int(row.dim_64))
        where = (row.step, row.layer, row.view)
        ref = scale[where] if row.quantity in SCALED else abs(b)
        ref = u3[where] if row.quantity in U3_PARTS else ref
        diff = abs(a - b)
        error = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
        out.append((row.quantity, error, tol, diff <= tol * ref + 1e-12))
    return pd.DataFrame(out, columns=["quantity", "error", "tolerance", "within"])


def holds(rows: pd.DataFrame) -> bool:
    """Whether every bound check of the measured rows held."""
    return bool(rows[rows.kind.isin(KINDS)].bounds_hold.astype(bool).all())


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def error_part() -> bool:
    """Print the float32 errors per norm; True when all are within the documented ones."""
    print(
        "\n(error) float32 against float64 analysis of the same run: SmallCNN(3, 10, width=16, "
        "seed=0), 10 SGD steps (momentum 0.9, batch 64), probe 128, ICSMonitor(every=3)"
    )
    print(
        f"tolerances: FLOAT32_ERROR = {_vocab.FLOAT32_ERROR:.0e}, FLOAT32_ERROR_U3 = "
        f"{_vocab.FLOAT32_ERROR_U3:.0e} (U3, relative_U3; U3_eps of U3); 'of scale' = |a - b| / "
        "the layer's scale, else |a - b| / |float64 value|; resolution (a bound) "
        "FLOAT32_ERROR + 2 (d + 1) u, its float32 row norms' a priori error"
    )
    ok = True
    largest: dict[str, float] = {}
    for norm in ("batch", "unitization"):
        t0 = time.perf_counter()
        f32, f64 = train("float32", norm), train("float64", norm)
        both = twins(f32, f64)
        errors = row_errors(both, f64)
        n64 = int(f64.kind.isin(KINDS).sum())
        complete = len(both) == n64  # every measured row has its twin, as the test asks
        hold32, hold64 = holds(f32), holds(f64)
        print(
            f"\nnorm={norm}: {len(both)} twin rows of {n64} measured float64 rows, "
            f"bounds_hold all true: float32 {yes(hold32)}, float64 {yes(hold64)} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        table = (
            errors.groupby("quantity")
            .agg(error=("error", "max"), tolerance=("tolerance", "first"), within=("within", "all"))
            .sort_values("error")
        )
        print(f"{'quantity':<24}{'measured as':<13}{'max error':>10}{'tolerance':>11}  within")
        for quantity, r in table.iterrows():
            kind = "of scale" if quantity in SCALED else "relative"
            print(f"{quantity:<24}{kind:<13}{r.error:>10.1e}{r.tolerance:>11.0e}  {yes(r.within)}")
            largest[quantity] = max(largest.get(quantity, 0.0), float(r.error))
        ok = ok and complete and hold32 and hold64 and bool(errors.within.all())
    quoted = ", ".join(
        f"{q} {largest[q]:.1e}" + (" of scale" if q in SCALED else "")
        for q in QUOTED
        if q in largest
    )
    print(f"\nlargest over both norms: {quoted}")
    print(f"max error within documented tolerance: {yes(ok)}")
    return ok


def median_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time (s) of each function over interleaved rounds, after a warm-up."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_part(rounds: int) -> None:
    """Time batchnorm_hat's two paths on one input and compare their outputs."""
    shape = (128, 32, 32, 32)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.BatchNorm2d(shape[1])
    paths = {
        "fast=False (var_mean)": lambda: batchnorm_hat(bn, x, training=True, fast=False),
        "fast=True (fused)": lambda: batchnorm_hat(bn, x, training=True, fast=True),
    }
    print(
        f"\n(kernel) batchnorm_hat on a {'x'.join(map(str, shape))} float32 input, batch "
        f"statistics, median of {rounds} interleaved rounds"
    )
    t = median_times(paths, rounds)
    for name, s in t.items():
        print(f"{name:<24}{1e3 * s:9.2f} ms")
    slow, fast = t["fast=False (var_mean)"], t["fast=True (fused)"]
    ref = paths["fast=False (var_mean)"]()
    diff = (ref - paths["fast=True (fused)"]()).abs().max().item()
    print(
        f"fast=True is {slow / fast:.1f}x faster; max abs difference of the outputs {diff:.1e} "
        f"(largest |output| {ref.abs().max().item():.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("error", "kernel", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the kernel (30)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, ics_toolkit {ics.__version__}, torch threads "
        f"{torch.get_num_threads()}, python {platform.python_version()}, 1-min load average "
        f"{load:.1f}, {os.cpu_count()} CPUs"
    )
    if args.part in ("error", "all"):
        error_part()
    if args.part in ("kernel", "all"):
        kernel_part(args.rounds)


if __name__ == "__main__":
    main()
