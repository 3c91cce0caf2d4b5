"""Forward and forward+backward time of Unitization versus torch.nn.BatchNorm2d.

Same input tensor, same mode (train: batch statistics and running-stat update),
rounds interleaved so that machine load hits every variant alike; medians over the
rounds, and ratios to BatchNorm2d measured in this one run. Goal: <= 1.5x on CPU.

    python benchmarks/unitization_speed.py            # 128x64x16x16, float32
    python benchmarks/unitization_speed.py --quick    # a few seconds

By default it runs once with 1 thread and once with torch's default thread count:
on a shared machine, multi-threaded timings mostly measure waiting for the other
processes (every parallel kernel is a barrier), which penalises the layer with more
kernels; the 1-thread run measures the work itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from ics_toolkit.nn import Unitization2d
from ics_toolkit.nn.functional import _batch_stats, _composite, unitization_scale


class CompositeUnitization(nn.Module):
    """The same layer written as plain torch ops (what autograd alone would give)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.alpha = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = _batch_stats(x)
        k = unitization_scale(x.shape, "authors")
        return _composite(x, mean, var, self.weight, self.bias, self.alpha, 1e-5, 1 / k**2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, threads: int) -> None:
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    n, c, h, w = args.shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, device=device).requires_grad_()
    g = torch.randn(n, c, h, w, generator=gen, device=device)
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(c).to(device),
        "Unitization2d": Unitization2d(c, alpha_init=0.5).to(device),
        "composite ops": CompositeUnitization(c).to(device),
    }

    def fwd(layer: nn.Module) -> None:
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer: nn.Module) -> None:
        layer(x).backward(g)

    times: dict[tuple[str, str], list[float]] = {}
    for mode, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
        for layer in layers.values():  # warm-up
            fn(layer)
            fn(layer)
        for _ in range(args.rounds):
            for name, layer in layers.items():
                _sync(device)
                t0 = time.perf_counter()
                fn(layer)
                _sync(device)
                times.setdefault((name, mode), []).append(time.perf_counter() - t0)
                x.grad = None

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"input {n}x{c}x{h}x{w} float32 on {device}, torch {torch.__version__}, "
        f"{threads} thread(s), train mode, median of {args.rounds} interleaved rounds "
        f"(1-min load average {load:.1f}, {os.cpu_count()} CPUs)"
    )
    print(f"{'layer':<16}{'forward ms':>12}{'ratio':>8}{'fwd+bwd ms':>13}{'ratio':>8}")
    base = {
        m: statistics.median(times[("BatchNorm2d", m)]) for m in ("forward", "forward+backward")
    }
    for name in layers:
        f = statistics.median(times[(name, "forward")])
        fb = statistics.median(times[(name, "forward+backward")])
        print(
            f"{name:<16}{f * 1e3:>12.3f}{f / base['forward']:>7.2f}x"
            f"{fb * 1e3:>13.3f}{fb / base['forward+backward']:>7.2f}x"
        )
    ratio = (
        statistics.median(times[("Unitization2d", "forward+backward")]) / base["forward+backward"]
    )
    verdict = "meets" if ratio <= 1.5 else "misses"
    print(
        f"Unitization2d / BatchNorm2d forward+backward, {threads} thread(s): {ratio:.2f}x "
        f"({verdict} the <= 1.5x goal)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(128, 64, 16, 16))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to run (default: 1 and torch's default)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="64x32x16x16, 10 rounds")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.rounds = (64, 32, 16, 16), 10
    threads = args.threads or sorted({1, torch.get_num_threads()})
    for t in threads:
        measure(args, t)


if __name__ == "__main__":
    main()
