"""Benchmark of the Earth Mover engine (ics_toolkit.distances), measured in one run.

(a) batched sliced W1 over many layers via ``wasserstein_many`` versus a loop of POT's
    own ``ot.sliced_wasserstein_distance(X, Y, n_projections=L, p=1, seed=...)`` on the
    same torch tensors (goal: >= 1.5x faster on CPU);
(b) the same batched call versus the bare projection matmuls ``x @ D``, ``y @ D`` of the
    same data (the floor; goal: within 1.5x of it);
(c) the ``exact`` method (POT emd2 on the float64 Euclidean cost) for growing n, with
    POT's plain ``ot.emd2(a, b, ot.dist(x, y, metric="euclidean"))`` beside it.

Timings are the median and the best of --repeat runs after one warm-up run; the
compared functions are timed round-robin so that load from other processes hits
them alike.

    python benchmarks/engine.py            # the full run (a few minutes on 2 cores)
    python benchmarks/engine.py --quick    # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import ot
import torch

from ics_toolkit.distances import random_directions, wasserstein, wasserstein_many

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fns: dict[str, Callable[[], object]], repeat: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median and best wall time (s) of each function, after one warm-up call each.

    The functions are timed round-robin (one run of each per round), so that load from
    other processes on a shared machine affects all of them alike and the ratios stay
    meaningful.
    """
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def ms(t: float) -> str:
    return f"{1e3 * t:9.1f}"


