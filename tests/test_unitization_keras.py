"""``Unitization.keras``: the authors' published Keras layer, against a transcription.

The transcription below is written from the formulas of the authors' layer (the spec's
section 5, in plain numpy, float64): in training mode the batch variance over the M
values of a channel is multiplied by M / (M - 1 - eps) before normalizing, and that
corrected variance is what the moving variance averages; Keras' defaults eps = 1e-3 and
momentum 0.99 on the old running value; eval mode normalizes by the moving statistics.
The zero-debiased moving averages of standalone Keras 2.1.3 to 2.2.5 are transcribed
from TensorFlow's ``assign_moving_average(zero_debias=True)``: a zero-started average
and an update counter, the variable set to ``biased / (1 - momentum**t)``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit._norm_snapshot import norm_snapshot
from ics_toolkit.nn import Unitization, Unitization1d, Unitization2d, Unitization3d, normalized
from ics_toolkit.nn.functional import keras_correction

KERAS_EPS, KERAS_MOMENTUM = 1e-3, 0.99  # Keras' BatchNormalization defaults


def _channel(v, ndim):
    """A (C,) vector shaped to broadcast over (N, C, *spatial)."""
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def _unitize(x_hat, gamma, beta, alpha, eps, k):
    """The authors' mix of x_hat and x_hat / s, then the affine map."""
    nd = x_hat.ndim
    s2 = (x_hat.reshape(len(x_hat), -1) ** 2).sum(axis=1) / k**2
    mix = _channel(alpha, nd) / np.sqrt(s2 + eps).reshape((-1,) + (1,) * (nd - 1))
    return _channel(gamma, nd) * x_hat * (mix + 1 - _channel(alpha, nd)) + _channel(beta, nd)


def transcription(x, gamma, beta, alpha, eps, k):
    """Training-mode output and batch statistics of the authors' layer, in numpy."""
    axes = (0, *range(2, x.ndim))
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes) * m / (m - 1 - eps)  # biased variance, then the correction
    x_hat = (x - _channel(mean, x.ndim)) / np.sqrt(_channel(var, x.ndim) + eps)
    return _unitize(x_hat, gamma, beta, alpha, eps, k), mean, var


def transcription_eval(x, moving_mean, moving_var, gamma, beta, alpha, eps, k):
    """Eval-mode output of the authors' layer: the moving statistics, the same eps."""
    x_hat = (x - _channel(moving_mean, x.ndim)) / np.sqrt(_channel(moving_var, x.ndim) + eps)
    return _unitize(x_hat, gamma, beta, alpha, eps, k)


def layer_for(shape, alpha, cls=Unitization, **kwargs):
    layer = cls.keras(shape[1], alpha_init=alpha, **kwargs).double()
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, shape[1]))
    return layer


def _affine(layer):
    return layer.weight.detach().numpy(), layer.bias.detach().numpy()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(16, 6), (8, 4, 5, 3)])
def test_training_mode_matches_the_transcription(shape, alpha):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = layer_for(shape, alpha)
    k = layer.scale(shape)
    y = layer(x)
    g, b = _affine(layer)
    want, mean, var = transcription(x.numpy(), g, b, np.full(shape[1], alpha), KERAS_EPS, k)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    # Keras' momentum 0.99 on the old value: r = 0.99 * init + 0.01 * batch
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.01 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.99 + 0.01 * var, rtol=1e-12)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(Unitization1d, (9, 3)), (Unitization1d, (6, 3, 5)), (Unitization2d, (5, 3, 2, 4)),
     (Unitization3d, (4, 3, 2, 3, 2))],
)  # fmt: skip
def test_every_rank_builds_the_authors_layer(cls, shape):
    gen = torch.Generator().manual_seed(6)
    layer = layer_for(shape, 0.5, cls)
    assert type(layer) is cls and layer.variance == "keras"
    x = 1.0 + 2.0 * torch.randn(*shape, dtype=torch.float64, generator=gen)
    g, b = _affine(layer)
    want, _, var = transcription(x.numpy(), g, b, np.full(3, 0.5), KERAS_EPS, layer.scale(x))
    np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.99 + 0.01 * var, rtol=1e-12)
    with pytest.raises(ics.ICSValueError, match="expected"):  # the rank check stays
        layer(x.reshape(shape[0], 3, -1, 1, 1, 1))  # 6D: no rank takes it


