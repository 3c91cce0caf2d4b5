"""The measured step's shortcuts give the numbers of the direct computation.

The normalized values are computed in place in the capture hook, the floor's ``exact``
reuses the row norms of the whole sample, and the order check reads its scale from the
float32 storage: each is compared with the direct computation it replaces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import shift
from ics_toolkit._norm_snapshot import batchnorm_hat
from ics_toolkit.models import SmallCNN
from ics_toolkit.nn.functional import _batch_stats


@pytest.mark.parametrize("shape", [(16, 3), (8, 4, 5), (6, 3, 4, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_hat_in_place_is_bitwise_the_formula(shape: tuple[int, ...], training: bool):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3 + 2
    bn = nn.BatchNorm1d(shape[1]) if len(shape) < 4 else nn.BatchNorm2d(shape[1])
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.5, 2, generator=g)
    if training:
        mean, var = _batch_stats(x)
    else:
        mean, var = bn.running_mean, bn.running_var
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    ref = (x - mean.view(view)) * torch.rsqrt(var.view(view) + float(bn.eps))
    assert torch.equal(batchnorm_hat(bn, x, training=training), ref)


def _run() -> list[np.ndarray]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    model = SmallCNN(3, 4, width=4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x[:24], every=1)
    monitor.attach(opt)
    for i in range(3):
        opt.zero_grad()
        batch = slice(i * 16, i * 16 + 16)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    monitor.detach()
    df = monitor.results()
    df = df[df.kind != "event"].sort_values(["step", "layer", "view", "quantity"])
    return [df.value.to_numpy(), df.bounds_hold.to_numpy(), df.quantity.to_numpy()]


def test_shortcuts_give_the_direct_numbers(monkeypatch: pytest.MonkeyPatch):
    fast = _run()
    floor_row, check_group = shift._floor_row, shift._check_group

    def direct_floor(x, method, config, row_norms=None):  # recompute the halves' norms
        return floor_row(x, method, config, None)

    def direct_check(step, key, name, g, config, sides):  # scale from the float64 views
        g.pop("stored", None)
        return check_group(step, key, name, g, config, sides)

    monkeypatch.setattr(shift, "_floor_row", direct_floor)
    monkeypatch.setattr(shift, "_check_group", direct_check)
    direct = _run()
    assert (fast[2] == direct[2]).all()
    assert "floor_exact" in set(fast[2])
    np.testing.assert_allclose(fast[0], direct[0], rtol=1e-12, atol=0)
    assert (fast[1] == direct[1]).all()
