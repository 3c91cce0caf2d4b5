"""Test accuracy of BatchNorm, Unitization and no normalization on the embedded digits.

Trains the SmallCNN and an MLP on scikit-learn's 8x8 digits (1347 train / 450 test
images) with each normalization, over several seeds, with the same optimizer and
schedule (SGD, Nesterov momentum 0.9, weight decay 5e-4, learning rate divided by 10
at 50% and 75% of the steps), and prints test accuracy mean +/- std and wall time per
run for each variant. Unitization starts at alpha = 0 (BatchNorm) and learns alpha.

    python benchmarks/accuracy.py            # 3 seeds x 600 steps: a few minutes
    python benchmarks/accuracy.py --quick    # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ics_toolkit.data import load_digits
from ics_toolkit.models import MLP, SmallCNN
from ics_toolkit.nn import Unitization
from ics_toolkit.train import train

VARIANTS = {
    "batch": "batch",
    "unitization": "unitization",
    "unitization-l2": lambda c, d: _unit(c, d, "l2"),
    "none": "none",
}


def _unit(c: int, dims: int, norm: str) -> Unitization:
    from ics_toolkit.nn import Unitization1d, Unitization2d

    return (Unitization1d if dims == 1 else Unitization2d)(c, norm=norm)


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):6.2f} +/- {100 * sd:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=32, help="SmallCNN first-stage channels")
    parser.add_argument("--hidden", type=int, nargs="+", default=(128, 128, 128))
    parser.add_argument("--models", nargs="+", default=("cnn", "mlp"), choices=("cnn", "mlp"))
    parser.add_argument(
        "--variants", nargs="+", default=("batch", "unitization", "none"), choices=tuple(VARIANTS)
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 steps, narrow models")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.width, args.hidden = 60, 8, (32, 32)
    torch.set_num_threads(args.threads)
    data = load_digits()
    print(
        f"digits {tuple(data.x_train.shape)} train / {tuple(data.x_test.shape)} test; "
        f"{args.steps} steps of batch {args.batch_size}, lr {args.lr}, seeds 0..{args.seeds - 1}; "
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs"
    )
    builders = {
        "cnn": lambda norm, seed: SmallCNN(1, 10, width=args.width, norm=norm, seed=seed),
        "mlp": lambda norm, seed: MLP(64, 10, hidden=tuple(args.hidden), norm=norm, seed=seed),
    }
    # one untimed warm-up run per model, so first-call overheads do not bias a variant
    for name in args.models:
        train(builders[name]("batch", 0), data, steps=5, progress=False)

    header = (
        f"{'model':<9}{'norm':<16}{'test accuracy %':>18}{'final loss':>12}"
        f"{'wall s/run':>12}{'mean |alpha|':>14}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        for variant in args.variants:
            accs, losses, walls, alphas = [], [], [], []
            for seed in range(args.seeds):
                model = builders[name](VARIANTS[variant], seed)
                t0 = time.perf_counter()
                result = train(
                    model,
                    data,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    seed=seed,
                    progress=False,
                )
                walls.append(time.perf_counter() - t0)
                accs.append(result.test_accuracy if not result.diverged else 0.0)
                losses.append(statistics.mean(result.losses[-20:]))
                a = [
                    m.alpha.detach().abs().mean()
                    for m in model.modules()
                    if isinstance(m, Unitization)
                ]
                if a:
                    alphas.append(float(torch.stack(a).mean()))
            alpha_txt = f"{statistics.mean(alphas):14.4f}" if alphas else f"{'-':>14}"
            print(
                f"{name:<9}{variant:<16}{_mean_std(accs):>18}{statistics.mean(losses):>12.4f}"
                f"{statistics.mean(walls):>12.2f}{alpha_txt}"
            )


if __name__ == "__main__":
    main()
