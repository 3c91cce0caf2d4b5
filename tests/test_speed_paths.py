"""Probe-pass reuse and the analysis worker: fewer passes, the same numbers, the same run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import shift

TIMINGS = ["measure_time_s"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )


def run(steps: int = 5, **options):
    """Train with a monitor (every step measured); count its probe passes."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = torch.randn(24, 5, generator=torch.Generator().manual_seed(1))
    mon = ics.ICSMonitor(model, probe, every=1, **options)
    calls = []
    capture = mon._capture

    def counted():
        calls.append(1)
        return capture()

    mon._capture = counted
    mon.attach(opt)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(32, 5, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    df = mon.results()
    mon.detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return df, len(calls), state


def values(df):
    out = df[~df.quantity.isin(TIMINGS)].drop(columns=["wall_time_s"])
    return out.sort_values(["step", "layer", "quantity"]).reset_index(drop=True)


def assert_same_run(a, b):
    df_a, _, state_a = a
    df_b, _, state_b = b
    va, vb = values(df_a), values(df_b)
    assert va.shape == vb.shape and len(va) > 0
    assert va.value.equals(vb.value)  # to the bit (NaN equal to NaN)
    assert va[["step", "layer", "quantity"]].equals(vb[["step", "layer", "quantity"]])
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_reuse_saves_a_probe_pass_per_consecutive_step_and_changes_no_number():
    fresh = run(reuse_probe=False)
    reused = run()
    assert fresh[1] == 10  # two passes per measured step
    assert reused[1] == 6  # one before step 0, then one after each step
    assert_same_run(fresh, reused)
    plain_model = make_model()  # the trajectory of an unmonitored run
    opt = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(32, 5, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(plain_model(x), y).backward()
        opt.step()
    for key, value in plain_model.state_dict().items():
        assert torch.equal(value, reused[2][key]), key


def test_a_reused_capture_brings_what_was_computed_from_it(monkeypatch: pytest.MonkeyPatch):
    # the one-sided numbers (row norms, column moments, sorted projections, largest
    # |value|) of the capture after step t serve step t+1, whose "before" it is
    from ics_toolkit import _sliced

    counts = {"moments": 0, "projections": 0}
    moments, project = shift._column_moments, _sliced._project

    def counted_moments(*args):
        counts["moments"] += 1
        return moments(*args)

    missing = object()

    def counted_project(t, directions_t, out, memo, key):
        kept = missing if memo is None else memo.get(key, missing)
        project(t, directions_t, out, memo, key)
        if memo is not None and kept is not missing:  # the kept sorted values, no product
            assert isinstance(kept, torch.Tensor) and torch.equal(out, kept)
        counts["projections"] += memo is not None and kept is missing  # (not the floor's)

    from ics_toolkit import bounding

    sums = bounding._u3_float32_sums

    def counted_sums(fa, fb, channels, m2x=None):
        counts["x_hat_mean_sq"] += m2x is None  # the "before" side's computed again
        return sums(fa, fb, channels, m2x)

    monkeypatch.setattr(shift, "_column_moments", counted_moments)
    monkeypatch.setattr(_sliced, "_project", counted_project)
    monkeypatch.setattr(bounding, "_u3_float32_sums", counted_sums)
    counts["x_hat_mean_sq"] = 0
    fresh = run(reuse_probe=False)
    fresh_counts = dict(counts)
    counts.update(moments=0, projections=0, x_hat_mean_sq=0)
    reused = run()
    assert_same_run(fresh, reused)  # to the bit
    # 2 layers, 5 steps: both sides each step, against both at step 0 then one per step;
    # U3's mean squared norm of the normalized values: each step, against step 0 only
    assert fresh_counts == {"moments": 20, "projections": 20, "x_hat_mean_sq": 10}
    assert counts == {"moments": 12, "projections": 12, "x_hat_mean_sq": 2}


def test_a_reused_capture_equals_a_fresh_one():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = torch.randn(24, 5, generator=torch.Generator().manual_seed(1))
    mon = ics.ICSMonitor(model, probe, every=1)
    mon.attach(opt)
    x = torch.randn(32, 5)
    model(x).sum().backward()
    opt.step()
    assert mon._carry is not None and mon._carry[0] == 1
    carried = mon._carry[1]
    opt.zero_grad()
    model(x).sum().backward()  # the training forward moves the running statistics
    assert mon._carry[2] == mon._read_state()  # ... which a train-mode pass does not read
    fresh = mon._capture()
    assert carried.tensors.keys() == fresh.tensors.keys()
    for key in fresh.tensors:
        assert torch.equal(carried.tensors[key], fresh.tensors[key]), key
    for key in fresh.norms:
        assert torch.equal(carried.norms[key].x_hat, fresh.norms[key].x_hat), key
    mon.detach()


def test_no_reuse_when_the_pass_reads_what_changed():
    # eval mode reads the running statistics, which every training forward updates
    fresh, reused = run(reuse_probe=False, mode="eval"), run(mode="eval")
    assert reused[1] == fresh[1] == 10
    assert_same_run(fresh, reused)
    # a parameter changed between the steps (outside the optimizer) forbids reuse too
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ics.ICSMonitor(model, torch.randn(24, 5), every=1)
    mon.attach(opt)
    model(torch.randn(8, 5)).sum().backward()
    opt.step()
    carried, state = mon._carry[1], mon._carry[2]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert mon._read_state() != state
    mon.before_step()
    assert mon._pending["capture"] is not carried  # a fresh pass
    mon.abort_step()
    mon.detach()


def test_the_worker_gives_the_same_rows_in_step_order_and_the_same_run():
    fresh = run(reuse_probe=False)
    worked = run(worker=True)
    assert_same_run(fresh, worked)
    steps = worked[0].step.tolist()
    assert steps == sorted(steps)


def test_worker_rows_are_handed_back_by_results_and_detach():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ics.ICSMonitor(model, torch.randn(24, 5), every=1, worker=True)
    mon.attach(opt)
    model(torch.randn(8, 5)).sum().backward()
    opt.step()
    assert mon._worker.pending == 1 and len(mon._store) == 0  # still with the worker
    mon.detach()  # the end of the run flushes
    assert mon._worker.pending == 0 and set(mon._store.frame().step) == {0}


def test_worker_errors_go_through_the_monitors_failure_path(monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ics.ICSMonitor(model, torch.randn(24, 5), every=1, worker=True, on_error="raise")
    seen = []
    original = mon._failed

    def failed(step, stage, err):
        seen.append((step, stage, type(err)))
        original(step, stage, err)

    mon._failed = failed

    def boom(*args, **kwargs):
        raise RuntimeError("analysis broke")

    monkeypatch.setattr("ics_toolkit.monitor.measure_step", boom)
    mon.attach(opt)
    model(torch.randn(8, 5)).sum().backward()
    opt.step()  # training goes on: the error surfaces when the rows are collected
    with pytest.raises(RuntimeError, match="analysis broke"):
        mon.results()
    assert seen == [(0, "analysis", RuntimeError)]
    mon.detach()


def test_worker_errors_warn_and_are_recorded_by_default(monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ics.ICSMonitor(model, torch.randn(24, 5), every=1, worker=True)

    def boom(*args, **kwargs):
        raise RuntimeError("analysis broke")

    monkeypatch.setattr("ics_toolkit.monitor.measure_step", boom)
    with pytest.warns(ics.ICSRuntimeWarning, match="analysis broke") as record:
        with mon.attach(opt):
            for _ in range(2):
                model(torch.randn(8, 5)).sum().backward()
                opt.step()  # training goes on; the worker's error surfaces when collected
            df = mon.results()
    assert len(record) == 1  # once per kind of failure, then counted
    errors = df[df.quantity == "error"]
    assert errors.step.tolist() == [0, 1] and errors.value.tolist() == [1.0, 2.0]
    assert mon.errors == {"the analysis: RuntimeError": 2}


def test_worker_defaults_to_off_on_cpu_and_checks_its_argument():
    model = make_model()
    assert ics.ICSMonitor(model, torch.randn(8, 5))._worker is None
    with pytest.raises(ics.ICSTypeError, match="`worker` must be True or False"):
        ics.ICSMonitor(model, torch.randn(8, 5), worker="yes")
    assert shift.MeasureConfig().methods == ("exact", "max_sliced", "sliced")


def test_one_pass_kernels_equal_the_direct_formulas():
    from ics_toolkit import _blocks, _sliced, bounding, moments
    from ics_toolkit._norm_snapshot import NormSnapshot, norm_pair

    gen = torch.Generator().manual_seed(3)
    n, c, h = 40, 12, 9  # d = 972: several row blocks of the one-pass loops at a small limit
    x = torch.randn(n, c * h * h, generator=gen, dtype=torch.float64) * 3 + 1
    y = x + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y[:, 5] += 0.5  # one column moves more than the others: the axis search must find it
    old_rows = _blocks.CPU_BLOCK_VALUES
    try:
        for limit in (3000, 500):  # 3 rows per block; one row (the in-place row loop)
            _blocks.CPU_BLOCK_VALUES = limit
            mu, var, m4 = moments._column_moments(x)
            torch.testing.assert_close(mu, x.mean(0), rtol=1e-13, atol=0)
            torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-12, atol=0)
            torch.testing.assert_close(m4, ((x - x.mean(0)) ** 4).mean(0), rtol=1e-12, atol=0)
    finally:
        _blocks.CPU_BLOCK_VALUES = old_rows
    paired = bounding._differences(x, y)
    torch.testing.assert_close(paired.dist, (x - y).norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(paired.column_abs_gap, (x - y).abs().mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(paired.gap, x.mean(0) - y.mean(0), rtol=1e-12, atol=1e-15)
    norm_gap = float(x.norm(dim=1).mean() - y.norm(dim=1).mean())
    assert paired.norm_gap == pytest.approx(norm_gap, rel=1e-12)
    # rows wider than a block (one row per block): the same formulas
    wx = torch.randn(3, 2**18 + 5, generator=gen, dtype=torch.float64)
    wy = wx + 0.01 * torch.randn(wx.shape, generator=gen, dtype=torch.float64)
    wide = bounding._differences(wx, wy)
    torch.testing.assert_close(wide.column_abs_gap, (wx - wy).abs().mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(wide.gap, wx.mean(0) - wy.mean(0), rtol=1e-12, atol=1e-15)
    # blocks of two rows (2^18 values), then a last block of one: the block sums add up
    bx = torch.randn(5, 2**17, generator=gen, dtype=torch.float64)
    by = bx + 0.01 * torch.randn(bx.shape, generator=gen, dtype=torch.float64)
    blocks = bounding._differences(bx, by)
    torch.testing.assert_close(blocks.dist, (bx - by).norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(blocks.column_abs_gap, (bx - by).abs().mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(blocks.gap, bx.mean(0) - by.mean(0), rtol=1e-12, atol=1e-15)
    block_gap = float(bx.norm(dim=1).mean() - by.norm(dim=1).mean())
    assert blocks.norm_gap == pytest.approx(block_gap, rel=1e-10, abs=0)
    # the pruned axis search returns the max over every column, to the bit
    every = float(_sliced.coordinate_group([x], [y], torch.float64)[0].max())
    assert bounding._best_axis(x, y, 0.0) == every
    assert bounding._best_axis(x, y, every + 1.0) == every + 1.0
    # U3 from stored float32 values in float64 row blocks = the float64 formula
    xa = torch.randn(600, c, h, h, generator=gen)  # 3 row blocks of 2**18 values
    xb = xa + 0.05 * torch.randn(xa.shape, generator=gen)
    wa, ba = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5, None
    wb = wa + 0.01
    bb = 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)
    snaps = [
        NormSnapshot(x_hat=t, weight=w, bias=b, alpha=None, k=1.0, eps=1e-5, form="batchnorm")
        for t, w, b in ((xa, wa, ba), (xb, wb, bb))
    ]
    reference = bounding._u3(*norm_pair(snaps[0], snaps[1], "flatten", {}))
    stored = bounding._u3_stored(xa, xb, (wa, wb), (ba, bb))
    # summation order only, amplified by the cancellation in d - c: far below 1e-9
    assert stored == pytest.approx(reference, rel=1e-10)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_normalized_values_taken_in_the_hook_equal_the_recomputed_ones(mode, precision):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(144)
    )
    model[1].running_mean.normal_()  # eval mode reads these
    model[1].running_var.uniform_(0.5, 2.0)
    probe = torch.randn(10, 2, 8, 8)
    hooked = ics.ICSMonitor(model, probe, mode=mode, precision=precision)
    assert hooked.recorder.transform is not None
    assert hooked.recorder.transform.fast == (precision == "float32")
    plain = ics.ICSMonitor(model, probe, mode=mode, precision="float64")
    plain.recorder.transform = None  # store the inputs, recompute after the pass
    a, b = hooked._capture(), plain._capture()
    assert a.norms.keys() == b.norms.keys() == {"1", "4"}
    for key in a.norms:
        if precision == "float64":  # the same operations: the same bits
            assert torch.equal(a.norms[key].x_hat, b.norms[key].x_hat), key
        else:  # torch's fused kernel: its statistics round differently, ~1e-7
            torch.testing.assert_close(a.norms[key].x_hat, b.norms[key].x_hat, rtol=0, atol=1e-5)
        assert torch.equal(a.norms[key].weight, b.norms[key].weight)
    if precision == "float32":
        return
    assert a.tensors.keys() == b.tensors.keys() == {"1", "4"}
    rows_a = shift.measure_step(0, a, a, hooked.config)
    rows_b = shift.measure_step(0, b, b, plain.config)
    assert [(r["quantity"], r["value"]) for r in rows_a] == [
        (r["quantity"], r["value"]) for r in rows_b
    ]
