"""Real architectures at real sizes: ResNet-50 and ViT-B/16 at 224 x 224, probe 16 / 32 / 64.

Each configuration (architecture, probe size n) runs in a fresh process (so that its
peak resident memory is its own): the model is built from a ``transformers`` config
(no download: ``ResNetForImageClassification(ResNetConfig(num_labels=10))``, 53
BatchNorm layers; ``ViTForImageClassification(ViTConfig(num_labels=10))``, 25
LayerNorms), trained with SGD on random 224 x 224 images, with the default monitor
(every normalization layer, methods exact / max_sliced / sliced, floors, bounds,
moments, the default memory budget). ``--every 2`` (the default) measures every other
step: a measured step runs both probe passes (before and after the optimizer step).
``--every 1`` is the issue's setting, every step measured: the probe pass after step t
is reused as the one before step t+1 (``reuse_probe``, on by default), so a measured
step in steady state runs one probe pass; the schedule measures steps 4j+1..4j+3 and
times 4j+2, 4j+3 (steady) against the unmeasured 4j; a control then times unmeasured
steps while as many bytes as one capture are held (on some machines, e.g. this
project's VMs, held memory alone slows a training step: its page faults cost more).
Unmeasured and measured steps of the same batch size n alternate, so both see the same
machine load; the ratio is the median measured step over the median unmeasured one.

The allocator matters on a CPU: glibc's malloc hands every block above 32 MiB back to
the operating system when it is freed, so each training step of a large model faults
in its activations again (on this project's VMs 3.4 to 6.2 million page faults, a
quarter of a ResNet-50 step at batch 64, and slower still while more memory is held).
``--allocator keep`` runs each configuration with glibc keeping freed memory for reuse
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` very large: the effect of the
jemalloc / tcmalloc preload that CPU training guides recommend); ``default`` (the
default) leaves the environment as it is. The same setting applies to the plain and
the measured steps of a run.

Printed per configuration: the memory plan's choice and predicted peak, the steps'
medians and their ratio, where a measured step's time goes (probe passes, the views
and scans outside every estimator, the estimators by family, from ``perf_counter``
timers around the monitor's parts and the rows' ``wall_time_s``), the peak memory (the
process's resident high-water mark; on CUDA also the device's), and the minor page
faults of an unmeasured training step (see ``--allocator``).

Usage::

    python benchmarks/big_models.py                      # both models, n = 16 32 64
    python benchmarks/big_models.py --model resnet50 --probe 16 --rounds 2
    python benchmarks/big_models.py --probe 64 --every 1  # every step measured
    python benchmarks/big_models.py --device cuda        # the GPU variant
    python benchmarks/big_models.py --memory-budget none # the monitor without a plan
    python benchmarks/big_models.py --sketch 256         # every wide layer sketched
    python benchmarks/big_models.py --allocator keep     # freed memory kept for reuse

Needs ``transformers`` (models from configs only, ``HF_HUB_OFFLINE=1`` is set). Not run
by the test suite.
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
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: Environment of each configuration's process, by ``--allocator``.
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    "keep": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}

ESTIMATOR_FAMILIES = {
    "sliced": "sliced+max_sliced",
    "max_sliced": "sliced+max_sliced",
    "exact": "exact",
    "paired": "other estimators",
    "per_coordinate": "other estimators",
    "sinkhorn": "other estimators",
}


def build(name: str) -> Any:
    """The model, from its ``transformers`` config (random weights, no download)."""
    import transformers as tf

    if name == "resnet50":
        return tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=10))
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=10))
    raise SystemExit(f"unknown model {name!r}: resnet50 or vit")


def family(quantity: str, kind: str) -> str:
    if kind == "floor":
        return "floor"
    if kind in ("lower", "upper", "theory_lower", "theory_upper", "bound"):
        return "bounds"
    if kind == "drift":
        return "drift"
    return ESTIMATOR_FAMILIES.get(quantity, "other estimators")


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process; returns the measured numbers."""
    import warnings

    import torch

    import ics_toolkit as ics
    from ics_toolkit import monitor as monitor_module

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(args.model).to(device)
    model.train()
    n = args.probe[0]
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(n, 3, 224, 224, generator=g).to(device)
    images = torch.randn(n, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    # timers around the monitor's parts (benchmark instrumentation only)
    parts: dict[str, list[float]] = defaultdict(list)
    capture, measure = ics.ICSMonitor._capture, monitor_module.measure_step
    layerwise = monitor_module.measure_layerwise

    def timed(fn: Any, label: str) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[label].append(time.perf_counter() - start)

        return wrapper

    ics.ICSMonitor._capture = timed(capture, "probe passes")  # type: ignore[method-assign]
    monitor_module.measure_step = timed(measure, "analysis")
    monitor_module.measure_layerwise = timed(layerwise, "analysis")

    budget: Any = args.memory_budget
    budget = None if budget == "none" else float(budget)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        monitor = ics.ICSMonitor(
            model,
            probe,
            every=(lambda s: s % 2 == 1) if args.every == 2 else (lambda s: s % 4 != 0),
            memory_budget=budget,
            sketch=args.sketch or None,
            seed=0,
        )
    build_s = time.perf_counter() - start
    plan = monitor.memory_plan()
    monitor.attach(opt)

    faults: list[int] = []  # minor page faults of each unmeasured training step

    def train_step(count_faults: bool = False) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(pixel_values=images).logits
        torch.nn.functional.cross_entropy(out, labels).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if count_faults:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return seconds

    plain, measured = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step()  # warm-up (allocator, first-call costs); step 0 is not measured
    # the training step's own device peak, before anything was measured: what the
    # monitor adds on top of it is the run's peak minus this
    train_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    parts.clear()
    for _ in range(args.rounds):
        if args.every == 2:
            measured.append(train_step())  # odd steps are measured
            plain.append(train_step(count_faults=True))
        else:
            train_step()  # 4j+1: both probe passes (no pass to reuse)
            parts.clear()
            measured.append(train_step())  # 4j+2, 4j+3: one probe pass each
            measured.append(train_step())
            plain.append(train_step(count_faults=True))  # 4j+4: unmeasured
    monitor.detach()
    held_s: list[float] = []
    held_bytes = int(plan.table["bytes_per_capture"].sum())
    if args.every == 1:
        # control: the same unmeasured step while as many bytes as one stored capture
        # (what the reused probe pass keeps through the next training step) are held
        held = torch.ones(max(1, held_bytes // 4), device=device)
        held_s = [train_step() for _ in range(args.rounds)]
        del held
    df = monitor.results()
    rows = df[(df.kind != "event") & (df.step == df.step.max())]
    breakdown: dict[str, float] = defaultdict(float)
    for row in rows.itertuples():
        if isinstance(row.wall_time_s, float) and row.wall_time_s == row.wall_time_s:
            breakdown[family(row.quantity, row.kind)] += row.wall_time_s
    rounds = len(plain)
    probe_s = sum(parts["probe passes"][-2:]) if args.every == 2 else parts["probe passes"][-1]
    analysis_s = parts["analysis"][-1] if parts["analysis"] else float("nan")
    estimators_s = sum(breakdown.values())
    total_s = float(
        df[(df.quantity == "measure_time_s") & (df.step == df.step.max())].value.iloc[0]
    )
    result = {
        "model": args.model,
        "sketch": args.sketch or None,
        "probe": n,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "construct_s": build_s,
        "train_s": statistics.median(plain),
        "measured_s": statistics.median(measured),
        "every": args.every,
        "ratio": statistics.median(measured) / statistics.median(plain),
        "monitor_s": total_s,
        "probe_passes_s": probe_s,
        "analysis_s": analysis_s,
        "outside_estimators_s": analysis_s - estimators_s,
        "gradient_and_rest_s": total_s - probe_s - analysis_s,
        "breakdown": dict(breakdown),
        "plan": plan.summary(),
        "plan_layerwise": plan.layerwise,
        "plan_sketched": len(plan.sketched),
        "plan_layers": len(plan.table),
        "plan_peak_gib": plan.peak / 2**30,
        "plan_unplanned_gib": plan.peak_unplanned / 2**30,
        "plan_budget_gib": plan.budget / 2**30,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "warnings": [str(w.message)[:200] for w in said],
        "held_gib": held_bytes / 2**30,
        "train_held_s": statistics.median(held_s) if held_s else None,
        "faults_per_step": statistics.median(faults) if faults else None,
    }
    if device.type == "cuda":
        result["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["train_peak_device_gib"] = train_peak / 2**30
        # page-locked host memory (host offload): torch's caching host allocator's peak
        stats = torch.cuda.host_memory_stats()
        result["pinned_peak_gib"] = stats.get("allocated_bytes.peak", 0) / 2**30
    result["plan_host_gib"] = plan.host_peak / 2**30
    return result


def show(r: dict[str, Any]) -> None:
    print(
        f"\n== {r['model']}, probe {r['probe']}, {r['device']} ({r['threads']} threads), "
        f"{r['rounds']} rounds, every={r.get('every', 2)}, "
        f"allocator {r.get('allocator', 'default')}"
    )
    print(f"   plan: {r['plan']}")
    print(
        f"   training step {r['train_s']:.2f} s, measured step {r['measured_s']:.2f} s: "
        f"ratio {r['ratio']:.2f}x (monitor {r['monitor_s']:.2f} s; construction "
        f"{r['construct_s']:.1f} s)"
    )
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["breakdown"].items()))
    print(
        f"   breakdown (s): probe passes {r['probe_passes_s']:.2f}, analysis "
        f"{r['analysis_s']:.2f} = estimators [{parts}] + outside them "
        f"{r['outside_estimators_s']:.2f}; rest {r['gradient_and_rest_s']:.2f}"
    )
    mem = f"   peak RSS {r['peak_rss_gib']:.2f} GiB"
    if "peak_device_gib" in r:
        mem += f", device peak {r['peak_device_gib']:.2f} GiB"
        if "train_peak_device_gib" in r:
            added = r["peak_device_gib"] - r["train_peak_device_gib"]
            mem += (
                f" = a training step's own {r['train_peak_device_gib']:.2f} + "
                f"{added:.2f} while measuring"
            )
    mem += (
        f"; plan predicted {r['plan_peak_gib']:.2f} GiB for the step "
        f"(unplanned {r['plan_unplanned_gib']:.2f}, budget {r['plan_budget_gib']:.2f})"
    )
    if r.get("plan_host_gib"):
        mem += f", {r['plan_host_gib']:.2f} GiB of pinned host memory (offload)"
    if r.get("pinned_peak_gib"):
        mem += f"; pinned host memory allocated at the peak {r['pinned_peak_gib']:.2f} GiB"
    print(mem, flush=True)
    if r.get("faults_per_step") is not None:
        print(
            f"   page faults per unmeasured training step: {r['faults_per_step']:,.0f} "
            f"({r['faults_per_step'] * 4096 / 2**30:.1f} GiB of 4 KiB pages)",
            flush=True,
        )
    if r.get("train_held_s"):
        print(
            f"   control: unmeasured step with one capture's {r['held_gib']:.2f} GiB held "
            f"{r['train_held_s']:.2f} s ({r['train_held_s'] / r['train_s']:.2f}x the "
            "training step): the share of the ratio that is the machine's, not the monitor's",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet50", "vit", "both"), default="both")
    parser.add_argument("--probe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--memory-budget", default="0.5", help="a share, or 'none'")
    parser.add_argument("--sketch", type=int, default=0, help="sketch=k for every wide layer")
    parser.add_argument(
        "--every", type=int, choices=(1, 2), default=2, help="2: every other step; 1: every step"
    )
    parser.add_argument(
        "--allocator",
        choices=tuple(ALLOCATORS),
        default="default",
        help="keep: glibc keeps freed memory for reuse (see the module docs)",
    )
    parser.add_argument("--json", default="", help="append each result as a JSON line")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    models = ("resnet50", "vit") if args.model == "both" else (args.model,)
    for model in models:
        for n in args.probe:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--model",
                model,
                "--probe",
                str(n),
                "--rounds",
                str(args.rounds),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                "--memory-budget",
                args.memory_budget,
                "--sketch",
                str(args.sketch),
                "--every",
                str(args.every),
            ]
            env = {**os.environ, **ALLOCATORS[args.allocator]}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                print(f"\n== {model}, probe {n}: FAILED (exit {out.returncode}): {tail}")
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            result["allocator"] = args.allocator
            show(result)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
