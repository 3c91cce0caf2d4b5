"""Pinned host memory of the plan's host offload, step by step, against the plan (GPU only).

Builds ResNet-50 from its ``transformers`` config (no download), attaches the default
ICSMonitor with a probe of ``--probe`` 224x224 images and a budget of ``--budget`` (a
share of the free device memory, small enough that the plan keeps the captures in
page-locked host memory), trains ``--steps`` steps with every step measured and prints
after each one the process's resident memory and torch's caching host allocator's
allocated bytes (current and peak), next to the plan's ``host_peak``.

Usage::

    python benchmarks/pinned_host.py                 # with the analysis worker (default)
    python benchmarks/pinned_host.py --no-worker
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-worker", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device: host offload is a GPU plan")

    import transformers as tf

    import ics_toolkit as ics

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=10)).to(device).train()
    gen = torch.Generator().manual_seed(1)
    n = args.probe
    probe = torch.randn(n, 3, 224, 224, generator=gen).to(device)
    images = torch.randn(n, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = ics.ICSMonitor(
            model, probe, every=1, memory_budget=args.budget, seed=0, worker=not args.no_worker
        )
    plan = monitor.memory_plan()
    print(plan.summary())
    print(f"plan: host_peak {plan.host_peak / 2**30:.2f} GiB (offload {plan.offload})")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor.attach(opt)
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        stats = torch.cuda.host_memory_stats()
        print(
            f"step {step}: resident {resident_gib():.2f} GiB, pinned allocated "
            f"{stats.get('allocated_bytes.current', 0) / 2**30:.2f} GiB "
            f"(peak {stats.get('allocated_bytes.peak', 0) / 2**30:.2f})",
            flush=True,
        )
    monitor.detach()


if __name__ == "__main__":
    main()
