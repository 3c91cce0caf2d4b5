"""The Unitization normalization layer (Huang and Yu, CVPR 2020), built like BatchNorm."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ics_toolkit.errors import ICSValueError
from ics_toolkit.nn.functional import (
    DEFAULT_NORM,
    VARIANCES,
    _check_norm,
    unitization,
    unitization_scale,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Unitization", "Unitization1d", "Unitization2d", "Unitization3d"]


def _debiased_weight(momentum: float, t: int) -> float:
    """Weight of the t-th statistic in a zero-debiased average: m / (1 - (1 - m)**t).

    Equal to TensorFlow's ``biased_t / (1 - (1 - m)**t)`` with ``biased`` a zero-started
    average; its limit 1 / t (a cumulative average) at ``m = 0``.
    """
    if momentum == 0.0:
        return 1.0 / t
    return momentum / -math.expm1(t * math.log1p(-momentum))  # no cancellation at small m


class Unitization(nn.Module):
    r"""BatchNorm with a trainable, per-channel share of unitized (norm-divided) output.

    .. math::

        \hat x = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}, \qquad
        y = \gamma \, \hat x \left(\frac{\alpha}{\sqrt{s^2 + \epsilon}}
            + 1 - \alpha\right) + \beta, \qquad
        s = \frac{\lVert \hat x_n \rVert_2}{k}

    Statistics are per channel over the batch and spatial axes, exactly as in
    ``torch.nn.BatchNorm``: batch statistics (biased variance) in training mode,
    updating ``running_mean`` and ``running_var`` (unbiased variance) with
    ``momentum``; running statistics in eval mode. ``s`` is each sample's norm over
    the channel and spatial axes, divided by ``k`` (see ``norm``). With ``alpha = 0``
    the layer is BatchNorm; with ``alpha = 1`` each sample's output before ``beta`` has
    norm ``|gamma| k`` (for a channel-constant ``gamma``), which is what bounds its
    internal covariate shift by ``2 |alpha| k`` (theory U4/U5).

    **The authors' exact layer.** Their published Keras layer is not torch's BatchNorm
    even at ``alpha = 0``: in training mode it normalizes by the biased batch variance
    times ``M / (M - 1 - eps)`` (M = values per channel, N times the spatial positions;
    Keras' stock BatchNormalization applies that factor to its moving variance only),
    with Keras' ``epsilon=1e-3`` and ``momentum=0.99``, which weighs the *old* running
    value (``r <- 0.99 r + 0.01 batch``, torch's ``momentum=0.01``). ``Unitization.keras(C,
    alpha_init=0.0)`` (or ``Unitization2d.keras``, ...) builds it, i.e. ``variance="keras",
    eps=1e-3, momentum=0.01``; its running variance averages the corrected variance and
    eval mode normalizes by the running statistics, as Keras does. The default
    (``variance="biased"``, eps 1e-5, momentum 0.1) keeps ``alpha = 0`` equal to
    ``nn.BatchNorm``. Keras 2.1.3 to 2.2.5 also debiased the running averages: add
    ``zero_debias=True`` for that.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels (dim 1 of the input).
    eps : float
        Added to the variance and to ``s**2``.
    momentum : float or None
        Weight of the batch statistics in the running update; None means a
        cumulative average (as in BatchNorm).
    affine : bool
        Learn ``gamma`` (``weight``, init 1) and ``beta`` (``bias``, init 0).
    track_running_stats : bool
        Keep running statistics; if False the batch statistics are used in eval
        mode too and the buffers are None.
    alpha_init : float
        Initial value of every ``alpha`` (the authors use 0, i.e. BatchNorm at init).
    norm : {"authors", "l2"}
        Which per-sample norm divides ``x_hat``. ``"authors"`` (the default, the
        authors' layer): ``k = P``, the number of spatial positions of the input, so
        ``s**2`` is the sum over channels of the spatial mean of ``x_hat**2``, divided
        by ``P``. ``"l2"``: the raw L2 norm, ``k = 1``. For (N, C) inputs both are the
        raw L2 norm. :meth:`scale` returns ``k`` for a given input shape.
    clamp_alpha : bool
        Use ``alpha.clamp(0, 1)`` in the forward (differentiable: the gradient is
        zero where the clamp is active). The stored parameter is not projected; the
        value used is :attr:`effective_alpha`.
    learn_alpha : bool
        Register ``alpha`` as a trainable parameter (True) or as a fixed buffer.
    variance : {"biased", "keras"}
        The batch variance that normalizes in training mode. ``"biased"`` (default):
        torch's BatchNorm, so ``alpha = 0`` is ``nn.BatchNorm`` exactly. ``"keras"``: the
        authors' published Keras layer, the biased variance times ``M / (M - 1 - eps)``
        (M = values per channel in the batch,
        :func:`~ics_toolkit.nn.functional.keras_correction`); the running variance then
        averages that corrected variance. Eval mode is the same for both (running
        statistics; without them, the batch statistics as in training, corrected for
        ``"keras"``). :meth:`keras` builds the authors' layer with their defaults.
    zero_debias : bool
        Debias the running statistics as Adam debiases its moments (TensorFlow's
        ``assign_moving_average(..., zero_debias=True)``, which standalone Keras 2.1.3
        to 2.2.5 call in ``keras.backend.moving_average_update``, the update of Keras'
        BatchNormalization and of the authors' layer): after ``t`` updates the
        running value is the zero-started average divided by ``1 - (1 - momentum)**t``,
        i.e. the update weight is ``momentum / (1 - (1 - momentum)**t)`` (1 at the
        first step, so the initial 0 / 1 are forgotten at once). False (default): the
        plain average, as torch and Keras 2.0 to 2.1.2 and from 2.3 on. Needs a
        ``momentum``; training-mode outputs do not depend on it.
    device, dtype
        Factory arguments for the parameters and buffers.

    Attributes
    ----------
    weight, bias : torch.nn.Parameter or None
        ``gamma`` and ``beta``, shape (C,); None when ``affine=False``.
    alpha : torch.nn.Parameter or torch.Tensor
        Shape (C,).
    running_mean, running_var : torch.Tensor or None
        Shape (C,); None when ``track_running_stats=False``.
    num_batches_tracked : torch.Tensor or None
        A long scalar counting training-mode forward passes.

    Shape
    -----
    - Input: (N, C) or (N, C, *spatial)
    - Output: same as the input

    Examples
    --------
    >>> layer = Unitization(16, alpha_init=0.5)
    >>> layer(torch.randn(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
    >>> layer.scale((8, 16, 4, 4))  # the authors' norm: k = 4 * 4 spatial positions
    16.0
    """

    _version = 1
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        alpha_init: float = 0.0,
        norm: str = DEFAULT_NORM,
        clamp_alpha: bool = False,
        learn_alpha: bool = True,
        variance: str = "biased",
        zero_debias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variance not in VARIANCES:
            raise ICSValueError(
                f"`variance` must be one of {VARIANCES} ('keras': the authors' layer, "
                f"see Unitization.keras), got {variance!r}"
            )
        self.variance = str(variance)
        if zero_debias and momentum is None:
            raise ICSValueError(
                "`zero_debias=True` needs a `momentum`: momentum=None is a cumulative "
                "average, already unbiased"
            )
        self.zero_debias = bool(zero_debias)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ICSValueError(f"`num_features` must be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ICSValueError(f"`eps` must be a float > 0, got {eps!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ICSValueError(
                f"`momentum` must be in [0, 1] or None (cumulative average), got {momentum!r}"
            )
        if not math.isfinite(float(alpha_init)):
            raise ICSValueError(f"`alpha_init` must be finite, got {alpha_init!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.alpha_init = float(alpha_init)
        self.norm = _check_norm(norm)
        self.clamp_alpha = bool(clamp_alpha)
        self.learn_alpha = bool(learn_alpha)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        alpha = torch.empty(num_features, **factory)
        if self.learn_alpha:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=factory["device"]),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @classmethod
    def keras(cls, num_features: int, **kwargs: Any) -> Unitization:
        """The authors' published Keras layer: its variance correction and defaults.

        ``variance="keras"`` (the batch variance times ``M / (M - 1 - eps)``), Keras'
        ``epsilon=1e-3`` and ``momentum=0.99``. Keras weighs the *old* running value by
        its momentum (``r <- 0.99 r + 0.01 batch``), torch the *new* batch statistic,
        so Keras' 0.99 is torch's ``momentum=0.01``. The running variance averages the
        corrected variance (what Keras' ``moving_variance`` averages) and eval mode
        normalizes by the running statistics. ``zero_debias=True`` adds the debiased
        running averages of standalone Keras 2.1.3 to 2.2.5. Any other argument
        (``alpha_init``, ``norm``, ...) as for the constructor; the ones above can be
        overridden too.

        Examples
        --------
        >>> layer = Unitization.keras(16, alpha_init=0.5)
        >>> layer.eps, layer.momentum, layer.variance
        (0.001, 0.01, 'keras')
        """
        options: dict[str, Any] = {"eps": 1e-3, "momentum": 0.01, "variance": "keras"}
        return cls(num_features, **{**options, **kwargs})

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and the batch counter to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset the running statistics, ``gamma = 1``, ``beta = 0``, ``alpha = alpha_init``."""
        self.reset_running_stats()
        with torch.no_grad():
            if self.affine:
                nn.init.ones_(self.weight)
                nn.init.zeros_(self.bias)
            self.alpha.fill_(self.alpha_init)

    @property
    def effective_alpha(self) -> torch.Tensor:
        """The per-channel alpha the forward uses, shape (C,): clamped if ``clamp_alpha``."""
        return self.alpha.clamp(0.0, 1.0) if self.clamp_alpha else self.alpha

    def scale(self, input_shape: Sequence[int] | torch.Size | torch.Tensor) -> float:
        """Return ``k`` of ``s = ||x_hat|| / k`` for an input of this shape (or tensor).

        ``"authors"``: the number of spatial positions (1 for (N, C) inputs);
        ``"l2"``: 1. The unitized part of each sample has norm ``|alpha| k``, so the
        theory's bound U4 is ``2 max|alpha| k``.
        """
        shape = input_shape.shape if isinstance(input_shape, torch.Tensor) else input_shape
        return unitization_scale(shape, self.norm)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ICSValueError(
                f"expected 2D or higher input (N, C, *spatial) (got {input.dim()}D input)"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` (N, C, *spatial); updates the running stats in training."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ICSValueError(
                f"{type(self).__name__}({self.num_features}) expected input with "
                f"{self.num_features} channels (dim 1), got {input.shape[1]} "
                f"(input shape {tuple(input.shape)})"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            elif self.zero_debias:  # Adam's debiasing, as a weight on the new statistic
                factor = _debiased_weight(self.momentum, int(self.num_batches_tracked))
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return unitization(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            self.effective_alpha,
            use_batch,
            factor,
            self.eps,
            self.norm,
            self.variance,
        )

    def extra_repr(self) -> str:
        """The constructor arguments, as shown by ``repr``."""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"norm={self.norm!r}, alpha_init={self.alpha_init}, "
            f"clamp_alpha={self.clamp_alpha}, learn_alpha={self.learn_alpha}"
            + ("" if self.variance == "biased" else f", variance={self.variance!r}")
            + (", zero_debias=True" if self.zero_debias else "")
        )


class Unitization1d(Unitization):
    """:class:`Unitization` for (N, C) or (N, C, L) inputs, like ``BatchNorm1d``.

    Examples
    --------
    >>> Unitization1d(4)(torch.randn(8, 4)).shape
    torch.Size([8, 4])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ICSValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class Unitization2d(Unitization):
    """:class:`Unitization` for (N, C, H, W) inputs, like ``BatchNorm2d``.

    Examples
    --------
    >>> Unitization2d(4)(torch.randn(8, 4, 3, 3)).shape
    torch.Size([8, 4, 3, 3])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ICSValueError(f"expected 4D input (got {input.dim()}D input)")


class Unitization3d(Unitization):
    """:class:`Unitization` for (N, C, D, H, W) inputs, like ``BatchNorm3d``.

    Examples
    --------
    >>> Unitization3d(4)(torch.randn(8, 4, 2, 3, 3)).shape
    torch.Size([8, 4, 2, 3, 3])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ICSValueError(f"expected 5D input (got {input.dim()}D input)")
