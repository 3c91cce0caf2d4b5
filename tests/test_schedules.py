"""Schedules decide which optimizer steps are measured."""

import itertools

import pytest

from ics_toolkit.errors import ICSTypeError, ICSValueError
from ics_toolkit.schedules import as_schedule, explicit, linear, logarithmic


def test_linear_with_offset():
    assert [s for s in range(30) if linear(10, offset=5)(s)] == [5, 15, 25]


def test_logarithmic_is_dense_early_and_hits_both_ends():
    steps = sorted(logarithmic(1000, n_points=20).steps)
    assert steps[0] == 0 and steps[-1] == 1000
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert gaps == sorted(gaps)  # spacing never shrinks


def test_as_schedule_accepts_every_form():
    assert as_schedule(3)(6) and not as_schedule(3)(7)
    assert as_schedule([2, 4])(4) and not as_schedule([2, 4])(3)
    assert as_schedule(lambda s: s == 7)(7)
    assert as_schedule("log:100:6")(100)
    assert isinstance(as_schedule((1, 2)), explicit)


@pytest.mark.parametrize(
    ("bad", "err", "match"),
    [
        (0, ICSValueError, "positive int"),
        (True, ICSTypeError, "must be an int"),
        ("every:3", ICSValueError, "log:END"),
        ("log:x", ICSValueError, "integers"),
        (3.5, ICSTypeError, "got float"),
        ([-1], ICSValueError, "non-negative"),
    ],
)
def test_bad_schedules_are_refused(bad, err, match):
    with pytest.raises(err, match=match):
        as_schedule(bad)
