"""Kernel launches and host synchronizations of one measured step, counted on the CPU.

On a GPU the monitor's analysis is launch-bound: its work is many small operations,
each a kernel launch, and every tensor read into a Python number (``float(t)``,
``t.item()``, ``bool(t)``) makes the host wait for the GPU
(``python benchmarks/profile_big_step.py --device cuda`` on an H200: 142,608 GPU
operations in one ResNet-50 measured step, the GPU busy 0.40 s of 2.2 s). Both counts
can be taken without a GPU: this script runs the analysis of one measured step of the
benchmark CNN of ``benchmarks/monitor.py`` (SmallCNN, 6 BatchNorm layers, probe 128,
the monitor's defaults) on the CPU and counts

- the aten operations that compute (view operations, which launch nothing, left out),
  by the ``ics_toolkit`` function that called them;
- the host synchronizations a GPU would have, by function.

``--as-gpu`` gives the kernels the row blocks they get on a GPU
(``ics_toolkit._blocks.sized_for``) while the tensors stay on the CPU, so the counts are a
GPU's. Counts, not times: they are exact and the same on every machine.

Usage::

    python benchmarks/op_count.py              # CPU block sizes
    python benchmarks/op_count.py --as-gpu     # the counts a GPU run launches
    python benchmarks/op_count.py --as-gpu --top 30
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods that return a Python value, i.e. wait for the device.
SYNCS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"}


def _caller() -> str:
    """``file:function`` of the innermost ics_toolkit frame on the stack."""
    frame = sys._getframe(2)
    while frame is not None and "ics_toolkit" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "(outside ics_toolkit)"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.by[_caller()] += 1
        return func(*args, **(kwargs or {}))


class _Syncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.by: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in SYNCS:
            self.by[_caller()] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--as-gpu", action="store_true", help="a GPU's row blocks")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    args = parser.parse_args()

    import ics_toolkit as ics
    from ics_toolkit import _blocks
    from ics_toolkit.models import SmallCNN
    from ics_toolkit.shift import measure_step

    gen = torch.Generator().manual_seed(7)
    probe = torch.randn(128, 3, 32, 32, generator=gen)
    images = torch.randn(128, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (128,), generator=gen)
    model = SmallCNN(3, 10, width=32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = ics.ICSMonitor(model, probe, every=10)
    before = monitor._capture()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    after = monitor._capture()
    keys = [k for k in before.tensors if monitor._measured(k)]
    sized_as = "cuda" if args.as_gpu else "cpu"  # block sizes only: no GPU is touched
    with _blocks.sized_for(sized_as):
        measure_step(0, before, after, monitor.config, keys)  # warm-up: one-time draws
    before.cache.clear()  # nothing kept from the warm-up: a step as the first of a pair
    after.cache.clear()
    with _blocks.sized_for(sized_as), _Ops() as ops, _Syncs() as syncs:
        rows = measure_step(1, before, after, monitor.config, keys)
    with _Ops() as capture_ops, _Syncs() as capture_syncs:
        monitor._capture()

    blocks = "a GPU's (2^24 values)" if args.as_gpu else "a CPU's (2^18 values)"
    layers = len(keys)
    total, waits = sum(ops.by.values()), sum(syncs.by.values())
    print(
        f"SmallCNN(width=32), probe 128, monitor defaults, {layers} layers, row blocks of "
        f"{blocks}; torch {torch.__version__}"
    )
    print(
        f"analysis of one measured step ({len(rows)} rows): {total} operations "
        f"({total / layers:.0f} per layer), {waits} host synchronizations "
        f"({waits / layers:.0f} per layer)"
    )
    print(
        f"one probe pass with its hooks: {sum(capture_ops.by.values())} operations, "
        f"{sum(capture_syncs.by.values())} host synchronizations"
    )
    print(f"\n{'operations':>10}  function")
    for name, count in ops.by.most_common(args.top):
        print(f"{count:>10}  {name}")
    print(f"\n{'syncs':>10}  function")
    for name, count in syncs.by.most_common(args.top):
        print(f"{count:>10}  {name}")


if __name__ == "__main__":
    main()
