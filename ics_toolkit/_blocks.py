"""Row blocks of the analysis' one-pass reductions, sized for the device they run on.

The reductions over a layer's (n, d) samples (paired differences, column moments, U3's
sums, the per-coordinate sorts) walk the rows in blocks through one reused buffer. On a
CPU blocks of 2^18 values (1 to 2 MiB) stay in cache, several times faster than passes
over whole matrices. On a GPU every block costs a few kernel launches and nothing is
gained from a cache-sized block: a wide layer in 1-row blocks launched thousands of
kernels per measured step (ResNet-50, probe 64, H200: 142,608 GPU operations, the GPU
busy 0.40 s of 2.2 s: ``benchmarks/profile_big_step.py --device cuda``), so blocks
there hold up to 2^24 values (64 MiB of float32), within the working memory that the
memory plan counts (``ics_toolkit._memory.WORKING_COPIES`` whole-matrix copies).
Blocks change only the order of additions (results within rounding, the same bits on
a CPU as before).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Values per block on a CPU: a block stays in cache.
CPU_BLOCK_VALUES = 2**18
#: Values per block on any other device (CUDA, MPS...): few kernel launches.
DEVICE_BLOCK_VALUES = 2**24

_sized_for: torch.device | None = None


@contextlib.contextmanager
def sized_for(device: str | torch.device) -> Iterator[None]:
    """Blocks sized for ``device`` whatever device the tensors are on, inside the block.

    For counting, on a CPU, what a GPU run launches (``benchmarks/op_count.py``) and for
    tests; process-wide while it lasts (a monitor's analysis worker sees it too).
    """
    global _sized_for
    before, _sized_for = _sized_for, torch.device(device)
    try:
        yield
    finally:
        _sized_for = before


def block_values(device: torch.device) -> int:
    """Values per block on ``device`` (the constants read at each call)."""
    device = _sized_for or device
    return CPU_BLOCK_VALUES if device.type == "cpu" else DEVICE_BLOCK_VALUES


def block_rows(width: int, device: torch.device) -> int:
    """Rows of ``width`` values per block on ``device``: at least 1."""
    return max(1, block_values(device) // max(1, width))
