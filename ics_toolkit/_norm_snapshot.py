"""Norm snapshots: what a BatchNorm / Unitization layer normalized, for the bounds U3 / U5.

At each capture the monitor recomputes, from a bound layer's captured input, the
normalized values ``x_hat`` and copies its affine parameters (and Unitization's
alpha). :func:`norm_pair` turns the snapshots of both sides of a step into the
bound kernel's float64 states, rows aligned with one view of the layer's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ics_toolkit.bounding import _Norm
from ics_toolkit.sketch import no_autocast
from ics_toolkit.views import view

__all__ = ["NormSnapshot", "bound_layer", "norm_pair", "norm_snapshot"]


def bound_layer(module: nn.Module) -> bool:
    """Whether ``module`` has a bound of its own (BatchNorm: U3, Unitization: U5)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from ics_toolkit._selection import is_norm

    return isinstance(module, _BatchNorm) or (
        is_norm(module) and type(module).__name__.startswith("Unitization")
    )


@dataclass
class NormSnapshot:
    """A BatchNorm / Unitization layer's internals at one capture.

    ``x_hat`` has the layer's input shape (N, C, *spatial); the per-channel vectors
    have shape (C,) and are float64 copies taken at capture time.
    """

    x_hat: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    alpha: torch.Tensor | None
    k: float
    eps: float
    form: str


