"""Cost of a capture pass relative to a plain no-grad forward, and memory held per layer.

Model: a plain CIFAR-style CNN with 10 BatchNorm layers (3 stages of 16/32/64 channels,
4 + 3 + 3 conv-BN-ReLU(inplace) units, stride 2 between stages). Probe: N images
3x32x32 (N = 256 by default). All passes run in train mode (BatchNorm on the probe's
own statistics) under ``torch.no_grad()``:

- plain: ``model(x)`` only;
- capture: ``Recorder.run(x)`` (hooks, state snapshot/restore, detached float32 CPU
  copies of the 10 layer outputs);
- count-only: the same pass with hooks and state snapshot/restore but no copies, so
  capture minus count-only is the cost of the copies (memory bandwidth).

Timings are wall-clock medians and minimums, and medians of process CPU time
(steadier on a shared machine), of interleaved repeats measured in this run; the goal
is capture / plain <= 1.3 (wall-clock medians).

Usage::

    python benchmarks/capture.py            # N = 256, 15 repeats
    python benchmarks/capture.py --quick    # N = 64, 5 repeats
    python benchmarks/capture.py --threads 2  # torch intra-op threads (default 1)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ics_toolkit.recording import Recorder


def cnn10() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for stage, (width, units) in enumerate([(16, 4), (32, 3), (64, 3)]):
        for unit in range(units):
            stride = 2 if stage > 0 and unit == 0 else 1
            layers += [
                nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers)


def _time(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small probe, few repeats")
    parser.add_argument("--n", type=int, default=None, help="probe size (default 256)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n or (64 if args.quick else 256)
    repeats = args.repeats or (5 if args.quick else 15)

    torch.manual_seed(0)
    model = cnn10().train()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rec = Recorder(model)  # "norm": the 10 BatchNorm2d layers
    assert len(rec.names) == 10

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def captured() -> None:
        rec.run(x)

    def counted() -> None:  # hooks + state snapshot/restore, nothing copied
        rec._pass(x, keep=False)

    for fn in (plain, captured, counted):  # warm-up (allocator, first-touch pages)
        fn()
    wall: dict[str, list[float]] = {"plain": [], "capture": [], "count-only": []}
    cpu: dict[str, list[float]] = {"plain": [], "capture": [], "count-only": []}
    passes = {"plain": plain, "capture": captured, "count-only": counted}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all three
        for key, fn in passes.items():
            w, c = _time(fn)
            wall[key].append(w)
            cpu[key].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    best = {k: min(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    print(f"# capture pass vs plain no-grad forward (CNN, 10 BatchNorm2d, probe {n}x3x32x32)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), {repeats} repeats")
    print(
        f"{'pass':<12} {'median ms':>10} {'ratio':>6} {'min ms':>8} {'ratio':>6}"
        f" {'cpu ms':>8} {'ratio':>6}"
    )
    for key in passes:
        print(
            f"{key:<12} {1e3 * med[key]:>10.2f} {med[key] / med['plain']:>6.2f}"
            f" {1e3 * best[key]:>8.2f} {best[key] / best['plain']:>6.2f}"
            f" {1e3 * med_cpu[key]:>8.2f} {med_cpu[key] / med_cpu['plain']:>6.2f}"
        )
    ratio = med["capture"] / med["plain"]
    verdict = "met" if ratio <= 1.3 else "MISSED"
    print(f"capture / plain = {ratio:.2f}x by wall-clock medians (goal <= 1.3x): {verdict}")

    out = rec.run(x)
    print()
    print("# memory held per captured layer: storage bytes of the float32 CPU copy")
    print(f"{'key':<6} {'shape':<20} {'bytes':>12} {'expected':>12} {'ratio':>6}")
    total = 0
    for key, t in out.items():
        held = t.untyped_storage().nbytes()  # what the copy really holds
        expected = n * int(torch.tensor(t.shape[1:]).prod()) * 4
        total += held
        shape = str(tuple(t.shape))
        print(f"{key:<6} {shape:<20} {held:>12,} {expected:>12,} {held / expected:>6.2f}")
    print(f"total  {'':<20} {total:>12,}  ({total / 2**20:.1f} MiB for {len(out)} layers)")


if __name__ == "__main__":
    main()
