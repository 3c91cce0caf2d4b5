"""Training time with the ICS monitor attached, as ratios measured in one run.

Variants of the same seeded training run of a small CNN (SmallCNN, 6 BatchNorm2d
layers, 3x32x32 inputs, batch 128, SGD with momentum) are interleaved round by round,
so that every ratio compares runs made under the same machine load; each run is a
fresh process (same warm-up for all), and the ratios are medians over the rounds:

- plain:    no monitor;
- idle:     a monitor attached whose schedule never fires: the cost of the optimizer
            hooks and the step counter (goal <= 1.01x);
- defaults: the monitor's defaults (methods exact, max_sliced, sliced; bounds, the
            sampling floor and the moment drift; float64 analysis) measuring every
            10th step (goal <= 1.10x; issue #11 asks <= 1.15x);
- lean:     every 10th step, ``ics_toolkit._vocab.PRESETS["lean"]`` (the exact W1
            only; goal <= 1.05x).

With ``--baseline DIR`` (a checkout of the code before a change, e.g. the main
branch), ``defaults@before`` and ``lean@before`` run the same training with the
monitor imported from DIR, interleaved with the others.

A measured step costs two probe forward passes plus the analysis, whatever the
training step costs, so the ratios depend on the model: the per-part breakdown of a
measured step (median over the measured steps after the first, from the monitor's own
``measure_time_s`` and ``wall_time_s`` columns) says where the time goes, before and
after.

Usage::

    python benchmarks/monitor.py                              # the measurement (CPU)
    python benchmarks/monitor.py --baseline /path/to/main     # ... and the code before
    python benchmarks/monitor.py --quick                      # seconds, a smoke test
    python benchmarks/monitor.py --device cuda                # on a GPU
    python benchmarks/monitor.py --allocator keep             # no run pays page faults

The allocator matters: with glibc's default, the plain runs keep page-faulting large
blocks freed by the previous step (about 17,000 minor faults a step here, steps about
10 % slower), while a run with the default monitor stops doing so after its first
measured step (its allocations raise glibc's threshold for returning memory), which
flatters the monitor; the faults per training step are printed.
``--allocator keep`` runs every variant with glibc keeping freed memory
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` very large), so that no run pays page
faults the others do not.

The plain runs also time a forward pass of the probe without hooks: two of them are the
floor of any configuration at this probe size (every measured step runs two probe passes,
one when consecutive steps are measured). A GPU line (defaults vs plain on ``cuda``) is
added when a CUDA device is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

LEAN = {"methods": ("exact",), "bounds": False, "floor": False, "moments": False}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "idle": {"every": [10**9]},
    "defaults": {},
    "lean": LEAN,
}
PARTS = ("probe passes + rest", "estimate", "floor", "bounds", "drift")


def make_data(n: int, seed: int, device: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def breakdown(df: Any) -> dict[str, float]:
    """Seconds per part of a measured step: medians over the steps after the first."""
    steps = sorted(df.step.unique())
    later = df[df.step.isin(steps[1:] or steps)]
    per_step: dict[str, list[float]] = {part: [] for part in ("total", *PARTS)}
    for _, rows in later.groupby("step"):
        total = float(rows.loc[rows.quantity == "measure_time_s", "value"].sum())
        seconds = rows.drop_duplicates(["layer", "view", "quantity"]).groupby("kind")
        kinds = seconds.wall_time_s.sum().to_dict()
        parts = {
            "estimate": kinds.get("estimate", 0.0),
            "floor": kinds.get("floor", 0.0),
            "bounds": kinds.get("lower", 0.0) + kinds.get("upper", 0.0),
            "drift": kinds.get("drift", 0.0),
        }
        parts["probe passes + rest"] = total - sum(parts.values())
        per_step["total"].append(total)
        for part, value in parts.items():
            per_step[part].append(value)
    return {part: statistics.median(v) for part, v in per_step.items() if v}


def one_run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds for ``args.steps`` training steps of one variant (this process)."""
    import torch
    from torch import nn

    import ics_toolkit as ics
    from ics_toolkit.models import SmallCNN

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = make_data(2048, seed=0, device=device)
    probe = make_data(args.probe, seed=7, device=device)[0]
    model = SmallCNN(3, 10, width=args.width, seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)

    def train(steps: int) -> None:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (args.batch,), generator=g).to(device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    train(3)  # warm-up: thread pools, allocator, kernels
    options = VARIANTS[variant.split("@")[0]]
    monitor = None
    construct = 0.0
    if options is not None:
        options = {"every": args.every, **options}
        begin = time.perf_counter()
        monitor = ics.ICSMonitor(model, probe, **options)
        monitor.attach(opt)
        construct = time.perf_counter() - begin
    sync(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    train(args.steps)
    sync(device)
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    out: dict[str, Any] = {"seconds": seconds, "construct": construct, "faults": faults}
    if monitor is None:  # the floor of any monitor: a forward pass of the probe, no hooks
        passes = []
        for _ in range(5):
            sync(device)
            begin = time.perf_counter()
            with torch.no_grad():  # train mode, as the monitor's pass (default mode="train")
                model(probe)
            sync(device)
            passes.append(time.perf_counter() - begin)
        out["probe_pass"] = statistics.median(passes)
    if monitor is not None:
        monitor.detach()
        if variant.split("@")[0] in ("defaults", "lean"):
            out["breakdown"] = breakdown(monitor.results())
    return out


def idle_hooks(args: argparse.Namespace) -> float:
    """Seconds of the two optimizer hooks of an unscheduled step (too small to see reliably
    in whole-run timings on a shared machine), timed directly in this process."""
    import torch

    import ics_toolkit as ics
    from ics_toolkit.models import SmallCNN

    device = torch.device(args.device)
    model = SmallCNN(3, 10, width=args.width, seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    idle = ics.ICSMonitor(model, make_data(8, seed=7, device=device)[0], every=[10**9])
    idle.attach(opt)
    hooks = list(opt._optimizer_step_pre_hooks.values())
    hooks += list(opt._optimizer_step_post_hooks.values())
    calls = 10000
    start = time.perf_counter()
    for _ in range(calls):
        for hook in hooks:
            hook(opt, (), {})
    idle.detach()
    return (time.perf_counter() - start) / calls


#: Environment of every run's process, by ``--allocator`` (see the module docs).
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    "keep": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}


def spawn(variant: str, args: argparse.Namespace, device: str | None = None) -> dict[str, Any]:
    """One run in a fresh process (importing ics_toolkit from --baseline for @before)."""
    env = {**os.environ, **ALLOCATORS[args.allocator]}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = args.baseline if variant.endswith("@before") else root
    # first on the path, before what the caller's PYTHONPATH brings (e.g. carried wheels)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__), "--one", variant]
    for name in ("steps", "every", "batch", "probe", "width", "threads"):
        value = getattr(args, name)
        if value is not None:
            command += [f"--{name}", str(value)]
    command += ["--device", device or args.device]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--baseline", default=None, help="checkout of the code before")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--allocator",
        choices=tuple(ALLOCATORS),
        default="default",
        help="keep: glibc keeps freed memory for every variant (see the module docs)",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.width = 20, 1, 16
    if args.one:
        print(json.dumps(one_run(args.one, args)))
        return

    import torch

    variants = list(VARIANTS)
    if args.baseline:
        variants += ["defaults@before", "lean@before"]
    print(
        f"SmallCNN(width={args.width}) on 3x32x32, batch {args.batch}, {args.steps} steps, "
        f"probe {args.probe}, monitor every {args.every}; torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} thread(s), device {args.device}; "
        f"{args.rounds} interleaved round(s) of {', '.join(variants)}; allocator "
        f"{args.allocator}" + (f"; before = {args.baseline}" if args.baseline else "")
    )
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    construct: dict[str, list[float]] = {v: [] for v in variants}
    parts: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    probe_pass: list[float] = []
    for _ in range(args.rounds):
        for variant in variants:
            out = spawn(variant, args)
            times[variant].append(out["seconds"])
            faults[variant].append(out["faults"])
            construct[variant].append(out["construct"])
            if "breakdown" in out:
                parts[variant].append(out["breakdown"])
            if "probe_pass" in out:
                probe_pass.append(out["probe_pass"])
    plain_med, plain_best = statistics.median(times["plain"]), min(times["plain"])
    print(f"{'variant':<16}{'median s':>10}{'best s':>9}{'ratio':>8}{'best ratio':>12}")
    for variant, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        print(
            f"{variant:<16}{med:>10.3f}{best:>9.3f}{med / plain_med:>8.3f}"
            f"{best / plain_best:>12.3f}"
        )
    ratio = {v: statistics.median(t) / plain_med for v, t in times.items()}
    print(
        f"idle: {ratio['idle']:.3f}x (goal <= 1.01x); defaults, every {args.every}: "
        f"{ratio['defaults']:.3f}x (goal <= 1.10x, issue #11: <= 1.15x); lean: "
        f"{ratio['lean']:.3f}x (goal <= 1.05x)"
    )

    print(
        "minor page faults per training step (whole run, medians over rounds): "
        + ", ".join(f"{v} {statistics.median(f) / args.steps:,.0f}" for v, f in faults.items())
    )
    print(
        "construction (dry run, memory plan, the one import of POT: once per run, not "
        "timed above): "
        + ", ".join(
            f"{v} {statistics.median(c):.2f} s" for v, c in construct.items() if v != "plain"
        )
    )

    train_step = plain_med / args.steps
    hooks = idle_hooks(args)
    print(
        f"idle hooks, timed directly: {hooks * 1e6:.1f} us per optimizer step = "
        f"{hooks / train_step * 100:.4f} % of a training step (ratio "
        f"{1 + hooks / train_step:.5f}x; goal <= 1.01x)"
    )
    print(
        f"\none training step: {train_step * 1e3:.0f} ms. A measured step (ms, median over "
        "rounds and over the measured steps after the first):"
    )
    shown = [v for v in variants if parts[v]]
    print(f"{'part':<22}" + "".join(f"{v:>17}" for v in shown))
    for part in ("total", *PARTS):
        cells = [statistics.median(b[part] for b in parts[v]) * 1e3 for v in shown]
        print(f"{part:<22}" + "".join(f"{c:>17.0f}" for c in cells))
    for v in shown:
        total = statistics.median(b["total"] for b in parts[v])
        print(
            f"{v}: a measured step costs {total / train_step:.1f} training steps, so every "
            f"{args.every} steps {1 + total / (args.every * train_step):.3f}x"
        )

    passes = 2 * statistics.median(probe_pass)
    print(
        f"two probe forward passes without hooks (measured in the plain runs): "
        f"{passes * 1e3:.0f} ms = {passes / train_step:.2f} training steps, so no "
        f"configuration can go below {1 + passes / (args.every * train_step):.3f}x at every "
        f"{args.every} with this probe (unless consecutive steps are measured: reuse_probe)"
    )

    if args.device == "cpu" and torch.cuda.is_available():
        gpu = {v: spawn(v, args, device="cuda")["seconds"] for v in ("plain", "defaults")}
        print(
            f"GPU ({torch.cuda.get_device_name(0)}): defaults every {args.every}: "
            f"{gpu['defaults'] / gpu['plain']:.3f}x the plain run (one round)"
        )


if __name__ == "__main__":
    main()