def test_running_statistics_over_steps_and_eval_mode():
    gen = torch.Generator().manual_seed(1)
    shape = (12, 3, 2, 2)
    layer = layer_for(shape, 0.5)
    moving_mean, moving_var = np.zeros(3), np.ones(3)  # Keras' initializers
    for _ in range(4):
        x = 2.0 + 3.0 * torch.randn(*shape, dtype=torch.float64, generator=gen)
        layer(x)
        _, mean, var = transcription(x.numpy(), np.ones(3), np.zeros(3), np.zeros(3), 1e-3, 2.0)
        # K.moving_average_update: x <- x - (x - value) * (1 - momentum)
        moving_mean -= (moving_mean - mean) * (1 - KERAS_MOMENTUM)
        moving_var -= (moving_var - var) * (1 - KERAS_MOMENTUM)
    np.testing.assert_allclose(layer.running_mean.numpy(), moving_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), moving_var, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 4
    # eval mode: the moving statistics with the same eps, and no update
    layer.eval()
    x = torch.randn(5, *shape[1:], dtype=torch.float64, generator=gen)
    g, b = _affine(layer)
    want = transcription_eval(x.numpy(), moving_mean, moving_var, g, b, np.full(3, 0.5), 1e-3, 4)
    np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), moving_var, rtol=1e-12)
    # which is the default layer's eval mode with the same eps and buffers
    plain = Unitization(3, eps=1e-3, alpha_init=0.5).double().eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-14, atol=1e-14)


def test_zero_debiased_running_statistics_follow_tensorflow():
    gen = torch.Generator().manual_seed(7)
    layer = layer_for((10, 4), 0.5, zero_debias=True)
    twin = layer_for((10, 4), 0.5)  # the plain average: same outputs in training mode
    biased_mean, biased_var, step = np.zeros(4), np.zeros(4), 0  # TF's shadow variables
    for t in range(5):
        x = 3.0 - torch.rand(10, 4, dtype=torch.float64, generator=gen) * 4.0
        torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)
        _, mean, var = transcription(x.numpy(), np.ones(4), np.zeros(4), np.zeros(4), 1e-3, 1.0)
        biased_mean -= (biased_mean - mean) * (1 - KERAS_MOMENTUM)
        biased_var -= (biased_var - var) * (1 - KERAS_MOMENTUM)
        step += 1
        debias = 1 - KERAS_MOMENTUM**step
        np.testing.assert_allclose(layer.running_mean.numpy(), biased_mean / debias, rtol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), biased_var / debias, rtol=1e-12)
        if t == 0:  # the first step forgets the initial 0 / 1 entirely
            np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)
    assert not np.allclose(twin.running_var.numpy(), layer.running_var.numpy(), rtol=1e-3)
    assert "zero_debias=True" in repr(layer) and "zero_debias" not in repr(twin)
    # momentum 0: the limit of the weight, a cumulative average (torch's momentum=None)
    limit = Unitization(4, momentum=0.0, zero_debias=True).double()
    cumulative = Unitization(4, momentum=None).double()
    for _ in range(3):
        x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
        limit(x), cumulative(x)
    torch.testing.assert_close(limit.running_var, cumulative.running_var, rtol=1e-14, atol=0)
    with pytest.raises(ics.ICSValueError, match="`zero_debias=True` needs a `momentum`"):
        Unitization(4, momentum=None, zero_debias=True)


def test_the_default_layer_is_still_batchnorm():
    gen = torch.Generator().manual_seed(8)
    layer, bn = Unitization2d(4).double(), torch.nn.BatchNorm2d(4).double()
    assert (layer.eps, layer.momentum, layer.variance) == (1e-5, 0.1, "biased")
    with torch.no_grad():
        for m in (layer, bn):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-0.2, 0.3, 4))
    for _ in range(3):
        x = 1.0 + 2.0 * torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(layer(x), bn(x), rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(bn, name), rtol=1e-12, atol=0)
    layer.eval(), bn.eval()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-12, atol=1e-12)


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


def test_state_dict_round_trip_repr_and_copies():
    gen = torch.Generator().manual_seed(9)
    layer = layer_for((8, 3, 2, 2), 0.3, Unitization2d, zero_debias=True)
    for _ in range(3):
        layer(torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen))
    state = layer.state_dict()
    # the options are configuration, like eps: the state is the default layer's
    assert set(state) == set(Unitization2d(3).state_dict())
    fresh = Unitization2d.keras(3, alpha_init=0.3, zero_debias=True).double()
    fresh.load_state_dict(state)
    for copied in (fresh, copy.deepcopy(layer)):
        assert (copied.variance, copied.zero_debias, copied.eps) == ("keras", True, 1e-3)
        assert repr(copied) == repr(layer)
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=gen)
    for mode in (False, True):  # eval, then a training step that updates both alike
        layer.train(mode), fresh.train(mode)
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh.running_var, layer.running_var, rtol=0, atol=0)
    text = repr(Unitization1d.keras(5))
    assert "eps=0.001, momentum=0.01" in text and "variance='keras'" in text
    assert "variance" not in repr(Unitization(5))


