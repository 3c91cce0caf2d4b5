r"""Functional form of the Unitization layer and side-effect-free normalization helpers.

The Unitization layer (Huang and Yu, CVPR 2020; section 5 of the theory) normalizes
like BatchNorm and then rescales every sample by its own norm:

.. math::

    \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    s_n = \frac{\lVert \hat x_n \rVert_2}{k}, \qquad
    y = \gamma \, \hat x \left( \frac{\alpha}{\sqrt{s_n^2 + \epsilon}}
        + 1 - \alpha \right) + \beta

with per-channel ``alpha``, ``gamma``, ``beta``, the norm taken per sample over the
channel and all spatial axes, and a scale ``k`` fixed by the ``norm`` option:

- ``"authors"`` (the default): ``k = P``, the number of spatial positions of the input
  (``P = 1`` for (N, C) inputs). This is the authors' published layer, which sums the
  per-channel spatial means of ``x_hat**2`` and divides by ``P``. The unitized part
  has norm ``|alpha| * P``.
- ``"l2"``: ``k = 1``, the raw L2 norm; the unitized part has norm ``|alpha|``.

The upper bounds U4/U5 of the theory are ``2 |alpha| k`` with this ``k``, returned by
:func:`unitization_scale`. ``alpha = 0`` is BatchNorm exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from ics_toolkit.errors import ICSTypeError, ICSValueError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_NORM",
    "NORMS",
    "VARIANCES",
    "Normalized",
    "keras_correction",
    "normalized",
    "unitization",
    "unitization_scale",
]

#: The norms a Unitization layer can divide by (see the module docstring).
NORMS: tuple[str, ...] = ("authors", "l2")
#: The default: the authors' per-pixel scaling, so that the layer reproduces theirs.
DEFAULT_NORM = "authors"

#: How the batch variance enters the normalization in training mode: ``"biased"`` (torch's
#: BatchNorm: the biased variance over the M = N * spatial values of a channel) or
#: ``"keras"`` (the authors' published Keras layer: that variance times M / (M - 1 - eps)).
VARIANCES = ("biased", "keras")


def keras_correction(count: int, eps: float) -> float:
    """``M / (M - 1 - eps)``: the authors' Keras layer's factor on the batch variance.

    ``count`` is M, the number of values per channel in the batch (N times the spatial
    positions). Close to Bessel's M / (M - 1), but with eps inside.
    """
    if count - 1 - eps <= 0:
        raise ICSValueError(
            f"the Keras variance correction M / (M - 1 - eps) needs M > 1 + eps values per "
            f"channel, got M = {count} (eps = {eps}); use a larger batch"
        )
    return count / (count - 1 - eps)


def _check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise ICSValueError(f"`norm` must be one of {NORMS}, got {norm!r}")
    return str(norm)


def unitization_scale(input_shape: Sequence[int] | torch.Size, norm: str = DEFAULT_NORM) -> float:
    """Return the scale ``k`` of the per-sample norm ``s = ||x_hat|| / k``.

    Parameters
    ----------
    input_shape : sequence of int
        The layer input's shape (N, C, *spatial); only the spatial part matters.
    norm : {"authors", "l2"}
        ``"authors"`` gives ``k = P`` (number of spatial positions, 1 for (N, C)
        inputs), ``"l2"`` gives ``k = 1``.

    Returns
    -------
    float
        ``k``. At ``alpha = 1`` every unitized sample has L2 norm ``|gamma| * k``, and
        the theory's bounds U4/U5 are ``2 * max|alpha| * k``.

    Examples
    --------
    >>> unitization_scale((8, 16, 4, 4), "authors"), unitization_scale((8, 16, 4, 4), "l2")
    (16.0, 1.0)
    """
    norm = _check_norm(norm)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 2:
        raise ICSValueError(
            f"`input_shape` must be (N, C, *spatial) with at least 2 entries, got {shape}"
        )
    if norm == "l2":
        return 1.0
    return float(math.prod(shape[2:]))


# ---------------------------------------------------------------------------------------
# checks shared by the functional form and the module
# ---------------------------------------------------------------------------------------
def _check_channel_vector(t: torch.Tensor | None, name: str, channels: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ICSTypeError(f"`{name}` must be a torch.Tensor of shape ({channels},) or None")
    if t.shape != (channels,):
        raise ICSValueError(
            f"`{name}` must have shape ({channels},) to match the input's {channels} "
            f"channels (dim 1), got {tuple(t.shape)}"
        )


def _check_input(x: object, channels: int | None = None, who: str = "input") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ICSTypeError(f"`{who}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ICSValueError(
            f"`{who}` must have shape (N, C, *spatial), got {x.dim()}D input {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ICSTypeError(f"`{who}` must be a floating tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ICSValueError(
            f"expected {who} with {channels} channels (dim 1), got {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    return x


def _check_batch(x: torch.Tensor) -> None:
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise ICSValueError(
            f"expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}; use a batch of at least 2 samples, or eval mode"
        )


# ---------------------------------------------------------------------------------------
# the composite implementation: plain differentiable torch ops
# ---------------------------------------------------------------------------------------
def _composite(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    alpha: torch.Tensor,
    eps: float,
    inv_k2: float,
) -> torch.Tensor:
    """Unitization of ``x`` (N, C, *) given per-channel ``mean``/``var``, by autograd ops.

    Used under ``torch.compile`` (the compiler fuses it), for double backward, and in
    the tests as the reference of the fused kernel.
    """
    n, c = x.shape[:2]
    view = (1, c) + (1,) * (x.dim() - 2)
    x_hat = (x - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    q = x_hat.square().reshape(n, -1).sum(1) * inv_k2  # s_n^2
    r = torch.rsqrt(q + eps).view((n,) + (1,) * (x.dim() - 1))
    a = alpha.view(view)
    y = x_hat * (a * r + (1 - a))
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over all axes but dim 1."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def _update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var_biased: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """BatchNorm's running update: biased var normalizes, unbiased var is averaged."""
    with torch.no_grad():
        unbiased = var_biased * (count / (count - 1))
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


