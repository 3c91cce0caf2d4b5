"""The sketch does not depend on how its rows are chunked (the chunk size is a speed knob)."""

from __future__ import annotations

import pytest
import torch

from ics_toolkit import sketch as sk


@pytest.mark.parametrize(("n", "d"), [(40, 5000), (7, 4096), (33, 300)])
def test_chunk_size_leaves_the_sketch_bitwise_unchanged(monkeypatch, n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d))
    results = []
    for elements in (1, 1 << 12, 1 << 16, 1 << 22):  # one row per chunk ... every row at once
        monkeypatch.setitem(sk.CHUNK_ELEMENTS, "cpu", elements)
        results.append(sk.Sketch(d, 64, seed=3)(x))
    for other in results[1:]:
        assert torch.equal(other, results[0])
    dense = x.double() @ sk.Sketch(d, 64, seed=3).matrix(dtype=torch.float64).T
    torch.testing.assert_close(results[0].double(), dense, rtol=1e-5, atol=1e-5)
