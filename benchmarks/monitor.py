"""Training time with the ICS monitor attached, as ratios measured in one run.

Three variants of the same seeded training run of a small CNN (SmallCNN, 6
BatchNorm2d layers, 3x32x32 inputs, batch 128, SGD) are interleaved round by round:

- plain:  no monitor;
- idle:   a monitor attached whose schedule never fires (the cost of the hooks and
          the step counter; goal <= 1.01x);
- every:  a monitor attached with its default methods (exact, max_sliced, sliced),
          bounds, floors and moment drift, measuring every 10th step
          (goal <= 1.15x).

Usage::

    python benchmarks/monitor.py            # the default measurement
    python benchmarks/monitor.py --quick    # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.models import SmallCNN


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def run(variant: str, args: argparse.Namespace, x, y, probe) -> float:
    """Seconds for `args.steps` training steps of one variant."""
    model = SmallCNN(3, 10, width=args.width, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = None
    if variant != "plain":
        every = args.every if variant == "every" else [10**9]
        monitor = ics.ICSMonitor(model, probe, every=every)
        monitor.attach(opt)
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - start
    if monitor is not None:
        if variant == "every":
            assert monitor.update_count == len(range(0, args.steps, args.every))
        monitor.detach()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--probe", type=int, default=128, help="probe size")
    parser.add_argument("--width", type=int, default=32, help="SmallCNN width")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.width = 20, 1, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_data(2048, seed=0)
    probe = make_data(args.probe, seed=7)[0]

    print(
        f"SmallCNN(width={args.width}) on 3x32x32, batch {args.batch}, {args.steps} steps, "
        f"probe {args.probe}, monitor every {args.every}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), device cpu; {args.rounds} interleaved round(s)"
    )
    times: dict[str, list[float]] = {"plain": [], "idle": [], "every": []}
    run("plain", args, x, y, probe)  # warm-up
    for _ in range(args.rounds):
        for variant in times:
            times[variant].append(run(variant, args, x, y, probe))
    plain = statistics.median(times["plain"])
    print(f"{'variant':<8}{'median s':>10}{'best s':>9}{'ratio':>8}{'best ratio':>12}")
    for variant, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(
            f"{variant:<8}{med:>10.3f}{best:>9.3f}{med / plain:>8.3f}"
            f"{best / min(times['plain']):>12.3f}"
        )
    print(
        f"idle monitor: {statistics.median(times['idle']) / plain:.3f}x (goal <= 1.01x); "
        f"measuring every {args.every}: {statistics.median(times['every']) / plain:.3f}x "
        "(goal <= 1.15x)"
    )


if __name__ == "__main__":
    main()