# ---------------------------------------------------------------------------------------
# the fused implementation: hand-derived gradient, one full-size allocation each way
# ---------------------------------------------------------------------------------------
def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(2)`` for (N, C, L) tensors without a full-size temporary on CPU."""
    n, c, length = a.shape
    if a.device.type == "cpu":
        out = torch.bmm(a.reshape(n * c, 1, length), b.reshape(n * c, length, 1))
        return out.view(n, c)
    return (a * b).sum(2)


class _UnitizationFunction(torch.autograd.Function):
    """Fused Unitization on x viewed as (N, C, L); per-(n, c) sums carry the rest.

    Forward allocates only the output: it holds ``x - mu`` (two-pass, stable
    statistics), whose per-(n, c) sums of squares give the channel variance and the
    per-sample norms; the per-(n, c) affine map is then applied in place. Backward
    needs ``sum_l g`` and ``sum_l g x`` per (n, c), then writes ``dx = D g + E x + F``
    into its one allocation. All other work is on (N, C) tensors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x3: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        alpha: torch.Tensor,
        mean_in: torch.Tensor | None,
        var_in: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        inv_k2: float,
    ) -> torch.Tensor:
        n, _, length = x3.shape
        mean_nc = x3.mean(2)  # (N, C)
        batch_stats = mean_in is None
        mu = mean_nc.mean(0) if batch_stats else mean_in
        assert mu is not None
        y = x3 - mu.unsqueeze(1)  # the output buffer holds x - mu for now
        ss = _rowdot(y, y)  # sum_l (x - mu)^2, (N, C)
        if batch_stats:
            var = ss.sum(0) / (n * length)  # biased variance, two-pass
            if running_mean is not None and running_var is not None:
                _update_running(running_mean, running_var, mu, var, n * length, momentum)
        else:
            assert var_in is not None
            var = var_in
        invstd = torch.rsqrt(var + eps)
        msq = ss * (invstd.square() / length)  # mean over l of x_hat^2, (N, C)
        r = torch.rsqrt(msq.sum(1) * (length * inv_k2) + eps)  # 1 / sqrt(s^2 + eps), (N,)
        m = alpha * r[:, None] + (1 - alpha)  # (N, C)
        w = m if weight is None else m * weight
        y.mul_((w * invstd).unsqueeze(2))
        if bias is not None:
            y.add_(bias.unsqueeze(1))
        dev = mean_nc - mu
        ctx.save_for_backward(x3, weight, bias, alpha, mu, var, invstd, dev, msq, r, m)
        ctx.batch_stats = batch_stats
        ctx.eps = eps
        ctx.inv_k2 = inv_k2
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        with torch.autocast(device_type=gy.device.type, enabled=False):
            return _UnitizationFunction._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy: torch.Tensor):
        x3, weight, bias, alpha, mu, var, invstd, dev, msq, r, m = ctx.saved_tensors
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        n_none = 7  # mean_in, var_in, running_mean, running_var, momentum, eps, inv_k2
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the composite form, so that double
            # backward works (the hand-derived gradient below is not differentiable).
            return (*_double_backward(ctx, gy, x3, weight, bias, alpha, mu, var), *[None] * n_none)
        n, _, length = x3.shape
        gy = gy.contiguous()
        g1 = gy.sum(2)  # sum_l g, (N, C)
        g2 = (_rowdot(gy, x3) - mu * g1) * invstd  # sum_l g * x_hat
        gamma = weight
        grad_w = (g2 * m).sum(0) if need_w else None
        grad_b = g1.sum(0) if need_b else None
        g2w = g2 if gamma is None else g2 * gamma
        grad_a = (g2w * (r[:, None] - 1)).sum(0) if need_a else None
        grad_x = None
        if need_x:
            # dL/dx_hat = g * w + t_n * x_hat, t_n from the dependence of s_n on x_hat
            t = -(r**3) * (g2w * alpha).sum(1) * ctx.inv_k2  # (N,)
            w = m if gamma is None else m * gamma
            if ctx.batch_stats:
                count = n * length
                mean_d = ((w * g1).sum(0) + (t[:, None] * dev).sum(0) * invstd * length) / count
                mean_dx = ((w * g2).sum(0) + (t[:, None] * msq).sum(0) * length) / count
            else:
                mean_d = torch.zeros_like(mu)
                mean_dx = torch.zeros_like(mu)
            d_coef = invstd * w
            e_coef = invstd.square() * (t[:, None] - mean_dx)
            f_coef = -invstd * mean_d - mu * e_coef
            grad_x = x3 * e_coef.unsqueeze(2)
            grad_x.add_(f_coef.unsqueeze(2)).addcmul_(gy, d_coef.unsqueeze(2))
        return (grad_x, grad_w, grad_b, grad_a, *[None] * n_none)