def test_gradients_and_options():
    layer = Unitization1d.keras(5, alpha_init=0.3).double()
    x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert layer.momentum == 0.01 and layer.eps == 1e-3 and not layer.zero_debias
    assert Unitization.keras(5, eps=1e-5).eps == 1e-5  # overridable
    with pytest.raises(ics.ICSValueError, match="`variance` must be one of"):
        Unitization(5, variance="bessel")
    with pytest.raises(ics.ICSValueError, match="M > 1 \\+ eps"):
        keras_correction(1, 1e-3)
    with pytest.raises(ics.ICSValueError, match="M > 1 \\+ eps"):  # M = 2, eps = 1.5
        Unitization1d.keras(5, eps=1.5)(torch.randn(2, 5))


def test_float32_and_bfloat16_inputs():
    x = torch.randn(12, 4, 3, 3, generator=torch.Generator().manual_seed(10))
    layer = layer_for(x.shape, 0.5, Unitization2d)
    g, b = _affine(layer)
    want, _, _ = transcription(x.double().numpy(), g, b, np.full(4, 0.5), 1e-3, 9.0)
    y32 = layer.float()(x)
    np.testing.assert_allclose(y32.detach().double().numpy(), want, rtol=1e-4, atol=1e-5)
    y16 = layer(x.bfloat16())  # computed in float32, rounded once
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=2e-2)


def test_normalized_values_follow_the_layer():
    x = torch.randn(7, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = Unitization1d.keras(3, alpha_init=0.0).double()
    out = normalized(layer, x)
    y = layer(x)  # alpha = 0, gamma = 1, beta = 0: the output is x_hat itself
    torch.testing.assert_close(out.x_hat, y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("training", [True, False])
def test_the_monitor_snapshot_is_what_the_layer_normalized(training):
    """_norm_snapshot (U3/U5's x_hat) applies the correction exactly when the layer does."""
    gen = torch.Generator().manual_seed(11)
    layer = Unitization2d.keras(3, alpha_init=0.0).double()
    for _ in range(2):  # running statistics away from their initial 0 / 1
        layer(2.0 + torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=gen))
    x = 2.0 + torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=gen)
    snap = norm_snapshot(layer, x, training=training)
    assert snap.eps == 1e-3 and snap.k == 4.0 and snap.form == "embedded"
    layer.train(training)
    before = layer.state_dict()
    torch.testing.assert_close(snap.x_hat, layer(x), rtol=1e-13, atol=1e-13)  # gamma 1, beta 0
    if training:  # the snapshot differs from the uncorrected x_hat the default would give
        plain = Unitization2d(3, eps=1e-3, alpha_init=0.0).double()
        plain.load_state_dict(before)
        gap = (norm_snapshot(plain, x, training=True).x_hat - snap.x_hat).abs().max()
        assert gap > 1e-3


def _train(model, monitor_args, x, target, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x[:32], every=1, **monitor_args).attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)  # a violated bound would raise
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    monitor.detach()
    return monitor.results()


def test_the_monitor_bounds_a_keras_layer():
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), Unitization1d.keras(32, alpha_init=0.5), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    )  # fmt: skip
    x, target = torch.randn(64, 8), torch.randint(0, 3, (64,))
    df = _train(model, {}, x, target)
    rows = df[(df.layer == "1") & df.quantity.isin(["exact", "U5"])]
    wide = rows.pivot_table(index="step", columns="quantity", values="value")
    assert len(wide) == 3 and (wide["exact"] <= wide["U5"] * (1 + 1e-5)).all()
    assert df[df.kind.isin(["estimate", "upper", "lower"])].bounds_hold.all()


def test_the_monitor_bounds_keras_conv_layers_at_alpha_0_and_1():
    torch.manual_seed(12)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), Unitization2d.keras(6, alpha_init=0.0), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3), Unitization2d.keras(4, alpha_init=1.0), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip
    x, target = torch.randn(48, 3, 8, 8), torch.randint(0, 3, (48,))
    args = {"methods": ("exact",), "views": ("flatten", "pixel"), "max_pixel_samples": 64}
    df = _train(model, args, x, target)
    rows = df[df.layer.isin(["1", "4"]) & df.quantity.isin(["exact", "U5"])]
    wide = rows.pivot_table(index=["step", "layer", "view"], columns="quantity", values="value")
    assert len(wide) == 3 * 2 * 2 and wide.notna().all().all()  # steps x layers x views
    assert (wide["exact"] > 0).all() and (wide["exact"] <= wide["U5"] * (1 + 1e-5)).all()
    assert df[df.kind.isin(["estimate", "upper", "lower"])].bounds_hold.all()
