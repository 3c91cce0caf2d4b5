"""Turn user arrays (numpy or torch, any device) into checked torch sample matrices.

Every public function that takes samples goes through here, so the same input gets
the same error everywhere. Errors name the argument and say what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ics_toolkit.errors import ICSTypeError, ICSValueError

ArrayLike = Any  # numpy.ndarray | torch.Tensor | nested sequences of numbers


def to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """Return ``x`` as a detached torch tensor on its own device (numpy -> CPU), no copy."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise ICSTypeError(f"`{name}` is a numpy array of dtype object; pass numbers")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            arr = np.asarray(x)
        except Exception as err:  # pragma: no cover - numpy's own message is kept
            raise ICSTypeError(f"`{name}` must be a numpy array or torch tensor") from err
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise ICSTypeError(
                f"`{name}` must be a numpy array or torch tensor of numbers, got {type(x).__name__}"
            )
        t = torch.from_numpy(arr)
    if t.is_complex():
        raise ICSTypeError(f"`{name}` is complex ({t.dtype}); pass real-valued samples")
    return t


def as_samples(
    x: ArrayLike,
    name: str,
    *,
    dtype: torch.dtype | None = torch.float64,
    check_finite: bool = True,
    min_samples: int = 2,
) -> torch.Tensor:
    """Check and convert one sample matrix.

    Parameters
    ----------
    x : array_like
        Samples of shape (n, d), or (n,) meaning d = 1.
    name : str
        The argument's name, quoted in every error.
    dtype : torch.dtype or None
        Floating dtype to cast to (integer and bool inputs are always cast to it, or to
        float64 when ``dtype`` is None). None keeps a floating input's dtype.
    check_finite : bool
        Scan for NaN/Inf. Fast paths pass False and check a smaller derived array.
    min_samples : int
        Fewest rows accepted.

    Returns
    -------
    torch.Tensor
        Shape (n, d), on ``x``'s device (CPU for numpy input).
    """
    t = to_tensor(x, name)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    elif t.ndim != 2:
        raise ICSValueError(
            f"`{name}` must have shape (n, d) or (n,), got shape {tuple(t.shape)}; "
            "flatten each sample first (e.g. ics_toolkit.views.flatten)"
        )
    if t.numel() == 0:
        raise ICSValueError(f"`{name}` is empty (shape {tuple(t.shape)}); pass at least 2 samples")
    if t.shape[0] < min_samples:
        raise ICSValueError(
            f"`{name}` has {t.shape[0]} sample(s); at least {min_samples} are needed "
            "to compare two distributions"
        )
    if not t.is_floating_point():
        t = t.to(dtype or torch.float64)
    elif dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if check_finite:
        check_finite_values(t, name)
    return t


def check_finite_values(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or Inf, naming ``name``."""
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ICSValueError(
            f"`{name}` contains {n_bad} NaN or Inf value(s); remove or replace them "
            "before measuring"
        )


def as_pair(
    x: ArrayLike,
    y: ArrayLike,
    *,
    names: tuple[str, str] = ("x", "y"),
    dtype: torch.dtype | None = torch.float64,
    check_finite: bool = True,
    same_n: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two sample matrices together: same width d, same device, same dtype."""
    tx = as_samples(x, names[0], dtype=dtype, check_finite=check_finite)
    ty = as_samples(y, names[1], dtype=dtype, check_finite=check_finite)
    if tx.shape[1] != ty.shape[1]:
        raise ICSValueError(
            f"`{names[0]}` and `{names[1]}` must have the same number of columns d, "
            f"got shapes {tuple(tx.shape)} and {tuple(ty.shape)}"
        )
    if tx.device != ty.device:
        raise ICSValueError(
            f"`{names[0]}` is on {tx.device} but `{names[1]}` is on {ty.device}; "
            "move both to one device"
        )
    if tx.dtype != ty.dtype:  # only when dtype=None keeps two different float dtypes
        common = torch.promote_types(tx.dtype, ty.dtype)
        tx, ty = tx.to(common), ty.to(common)
    if same_n and tx.shape[0] != ty.shape[0]:
        raise ICSValueError(
            f"`{names[0]}` and `{names[1]}` must have the same number of samples "
            f"(paired rows), got {tx.shape[0]} and {ty.shape[0]}"
        )
    return tx, ty