def _double_backward(
    ctx: torch.autograd.function.FunctionCtx,
    gy: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    alpha: torch.Tensor,
    mu: torch.Tensor,
    var: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    inputs = (x3, weight, bias, alpha)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        if ctx.batch_stats:
            mean, var_b = _batch_stats(x3)
        else:
            mean, var_b = mu, var
        y = _composite(x3, mean, var_b, weight, bias, alpha, ctx.eps, ctx.inv_k2)
        grads = torch.autograd.grad(
            y, [inputs[i] for i in wanted], gy, create_graph=True, allow_unused=True
        )
    out: list[torch.Tensor | None] = [None] * 4
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])  # type: ignore[arg-type]
    return tuple(out)


# ---------------------------------------------------------------------------------------
# public functional form
# ---------------------------------------------------------------------------------------
def unitization(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | float | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm: str = DEFAULT_NORM,
    variance: str = "biased",
) -> torch.Tensor:
    r"""Apply Unitization: BatchNorm, then a per-sample rescaling by the sample's norm.

    .. math::

        y = \gamma \, \hat x \left(\frac{\alpha}{\sqrt{s^2 + \epsilon}}
            + 1 - \alpha\right) + \beta,
        \qquad s = \lVert \hat x \rVert_2 / k

    Parameters
    ----------
    input : torch.Tensor
        Shape (N, C) or (N, C, *spatial), floating.
    running_mean, running_var : torch.Tensor or None
        Shape (C,). In training mode they are updated in place (BatchNorm's rule:
        ``r <- (1 - momentum) r + momentum * stat``, the unbiased batch variance);
        outside training mode they normalize ``input`` and are required.
    weight, bias : torch.Tensor or None
        ``gamma`` and ``beta``, shape (C,); None means 1 and 0.
    alpha : torch.Tensor or float or None
        Per-channel mixing weight, shape (C,) or a scalar; None means 0 (BatchNorm).
    training : bool
        Normalize by the batch statistics (biased variance over N and the spatial
        axes) instead of the running ones.
    momentum : float
        Weight of the new batch statistics in the running update.
    eps : float
        Added to the variance and to ``s**2``.
    norm : {"authors", "l2"}
        Which per-sample norm divides ``x_hat``: see :func:`unitization_scale`.
    variance : {"biased", "keras"}
        In training mode, normalize by the biased batch variance (``"biased"``, torch's
        BatchNorm) or by it times M / (M - 1 - eps) (``"keras"``, the authors' Keras
        layer, M the values per channel; see :func:`keras_correction`). With
        ``"keras"`` the running variance averages the corrected variance, the one
        used to normalize; the running mean is updated as usual.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``input``.

    Notes
    -----
    Parameters are cast to ``input``'s dtype; float16 and bfloat16 inputs are
    computed in float32 and the result cast back (autocast is disabled inside, as
    BatchNorm runs in float32 under autocast). Eager calls use a fused kernel with a
    hand-derived backward (one full-size allocation each way); under
    ``torch.compile`` or double backward the same formula runs as plain torch ops.

    Examples
    --------
    >>> x = torch.arange(300, dtype=torch.float64).reshape(4, 3, 5, 5).sin()
    >>> y = unitization(x, alpha=torch.ones(3, dtype=torch.float64), training=True, eps=1e-9)
    >>> k = unitization_scale(x.shape)  # the authors' norm: 25 spatial positions
    >>> y.flatten(1).norm(dim=1)  # alpha = 1: every sample has norm k
    tensor([25.0000, 25.0000, 25.0000, 25.0000], dtype=torch.float64)
    """
    x = _check_input(input)
    if x.dtype in (torch.float16, torch.bfloat16):
        y = unitization(
            x.float(),
            running_mean,
            running_var,
            weight,
            bias,
            alpha,
            training,
            momentum,
            eps,
            norm,
            variance,
        )
        return y.to(x.dtype)
    if variance not in VARIANCES:
        raise ICSValueError(f"`variance` must be one of {VARIANCES}, got {variance!r}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _unitization(
            x, running_mean, running_var, weight, bias, alpha, training, momentum, eps, norm,
            variance == "keras",
        )  # fmt: skip


