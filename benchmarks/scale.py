"""How the cost of a measured step grows with the probe size n and the layer width d.

Three sections, each measured in this run on one device:

(a) analysis time of one measured step for one layer (``ics_toolkit.shift.measure_step``
    on synthetic captures X ~ N(0, I), Y = X + 0.1 N(0, I), float32 storage) per method,
    with floors, bounds and moments off so that each row is the method alone; plus the
    pseudo-methods ``bounds`` (L1-L3, U1, U2) and ``moments`` (the drift). Growth in n
    at fixed d and in d at fixed n, with the exponent of a least-squares fit
    time ~ size^p on the log-log points;
(b) the random-projection sketch taken in the capture hook (``Sketch(d, k)`` on n rows):
    time versus d (expected p ~ 1: O(n d log d));
(c) memory per layer of a monitor on ``Linear(8, d) -> BatchNorm1d(d)`` with and without
    ``sketch=k``: what ``ICSMonitor.memory_per_layer()`` predicts, what one capture
    actually holds (``nbytes`` of the stored tensors), and the measured peak of one
    measured step (CUDA: ``torch.cuda.max_memory_allocated``; Linux CPU: the growth of
    the process's resident high-water mark, reset through ``/proc/self/clear_refs``),
    with the ratio without / with the sketch. Goal: with the sketch, memory per layer
    independent of d.

Timings are the best of --repeat runs after one warm-up (the machine may be shared).

    python benchmarks/scale.py            # the full run (a few minutes on 2 CPU cores)
    python benchmarks/scale.py --quick    # seconds
    python benchmarks/scale.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.recording import CaptureInfo
from ics_toolkit.shift import MeasureConfig, StepCapture, measure_step
from ics_toolkit.sketch import CHUNK_COPIES, CHUNK_ELEMENTS, Sketch

METHODS = ("exact", "sinkhorn", "paired", "sliced", "max_sliced", "per_coordinate")
PSEUDO = ("bounds", "moments")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Best of ``repeat`` timed runs after a warm-up (the least disturbed by other load)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def exponent(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(t, 1e-9)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def captures(n: int, d: int, device: torch.device) -> tuple[StepCapture, StepCapture]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=gen, device=device)
    y = x + 0.1 * torch.randn(n, d, generator=gen, device=device)
    info = CaptureInfo(
        key="layer",
        name="layer",
        call=1,
        site="output",
        module_type="Linear",
        module=nn.Identity(),
        shape=(n, d),
        batch_axis=0,
        channel_axis=1,
        source_dtype=torch.float32,
        source_shape=(n, d),
    )
    return (
        StepCapture(tensors={"layer": x}, info={"layer": info}),
        StepCapture(tensors={"layer": y}, info={"layer": info}),
    )


def config(method: str, projections: int) -> MeasureConfig:
    if method in PSEUDO:
        return MeasureConfig(
            methods=("paired",),
            floor=(),
            bounds=method == "bounds",
            moments=method == "moments",
            n_projections=projections,
        )
    return MeasureConfig(
        methods=(method,),
        floor=(),
        bounds=False,
        moments=False,
        n_projections=projections,
        method_options={"sinkhorn": {"numItermax": 2000, "on_failure": "flag"}},
    )


def section_time(args: argparse.Namespace, device: torch.device) -> None:
    methods = [m for m in (*METHODS, *PSEUDO) if m in args.methods]
    grids = {
        "n": [(n, args.d) for n in args.ns],
        "d": [(args.n, d) for d in args.ds],
    }
    print(
        f"\n(a) analysis time of one measured step, one layer, ms (best of {args.repeat}); "
        f"sliced/max_sliced/L3 with L = {args.projections} directions; 'bounds' and "
        "'moments' are measured with 'paired' (subtract its row)"
    )
    for axis, grid in grids.items():
        fixed = f"d = {args.d}" if axis == "n" else f"n = {args.n}"
        sizes = [n if axis == "n" else d for n, d in grid]
        head = "".join(f"{axis}={s:>7}" for s in sizes)
        print(f"\n  growth in {axis} ({fixed})")
        print(f"  {'method':<15}{head}   exponent p (time ~ {axis}^p)")
        for method in methods:
            times = []
            for n, d in grid:
                if method in ("exact", "sinkhorn") and n > args.max_exact_n:
                    times.append(math.nan)
                    continue
                before, after = captures(n, d, device)
                cfg = config(method, args.projections)
                times.append(
                    best_time(
                        lambda b=before, a=after, c=cfg: measure_step(0, b, a, c),
                        args.repeat,
                        device,
                    )
                )
            cells = "".join(
                f"{1e3 * t:>{len(axis) + 8}.2f}" if math.isfinite(t) else f"{'-':>{len(axis) + 8}}"
                for t in times
            )
            ok = [(s, t) for s, t in zip(sizes, times, strict=True) if math.isfinite(t)]
            p = exponent([s for s, _ in ok], [t for _, t in ok]) if len(ok) >= 2 else math.nan
            print(f"  {method:<15}{cells}   {p:5.2f}")


def section_sketch(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\n(b) the sketch in the capture hook: Sketch(d, k={args.k}) on n = {args.n} rows, "
        f"ms (best of {args.repeat})"
    )
    times = []
    for d in args.ds:
        x = torch.randn(args.n, d, device=device)
        sk = Sketch(d, args.k, seed=0)
        times.append(best_time(lambda x=x, sk=sk: sk(x), args.repeat, device))
    print("  " + "".join(f"d={d:>8}" for d in args.ds) + "   exponent p (time ~ d^p)")
    cells = "".join(f"{1e3 * t:>10.2f}" for t in times)
    print(f"  {cells}   {exponent(args.ds, times):5.2f}")


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> bool:
    """glibc: serve every allocation above 64 KiB by its own mmap, returned on free.

    Otherwise glibc raises its mmap threshold after large frees and keeps the memory in
    its heap, and the resident high-water mark stops showing what a step allocates.
    Called first thing, before the heap grows.
    """
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except AttributeError:  # not glibc
        return False


def _trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # hand free heap pages back, so that they count again


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes ``fn`` needed above what was allocated before it (None: cannot measure)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif platform.system() == "Linux":
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident high-water mark (Linux >= 4.0)
        except OSError:
            return None
        base = _rss_kib("VmRSS") * 1024
    else:
        return None
    fn()
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _rss_kib("VmHWM") * 1024 - base


def monitor_peak(monitor: ics.ICSMonitor, model: nn.Module, x: torch.Tensor, device) -> Any:
    """Peak of one measured (SGD) step minus the peak of a plain no-grad probe forward."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(x).square().mean().backward()  # gradients exist before the measurement
    monitor.attach(opt)

    def step() -> None:
        opt.step()  # the monitor's hooks capture before and after, then measure

    def forward() -> None:
        with torch.no_grad():
            model(x)

    step()  # warm-up: imports, caches, allocator pools
    measured, plain = peak(step, device), peak(forward, device)
    monitor.detach()
    return None if measured is None or plain is None else max(measured - plain, 0)


