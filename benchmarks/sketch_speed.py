"""The sketch's two ways to compute S H D E z: only the k kept coordinates, or every one.

:class:`ics_toolkit.sketch.Sketch` computes only the k kept coordinates of the
Hadamard transform for k <= ``KEPT_MAX_K`` and padded widths >= 2^``KEPT_MIN_BITS``
(one pass over each row), and the whole transform (one pass per Kronecker factor)
otherwise. This script times both ways on the same rows in one run, interleaved, and
prints their ratio and their largest difference (float32 input, relative to the
largest coordinate), so that the thresholds can be checked on another machine.

Usage::

    python benchmarks/sketch_speed.py             # the grid below, on the CPU
    python benchmarks/sketch_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ics_toolkit.sketch as sketch_module
from ics_toolkit.sketch import Sketch

GRID = [  # (n, d): ResNet-50's widest layers at probe 64, narrower ones, a small CNN's
    (64, 802816),
    (64, 200704),
    (256, 65536),
    (128, 32768),
    (128, 8192),
]


def timed(sk: Sketch, x: torch.Tensor, repeats: int) -> float:
    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        sk(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    limit = sketch_module.KEPT_MAX_K
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}; "
        f"kept coordinates only for k <= {limit} and d' >= 2^{sketch_module.KEPT_MIN_BITS}"
    )
    head = ("n", 5), ("d", 8), ("k", 5), ("kept s", 8), ("whole s", 8), ("speed-up", 9)
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'rel diff':>9}")
    g = torch.Generator().manual_seed(0)
    for n, d in GRID:
        x = torch.randn(n, d, generator=g).to(device)
        for k in args.k:
            sk = Sketch(d, k, seed=1)
            try:
                sketch_module.KEPT_MAX_K = max(k, limit)  # the kept coordinates (if d' is wide)
                kept_out = sk(x)
                kept = timed(sk, x, args.repeats)
                sketch_module.KEPT_MAX_K = 0  # the whole transform
                whole_out = sk(x)
                whole = timed(sk, x, args.repeats)
            finally:
                sketch_module.KEPT_MAX_K = limit
            diff = float((kept_out - whole_out).abs().max() / whole_out.abs().max())
            plan = sketch_module._KeptCoordinates.plan
            chosen = "kept" if plan(sk.d_padded, sk.rows(device), torch.float32) else "whole"
            if sk.d_padded < 1 << sketch_module.KEPT_MIN_BITS:
                print(f"{n:>5} {d:>8} {k:>5} {'-':>8} {whole:>8.4f}  (rows too narrow: whole)")
                continue
            print(
                f"{n:>5} {d:>8} {k:>5} {kept:>8.4f} {whole:>8.4f} {whole / kept:>8.2f}x "
                f"{diff:>9.1e}  (default: {chosen})"
            )


if __name__ == "__main__":
    main()
