"""``method="sinkhorn"`` against POT's exact solver and GeomLoss, on ICS-like pairs.

An ICS-like pair is a sample X ~ N(0, I) of n rows and Y = X + a random step of a given
norm per row (the same probe inputs before and after an optimizer step): the mean pairwise
cost is many times W1, which is what made a Sinkhorn regularized at the mean cost's scale
useless (issue #15). For each pair it prints the exact W1 (POT's network simplex on the
float64 Euclidean cost, ``wasserstein(method="exact")``) and its time, then for
``wasserstein(method="sinkhorn")`` (certified: the lower end of an interval narrower than
``rtol``) and for GeomLoss's debiased Sinkhorn divergence (``SamplesLoss("sinkhorn", p=1,
blur=0.05 * mean cost, scaling=0.9, debias=True)``, as issue #15 ran it; skipped when
``geomloss`` is not installed: ``pip install geomloss`` or ``.[bench]``) the value, the
relative error and the time as a ratio to the exact solver's. Times are medians of
``--repeat`` calls after one warm-up call.

Usage::

    python benchmarks/sinkhorn.py                  # the issue's three pairs + randomized ones
    python benchmarks/sinkhorn.py --device cuda    # on a GPU (sinkhorn and GeomLoss there)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ics_toolkit import wasserstein

#: (n, d, step): the issue's three pairs, and two where the step is large against the
#: gaps between points (the optimal coupling is not the identity), then randomized ones.
PAIRS = [(512, 4096, 0.4), (2048, 64, 0.4), (1024, 256, 4.0), (1024, 8, 1.0), (2048, 16, 2.0)]


def pair(n: int, d: int, step: float, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    move = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x + step * move / move.norm(dim=1, keepdim=True)
    return x.to(device), y.to(device)


def timed(fn, repeat: int) -> tuple[float, float]:
    value = fn()  # warm-up (and the value)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(value), statistics.median(times)


def geomloss_fn(x: torch.Tensor, y: torch.Tensor):
    try:
        from geomloss import SamplesLoss
    except ImportError:
        return None
    blur = 0.05 * float(torch.cdist(x, y).mean())
    loss = SamplesLoss("sinkhorn", p=1, blur=blur, scaling=0.9, debias=True, backend="tensorized")
    return lambda: float(loss(x, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--random", type=int, default=4, help="randomized pairs after the issue's")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    cases = [(*p, 0) for p in PAIRS]
    for i in range(args.random):
        n = int(torch.randint(256, 1025, (1,), generator=gen))
        d = int(2 ** torch.randint(3, 12, (1,), generator=gen))
        step = float(10 ** torch.empty(1).uniform_(-1.5, 0.7, generator=gen))
        cases.append((n, d, step, i + 1))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}; "
        f"median of {args.repeat} calls; rel = value / exact - 1; time ratio = time / exact's"
    )
    head = f"{'n':>5} {'d':>5} {'step':>7} {'exact':>10} {'exact s':>8} | "
    head += f"{'sinkhorn':>10} {'rel':>9} {'ratio':>6} {'iter':>5} | "
    head += f"{'geomloss':>10} {'rel':>9} {'ratio':>6}"
    print(head)
    worst = 0.0
    for n, d, step, seed in cases:
        x, y = pair(n, d, step, seed, args.device)
        exact, t_exact = timed(lambda x=x, y=y: wasserstein(x, y, "exact"), args.repeat)
        _, log = wasserstein(x, y, "sinkhorn", log=True)
        value, t_sk = timed(lambda x=x, y=y: wasserstein(x, y, "sinkhorn"), args.repeat)
        rel = value / exact - 1
        worst = max(worst, abs(rel))
        line = f"{n:>5} {d:>5} {step:>7.3g} {exact:>10.6g} {t_exact:>8.3f} | "
        line += f"{value:>10.6g} {rel:>+9.1e} {t_sk / t_exact:>6.2f} {log['niter']:>5} | "
        fn = geomloss_fn(x, y)
        if fn is None:
            line += "(geomloss not installed)"
        else:
            g_value, t_g = timed(fn, args.repeat)
            line += f"{g_value:>10.6g} {g_value / exact - 1:>+9.1e} {t_g / t_exact:>6.2f}"
        print(line, flush=True)
    print(f"largest |rel| of sinkhorn: {worst:.1e} (certified: <= rtol = 5e-3)")


if __name__ == "__main__":
    main()
