"""Where one measured step of a large model goes, function by function (cProfile).

Builds ResNet-50 (or ViT-B/16) from its ``transformers`` config (no download), attaches
the default ICSMonitor with a probe of ``--probe`` 224x224 images, times a plain training
step and a no-grad forward of the probe, then profiles one measured training step (the
training step itself, the two probe passes with their capture hooks, the analysis) and
prints the functions with the most time of their own. A warm-up measured step first, so
that one-time costs (the random directions' draw, allocator growth) are not counted.

Usage::

    python benchmarks/profile_big_step.py                       # ResNet-50, probe 64
    python benchmarks/profile_big_step.py --model vit --probe 16
    python benchmarks/profile_big_step.py --every 1              # steady state, pass reused
    python benchmarks/profile_big_step.py --device cuda          # host time and GPU kernels

On a GPU the host's view (cProfile) shows where Python waits: for the kernels at each
synchronization (a tensor read into a Python number), and for kernel launches; the
table of torch.profiler after it says how much of the step the GPU itself was busy.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet50", "vit"), default="resnet50")
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--every", type=int, choices=(1, 2), default=2, help="1: steps 2 and 3 measured too"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import transformers as tf

    import ics_toolkit as ics

    torch.manual_seed(0)
    if args.model == "resnet50":
        model = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=10))
    else:
        model = tf.ViTForImageClassification(tf.ViTConfig(num_labels=10))
    device = torch.device(args.device)
    model.to(device).train()
    gen = torch.Generator().manual_seed(1)
    n = args.probe
    probe = torch.randn(n, 3, 224, 224, generator=gen).to(device)
    images = torch.randn(n, 3, 224, 224, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every=2: steps 1 and 3 measured, each with two probe passes; every=1: steps 1..3,
        # so step 3 reuses the pass after step 2 (one probe pass, the steady state)
        every = (lambda s: s % 2 == 1) if args.every == 2 else (lambda s: s >= 1)
        monitor = ics.ICSMonitor(model, probe, every=every, seed=0)
    monitor.attach(opt)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(pixel_values=images).logits
        torch.nn.functional.cross_entropy(out, labels).backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    step()  # step 0, not measured: warm-up
    step()  # step 1, measured: the one-time costs
    seconds_2 = step()  # step 2: plain (every=2) or measured (every=1)
    if args.every == 2:
        print(f"plain training step {seconds_2:.2f} s")
    with torch.no_grad():
        start = time.perf_counter()
        model(pixel_values=probe)
        sync()
        print(f"no-grad forward of the probe {time.perf_counter() - start:.2f} s")
    profile = cProfile.Profile()
    profile.enable()
    seconds = step()  # step 3, measured
    profile.disable()
    print(f"measured training step {seconds:.2f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    if device.type == "cuda":  # one more measured step: the GPU's busy time and kernels
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        if args.every == 2:
            step()  # step 4, not measured
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            seconds = step()  # measured
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e6
        kernels = sum(e.count for e in events if e.self_device_time_total > 0)
        print(f"measured step under torch.profiler {seconds:.2f} s: GPU busy {busy:.2f} s")
        print(f"({kernels} GPU operations)")
        print(events.table(sort_by="self_device_time_total", row_limit=args.top))
    monitor.detach()


if __name__ == "__main__":
    main()