def _vector(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach().to(torch.float64).clone()


def norm_snapshot(module: nn.Module, x: torch.Tensor, *, training: bool) -> NormSnapshot | None:
    """Recompute what a BatchNorm / Unitization layer normalized on its input ``x``.

    ``training`` is the mode the capture pass ran the layer in (batch statistics when
    True). Returns None for other layers. No side effects on ``module``.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from ics_toolkit.nn import Unitization, normalized

    if not isinstance(module, _BatchNorm | Unitization):
        return None
    was = module.training
    try:
        module.training = training  # normalized() picks batch or running statistics by it
        # in the storage dtype: x_hat is stored in it anyway, and float64 here would
        # double the cost of a measured step's norm layers for digits nobody keeps; but
        # never below float32: batch statistics in bfloat16 / float16 are badly wrong
        low = x.dtype in (torch.float16, torch.bfloat16)
        with no_autocast(x.device):
            out = normalized(module, x, dtype=torch.float32 if low else None)
    finally:
        module.training = was
    if low:
        out = out._replace(x_hat=out.x_hat.to(x.dtype))
    unit = isinstance(module, Unitization)
    return NormSnapshot(
        x_hat=out.x_hat,
        weight=_vector(module.weight),
        bias=_vector(module.bias),
        alpha=_vector(out.alpha) if unit else None,
        k=float(out.k),
        eps=float(module.eps),
        form="embedded" if unit else "batchnorm",
    )


def batchnorm_hat(
    module: nn.Module, x: torch.Tensor, *, training: bool, fast: bool = False
) -> torch.Tensor:
    """A BatchNorm layer's normalized values on ``x``, in ``x``'s dtype (float32 at least).

    The same operations as :func:`ics_toolkit.nn.normalized` (so the same bits), without
    its input checks and the norms ``s`` that BatchNorm's bound does not use: this runs
    inside the capture hook on the layer's live input. ``fast`` uses torch's fused
    batch-norm kernel without affine parameters or running-statistics update instead
    (3.4x to 3.9x faster on 2 CPU threads; its statistics round differently, outputs within
    9.5e-7 on a unit-variance input: ``python benchmarks/precision.py --part kernel``): the
    float32 analysis' choice.
    """
    from ics_toolkit.nn.functional import _batch_stats

    low = x.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad(), no_autocast(x.device):
        xd = x.detach().to(torch.float32) if low else x.detach()
        if fast:
            batch = training or module.running_mean is None
            stats = (None, None) if batch else (module.running_mean, module.running_var)
            # momentum 0 and no running buffers on the batch path: nothing is updated
            x_hat = torch.native_batch_norm(xd, None, None, *stats, batch, 0.0, float(module.eps))[
                0
            ]
            return x_hat.to(x.dtype) if low else x_hat
        if training or module.running_mean is None:
            mean, var = _batch_stats(xd)
        else:
            mean = module.running_mean.to(xd.dtype)
            var = module.running_var.to(xd.dtype)
        shape = (1, xd.shape[1]) + (1,) * (xd.dim() - 2)
        # in place on the difference: the same two roundings, one full-size buffer less
        inv = torch.rsqrt(var.view(shape) + float(module.eps))
        x_hat = torch.sub(xd, mean.view(shape)).mul_(inv)
    return x_hat.to(x.dtype) if low else x_hat


class HatTransform:
    """Recorder transform: a BatchNorm layer's captured input becomes its normalized values.

    The monitor captures bound layers' inputs only to recompute what they normalized;
    doing it in the hook, on the live input, stores ``x_hat`` instead of a copy of the
    input that would be read again right after the pass. Other keys pass unchanged.
    ``dtype`` is the storage dtype: the input is rounded to it first, as a stored
    input would be. ``fast``: see :func:`batchnorm_hat`.
    """

    def __init__(
        self, modules: dict[str, nn.Module], mode: str, dtype: torch.dtype, fast: bool = False
    ) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm

        self.modules = {k: m for k, m in modules.items() if isinstance(m, _BatchNorm)}
        self.mode, self.dtype, self.fast = mode, dtype, fast

    def __call__(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if not key.endswith(":input"):
            return x
        module = self.modules.get(key[: -len(":input")].split("#")[0])
        if module is None:
            return x
        training = module.training if self.mode == "keep" else self.mode == "train"
        return batchnorm_hat(module, x.to(self.dtype), training=training, fast=self.fast)

    def hat_keys(self, keys: list[str]) -> set[str]:
        """The input keys among ``keys`` that hold normalized values."""
        return {
            k
            for k in keys
            if k.endswith(":input") and k[: -len(":input")].split("#")[0] in self.modules
        }


class ChainTransform:
    """Recorder transform: ``first``, then ``second`` (e.g. the hook's x_hat, then a sketch).

    ``hat_keys`` is ``first``'s: the keys that hold normalized values.
    """

    def __init__(self, first: HatTransform, second: Any) -> None:
        self.first, self.second = first, second

    def __call__(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.second(key, self.first(key, x))

    def hat_keys(self, keys: list[str]) -> set[str]:
        """The input keys among ``keys`` that hold normalized values (see HatTransform)."""
        return self.first.hat_keys(keys)


def snapshot_from_hat(module: nn.Module, x_hat: torch.Tensor) -> NormSnapshot:
    """The snapshot of a BatchNorm layer whose normalized values were taken in the hook."""
    return NormSnapshot(
        x_hat=x_hat,
        weight=_vector(module.weight),
        bias=_vector(module.bias),
        alpha=None,
        k=1.0,
        eps=float(module.eps),
        form="batchnorm",
    )


def _param_rows(p: torch.Tensor | None, shape: Sequence[int], name: str, d: int) -> Any:
    """A per-channel (C,) vector as a float64 (d,) vector laid out like one row of the view."""
    if p is None:
        return None
    if name == "flatten":
        full = p.reshape((1, -1) + (1,) * (len(shape) - 2)).expand((1, *shape[1:]))
        p = view(full, name, (0, 1))[0]
    return p.to(torch.float64).reshape(-1).expand(d) if p.numel() == 1 else p.to(torch.float64)


def norm_pair(
    a: NormSnapshot, b: NormSnapshot, name: str, opts: dict[str, Any]
) -> tuple[_Norm, _Norm]:
    """The bound kernel's states of one view of a layer, rows aligned with its output's view.

    Snapshots are trusted (the monitor made them from finite captures): no checks.
    """
    states = []
    shape = tuple(a.x_hat.shape)
    for snap in (a, b):
        x_hat = view(snap.x_hat.to(torch.float64), name, (0, 1), **opts)
        d = x_hat.shape[1]
        s = None
        if snap.form != "batchnorm" and name in ("pixel", "token"):
            # each pixel row belongs to an image, and the layer divided by the image's norm
            n = snap.x_hat.shape[0]
            norms = snap.x_hat.to(torch.float64).reshape(n, -1).norm(dim=1)
            s_img = torch.sqrt(norms**2 / snap.k**2 + snap.eps)
            s_full = s_img.reshape((n, 1) + (1,) * (len(shape) - 2)).expand((n, 1, *shape[2:]))
            s = view(s_full, name, (0, 1), **opts)[:, 0].reshape(-1, 1)
        ones = torch.ones(d, dtype=torch.float64, device=x_hat.device)
        weight = _param_rows(snap.weight, shape, name, d)
        bias = _param_rows(snap.bias, shape, name, d)
        states.append(
            _Norm(
                x_hat=x_hat,
                weight=ones if weight is None else weight,
                bias=torch.zeros_like(ones) if bias is None else bias,
                alpha=_param_rows(snap.alpha, shape, name, d),
                k=snap.k,
                eps=snap.eps,
                form=snap.form,
                s=s,
            )
        )
    return states[0], states[1]
