"""``Unitization.keras``: the authors' published Keras layer, against a transcription.

The transcription below is written from the formulas of the authors' layer (the spec's
section 5, in plain numpy, float64): in training mode the batch variance over the M
values of a channel is multiplied by M / (M - 1 - eps) before normalizing; Keras'
defaults eps = 1e-3 and momentum 0.99 on the old running value.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit.nn import Unitization, Unitization1d, Unitization2d, normalized
from ics_toolkit.nn.functional import keras_correction


def transcription(x, gamma, beta, alpha, eps, k):
    """Training-mode output and batch statistics of the authors' layer, in numpy."""
    axes = (0, *range(2, x.ndim))
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes) * m / (m - 1 - eps)  # biased variance, then the correction
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    s = np.sqrt((x_hat.reshape(len(x), -1) ** 2).sum(axis=1)) / k
    mix = alpha.reshape(shape) / np.sqrt(s**2 + eps).reshape((-1,) + (1,) * (x.ndim - 1))
    y = gamma.reshape(shape) * x_hat * (mix + 1 - alpha.reshape(shape)) + beta.reshape(shape)
    return y, mean, var


def layer_for(shape, alpha):
    layer = Unitization.keras(shape[1], alpha_init=alpha).double()
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, shape[1]))
    return layer


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(16, 6), (8, 4, 5, 3)])
def test_training_mode_matches_the_transcription(shape, alpha):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = layer_for(shape, alpha)
    k = layer.scale(shape)
    y = layer(x)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    a = np.full(shape[1], alpha)
    want, mean, var = transcription(x.numpy(), g, b, a, 1e-3, k)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # Keras' momentum 0.99 on the old value: r = 0.99 * init + 0.01 * batch
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.99 + 0.01 * var, rtol=1e-12)


def test_running_statistics_over_steps_and_eval_mode():
    gen = torch.Generator().manual_seed(1)
    layer = layer_for((12, 3, 2, 2), 0.5)
    r_mean, r_var = np.zeros(3), np.ones(3)
    for _ in range(4):
        x = 2.0 + 3.0 * torch.randn(12, 3, 2, 2, dtype=torch.float64, generator=gen)
        layer(x)
        _, mean, var = transcription(x.numpy(), np.ones(3), np.zeros(3), np.zeros(3), 1e-3, 2.0)
        r_mean, r_var = 0.99 * r_mean + 0.01 * mean, 0.99 * r_var + 0.01 * var
    np.testing.assert_allclose(layer.running_mean.numpy(), r_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), r_var, rtol=1e-12)
    # eval mode: the running statistics, as the default layer
    layer.eval()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=gen)
    plain = Unitization(3, eps=1e-3, alpha_init=0.5).double().eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-14, atol=1e-14)


def test_the_correction_is_what_separates_it_from_batchnorm():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    keras = Unitization2d.keras(4).double()
    same_eps = Unitization2d(4, eps=1e-3, momentum=0.01).double()
    bn = torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.01).double()
    torch.testing.assert_close(same_eps(x), bn(x), rtol=1e-12, atol=1e-12)  # default = BN
    ratio = (keras(x) / same_eps(x))[x.abs() > 1e-3]  # x_hat shrinks by ~sqrt(corr)
    m = 6 * 9
    var = x.var(dim=(0, 2, 3), unbiased=False)
    want = torch.sqrt((var + 1e-3) / (var * m / (m - 1 - 1e-3) + 1e-3))
    assert not torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4)
    torch.testing.assert_close(
        keras(x), same_eps(x) * want.view(1, 4, 1, 1), rtol=1e-12, atol=1e-12
    )


def test_gradients_and_options():
    layer = Unitization1d.keras(5, alpha_init=0.3).double()
    x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert layer.momentum == 0.01 and layer.eps == 1e-3
    assert "variance='keras'" in repr(layer) and "variance" not in repr(Unitization(5))
    assert Unitization.keras(5, eps=1e-5).eps == 1e-5  # overridable
    with pytest.raises(ics.ICSValueError, match="`variance` must be one of"):
        Unitization(5, variance="bessel")
    with pytest.raises(ics.ICSValueError, match="M > 1 \\+ eps"):
        keras_correction(1, 1e-3)


def test_normalized_values_follow_the_layer():
    x = torch.randn(7, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = Unitization1d.keras(3, alpha_init=0.0).double()
    out = normalized(layer, x)
    y = layer(x)  # alpha = 0, gamma = 1, beta = 0: the output is x_hat itself
    torch.testing.assert_close(out.x_hat, y, rtol=1e-13, atol=1e-13)


def test_the_monitor_bounds_a_keras_layer():
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), Unitization1d.keras(32, alpha_init=0.5), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    )  # fmt: skip
    x, target = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x[:32], every=1).attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    monitor.detach()
    df = monitor.results()
    rows = df[(df.layer == "1") & df.quantity.isin(["exact", "U5"])]
    wide = rows.pivot_table(index="step", columns="quantity", values="value")
    assert len(wide) == 3 and (wide["exact"] <= wide["U5"] * (1 + 1e-5)).all()
    assert df[df.kind.isin(["estimate", "upper", "lower"])].bounds_hold.all()