def _unitization(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    alpha: torch.Tensor | float | None,
    training: bool,
    momentum: float,
    eps: float,
    norm: str,
    keras: bool = False,
) -> torch.Tensor:
    channels = x.shape[1]
    norm = _check_norm(norm)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(t, name, channels)
    if (running_mean is None) != (running_var is None):
        raise ICSValueError("pass both `running_mean` and `running_var`, or neither")
    if not training and running_mean is None:
        raise ICSValueError(
            "`running_mean` and `running_var` are required when training=False; "
            "pass them or set training=True to use batch statistics"
        )
    _check_channel_vector(weight, "weight", channels)
    _check_channel_vector(bias, "bias", channels)
    if alpha is None:
        alpha_t = x.new_zeros(channels)
    elif isinstance(alpha, torch.Tensor):
        alpha_t = alpha.expand(channels) if alpha.dim() == 0 else alpha
        _check_channel_vector(alpha_t, "alpha", channels)
        alpha_t = alpha_t.to(x.dtype)
    else:
        alpha_t = x.new_full((channels,), float(alpha))
    if not eps > 0:
        raise ICSValueError(f"`eps` must be > 0, got {eps}")
    if training:
        _check_batch(x)
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    inv_k2 = 1.0 / unitization_scale(x.shape, norm) ** 2
    update = training and running_mean is not None

    if training and keras:  # the authors' variance: plain torch ops (autograd differentiates)
        mean, var = _batch_stats(x)
        var = var * keras_correction(x.numel() // channels, eps)
        if update:
            with torch.no_grad():
                for buf, stat in ((running_mean, mean), (running_var, var)):
                    buf.mul_(1.0 - momentum).add_(stat.to(buf.dtype), alpha=momentum)  # type: ignore[union-attr]
        return _composite(x, mean, var, w, b, alpha_t, eps, inv_k2)

    if torch.compiler.is_compiling():
        if training:
            mean, var = _batch_stats(x)
            if update:
                count = x.numel() // channels
                _update_running(running_mean, running_var, mean, var, count, momentum)  # type: ignore[arg-type]
        else:
            mean = running_mean.to(x.dtype)  # type: ignore[union-attr]
            var = running_var.to(x.dtype)  # type: ignore[union-attr]
        return _composite(x, mean, var, w, b, alpha_t, eps, inv_k2)

    x3 = x.reshape(x.shape[0], channels, -1)
    # copies: a later training-mode call updates the buffers in place before backward
    mean_in = None if training else running_mean.to(x.dtype, copy=True)  # type: ignore[union-attr]
    var_in = None if training else running_var.to(x.dtype, copy=True)  # type: ignore[union-attr]
    y3 = _UnitizationFunction.apply(
        x3,
        w,
        b,
        alpha_t,
        mean_in,
        var_in,
        running_mean if update else None,
        running_var if update else None,
        float(momentum),
        float(eps),
        inv_k2,
    )
    return y3.view(x.shape)


# ---------------------------------------------------------------------------------------
# the normalized values a layer produced, for the bounds
# ---------------------------------------------------------------------------------------
class Normalized(NamedTuple):
    """What a BatchNorm or Unitization layer computes before its affine map.

    Attributes
    ----------
    x_hat : torch.Tensor
        ``(x - mu) / sqrt(var + eps)``, shape (N, C, *spatial), with the statistics
        the layer uses in its current mode.
    s : torch.Tensor
        Per-sample norm ``||x_hat_n||_2 / k`` over channel and spatial axes, shape (N,).
    k : float
        The scale of the norm (see :func:`unitization_scale`).
    alpha : torch.Tensor or None
        The layer's effective per-channel alpha (clamped if the layer clamps), shape
        (C,), detached; None for a BatchNorm layer.
    """

    x_hat: torch.Tensor
    s: torch.Tensor
    k: float
    alpha: torch.Tensor | None


def normalized(
    module: torch.nn.Module,
    x: torch.Tensor,
    *,
    norm: str | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> Normalized:
    """Recompute the normalized values a BatchNorm or Unitization layer produces on ``x``.

    No side effects: running statistics, ``num_batches_tracked`` and the module's
    flags are not touched, and no autograd graph is built.

    Parameters
    ----------
    module : torch.nn.Module
        A ``torch.nn.BatchNorm1d/2d/3d`` (or any ``_BatchNorm``) or a
        :class:`~ics_toolkit.nn.Unitization`. In training mode (or without running
        statistics) the batch statistics of ``x`` are used, otherwise the running ones,
        exactly as the layer's forward would.
    x : torch.Tensor
        The layer's input, shape (N, C, *spatial).
    norm : {"authors", "l2"} or None
        Which norm ``s`` is: None means the Unitization layer's own, and ``"l2"`` for
        BatchNorm.
    dtype : torch.dtype or None
        Compute in this dtype (float64 by default); None keeps ``x``'s.

    Returns
    -------
    Normalized
        ``(x_hat, s, k, alpha)``.

    Examples
    --------
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> out = normalized(bn, torch.randn(8, 3))
    >>> out.x_hat.shape, out.s.shape, out.k, out.alpha
    (torch.Size([8, 3]), torch.Size([8]), 1.0, None)
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from ics_toolkit.nn.unitization import Unitization

    if isinstance(module, Unitization):
        norm = module.norm if norm is None else norm
    elif isinstance(module, _BatchNorm):
        norm = "l2" if norm is None else norm
    else:
        raise ICSTypeError(
            f"normalized() takes a BatchNorm or Unitization layer, got {type(module).__name__}"
        )
    norm = _check_norm(norm)
    channels = int(module.num_features)
    x = _check_input(x, channels, "x")
    with torch.no_grad():
        xd = x.detach() if dtype is None else x.detach().to(dtype)
        use_batch = module.training or module.running_mean is None
        if use_batch:
            _check_batch(xd)
            mean, var = _batch_stats(xd)
            if getattr(module, "variance", "biased") == "keras":  # as the layer normalized
                var = var * keras_correction(xd.numel() // channels, float(module.eps))
        else:
            mean = module.running_mean.to(xd.dtype)
            var = module.running_var.to(xd.dtype)
        view = (1, channels) + (1,) * (xd.dim() - 2)
        x_hat = (xd - mean.view(view)) * torch.rsqrt(var.view(view) + float(module.eps))
        k = unitization_scale(xd.shape, norm)
        s = x_hat.reshape(xd.shape[0], -1).norm(dim=1) / k
        alpha = None
        if isinstance(module, Unitization):
            alpha = module.effective_alpha.detach().to(xd.dtype).clone()
    return Normalized(x_hat, s, k, alpha)
