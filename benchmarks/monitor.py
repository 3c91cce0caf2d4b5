"""Training time with the ICS monitor attached, as ratios measured in one run.

Variants of the same seeded training run of a small CNN (SmallCNN, 6 BatchNorm2d
layers, 3x32x32 inputs, batch 128, SGD with momentum) are interleaved round by round,
so that every ratio compares runs made under the same machine load:

- plain:   no monitor;
- idle:    a monitor attached whose schedule never fires: the cost of the optimizer
           hooks and the step counter (goal <= 1.01x);
- default: the monitor's defaults (methods exact, max_sliced, sliced; bounds, the
           sampling floor and the moment drift; float64 analysis) measuring every
           10th step (goal <= 1.15x);
- lean:    every 10th step, ``methods=("exact",)`` with bounds, floor and moments off;
- probe64: the defaults with a probe of 64 instead of 128 inputs.

A measured step costs two probe forward passes plus the analysis, whatever the
training step costs, so the ratios depend on the model: the per-step breakdown
printed at the end says where the time goes.

Usage::

    python benchmarks/monitor.py                 # the default measurement (CPU)
    python benchmarks/monitor.py --quick         # seconds, for a smoke test
    python benchmarks/monitor.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.models import SmallCNN

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "idle": {"every": [10**9]},
    "default": {},
    "lean": {"methods": ("exact",), "bounds": False, "floor": False, "moments": False},
    "probe64": {"probe_size": 64},
}


def make_data(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(variant: str, args: argparse.Namespace, x, y, probe) -> tuple[float, Any]:
    """Seconds for `args.steps` training steps of one variant, and its monitor."""
    model = SmallCNN(3, 10, width=args.width, seed=0).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = VARIANTS[variant]
    monitor = None
    if options is not None:
        options = dict(options)
        size = options.pop("probe_size", len(probe))
        options.setdefault("every", args.every)
        monitor = ics.ICSMonitor(model, probe[:size], **options)
        monitor.attach(opt)
    g = torch.Generator().manual_seed(1)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=g).to(args.device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    sync(args.device)
    seconds = time.perf_counter() - start
    if monitor is not None:
        monitor.detach()
    return seconds, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--probe", type=int, default=128, help="probe size")
    parser.add_argument("--width", type=int, default=32, help="SmallCNN width")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.quick:
        args.steps, args.rounds, args.width = 20, 1, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_data(2048, seed=0, device=args.device)
    probe = make_data(args.probe, seed=7, device=args.device)[0]

    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(
        f"SmallCNN(width={args.width}) on 3x32x32, batch {args.batch}, {args.steps} steps, "
        f"probe {args.probe}, monitor every {args.every}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), device {args.device} ({name}); "
        f"{args.rounds} interleaved round(s)"
    )
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    monitors: dict[str, Any] = {}
    run("plain", args, x, y, probe)  # warm-up
    for _ in range(args.rounds):
        for variant in VARIANTS:
            seconds, monitors[variant] = run(variant, args, x, y, probe)
            times[variant].append(seconds)
    plain_med, plain_best = statistics.median(times["plain"]), min(times["plain"])
    print(f"{'variant':<9}{'median s':>10}{'best s':>9}{'ratio':>8}{'best ratio':>12}")
    for variant, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(
            f"{variant:<9}{med:>10.3f}{best:>9.3f}{med / plain_med:>8.3f}{best / plain_best:>12.3f}"
        )
    print(
        f"idle monitor: {statistics.median(times['idle']) / plain_med:.3f}x (goal <= 1.01x); "
        f"defaults, every {args.every}: {statistics.median(times['default']) / plain_med:.3f}x "
        "(goal <= 1.15x)"
    )

    # the idle cost, measured directly: the two optimizer hooks of an unscheduled step
    # (too small to see reliably in whole-run timings on a shared machine)
    model = SmallCNN(3, 10, width=args.width, seed=0).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    idle = ics.ICSMonitor(model, probe, every=[10**9])
    idle.attach(opt)
    hooks = list(opt._optimizer_step_pre_hooks.values()) + list(
        opt._optimizer_step_post_hooks.values()
    )
    calls = 20000
    start = time.perf_counter()
    for _ in range(calls // 2):
        for hook in hooks:
            hook(opt, (), {})
    per_step = (time.perf_counter() - start) / (calls // 2)
    idle.detach()
    train_step = plain_med / args.steps
    print(
        f"idle hooks: {per_step * 1e6:.1f} us per optimizer step = "
        f"{per_step / train_step * 100:.4f} % of a {train_step * 1e3:.0f} ms training step "
        f"(ratio {1 + per_step / train_step:.5f}x; goal <= 1.01x)"
    )

    # where a measured step's time goes (the default monitor's own timings)
    df = monitors["default"].results()
    last = df[df.step == df.step.max()]
    per_step = last.loc[last.quantity == "measure_time_s", "value"].item()
    print(
        f"\none training step: {train_step * 1e3:.0f} ms; the monitor's work at one measured "
        f"step (two probe passes and the analysis): {per_step * 1e3:.0f} ms, so measuring every "
        f"{args.every} steps costs {1 + per_step / (args.every * train_step):.2f}x; of the "
        "analysis (summed over layers):"
    )
    seconds = last.drop_duplicates(["layer", "quantity"]).groupby("kind").wall_time_s.sum()
    for kind, value in seconds.sort_values(ascending=False).items():
        print(f"  {kind:<9}{value * 1e3:8.0f} ms")


if __name__ == "__main__":
    main()
