"""Row blocks of the one-pass reductions: cache-sized on a CPU, large on a GPU, same numbers."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ics_toolkit import _blocks, _sliced, bounding, moments

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_block_rows_by_device():
    assert _blocks.block_rows(2**17, CPU) == 2  # 2^18 values
    assert _blocks.block_rows(2**19, CPU) == 1  # never 0 rows
    assert _blocks.block_rows(2**17, GPU) == 2**7  # 2^24 values
    assert _blocks.block_rows(2**25, GPU) == 1
    cpu_values = _blocks.CPU_BLOCK_VALUES
    try:  # the constant is read at each call (tests set small blocks through it)
        _blocks.CPU_BLOCK_VALUES = 3000
        assert _blocks.block_rows(1000, CPU) == 3
        assert _blocks.block_rows(1000, GPU) == 2**24 // 1000
    finally:
        _blocks.CPU_BLOCK_VALUES = cpu_values
    assert _blocks.block_rows(0, CPU) == 2**18  # no division by zero
    assert _blocks.block_values(torch.device("mps")) == _blocks.DEVICE_BLOCK_VALUES
    with pytest.raises(RuntimeError), _blocks.sized_for("cuda"):
        assert _blocks.block_rows(2**17, CPU) == 2**7  # a GPU's blocks for CPU tensors
        raise RuntimeError("left by an error")
    assert _blocks.block_rows(2**17, CPU) == 2  # and the CPU's again after


class _Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.subs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.sub:
            self.subs += 1
        return func(*args, **(kwargs or {}))


def _everything(x, y, xa, xb):
    paired = bounding._differences(x, y)
    out = {
        "dist": paired.dist,
        "column_abs_gap": paired.column_abs_gap,
        "gap": paired.gap,
        "norm_gap": torch.tensor(paired.norm_gap),
        "per_coordinate": _sliced.coordinate_group([x], [y], torch.float64)[0],
    }
    for name, t in zip(("mean", "var", "m4"), moments._column_moments(x), strict=True):
        out[name] = t
    m2x, m2y, gap, column_sq = bounding._u3_float32_sums(
        xa.reshape(len(xa), -1), xb.reshape(len(xb), -1), xa.shape[1]
    )
    out["u3_sums"] = torch.tensor([m2x, m2y, gap])
    out["column_sq"] = column_sq
    w = (torch.ones(xa.shape[1], dtype=torch.float64), None)
    out["u3_precise"] = torch.tensor(bounding._u3_stored_terms(xa, xb, w, (None, None)))
    return out


def test_blocks_sized_for_a_gpu_give_the_same_numbers_with_fewer_blocks():
    gen = torch.Generator().manual_seed(5)
    n, d = 48, 2**15  # 8 rows per CPU block: 6 blocks; one block on a GPU
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    y = x + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    xa = torch.randn(n, 32, 32, 32, generator=gen)  # stored float32 normalized values
    xb = xa + 0.05 * torch.randn(xa.shape, generator=gen)
    with _Count() as cpu_count:
        on_cpu = _everything(x, y, xa, xb)
    with _blocks.sized_for(GPU), _Count() as gpu_count:  # the tensors stay on the CPU
        as_gpu = _everything(x, y, xa, xb)
    assert _blocks.block_rows(2**17, CPU) == 2  # the CPU's blocks again after the block
    # one torch.sub per block of _differences, _column_moments and U3's float32 sums:
    # 6 blocks each on a CPU, one on a GPU
    assert (cpu_count.subs, gpu_count.subs) == (18, 3)
    for name, value in on_cpu.items():
        # the order of additions only; the per-coordinate sorts do not depend on blocks
        rtol = 0 if name in ("per_coordinate", "dist") else 1e-12
        torch.testing.assert_close(as_gpu[name], value, rtol=rtol, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_cuda_equal_the_cpu_ones():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 3000, generator=gen, dtype=torch.float64)
    y = x + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    cpu = bounding._differences(x, y)
    gpu = bounding._differences(x.cuda(), y.cuda())
    torch.testing.assert_close(gpu.dist.cpu(), cpu.dist, rtol=1e-12, atol=0)
    torch.testing.assert_close(gpu.column_abs_gap.cpu(), cpu.column_abs_gap, rtol=1e-12, atol=0)
    assert gpu.norm_gap == pytest.approx(cpu.norm_gap, rel=1e-10)
    for a, b in zip(moments._column_moments(x.cuda()), moments._column_moments(x), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=0)
