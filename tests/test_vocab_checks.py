"""The vocabulary module, the argument checkers, and MeasureConfig as the one boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit import _checks, _vocab, bounding, distances, report, results, views
from ics_toolkit.errors import ICSTypeError, ICSValueError
from ics_toolkit.shift import MeasureConfig


def test_every_public_home_reexports_the_one_vocabulary():
    assert distances.METHODS is _vocab.METHODS
    assert bounding.LOWER_BOUNDS is _vocab.LOWER_BOUNDS
    assert bounding.UPPER_BOUNDS is _vocab.UPPER_BOUNDS
    assert report.ESTIMATORS is _vocab.ESTIMATORS
    assert report.NORM_BOUNDS is _vocab.NORM_BOUNDS
    assert results.KINDS is _vocab.KINDS
    assert views.VIEWS is _vocab.VIEWS
    assert set(_vocab.DEFAULT_METHODS) <= set(_vocab.METHODS)
    assert _vocab.BATCHED_METHODS <= set(_vocab.METHODS)


@pytest.mark.parametrize(
    ("quantity", "kind"),
    [
        ("exact", "estimate"),
        ("per_coordinate_max", "estimate"),
        ("L3", "lower"),
        ("U5", "upper"),
        ("floor_sliced", "floor"),
        ("drift_m4", "drift"),
    ],
)
def test_quantity_kind(quantity, kind):
    assert _vocab.quantity_kind(quantity) == kind
    assert kind in _vocab.KINDS


def test_monitor_rows_use_only_vocabulary_kinds():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ics.ICSMonitor(model, torch.randn(16, 4), every=1)
    mon.attach(opt)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    df = mon.results()
    assert set(df.kind) <= set(_vocab.KINDS)
    for q, kind in df[df.kind != "event"][["quantity", "kind"]].drop_duplicates().values:
        assert _vocab.quantity_kind(q) == kind


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: _checks.positive_int(0, "steps"), ICSValueError, "`steps` must be a positive int"),
        (lambda: _checks.positive_int(True, "k"), ICSValueError, "`k` must be a positive int"),
        (
            lambda: _checks.positive_int(-1, "`dims` entries"),
            ICSValueError,
            "`dims` entries must be a positive int",
        ),
        (lambda: _checks.integer(1.5, "d", 1), ICSTypeError, "`d` must be an integer"),
        (lambda: _checks.integer(0, "d", 1), ICSValueError, "`d` must be >= 1"),
        (lambda: _checks.seed(2**63), ICSValueError, r"`seed` must be an int in \[0, 2\*\*63\)"),
        (lambda: _checks.positive_number(0.0, "reg"), ICSValueError, "`reg` must be a positive"),
        (lambda: _checks.positive_number("1", "reg"), ICSTypeError, "`reg` must be a positive"),
        (lambda: _checks.boolean("yes", "log"), ICSTypeError, "`log` must be True or False"),
        (lambda: _checks.choice("slice", "method", _vocab.METHODS), ICSValueError, "'sliced'"),
        (lambda: _checks.methods("exact,emd", "--methods"), ICSValueError, r"--methods: unknown"),
        (lambda: _checks.views([], "views"), ICSValueError, r"`views`: unknown view"),
        (lambda: _checks.views(3, "views"), ICSTypeError, r"`views` must be a view name"),
    ],
)
def test_checkers_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_checkers_normalize():
    assert _checks.positive_int(np.int64(3), "n") == 3
    assert _checks.positive_int(None, "n", allow_none=True) is None
    assert _checks.methods("exact, sliced,exact") == ("exact", "sliced")
    assert _checks.boolean(np.bool_(True), "log") is True


def test_measure_config_is_checked_and_normalized_when_built():
    cfg = MeasureConfig(methods=["paired", "sliced"], floor=True, views="flatten")
    assert cfg.methods == ("paired", "sliced")
    assert cfg.views == ("flatten",)
    assert cfg.floor == ("sliced",)  # paired has no floor
    assert cfg.options["exact" if "exact" in cfg.options else "sliced"]["dtype"] is torch.float64
    assert cfg.options["per_coordinate"]["dtype"] is torch.float64
    with pytest.raises(ICSValueError, match="unknown method"):
        MeasureConfig(methods=("emd",))
    with pytest.raises(ICSValueError, match="`floor` names"):
        MeasureConfig(methods=("exact",), floor=("sliced",))
    with pytest.raises(ICSValueError, match="`n_projections` must be a positive int"):
        MeasureConfig(n_projections=0)
    with pytest.raises(ICSTypeError, match="unknown option"):
        MeasureConfig(method_options={"exact": {"regg": 1}})
    with pytest.raises(ICSValueError, match=r"`method_options` key .emd. must be one of"):
        MeasureConfig(method_options={"emd": {}})
    # a failed solve is a flagged row, not an exception, inside a measured step
    assert MeasureConfig().options["exact"]["on_failure"] == "flag"


def test_the_kernels_equal_the_checked_public_functions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    y = x + 0.1 * torch.randn(40, 7, generator=gen, dtype=torch.float64)
    cfg = MeasureConfig(methods=distances.METHODS, floor=False)
    for method in ("exact", "paired", "sliced", "max_sliced", "per_coordinate"):
        value, _ = distances._kernel(method, x, y, cfg.options[method], 16, 3)
        ref = ics.wasserstein(x, y, method, n_projections=16, seed=3)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
    first, second = distances._halves(x, 5)
    value, _ = distances._kernel("exact", first, second, cfg.options["exact"], 16, 5)
    assert value == ics.sampling_floor(x, "exact", seed=5)
    assert bounding._bounds(x, y, None, 16, 3) == ics.bounds(x, y, n_projections=16, seed=3)