def layers(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> list:
    """One (x, y) pair per layer: y = x + 0.1 N(0, I), a small training step."""
    gen = torch.Generator(device=device).manual_seed(1234)
    out = []
    for _ in range(args.layers):
        x = torch.randn(args.n, args.d, generator=gen, device=device, dtype=torch.float64)
        y = x + 0.1 * torch.randn(args.n, args.d, generator=gen, device=device, dtype=x.dtype)
        out.append((x.to(dtype), y.to(dtype)))
    return out


def sliced_section(args: argparse.Namespace, device: torch.device) -> None:
    n_proj = args.projections
    print(
        f"\n(a, b) sliced W1 (p = 1) over {args.layers} layers, n = {args.n}, d = {args.d}, "
        f"L = {n_proj} directions; y = x + 0.1 N(0, I)"
    )
    header = (
        f"{'input':8} {'compute':8} {'ours ms':>9} {'(best)':>9} {'POT ms':>9} {'(best)':>9} "
        f"{'floor ms':>9} {'(best)':>9} {'POT/ours':>9} {'(best)':>7} {'ours/floor':>10} "
        f"{'(best)':>7}"
    )
    print(header)
    print("-" * len(header))
    checks = []
    for name in args.dtypes:
        in_dtype = DTYPES[name]
        pairs = layers(args, in_dtype, device)
        # ours computes in float64 by default; with float32 input also show dtype=None
        variants = [("float64", {})]
        if in_dtype != torch.float64:
            variants.append((name, {"dtype": None}))
        for comp_name, opts in variants:
            comp = DTYPES[comp_name]

            def ours(pairs=pairs, opts=opts):
                return wasserstein_many(pairs, "sliced", n_projections=n_proj, seed=0, **opts)

            def pot(pairs=pairs, comp=comp):
                return [
                    ot.sliced_wasserstein_distance(
                        x.to(comp), y.to(comp), n_projections=n_proj, p=1, seed=i
                    )
                    for i, (x, y) in enumerate(pairs)
                ]

            proj = random_directions(args.d, n_proj, seed=0, device=device, dtype=comp)
            cast = [(x.to(comp), y.to(comp)) for x, y in pairs]

            def floor(cast=cast, proj=proj):
                for x, y in cast:
                    x @ proj
                    y @ proj

            t = timeit({"ours": ours, "pot": pot, "floor": floor}, args.repeat, device)
            t_ours, t_pot, t_floor = t["ours"], t["pot"], t["floor"]
            print(
                f"{name:8} {comp_name:8} {ms(t_ours[0])} {ms(t_ours[1])} {ms(t_pot[0])} "
                f"{ms(t_pot[1])} {ms(t_floor[0])} {ms(t_floor[1])} "
                f"{t_pot[0] / t_ours[0]:8.2f}x {t_pot[1] / t_ours[1]:6.2f}x "
                f"{t_ours[0] / t_floor[0]:9.2f}x {t_ours[1] / t_floor[1]:6.2f}x"
            )
            # same directions -> same numbers as POT (a correctness check, not timed)
            mine = np.array(ours())
            theirs = np.array(
                [
                    float(
                        ot.sliced_wasserstein_distance(
                            x.to(comp), y.to(comp), projections=proj, p=1
                        )
                    )
                    for x, y in pairs
                ]
            )
            checks.append((name, comp_name, float(np.max(np.abs(mine / theirs - 1))), mine.mean()))
            del cast
        del pairs
    print(
        "ratios of medians, then of best times (the best time is the least disturbed by other\n"
        "processes on a shared machine); goals: POT/ours >= 1.5, ours/floor <= 1.5"
    )
    for name, comp_name, rel, mean in checks:
        print(
            f"check {name} input, {comp_name} compute: max relative difference to POT with "
            f"the same directions = {rel:.1e} (mean sliced value {mean:.4f})"
        )


def exact_section(args: argparse.Namespace, device: torch.device) -> None:
    d = args.exact_d
    print(f"\n(c) exact W1 (POT emd2, float64 Euclidean cost), d = {d}; x ~ N(0, I), y ~ N(0.5, I)")
    header = (
        f"{'n = m':>6} {'ours ms':>9} {'(best)':>9} {'cost ms':>9} {'POT ms':>9} {'(best)':>9} "
        f"{'ours/POT':>9} {'status':>8} {'numItermax':>11} {'W1':>9}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for n in args.exact_sizes:
        xn = rng.standard_normal((n, d))
        yn = rng.standard_normal((n, d)) + 0.5
        x = torch.from_numpy(xn).to(device)
        y = torch.from_numpy(yn).to(device)
        repeat = max(1, args.repeat if n <= 1024 else args.repeat // 2)
        w = np.full(n, 1.0 / n)

        def pot(xn=xn, yn=yn, w=w, n=n):
            return ot.emd2(w, w, ot.dist(xn, yn, metric="euclidean"), numItermax=n * n)

        t = timeit(
            {
                "ours": lambda x=x, y=y: wasserstein(x, y, "exact"),
                "cost": lambda x=x, y=y: torch.cdist(
                    x, y, compute_mode="donot_use_mm_for_euclid_dist"
                ).cpu(),
                "pot": pot,
            },
            repeat,
            device,
        )
        t_ours, t_cost, t_pot = t["ours"], t["cost"], t["pot"]
        value, info = wasserstein(x, y, "exact", log=True)
        print(
            f"{n:6d} {ms(t_ours[0])} {ms(t_ours[1])} {ms(t_cost[0])} {ms(t_pot[0])} {ms(t_pot[1])} "
            f"{t_ours[0] / t_pot[0]:8.2f}x {info['status']:>8} {info['numItermax']:11d} "
            f"{value:9.4f}"
        )
    print("POT column: ot.emd2 on ot.dist(metric='euclidean') with numItermax = n * n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=20, help="number of layer pairs (20)")
    p.add_argument("--n", type=int, default=512, help="samples per layer (512)")
    p.add_argument("--d", type=int, default=4096, help="layer width (4096)")
    p.add_argument("--projections", type=int, default=128, help="directions L (128)")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=list(DTYPES))
    p.add_argument("--exact-sizes", nargs="+", type=int, default=[256, 512, 1024, 2048])
    p.add_argument("--exact-d", type=int, default=64, help="width for the exact section (64)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (7)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    p.add_argument("--skip-exact", action="store_true", help="skip section (c)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.n, args.d, args.repeat = 4, 256, 1024, 2
        args.exact_sizes = [128, 256]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({where or platform.machine()})")
    print(
        f"torch {torch.__version__}, POT {ot.__version__}, numpy {np.__version__}, "
        f"torch threads {torch.get_num_threads()}, python {platform.python_version()}"
    )
    print(f"timing: median and best of {args.repeat} runs after a warm-up")
    sliced_section(args, device)
    if not args.skip_exact:
        exact_section(args, device)


if __name__ == "__main__":
    main()