def section_memory(args: argparse.Namespace, device: torch.device) -> None:
    if device.type == "cuda":
        how = "torch.cuda.max_memory_allocated"
    else:
        how = "resident high-water mark growth" + (
            ", glibc mmap threshold fixed at 64 KiB" if args.fixed_mmap else ""
        )
    print(
        f"\n(c) memory per layer of Linear(8, d) -> BatchNorm1d(d), probe n = {args.n}, "
        f"float32 storage, methods exact + sliced, bounds and moments on; MiB. "
        f"predicted = memory_per_layer().bytes_peak, held = nbytes of one capture x 2, "
        f"measured = peak of one measured step minus that of a plain no-grad probe "
        f"forward ({how})"
    )
    print(
        f"  {'d':>7} | {'no sketch: predicted':>21}{'held':>8}{'measured':>10} | "
        f"{f'sketch k={args.k}: predicted':>24}{'held':>8}{'measured':>10} | "
        f"{'ratio held':>10}{'measured':>10}"
    )
    mib = 2.0**20
    for d in args.ds:
        cells = []
        for sketch in (None, args.k):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, d), nn.BatchNorm1d(d)).to(device)
            x = torch.randn(args.n, 8, device=device)
            mon = ics.ICSMonitor(
                model, x, every=1, methods=("exact", "sliced"), sketch=sketch, floor=False
            )
            table = mon.memory_per_layer()
            predicted = int(table.bytes_peak.sum())
            cap = mon._capture()
            held = 2 * sum(t.nbytes for t in cap.tensors.values()) + 2 * sum(
                s.x_hat.nbytes for s in cap.norms.values()
            )
            del cap
            cells.append((predicted, held, monitor_peak(mon, model, x, device)))
        (p0, h0, m0), (p1, h1, m1) = cells

        def fmt(v: int | None, width: int) -> str:
            return f"{v / mib:>{width}.2f}" if v is not None else f"{'n/a':>{width}}"

        print(
            f"  {d:>7} | {fmt(p0, 21)}{fmt(h0, 8)}{fmt(m0, 10)} | "
            f"{fmt(p1, 24)}{fmt(h1, 8)}{fmt(m1, 10)} | {h0 / h1:>10.1f}"
            + (f"{m0 / m1:>10.1f}" if m0 and m1 else f"{'n/a':>10}")
        )
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["default"])
    print(
        "  ratios: without / with the sketch. With the sketch the held bytes are the same "
        "for every d; the peak adds the capture hook's transient chunks, at most "
        f"{CHUNK_COPIES} x {budget} float32 values ({CHUNK_COPIES * budget * 4 / mib:.0f} MiB) "
        "on this device whatever d (one row per chunk beyond that width), and its random "
        "draws (13 bytes per coordinate, freed with the chunks)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--ds", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--n", type=int, default=256, help="probe size for the d sweeps")
    p.add_argument("--d", type=int, default=1024, help="width for the n sweep")
    p.add_argument("--k", type=int, default=256, help="sketch dimension")
    p.add_argument("--projections", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=[*METHODS, *PSEUDO])
    p.add_argument("--max-exact-n", type=int, default=2048, help="skip exact/sinkhorn above")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1: steadier)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--skip", nargs="*", default=[], choices=["time", "sketch", "memory"])
    args = p.parse_args()
    args.fixed_mmap = platform.system() == "Linux" and fix_mmap_threshold()
    if args.quick:
        args.ns, args.ds, args.n, args.d, args.k = [64, 128, 256], [256, 1024, 4096], 128, 256, 64
        args.repeat = 3
        if "sinkhorn" in args.methods and args.methods == [*METHODS, *PSEUDO]:
            args.methods.remove("sinkhorn")  # iteration-bound: seconds even when small
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    print(f"device: {device} ({where})")
    print(
        f"torch {torch.__version__}, ics_toolkit {ics.__version__}, torch threads "
        f"{torch.get_num_threads()}, python {platform.python_version()}"
    )
    if "time" not in args.skip:
        section_time(args, device)
    if "sketch" not in args.skip:
        section_sketch(args, device)
    if "memory" not in args.skip:
        section_memory(args, device)


if __name__ == "__main__":
    main()
