"""Unitization layer, its functional form, normalized(), and replace_norm."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import ICSRuntimeWarning, ICSTypeError, ICSValueError
from ics_toolkit.nn import (
    Unitization,
    Unitization1d,
    Unitization2d,
    Unitization3d,
    normalized,
    replace_norm,
    unitization_scale,
)
from ics_toolkit.nn.functional import _batch_stats, _composite, unitization

DT = torch.float64
# BatchNorm and the fused Unitization round differently; in float64 they agree to
# ~1e-15 relative, so this tolerance leaves three orders of magnitude of margin.
RTOL = 1e-12
ATOL = 1e-12

CASES = [  # (Unitization class, BatchNorm class, input shape)
    (Unitization1d, nn.BatchNorm1d, (7, 3)),
    (Unitization1d, nn.BatchNorm1d, (5, 3, 4)),
    (Unitization2d, nn.BatchNorm2d, (4, 3, 3, 5)),
    (Unitization3d, nn.BatchNorm3d, (3, 3, 2, 3, 2)),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT) * scale + shift


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    g = _gen(seed)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=DT) * 3 - 1.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=DT))


# ----------------------------------------------------------------------------------------
# alpha = 0 is BatchNorm: outputs, running statistics, gradients, train and eval
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ucls", "bcls", "shape"), CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_alpha_zero_reproduces_batchnorm(ucls, bcls, shape, momentum, affine, track):
    c = shape[1]
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    bn = bcls(c, **kw).to(DT)
    un = ucls(c, **kw, dtype=DT)
    _randomize(bn)
    if affine:
        un.load_state_dict(bn.state_dict(), strict=False)
    for step in range(3):  # train mode: batch stats, running stats update
        x1 = _randn(*shape, seed=10 + step, scale=2.0, shift=3.0).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        g = _randn(*shape, seed=20 + step)
        y1, y2 = bn(x1), un(x2)
        torch.testing.assert_close(y2, y1, rtol=RTOL, atol=ATOL)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
        if affine:
            torch.testing.assert_close(un.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(un.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-10)
    if track:
        torch.testing.assert_close(un.running_mean, bn.running_mean, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(un.running_var, bn.running_var, rtol=RTOL, atol=ATOL)
        assert int(un.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    else:
        assert un.running_mean is None and un.num_batches_tracked is None
    bn.eval()
    un.eval()
    x1 = _randn(*shape, seed=99, shift=1.0).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = bn(x1), un(x2)
    torch.testing.assert_close(y2, y1, rtol=RTOL, atol=ATOL)
    g = _randn(*shape, seed=98)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------
# the forward formula against a direct numpy transcription of the spec
# ----------------------------------------------------------------------------------------
def _numpy_reference(x, mean, var, gamma, beta, alpha, eps, norm):
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    p = int(np.prod(x.shape[2:])) if x.ndim > 2 else 1
    k = p if norm == "authors" else 1
    bshape = (1, c) + (1,) * (x.ndim - 2)
    out = np.empty_like(x)
    for i in range(n):
        xh = (x[i] - mean.reshape(bshape[1:])) / np.sqrt(var.reshape(bshape[1:]) + eps)
        s2 = np.sum(xh**2) / k**2
        mult = alpha.reshape(bshape[1:]) / np.sqrt(s2 + eps) + 1 - alpha.reshape(bshape[1:])
        out[i] = gamma.reshape(bshape[1:]) * xh * mult + beta.reshape(bshape[1:])
    return out


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4), (4, 2, 3, 5), (3, 2, 2, 3, 2)])
@pytest.mark.parametrize("norm", ["authors", "l2"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_numpy_transcription(shape, norm, training):
    c = shape[1]
    layer = Unitization(c, norm=norm, dtype=DT)
    _randomize(layer)
    with torch.no_grad():
        layer.alpha.copy_(torch.linspace(-0.5, 1.5, c, dtype=DT))
        layer.running_mean.copy_(torch.linspace(-1, 1, c, dtype=DT))
        layer.running_var.copy_(torch.linspace(0.5, 2, c, dtype=DT))
    layer.train(training)
    x = _randn(*shape, seed=3, scale=1.5, shift=0.5)
    xn = x.numpy()
    axes = (0, *range(2, x.dim()))
    if training:
        mean, var = xn.mean(axis=axes), xn.var(axis=axes)
    else:
        mean, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    expected = _numpy_reference(
        xn,
        mean,
        var,
        layer.weight.detach().numpy(),
        layer.bias.detach().numpy(),
        layer.alpha.detach().numpy(),
        layer.eps,
        norm,
    )
    with torch.no_grad():
        y = layer(x)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-11, atol=1e-12)
    if training:  # running stats: (1 - m) r + m * unbiased batch statistic
        n = x.numel() // c
        np.testing.assert_allclose(
            layer.running_mean.numpy(), 0.9 * np.linspace(-1, 1, c) + 0.1 * mean
        )
        np.testing.assert_allclose(
            layer.running_var.numpy(), 0.9 * np.linspace(0.5, 2, c) + 0.1 * var * n / (n - 1)
        )


# ----------------------------------------------------------------------------------------
# alpha = 1: every sample's chosen norm is |gamma| (up to eps); the scale k
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (4, 4, 5, 5), (3, 4, 2, 3, 3)])
@pytest.mark.parametrize("norm", ["authors", "l2"])
@pytest.mark.parametrize("gamma", [1.0, -2.5, 0.3])
def test_alpha_one_gives_norm_gamma(shape, norm, gamma):
    c = shape[1]
    layer = Unitization(c, alpha_init=1.0, norm=norm, dtype=DT)
    beta = _randn(c, seed=5)
    with torch.no_grad():
        layer.weight.fill_(gamma)
        layer.bias.copy_(beta)
    x = _randn(*shape, seed=4, scale=3.0, shift=-2.0)
    with torch.no_grad():
        y = layer(x)
    bshape = (1, c) + (1,) * (x.dim() - 2)
    centred = (y - beta.view(bshape)).reshape(shape[0], -1)
    p = math.prod(shape[2:])
    k = p if norm == "authors" else 1
    assert layer.scale(shape) == k == unitization_scale(shape, norm)
    chosen = centred.norm(dim=1) / k  # the layer's own norm, applied to its output
    # up to the eps term: |gamma| s / sqrt(s^2 + eps), s from an independent x_hat
    axes = (0, *range(2, x.dim()))
    xh = (x - x.mean(axes, keepdim=True)) / torch.sqrt(
        x.var(axes, unbiased=False, keepdim=True) + layer.eps
    )
    s = xh.reshape(shape[0], -1).norm(dim=1) / k
    torch.testing.assert_close(
        chosen, abs(gamma) * s / torch.sqrt(s**2 + layer.eps), rtol=1e-12, atol=0
    )
    # and the eps term is small: within eps / (2 s^2) of |gamma|
    assert torch.all((chosen - abs(gamma)).abs() <= abs(gamma) * layer.eps / (2 * s**2) * 1.01)


def test_unitized_output_norm_is_alpha_times_k():
    """Theory U4: u = alpha * x_hat / s has norm |alpha| k for every sample."""
    layer = Unitization2d(4, alpha_init=0.7, eps=1e-12, dtype=DT)
    x = _randn(6, 4, 3, 3, seed=8)
    y = layer(x).detach()
    # y = x_hat * (alpha / s + 1 - alpha): remove the BatchNorm part to isolate u
    xh = normalized(layer, x).x_hat
    u = y - 0.3 * xh
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.full((6,), 0.7 * 9, dtype=DT))


# ----------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 3)])
@pytest.mark.parametrize("norm", ["authors", "l2"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(shape, norm, training, affine):
    c = shape[1]
    x = _randn(*shape, seed=2, scale=1.5).requires_grad_()
    alpha = torch.linspace(-0.4, 1.3, c, dtype=DT).requires_grad_()
    w = (torch.rand(c, generator=_gen(3), dtype=DT) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=_gen(4), dtype=DT).requires_grad_() if affine else None
    rm = torch.linspace(-0.5, 0.5, c, dtype=DT)
    rv = torch.linspace(0.5, 1.5, c, dtype=DT)

    def f(x, alpha, *wb):
        ww, bb = wb if wb else (None, None)
        return unitization(x, rm.clone(), rv.clone(), ww, bb, alpha, training, 0.1, 1e-3, norm)

    inputs = (x, alpha, *((w, b) if affine else ()))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck(training):
    c = 3
    x = _randn(4, c, 2, 2, seed=6).requires_grad_()
    alpha = torch.tensor([0.2, 0.9, -0.3], dtype=DT, requires_grad=True)
    w = torch.tensor([1.5, -0.7, 1.0], dtype=DT, requires_grad=True)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=DT, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)

    def f(x, alpha, w, b):
        return unitization(x, rm.clone(), rv.clone(), w, b, alpha, training, 0.1, 1e-3)

    assert torch.autograd.gradgradcheck(f, (x, alpha, w, b))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_composite(training, dtype):
    """The fused kernel and the plain-ops form (used under torch.compile) agree."""
    c = 5
    x = (torch.randn(8, c, 4, 4, generator=_gen(7)) * 2 + 1).to(dtype).requires_grad_()
    alpha = torch.linspace(-0.2, 1.2, c, dtype=dtype, requires_grad=True)
    w = torch.linspace(0.5, 2.0, c, dtype=dtype, requires_grad=True)
    b = torch.linspace(-1, 1, c, dtype=dtype, requires_grad=True)
    rm, rv = torch.full((c,), 0.5, dtype=dtype), torch.full((c,), 3.0, dtype=dtype)
    g = torch.randn(8, c, 4, 4, generator=_gen(8)).to(dtype)
    y = unitization(x, rm, rv, w, b, alpha, training, 0.1, 1e-5)
    grads = torch.autograd.grad(y, (x, alpha, w, b), g)
    mean, var = (
        _batch_stats(x)
        if training
        else (torch.full((c,), 0.5, dtype=dtype), torch.full((c,), 3.0, dtype=dtype))
    )
    y_ref = _composite(x, mean, var, w, b, alpha, 1e-5, 1 / 16**2)
    grads_ref = torch.autograd.grad(y_ref, (x, alpha, w, b), g)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == DT else {"rtol": 2e-4, "atol": 2e-4}
    torch.testing.assert_close(y, y_ref, **tol)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, **tol)


def test_eval_backward_survives_a_later_running_stats_update():
    layer = Unitization2d(3, alpha_init=0.5, dtype=DT).eval()
    x = _randn(4, 3, 2, 2, seed=13).requires_grad_()
    (expected,) = torch.autograd.grad(layer(x).sum(), x)
    y = layer(x)
    layer.train()
    layer(_randn(4, 3, 2, 2, seed=14) * 5)  # moves the running statistics in place
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, expected)


def test_float32_stays_accurate_with_large_offsets():
    """Stable statistics: a large common offset does not destroy float32 precision."""
    layer = Unitization2d(3, alpha_init=0.5)
    x64 = _randn(16, 3, 8, 8, seed=9) + 1000.0
    y32 = layer(x64.float())
    layer64 = Unitization2d(3, alpha_init=0.5, dtype=DT)
    y64 = layer64(x64)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    x = _randn(8, 3, 4, 4, seed=11).float()
    ref_layer = Unitization2d(3, alpha_init=0.5)
    layer = Unitization2d(3, alpha_init=0.5)
    xl = x.to(dtype).requires_grad_()
    y = layer(xl)
    assert y.dtype == dtype and layer.running_var.dtype == torch.float32
    ref = ref_layer(xl.detach().float())  # the same rounded input, in float32
    # only the final rounding to `dtype` differs: half an ulp of |y| <= ~4
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, rtol=ulp, atol=4 * ulp)
    torch.testing.assert_close(layer.running_var, ref_layer.running_var)
    y.float().sum().backward()
    assert xl.grad.dtype == dtype and layer.alpha.grad.dtype == torch.float32


def test_autocast_keeps_the_statistics_in_float32():
    x = _randn(8, 3, 4, 4, seed=12).float()
    plain, amp = Unitization2d(3, alpha_init=0.5), Unitization2d(3, alpha_init=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = amp(x)  # float32 input: autocast must not push bmm & co. to bfloat16
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, plain(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# module mechanics: state_dict, clamp, learn_alpha, repr, reset, dtype casting
# ----------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    layer = Unitization2d(4, alpha_init=0.3, norm="l2", momentum=None)
    _randomize(layer.double())
    layer = layer.float()
    for seed in range(3):
        layer(torch.randn(6, 4, 3, 3, generator=_gen(seed)))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Unitization2d(4, alpha_init=0.3, norm="l2", momentum=None)
    fresh.load_state_dict(torch.load(buf))
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "alpha",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.num_batches_tracked.dtype == torch.long
    layer.eval()
    fresh.eval()
    x = torch.randn(5, 4, 3, 3, generator=_gen(9))
    assert torch.equal(layer(x), fresh(x))


def test_learn_alpha_false_makes_alpha_a_buffer():
    layer = Unitization1d(3, alpha_init=0.5, learn_alpha=False)
    assert "alpha" not in dict(layer.named_parameters())
    assert "alpha" in dict(layer.named_buffers())
    assert sum(p.numel() for p in layer.parameters()) == 6
    assert sum(p.numel() for p in Unitization1d(3).parameters()) == 9


def test_affine_false_registers_none():
    layer = Unitization(3, affine=False)
    assert layer.weight is None and layer.bias is None
    assert [n for n, _ in layer.named_parameters()] == ["alpha"]


def test_clamp_alpha_clamps_in_forward_and_zeroes_clamped_gradients():
    raw = torch.tensor([-1.0, 0.5, 2.0], dtype=DT)
    clamped = Unitization2d(3, clamp_alpha=True, dtype=DT)
    plain = Unitization2d(3, dtype=DT)
    with torch.no_grad():
        clamped.alpha.copy_(raw)
        plain.alpha.copy_(raw.clamp(0, 1))
    x = _randn(4, 3, 2, 2, seed=1)
    y1, y2 = clamped(x), plain(x)
    torch.testing.assert_close(y1, y2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(clamped.effective_alpha, raw.clamp(0, 1))
    assert torch.equal(clamped.alpha.detach(), raw)  # the parameter itself is not projected
    (y1 * _randn(*y1.shape, seed=2)).sum().backward()
    grad = clamped.alpha.grad
    assert grad[0] == 0 and grad[2] == 0 and grad[1] != 0


def test_reset_parameters_and_running_stats():
    layer = Unitization1d(2, alpha_init=0.25)
    with torch.no_grad():
        layer.weight.fill_(3)
        layer.alpha.fill_(-1)
    layer(torch.randn(5, 2, generator=_gen(0)))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(2))
    assert torch.equal(layer.alpha, torch.full((2,), 0.25))
    assert torch.equal(layer.running_mean, torch.zeros(2))
    assert torch.equal(layer.running_var, torch.ones(2))
    assert int(layer.num_batches_tracked) == 0


def test_extra_repr_names_the_options():
    text = repr(Unitization2d(8, norm="l2", alpha_init=0.5, clamp_alpha=True))
    assert text.startswith("Unitization2d(8, eps=1e-05, momentum=0.1")
    for part in ("norm='l2'", "alpha_init=0.5", "clamp_alpha=True", "affine=True"):
        assert part in text


def test_default_norm_is_authors():
    assert Unitization(3).norm == "authors" == ics.nn.DEFAULT_NORM


def test_parameters_are_cast_to_the_input_dtype():
    layer = Unitization2d(3, alpha_init=0.5)  # float32 parameters
    x = _randn(4, 3, 2, 2, seed=0)
    y = layer(x)
    assert y.dtype == DT
    ref = Unitization2d(3, alpha_init=0.5, dtype=DT)(x)
    torch.testing.assert_close(y, ref)


def test_non_contiguous_input():
    layer = Unitization2d(3, alpha_init=0.5, dtype=DT)
    x = _randn(4, 3, 5, 6, seed=0)
    xt = x.transpose(2, 3)  # (4, 3, 6, 5), not contiguous
    y = layer(xt)
    ref = Unitization2d(3, alpha_init=0.5, dtype=DT)(xt.contiguous())
    torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)
    xcl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(xcl), layer(x), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_torch_compile_runs_on_cpu():
    torch._dynamo.reset()
    eager = Unitization2d(4, alpha_init=0.4, dtype=DT)
    compiled_layer = Unitization2d(4, alpha_init=0.4, dtype=DT)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x1 = _randn(3, 4, 2, 2, seed=0).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = eager(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(compiled_layer.alpha.grad, eager.alpha.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    assert int(compiled_layer.num_batches_tracked) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = Unitization2d(4, alpha_init=0.5, dtype=DT)
    gpu = Unitization2d(4, alpha_init=0.5, dtype=DT, device="cuda")
    x = _randn(6, 4, 3, 3, seed=0)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x))
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var)


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "shape", "msg"),
    [
        (Unitization2d, (4, 3, 5), r"expected 4D input \(got 3D input\)"),
        (Unitization1d, (4, 3, 5, 5), r"expected 2D or 3D input \(got 4D input\)"),
        (Unitization3d, (4, 3, 5, 5), r"expected 5D input \(got 4D input\)"),
        (Unitization, (4,), r"expected 2D or higher input .* \(got 1D input\)"),
    ],
)
def test_input_rank_errors(cls, shape, msg):
    with pytest.raises(ICSValueError, match=msg):
        cls(3)(torch.zeros(shape))


def test_channel_mismatch_error():
    with pytest.raises(ICSValueError, match=r"Unitization2d\(3\) expected input with 3 channels"):
        Unitization2d(3)(torch.zeros(2, 5, 2, 2))
    with pytest.raises(ICSValueError, match=r"`weight` must have shape \(5,\) to match"):
        unitization(torch.zeros(2, 5), weight=torch.ones(3), training=True)


def test_single_value_per_channel_in_training():
    with pytest.raises(ICSValueError, match="more than 1 value per channel when training"):
        Unitization1d(3)(torch.zeros(1, 3))
    layer = Unitization1d(3).eval()
    assert layer(torch.zeros(1, 3)).shape == (1, 3)  # eval mode is fine


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"num_features": 0}, "`num_features` must be a positive int"),
        ({"num_features": 3, "eps": 0.0}, "`eps` must be a float > 0"),
        ({"num_features": 3, "momentum": 1.5}, r"`momentum` must be in \[0, 1\] or None"),
        ({"num_features": 3, "norm": "l1"}, r"`norm` must be one of \('authors', 'l2'\)"),
        ({"num_features": 3, "alpha_init": float("nan")}, "`alpha_init` must be finite"),
    ],
)
def test_constructor_errors(kwargs, msg):
    with pytest.raises(ICSValueError, match=msg):
        Unitization(**kwargs)


def test_functional_errors():
    x = torch.zeros(4, 3)
    with pytest.raises(ICSValueError, match="required when training=False"):
        unitization(x)
    with pytest.raises(ICSValueError, match="pass both `running_mean` and `running_var`"):
        unitization(x, torch.zeros(3), None, training=True)
    with pytest.raises(ICSValueError, match=r"`alpha` must have shape \(3,\)"):
        unitization(x, alpha=torch.zeros(2), training=True)
    with pytest.raises(ICSTypeError, match="`input` must be a floating tensor"):
        unitization(torch.zeros(4, 3, dtype=torch.long), training=True)
    with pytest.raises(ICSTypeError, match=r"`input` must be a torch\.Tensor"):
        unitization(np.zeros((4, 3)), training=True)
    with pytest.raises(ICSValueError, match="`input_shape` must be"):
        unitization_scale((3,))


def test_functional_scalar_alpha_and_defaults():
    x = _randn(5, 3, 4, seed=0)
    y_scalar = unitization(x, alpha=0.5, training=True)
    y_vec = unitization(x, alpha=torch.full((3,), 0.5, dtype=DT), training=True)
    torch.testing.assert_close(y_scalar, y_vec)
    # alpha None is BatchNorm without affine
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(unitization(x, training=True), ref, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------
# normalized(): what the layer computed, without side effects
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_normalized_batchnorm_matches_formula_and_has_no_side_effects(training):
    bn = nn.BatchNorm2d(3)
    for seed in range(2):
        bn(torch.randn(8, 3, 4, 4, generator=_gen(seed)) * 2 + 1)
    bn.train(training)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(5, 3, 4, 4, generator=_gen(7)) + 0.5
    out = normalized(bn, x)
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert bn.training is training
    xd = x.double().numpy()
    if training:
        mean, var = xd.mean(axis=(0, 2, 3)), xd.var(axis=(0, 2, 3))
    else:
        mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    expected = (xd - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps)
    assert out.x_hat.dtype == torch.float64 and not out.x_hat.requires_grad
    np.testing.assert_allclose(out.x_hat.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        out.s.numpy(), np.linalg.norm(expected.reshape(5, -1), axis=1), rtol=1e-6
    )
    assert out.k == 1.0 and out.alpha is None
    # and x_hat is what BatchNorm scaled: gamma * x_hat + beta == bn(x)
    with torch.no_grad():
        bn.weight.fill_(1.7)
        bn.bias.fill_(-0.2)
        y = bn(x) if not training else None
    if y is not None:
        torch.testing.assert_close(1.7 * out.x_hat.float() - 0.2, y, rtol=1e-5, atol=1e-5)


def test_normalized_unitization_uses_its_norm_and_effective_alpha():
    layer = Unitization2d(3, clamp_alpha=True)
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([-1.0, 0.5, 3.0]))
    x = torch.randn(4, 3, 5, 5, generator=_gen(1))
    out = normalized(layer, x)
    assert out.k == 25.0
    torch.testing.assert_close(out.s, out.x_hat.flatten(1).norm(dim=1) / 25)
    torch.testing.assert_close(out.alpha, torch.tensor([0.0, 0.5, 1.0], dtype=DT))
    assert int(layer.num_batches_tracked) == 0
    assert normalized(layer, x, norm="l2").k == 1.0
    assert normalized(layer, x, dtype=None).x_hat.dtype == torch.float32


def test_normalized_errors():
    with pytest.raises(ICSTypeError, match="takes a BatchNorm or Unitization layer, got GroupNorm"):
        normalized(nn.GroupNorm(1, 3), torch.zeros(2, 3))
    with pytest.raises(ICSValueError, match="expected x with 3 channels"):
        normalized(nn.BatchNorm1d(3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------
# replace_norm
# ----------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv3d(4, 3, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(3)
        self.head = nn.Sequential(nn.Linear(3, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU())

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv(x)))
        h = self.bn3(self.conv3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1)))
        return self.head(h.mean(dim=(2, 3, 4)))


def _trained_net() -> _Net:
    torch.manual_seed(0)
    net = _Net().double()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize(m, seed=m.num_features)
    for seed in range(3):
        net(_randn(6, 2, 4, 4, seed=seed))
    return net


@pytest.mark.parametrize("training", [True, False])
def test_replace_with_unitization_keeps_the_computation(training):
    net = _trained_net().train(training)
    x = _randn(6, 2, 4, 4, seed=50)
    ref_net = _trained_net().train(training)
    n_params = sum(p.numel() for p in net.parameters())
    weight_obj = net.bn2.weight
    report = replace_norm(net, "unitization")
    assert list(report.columns) == ["name", "old", "new", "num_features", "carried"]
    assert report["name"].tolist() == ["bn2", "bn3", "head.1"]
    assert report["new"].tolist() == ["Unitization2d", "Unitization3d", "Unitization1d"]
    assert set(report["carried"]) == {
        "weight, bias, running_mean, running_var, num_batches_tracked"
    }
    assert net.bn2.weight is weight_obj
    assert sum(p.numel() for p in net.parameters()) == n_params + 4 + 3 + 5
    assert all(m.training is training for m in net.modules())
    y, y_ref = net(x), ref_net(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(
        net.conv.weight.grad, ref_net.conv.weight.grad, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(net.bn2.running_var, ref_net.bn2.running_var)


def test_replace_selection_by_glob_list_and_predicate():
    net = _Net()
    report = replace_norm(net, "identity", layers="head.*")
    assert report["name"].tolist() == ["head.1"] and isinstance(net.head[1], nn.Identity)
    assert isinstance(net.bn2, nn.BatchNorm2d)
    net = _Net()
    report = replace_norm(net, "unitization", layers=["bn2", "bn3"], alpha_init=0.5)
    assert report["name"].tolist() == ["bn2", "bn3"]
    assert float(net.bn3.alpha.detach()[0]) == 0.5
    net = _Net()
    report = replace_norm(net, "group", layers=lambda name, m: m.num_features == 4, num_groups=2)
    assert report["name"].tolist() == ["bn2"] and net.bn2.num_groups == 2


def test_replace_group_layer_identity():
    net = _Net()
    w = net.bn2.weight
    report = replace_norm(net, "group")
    assert report["new"].tolist() == ["GroupNorm"] * 3
    assert (net.bn2.num_groups, net.bn3.num_groups, net.head[1].num_groups) == (4, 3, 5)
    assert net.bn2.weight is w and report["carried"].tolist() == ["weight, bias"] * 3
    net = _Net()
    replace_norm(net, "layer")
    assert isinstance(net.head[1], nn.LayerNorm) and net.bn2.num_groups == 1
    x = torch.randn(4, 5, generator=_gen(0))
    with torch.no_grad():
        net.head[1].weight.fill_(1.0)
        net.head[1].bias.zero_()
        h = net.head[1](x)
    xd = x.numpy().astype(np.float64)
    ref = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(h.numpy(), ref, rtol=1e-5, atol=1e-5)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    report = replace_norm(net, "identity")
    assert report["carried"].tolist() == [""]
    x = torch.randn(2, 3, generator=_gen(1))
    torch.testing.assert_close(net(x), net[0](x))


def test_replace_shared_module_everywhere():
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn)
    report = replace_norm(net, "unitization")
    assert len(report) == 1
    assert net[1] is net[3] and isinstance(net[1], Unitization1d)


def test_replace_warns_about_hooks_and_keeps_device_dtype():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    net[1].register_forward_hook(lambda *a: None)
    with pytest.warns(ICSRuntimeWarning, match="hooks registered on it; they do not carry over"):
        replace_norm(net, "unitization")
    assert net[1].alpha.dtype == DT


def test_replace_errors():
    with pytest.raises(ICSValueError, match=r"`kind` must be one of \('unitization'"):
        replace_norm(_Net(), "batch")
    with pytest.raises(
        ICSValueError, match=r"unknown option\(s\) \['num_groups'\] for kind='unitization'"
    ):
        replace_norm(_Net(), "unitization", num_groups=2)
    with pytest.raises(
        ICSValueError,
        match=r"pattern 'nope\.\*' matches no BatchNorm layer; the BatchNorm layers are: "
        r"bn2, bn3, head\.1",
    ):
        replace_norm(_Net(), "identity", layers="nope.*")
    with pytest.raises(ICSValueError, match="selected no BatchNorm layer"):
        replace_norm(_Net(), "identity", layers=lambda n, m: False)
    with pytest.raises(ICSValueError, match="has no BatchNorm layers to replace"):
        replace_norm(nn.Linear(2, 2), "identity")
    with pytest.raises(ICSValueError, match="is itself a BatchNorm layer"):
        replace_norm(nn.BatchNorm1d(2), "identity")
    with pytest.raises(ICSTypeError, match=r"`model` must be a torch\.nn\.Module"):
        replace_norm("model", "identity")
    with pytest.raises(ICSTypeError, match="`layers` must be None, a name glob"):
        replace_norm(_Net(), "identity", layers=[1, 2])
    with pytest.raises(
        ICSValueError, match="`num_groups`=3 does not divide the 4 channels of layer 'bn2'"
    ):
        replace_norm(_Net(), "group", num_groups=3)
    lazy = nn.Sequential(nn.Linear(2, 2), nn.LazyBatchNorm1d())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ICSValueError, match="lazy BatchNorm that has not seen an input"):
            replace_norm(lazy, "unitization")


def test_replace_norm_is_exported_lazily():
    assert ics.replace_norm is replace_norm
