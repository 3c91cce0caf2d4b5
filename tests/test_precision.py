"""The float32 analysis (ICSMonitor's default precision) against the float64 reference.

The documented errors (ics_toolkit._vocab.FLOAT32_ERROR, FLOAT32_ERROR_U3) are checked
row by row on the same seeded training run measured in both precisions, the bound
checks must hold in float32, and layers float32 cannot square safely are analysed in
float64.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit import _vocab, shift
from ics_toolkit.models import SmallCNN

KINDS = ("estimate", "floor", "lower", "upper", "interval", "stat", "term", "drift", "relative")
ABSOLUTE = {"L2", "drift_norm_var"}  # differences of nearly equal numbers: vs the scale
U3_FAMILY = {"U3", "relative_U3"}
# U3's eps part is U3 minus its accurate core (the RMS gap of the normalized values, as
# U2): its error is U3's, stated against U3
U3_PARTS = {"U3_eps"}


def _run(precision: str, norm: str, lr: float = 0.05) -> pd.DataFrame:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    probe = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    model = SmallCNN(3, 10, width=8, norm=norm, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    monitor = ics.ICSMonitor(model, probe, every=3, precision=precision).attach(opt)
    for _ in range(7):
        idx = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    monitor.detach()
    return monitor.results()


@pytest.mark.parametrize("norm", ["batch", "unitization"])
def test_float32_analysis_is_within_the_documented_error_of_float64(norm):
    f32, f64 = _run("float32", norm), _run("float64", norm)
    key = ["step", "layer", "view", "quantity"]
    both = f32.merge(f64, on=key, suffixes=("_32", "_64"))
    both = both[both.kind_64.isin(KINDS)]
    assert len(both) == len(f64[f64.kind.isin(KINDS)]) > 100  # every row has its twin
    scale = f64[f64.quantity == _vocab.SCALE].set_index(["step", "layer", "view"]).value
    u3 = f64[f64.quantity == "U3"].set_index(["step", "layer", "view"]).value
    checked = set()
    for row in both.itertuples():
        a, b = row.value_32, row.value_64
        assert math.isfinite(a) == math.isfinite(b), row
        if not math.isfinite(b):
            continue
        if row.quantity in ABSOLUTE:
            limit = _vocab.FLOAT32_ERROR * scale[(row.step, row.layer, row.view)]
        elif row.quantity in U3_FAMILY:
            limit = _vocab.FLOAT32_ERROR_U3 * abs(b)
        elif row.quantity in U3_PARTS:
            limit = _vocab.FLOAT32_ERROR_U3 * u3[(row.step, row.layer, row.view)]
        elif row.quantity == _vocab.RESOLUTION:  # a bound: it adds its norms' a priori error
            limit = (_vocab.FLOAT32_ERROR + 2 * (row.dim_64 + 1) * 2.0**-24) * abs(b)
        else:
            limit = _vocab.FLOAT32_ERROR * abs(b)
        assert abs(a - b) <= limit + 1e-12, (row.quantity, row.layer, a, b)
        checked.add(row.quantity)
    wanted = {"exact", "sliced", "max_sliced", "floor_exact", "L1", "L2", "L3", "U1", "U2"}
    wanted |= {"exact_ci_low", "drift_var", "scale"}
    wanted |= {"U3", "U3_tight", "U3_core", "U3_eps"} if norm == "batch" else {"U5"}
    wanted |= {_vocab.RESOLUTION}
    assert wanted <= checked
    # the float32 rows say so, and every bound check holds in float32 too
    assert f32[f32.kind.isin(KINDS)].bounds_hold.all()


def test_tiny_steps_raise_no_false_alarm_in_float32(recwarn):
    # lr 1e-6: the W1 of a step is ~1e-7 of the outputs' norm, about float32's unit
    # roundoff times the norm. L1 and L2 used to come from differences of float32 means
    # (of the columns, of the row norms), off by ~u ||x||: L2 > exact was reported as a
    # violated bound. From the paired differences they keep float64's value.
    f32, f64 = _run("float32", "batch", lr=1e-6), _run("float64", "batch", lr=1e-6)
    assert not [w for w in recwarn if "violated" in str(w.message)]
    assert f32[f32.kind.isin(KINDS)].bounds_hold.all()
    key = ["step", "layer", "view", "quantity"]
    both = f32.merge(f64, on=key, suffixes=("_32", "_64"))
    at = ["step", "layer", "view"]
    exact = both[both.quantity == "exact"].set_index(at).value_64.rename("w1")
    lower = both[both.quantity.isin(["L1", "L2"])].join(exact, on=at)
    assert len(lower) >= 20
    # stated against the W1 they are compared with (L2 may cancel to far below it)
    error = ((lower.value_32 - lower.value_64).abs() / lower.w1).max()
    assert error <= _vocab.FLOAT32_ERROR


def test_a_layer_float32_cannot_square_is_analysed_in_float64():
    # outputs near 1e17: their squared norms overflow float32, not float64
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    before = ics.ICSMonitor(model, torch.randn(40, 6), layers=["0"])._capture()
    tensors = {k: 1e17 * v for k, v in before.tensors.items()}
    big = shift.StepCapture(tensors, before.info)
    big_after = shift.StepCapture({k: 1.01 * v for k, v in tensors.items()}, before.info)
    rows = {}
    for precision in ("float32", "float64"):
        config = shift.MeasureConfig(methods=("exact", "sliced"), precision=precision)
        out = shift.measure_step(0, big, big_after, config)
        rows[precision] = {r["quantity"]: r["value"] for r in out}
    assert math.isfinite(rows["float32"]["exact"]) and rows["float32"]["exact"] > 1e15
    for quantity, value in rows["float64"].items():
        if isinstance(value, float) and math.isfinite(value):
            assert rows["float32"][quantity] == pytest.approx(value, rel=1e-12), quantity


def test_precision_is_checked_and_recorded():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ics.errors.ICSValueError, match="precision"):
        ics.ICSMonitor(model, torch.randn(8, 4), precision="float16")
    assert ics.ICSMonitor(model, torch.randn(8, 4)).config.precision == "float32"
    assert shift.MeasureConfig().precision == "float64"  # the pure function: the reference
    assert shift.MeasureConfig(precision="float32").check_rtol == _vocab.FLOAT32_RTOL
