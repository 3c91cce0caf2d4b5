"""Resident memory (RSS) of a monitored training run: flat when results go to disk.

A small MLP (32 -> 64 -> 64 -> 10, two BatchNorm1d layers) is trained with SGD for
``--steps`` steps, every step measured by an :class:`ics_toolkit.ICSMonitor` with
``path`` set (each measured step is written as one part file and no result row is
kept in memory). The process's resident memory is printed every ``--every`` steps.
Goal: after the warm-up (the first ``--warmup`` steps: allocator pools, imports,
lazily built caches) the RSS stays within 5 % of its value at the end of the
warm-up.

At the end the results are read back once (``monitor.results()``), whose table the
process then holds. ``--no-path`` runs the same with ``path=None`` (rows kept in
memory, as every monitor without a path does); ``--compare`` runs both, each in a
fresh process.

Usage::

    python benchmarks/memory.py              # 5,000 measured steps
    python benchmarks/memory.py --quick      # 600 steps, a smoke test
    python benchmarks/memory.py --compare    # and the in-memory monitor, for contrast
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ics_toolkit as ics


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; else psutil, else peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - peak, not current (macOS reports bytes)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def model_and_data(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    x = torch.randn(512, 32, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    return model, x, y


def run(steps: int, every: int, path: str | None) -> tuple[list[tuple[int, float]], ics.ICSMonitor]:
    """Train ``steps`` steps, every one measured; RSS (MiB) after every ``every`` steps."""
    model, x, y = model_and_data(0)
    monitor = ics.ICSMonitor(
        model, x[:64], every=1, methods=("exact", "sliced"), path=path, run="mem", seed=0
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor.attach(opt)
    trace = [(0, rss_mib())]
    for step in range(1, steps + 1):
        idx = torch.arange((step * 64) % 512, (step * 64) % 512 + 64) % 512
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % every == 0:
            gc.collect()
            trace.append((step, rss_mib()))
    monitor.detach()
    return trace, monitor


def verdict(trace: list[tuple[int, float]], warmup: int, tolerance: float = 0.05) -> bool:
    after = [mib for step, mib in trace if step >= warmup]
    base = after[0]
    growth = (max(after) - base) / base
    print(
        f"after the warm-up ({warmup} steps): RSS {base:.1f} MiB -> {after[-1]:.1f} MiB, "
        f"min {min(after):.1f}, max {max(after):.1f} MiB; largest growth "
        f"{100 * growth:+.2f} % (goal: within {100 * tolerance:.0f} %)"
    )
    flat = growth <= tolerance and (base - min(after)) / base <= tolerance
    print("verdict:", "FLAT (goal met)" if flat else "NOT FLAT (goal missed)")
    return flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="measured steps (5000)")
    parser.add_argument("--warmup", type=int, help="steps before the flatness check (1000)")
    parser.add_argument("--every", type=int, help="print RSS every N steps (500)")
    parser.add_argument("--quick", action="store_true", help="600 steps")
    parser.add_argument("--no-path", action="store_true", help="keep the rows in memory")
    parser.add_argument("--compare", action="store_true", help="--no-path too, in a new process")
    args = parser.parse_args()
    steps = 600 if args.quick else args.steps
    warmup = args.warmup if args.warmup is not None else max(steps // 5, 1)
    every = args.every if args.every is not None else max(steps // 10, 1)
    torch.set_num_threads(1)
    print(
        f"ics_toolkit {ics.__version__}, torch {torch.__version__}, python "
        f"{sys.version.split()[0]}, pid {os.getpid()}; {steps} steps, each measured "
        "(methods exact, sliced; bounds, floor, moments on), MLP 32-64-64-10, probe 64"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trace, monitor = run(steps, every, None if args.no_path else tmp)
        seconds = time.perf_counter() - t0
        parts = sum(1 for _ in Path(tmp).iterdir())
        where = "path=None (rows kept in memory)" if args.no_path else f"path set: {parts} parts"
        print(f"\n{where}; {len(monitor._store)} rows in {seconds:.0f} s")
        print(f"{'step':>6} {'RSS MiB':>9}")
        for step, mib in trace:
            print(f"{step:>6} {mib:>9.1f}")
        flat = verdict(trace, warmup)
        table = monitor.results()
        size = table.memory_usage(deep=True).sum() / 2**20
        print(
            f"results() read back {len(table)} rows ({size:.1f} MiB as a DataFrame); "
            f"RSS now {rss_mib():.1f} MiB"
        )
        del table, monitor
    if args.compare and not args.no_path:
        argv = [sys.executable, __file__, "--no-path", "--steps", str(steps)]
        argv += ["--warmup", str(warmup), "--every", str(every)]
        print("\n--- the same run with path=None, in a fresh process ---", flush=True)
        subprocess.run(argv, check=False)
    return 0 if flat or args.no_path else 1


if __name__ == "__main__":
    sys.exit(main())
