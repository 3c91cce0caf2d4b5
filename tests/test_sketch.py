"""Random-projection sketches: the matrix, what stays a bound, the JL error, the monitor.

References are independent of the code under test: scipy's Hadamard matrix for the
transform, POT's ``emd2`` for every exact W1, closed forms for norms.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.linalg import hadamard
from torch import nn

import ics_toolkit as ics
import ics_toolkit.sketch as sketch_module
from ics_toolkit.bounding import bounds
from ics_toolkit.distances import ORDER_RTOL
from ics_toolkit.sketch import (
    Sketch,
    SketchTransform,
    jl_epsilon,
    jl_scale,
    layer_seed,
    padded_dim,
)
from ics_toolkit.views import flatten


def emd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W1 with POT directly (float64 Euclidean cost, uniform weights)."""
    xn, yn = x.double().numpy(), y.double().numpy()
    cost = ot.dist(xn, yn, metric="euclidean")
    return float(ot.emd2(np.full(len(xn), 1 / len(xn)), np.full(len(yn), 1 / len(yn)), cost))


def le(a: float, b: float, scale: float) -> bool:
    """a <= b up to the engine's documented order tolerance."""
    return a <= b + ORDER_RTOL * (abs(b) + scale)


def cases(n=48, d=768, seed=0):
    """Pairs (X, Y): a noise-like step, a low-rank rescaling + shift, sparse samples."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(n, d)
    low = randn(n, 8) @ randn(8, d)
    mask_x = torch.rand(n, d, generator=g, dtype=torch.float64) < 0.01
    mask_y = torch.rand(n, d, generator=g, dtype=torch.float64) < 0.01
    return {
        "noise": (x, x + 0.3 * randn(n, d)),
        "lowrank": (low, 1.1 * low + 0.5),
        "sparse": (randn(n, d) * mask_x, randn(n, d) * mask_y),
    }


# ------------------------------------------------------------------ the matrix


@pytest.mark.parametrize("d", [1000, 1024, 5])
def test_the_sketch_is_the_subsampled_randomized_hadamard_transform(d):
    k = min(64, d)
    sk = Sketch(d, k, seed=7)
    dp = padded_dim(d)
    assert dp == 2 ** math.ceil(math.log2(d))
    h = torch.from_numpy(hadamard(dp)).double()  # Sylvester order, like ours
    reference = h[sk.rows()][:, :d] * sk.signs().double() / math.sqrt(dp)
    x = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sk(x), x @ reference.T, rtol=0, atol=1e-12)
    assert sorted(set(sk.rows().tolist())) == sorted(sk.rows().tolist())  # distinct rows


def _hadamard_rows_numpy(rows: np.ndarray, dp: int) -> np.ndarray:
    """Rows of the Sylvester-Hadamard matrix from its definition, (-1)^popcount(i & j)."""
    return 1.0 - 2.0 * (np.bitwise_count(rows[:, None] & np.arange(dp)[None, :]) % 2)


@pytest.mark.parametrize(("d", "k"), [(20000, 64), (16384, 256), (40000, 200), (20000, 257)])
def test_a_wide_sketch_is_the_same_matrix_whichever_way_it_is_computed(d, k, monkeypatch):
    # rows of >= 2^14 (padded) and k <= 256 compute only the k kept coordinates; k = 257
    # transforms every coordinate: both are S H D E / sqrt(d'), against the definition
    sk = Sketch(d, k, seed=11)
    dp = padded_dim(d)
    h = torch.from_numpy(_hadamard_rows_numpy(sk.rows().numpy(), dp))
    reference = h[:, :d] * sk.signs().double() / math.sqrt(dp)
    x = torch.randn(7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = sk(x)
    torch.testing.assert_close(got, x @ reference.T, rtol=0, atol=1e-12)
    monkeypatch.setattr(sketch_module, "KEPT_MAX_K", 0)  # the whole transform, then S
    torch.testing.assert_close(sk(x), got, rtol=0, atol=1e-12)
    # float32 input: float32 arithmetic, within a few units of its rounding
    got32 = sk(x.float())
    assert got32.dtype == torch.float32
    err = float((got32.double() - got).abs().max() / got.abs().max())
    assert 0 < err < 1e-5


def test_which_sketches_compute_only_their_kept_coordinates():
    # the documented rule: k <= KEPT_MAX_K (256) and d' >= 2^KEPT_MIN_BITS (2^14); the
    # first factor is 2^(bit_length(k - 1) + 3) wide (8 k for a power of two)
    plan = sketch_module._KeptCoordinates.plan
    assert (sketch_module.KEPT_MAX_K, sketch_module.KEPT_MIN_BITS) == (256, 14)

    def rows(k: int, dp: int) -> torch.Tensor:
        return torch.randperm(dp, generator=torch.Generator().manual_seed(k))[:k]

    assert plan(2**13, rows(64, 2**13), torch.float32) is None  # rows too narrow
    assert plan(2**14, rows(257, 2**14), torch.float32) is None  # k too large
    wide = plan(2**14, rows(256, 2**14), torch.float32)
    assert wide is not None and wide.h1.shape[1] == 2048 and wide.a2 == 8
    small = plan(2**20, rows(64, 2**20), torch.float64)
    assert small is not None and small.h1.shape[1] == 512 and small.a2 == 2**11
    assert small.h1.dtype == torch.float64 and len(small.which) == 64
    # the kept rows of the first factor, scaled by 1 / sqrt(d'): entries +-2^-10
    assert set(small.h1.abs().unique().tolist()) == {2.0**-10}
    odd = plan(2**16, rows(65, 2**16), torch.float32)  # k - 1 = 64 needs 7 bits: 2^10 wide
    assert odd is not None and odd.h1.shape[1] == 1024 and odd.a2 == 64


def test_the_transient_bytes_of_a_sketch():
    # CHUNK_COPIES (3) chunks of at most 2^22 values, an int64 permutation of d', d int8
    # signs and d signs in the compute dtype, and for rows of >= 2^14 the kept rows of the
    # first factor: at most 256 x 2048 values
    assert sketch_module.chunk_bytes(256, 5000) == 3 * 256 * 8192 * 4 + 8 * 8192 + 5 * 5000
    assert sketch_module.chunk_bytes(256, 65536) == (
        3 * 64 * 65536 * 4 + 8 * 65536 + 5 * 65536 + 256 * 2048 * 4
    )
    assert sketch_module.chunk_bytes(3, 65536, itemsize=8) == (
        3 * 3 * 65536 * 8 + 8 * 65536 + 9 * 65536 + 256 * 2048 * 8
    )
    wide = 2**23 + 1  # wider than a chunk: one row at a time, padded to 2^24
    assert sketch_module.chunk_bytes(4, wide) == (
        3 * 2**24 * 4 + 8 * 2**24 + 5 * wide + 256 * 2048 * 4
    )
    assert sketch_module.chunk_bytes(64, 16384) - sketch_module.chunk_bytes(64, 8192) == (
        3 * 64 * 8192 * 4 + 8 * 8192 + 5 * 8192 + 256 * 2048 * 4
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_sketch_is_the_hadamard_transform_drawn_on_the_gpu():
    d, k = 3000, 128
    sk = Sketch(d, k, seed=5)
    dp = padded_dim(d)
    h = torch.from_numpy(hadamard(dp)).double().cuda()
    reference = h[sk.rows("cuda")][:, :d] * sk.signs("cuda").double() / math.sqrt(dp)
    x = torch.randn(300, d, dtype=torch.float64, device="cuda")
    got = sk(x)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, x @ reference.T, rtol=0, atol=1e-10)
    assert torch.equal(sk(x), got)  # the same matrix at every call (both steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_wide_sketch_computes_its_kept_coordinates_on_the_gpu():
    d, k = 20000, 128  # padded to 2^15: only the kept coordinates are computed
    sk = Sketch(d, k, seed=5)
    dp = padded_dim(d)
    h = torch.from_numpy(_hadamard_rows_numpy(sk.rows("cuda").cpu().numpy(), dp))
    reference = (h[:, :d] * sk.signs("cuda").cpu().double() / math.sqrt(dp)).cuda()
    x = torch.randn(50, d, dtype=torch.float64, device="cuda")
    got = sk(x)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, x @ reference.T, rtol=0, atol=1e-10)


def test_orthonormal_rows_for_a_power_of_two_and_a_contraction_otherwise():
    p = Sketch(512, 48, seed=1).matrix(dtype=torch.float64)
    torch.testing.assert_close(p @ p.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    for d in (300, 700, 1500):
        p = Sketch(d, 40, seed=d).matrix(dtype=torch.float64)
        assert float(torch.linalg.svdvals(p).max()) <= 1 + 1e-12
    # all d' rows kept: an isometry (Parseval), so k = d' loses nothing
    z = torch.randn(5, 700, dtype=torch.float64)
    full = Sketch(700, 1024, seed=3)(z)
    torch.testing.assert_close(full.norm(dim=1), z.norm(dim=1), rtol=1e-12, atol=0)


def test_the_jl_scale_makes_squared_norms_unbiased():
    d, k = 600, 16
    z = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ratios = torch.stack(
        [(jl_scale(d, k) * Sketch(d, k, seed=s)(z)).pow(2).sum(1) for s in range(400)]
    ) / z.pow(2).sum(1)
    # mean of 400 draws of a variable with relative sd ~ sqrt(2/k): se ~ 0.018
    torch.testing.assert_close(
        ratios.mean(0), torch.ones(3, dtype=torch.float64), atol=0.08, rtol=0
    )


def test_the_matrix_is_fixed_by_seed_and_key_and_leaves_the_global_rng_alone():
    x = torch.randn(6, 300)
    state = torch.get_rng_state()
    a, b = Sketch(300, 20, seed=4)(x), Sketch(300, 20, seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, Sketch(300, 20, seed=5)(x))
    assert torch.equal(state, torch.get_rng_state())
    import zlib

    assert layer_seed(3, "blocks.0#2") == (3 * 1_000_003 + zlib.crc32(b"blocks.0#2")) % (1 << 62)


def test_low_precision_and_autocast_inputs_are_sketched_in_float32():
    x = torch.randn(7, 500)
    sk = Sketch(500, 32, seed=0)
    ref = sk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sk(x)
    assert under.dtype == torch.float32 and torch.equal(under, ref)
    half = sk(x.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, sk(x.to(torch.bfloat16).float()), rtol=0, atol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ics.ICSValueError, match=r"`k` must be an int in 1..1024"):
        Sketch(1000, 2000)
    with pytest.raises(ics.ICSValueError, match="`d` must be a positive int"):
        Sketch(0, 4)
    with pytest.raises(ics.ICSValueError, match="rows of width 7"):
        Sketch(8, 4)(torch.zeros(3, 7))
    with pytest.raises(ics.ICSValueError, match=r"`sketch` \(k\) must be a positive int"):
        SketchTransform(0)


# ------------------------------------------------------------------ what stays a bound


@pytest.mark.parametrize("case", ["noise", "lowrank", "sparse"])
def test_the_sketch_w1_and_its_lower_bounds_stay_below_the_true_w1(case):
    x, y = cases()[case]
    true = emd(x, y)
    scale = float(max(x.abs().max(), y.abs().max()))
    for k in (4, 32, 256):
        for seed in range(3):
            sk = Sketch(x.shape[1], k, seed=seed)
            px, py = sk(x), sk(y)
            assert le(emd(px, py), true, scale)
            b = bounds(px, py, n_projections=16, seed=seed)
            for q in ("L1", "L2", "L3"):
                assert le(b[q], true, scale), (q, b[q], true)
            sliced = ics.wasserstein(px, py, "max_sliced", n_projections=16, seed=seed)
            assert le(sliced, true, scale)


def test_upper_bounds_of_the_sketch_are_not_upper_bounds_of_the_true_w1():
    # a pure translation t: W1 = U1 = |t|; the sketch sees |P t| ~ sqrt(k/d') |t|
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1024, dtype=torch.float64, generator=g)
    t = torch.randn(1024, dtype=torch.float64, generator=g)
    y = x + t
    sk = Sketch(1024, 16, seed=0)
    b = bounds(sk(x), sk(y), n_projections=0)
    true = emd(x, y)
    assert true == pytest.approx(float(t.norm()), rel=1e-9)
    assert b["U1"] < 0.5 * true and b["U2"] < 0.5 * true  # no longer upper bounds
    rescaled = jl_scale(1024, 16) * b["U1"]  # but rescaled, an estimate of U1 = W1
    assert abs(rescaled / true - 1) < jl_epsilon(40, 16)


def test_the_rescaled_sketch_w1_error_shrinks_with_k():
    n = 48
    for case, (x, y) in cases(n=n).items():
        true = emd(x, y)
        rms, worst = [], []
        for k in (16, 64, 256):
            sketches = [Sketch(x.shape[1], k, seed=s) for s in range(12)]
            errors = torch.tensor([sk.scale * emd(sk(x), sk(y)) / true - 1 for sk in sketches])
            rms.append(float(errors.pow(2).mean().sqrt()))
            worst.append(float(errors.abs().max()))
            assert worst[-1] < jl_epsilon(n, k), (case, k, worst[-1])
        # quadrupling k should halve the error; ask for at least 1.4x per step
        assert rms[0] > 1.4 * rms[1] > 1.4**2 * rms[2], (case, rms)


# ------------------------------------------------------------------ the recorder transform


def test_the_transform_flattens_along_each_layers_batch_axis():
    t = torch.randn(5, 7, 40)  # (T, N, C): batch axis 1, as a sequence-first layer
    tr = SketchTransform(16, seed=2, batch_axes={"enc.norm": 1})
    out = tr("enc.norm#2", t)
    expected = Sketch(5 * 40, 16, seed=layer_seed(2, "enc.norm#2"))(flatten(t, 1))
    assert torch.equal(out, expected) and out.shape == (7, 16)
    small = torch.randn(6, 10)
    assert tr("fc", small) is small  # d <= k: stored as it is


# ------------------------------------------------------------------ the monitor


def wide_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 12),
        nn.BatchNorm1d(12),
    )


def run(model, monitors, steps=4):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for m in monitors:
        m.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 1, 8, 8, generator=g)).square().mean().backward()
        opt.step()


def test_monitor_with_a_sketch_reports_bounds_that_hold_for_the_true_w1():
    model = wide_model()
    probe = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    full = ics.ICSMonitor(model, probe, every=2)
    k = 64
    sketched = ics.ICSMonitor(model, probe, every=2, sketch=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)
        run(model, [full, sketched])
    a = ics.to_wide(full.results().query("kind != 'event'")).set_index(["step", "layer"])
    df = sketched.results().query("kind != 'event'")
    wide = df[df.layer == "1"]  # 512 wide: sketched
    assert set(wide.view) == {"sketch"} and set(wide.dim) == {k}
    assert not set(wide.quantity) & {"U3", "U4", "U5", "drift_var", "drift_mean"}
    assert {"exact", "exact_jl", "L1", "L3", "U1", "floor_exact"} <= set(wide.quantity)
    narrow = df[df.layer == "5"]  # 12 <= k: stored as is, the ordinary flatten view
    assert set(narrow.view) == {"flatten"} and set(narrow.dim) == {12}
    assert df.bounds_hold.all()  # the order holds on the sketch's own samples
    b = ics.to_wide(df).set_index(["step", "layer"])
    for idx in b.index:
        true = a.loc[idx, "exact"]
        for q in ("exact", "L1", "L2", "L3", "max_sliced"):
            assert b.loc[idx, q] <= true * (1 + 1e-6) + 1e-9, (idx, q)
        if idx[1] == "1":
            assert abs(b.loc[idx, "exact_jl"] / true - 1) < jl_epsilon(48, k)
            # the rescaling cancels in the relative value: exact_jl / (JL-rescaled scale)
            rel = b.loc[idx, "relative_exact_jl"]
            assert rel == pytest.approx(b.loc[idx, "relative_exact"], rel=1e-12)
            assert abs(rel / a.loc[idx, "relative_exact"] - 1) < 2 * jl_epsilon(48, k)
        else:
            assert b.loc[idx, "exact"] == pytest.approx(true, rel=1e-9)
    mem = sketched.memory_per_layer().set_index("layer")
    assert mem.loc["1", "stored_shape"] == (48, k) and mem.loc["1", "sketch"] == k


def test_sketch_options_are_checked():
    model = wide_model()
    probe = torch.randn(8, 1, 8, 8)
    with pytest.raises(ics.ICSValueError, match=r"`sketch` stores a projection of the flatten"):
        ics.ICSMonitor(model, probe, sketch=16, views=("flatten", "pixel"))
    with pytest.raises(ics.ICSValueError, match="`sketch` must be a positive int or None"):
        ics.ICSMonitor(model, probe, sketch=0)
