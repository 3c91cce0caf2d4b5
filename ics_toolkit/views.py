"""Turn a captured layer tensor into a sample matrix for a distance.

A layer output of shape (N, C, *spatial) (or (N, T, C) for sequences, with the
channel axis last) can be read as samples in three ways:

- :func:`flatten`: one sample per probe input, in R^(C*prod(spatial)) -- the paper's
  "layer output" view, shape (N, C*prod(spatial));
- :func:`pixel`: one sample per (input, spatial position) in R^C, shape
  (N*prod(spatial), C), optionally subsampled to a cap with a private, seeded
  generator;
- :func:`channel`: the same (N*prod(spatial), C) matrix, read column by column: column
  c holds channel c's 1-D sample (per-channel 1-D W1 is exact by sorting); never
  subsampled;
- :func:`token`: for sequences, one sample per *non-padded* (input, position) in R^C:
  the ``pixel`` rows whose padding mask is set, optionally subsampled to a cap.

For a (N, C) tensor all three give (N, C) (``pixel`` subsamples only if
``max_samples < N``); for a (N,) tensor, (N, 1). Rows are ordered input-major
(row = n * prod(spatial) + position), so two captures of one layer on the same probe
give row-aligned (paired) matrices, also after ``pixel`` subsampling with the same
``seed``. The views return views of the input where possible (no copy) and keep its
dtype and device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ics_toolkit import _checks, _vocab
from ics_toolkit._arrays import ArrayLike, to_tensor
from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = ["VIEWS", "channel", "flatten", "pixel", "token", "view"]

VIEWS = _vocab.VIEWS


def _check(t: ArrayLike) -> torch.Tensor:
    x = to_tensor(t, "t")
    if x.ndim == 0 or x.numel() == 0:
        raise ICSValueError(
            f"`t` must hold a batch of samples (shape (N, ...)), got shape {tuple(x.shape)}"
        )
    return x


def _axis(axis: Any, ndim: int, name: str) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ICSTypeError(f"`{name}` must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ICSValueError(f"`{name}`={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def flatten(t: ArrayLike, batch_axis: int = 0) -> torch.Tensor:
    """One sample per probe input: the paper's view of a layer output.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A captured tensor, e.g. (N, C, H, W).
    batch_axis : int
        The axis indexing probe inputs.

    Returns
    -------
    torch.Tensor
        Shape (N, prod(other dims)); (N, 1) for a 1-D input.

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.views import flatten
    >>> flatten(torch.zeros(4, 3, 2, 2)).shape
    torch.Size([4, 12])
    """
    x = _check(t)
    b = _axis(batch_axis, x.ndim, "batch_axis")
    x = x.movedim(b, 0)
    return x.reshape(x.shape[0], -1)


def _rows(x: torch.Tensor, batch_axis: int, channel_axis: int) -> torch.Tensor:
    if x.ndim == 1:
        return x.reshape(-1, 1)
    b = _axis(batch_axis, x.ndim, "batch_axis")
    c = _axis(channel_axis, x.ndim, "channel_axis")
    if b == c:
        raise ICSValueError(
            f"`batch_axis` and `channel_axis` are the same axis ({b}); give the channel axis "
            "(1 for (N, C, H, W), -1 for (N, T, C))"
        )
    x = x.movedim((b, c), (0, x.ndim - 1))
    return x.reshape(-1, x.shape[-1])


def pixel(
    t: ArrayLike,
    *,
    batch_axis: int = 0,
    channel_axis: int = 1,
    max_samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One C-dimensional sample per (input, spatial position) or per token.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A captured tensor, e.g. (N, C, H, W) or (N, T, C) with ``channel_axis=-1``.
    batch_axis : int
        The axis indexing probe inputs.
    channel_axis : int
        The axis of channels / features (1 for channels-first, -1 for channels-last).
    max_samples : int or None
        Keep at most this many rows, drawn without replacement (in their original
        order) by a private ``torch.Generator`` on the tensor's device seeded with
        ``seed``; the global RNGs are not touched. None keeps all rows.
    seed : int
        Seed of the subsample. The same seed and shape give the same rows, so the
        views of two captures of one layer stay paired.

    Returns
    -------
    torch.Tensor
        Shape (min(N * prod(spatial), max_samples), C).

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.views import pixel
    >>> pixel(torch.zeros(4, 3, 2, 5)).shape
    torch.Size([40, 3])
    >>> pixel(torch.zeros(4, 3, 2, 5), max_samples=7).shape
    torch.Size([7, 3])
    >>> pixel(torch.zeros(4, 6, 8), channel_axis=-1).shape  # tokens as pixels
    torch.Size([24, 8])
    """
    rows = _rows(_check(t), batch_axis, channel_axis)
    if max_samples is None:
        return rows
    max_samples = _checks.positive_int(max_samples, "max_samples", allow_none=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ICSTypeError(f"`seed` must be an int, got {type(seed).__name__}")
    n = rows.shape[0]
    if n <= max_samples:
        return rows
    gen = torch.Generator(device=rows.device)
    gen.manual_seed(seed)
    keep = torch.randperm(n, generator=gen, device=rows.device)[:max_samples]
    return rows[keep.sort().values]


def _subsample(rows: torch.Tensor, max_samples: int | None, seed: int) -> torch.Tensor:
    if max_samples is None:
        return rows
    if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
        raise ICSValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ICSTypeError(f"`seed` must be an int, got {type(seed).__name__}")
    n = rows.shape[0]
    if n <= max_samples:
        return rows
    gen = torch.Generator(device=rows.device)
    gen.manual_seed(seed)
    keep = torch.randperm(n, generator=gen, device=rows.device)[:max_samples]
    return rows[keep.sort().values]


def token(
    t: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    batch_axis: int = 0,
    channel_axis: int = -1,
    max_samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One C-dimensional sample per non-padded token.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A captured sequence tensor, e.g. (N, T, C) (``channel_axis=-1``) or (N, C, T)
        (``channel_axis=1``).
    mask : torch.Tensor, numpy.ndarray or None
        The padding mask, true (or 1) for real tokens: shape (N, T), i.e. the shape of
        ``t`` without its channel axis, batch axis first (an ``attention_mask``).
        None keeps every position (then ``token`` is ``pixel``).
    batch_axis : int
        The axis indexing probe inputs.
    channel_axis : int
        The axis of features (-1 for (N, T, C)).
    max_samples : int or None
        Keep at most this many tokens, drawn without replacement (in their original
        order) by a private generator seeded with ``seed``, after the padding is
        removed; the same mask, shape and seed give the same tokens, so two captures
        of one layer stay paired.
    seed : int
        Seed of the subsample.

    Returns
    -------
    torch.Tensor
        Shape (min(number of real tokens, max_samples), C), rows input-major.

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.views import token
    >>> x = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)  # 2 sequences of 3 tokens, C = 4
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> token(x, mask)[:, 0].tolist()  # tokens (0, 0), (0, 1), (1, 0)
    [0.0, 4.0, 12.0]
    """
    x = _check(t)
    rows = _rows(x, batch_axis, channel_axis)
    if mask is not None:
        m = to_tensor(mask, "mask")
        if x.ndim == 1:
            positions: tuple[int, ...] = tuple(x.shape)
        else:
            b = _axis(batch_axis, x.ndim, "batch_axis")
            c = _axis(channel_axis, x.ndim, "channel_axis")
            positions = tuple(x.movedim((b, c), (0, x.ndim - 1)).shape[:-1])
        if tuple(m.shape) != positions:
            raise ICSValueError(
                f"`mask` has shape {tuple(m.shape)}, but the tensor of shape {tuple(x.shape)} "
                f"has tokens of shape {positions} (batch first, channel axis removed); pass "
                "the padding mask of these inputs (e.g. the probe's attention_mask)"
            )
        keep = m.reshape(-1).to(device=rows.device) != 0
        rows = rows[keep]
        if rows.shape[0] == 0:
            raise ICSValueError("`mask` marks no token as real; nothing to measure")
    return _subsample(rows, max_samples, seed)


def channel(t: ArrayLike, *, batch_axis: int = 0, channel_axis: int = 1) -> torch.Tensor:
    """Per-channel 1-D samples: column c holds every value of channel c.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A captured tensor, e.g. (N, C, H, W).
    batch_axis : int
        The axis indexing probe inputs.
    channel_axis : int
        The axis of channels.

    Returns
    -------
    torch.Tensor
        Shape (N * prod(spatial), C); never subsampled.

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.views import channel
    >>> x = torch.arange(24.0).reshape(2, 3, 4)
    >>> channel(x)[:, 1].tolist()  # channel 1 of both inputs
    [4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0]
    """
    return _rows(_check(t), batch_axis, channel_axis)


def view(
    t: ArrayLike,
    name: str,
    info_or_axes: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Apply the view called ``name`` with the axes of a capture.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A captured tensor.
    name : {"flatten", "pixel", "channel", "token"}
        The view.
    info_or_axes : CaptureInfo, tuple, dict or None
        Where the axes come from: a :class:`~ics_toolkit.recording.CaptureInfo` (or any
        object with ``batch_axis`` / ``channel_axis`` attributes), a pair
        ``(batch_axis, channel_axis)``, a dict with those keys, or None for (0, 1).
    **options
        ``max_samples`` and ``seed`` for ``"pixel"`` and ``"token"``; ``mask`` for
        ``"token"``.

    Returns
    -------
    torch.Tensor
        The sample matrix (see the individual views).

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.views import view
    >>> view(torch.zeros(4, 5, 8), "pixel", (0, -1)).shape
    torch.Size([20, 8])
    """
    if name not in VIEWS:
        raise ICSValueError(f"unknown view {name!r}; use one of {', '.join(map(repr, VIEWS))}")
    if info_or_axes is None:
        batch_axis, channel_axis = 0, 1
    elif isinstance(info_or_axes, Mapping):
        batch_axis = info_or_axes.get("batch_axis", 0)
        channel_axis = info_or_axes.get("channel_axis", 1)
    elif isinstance(info_or_axes, tuple | list) and len(info_or_axes) == 2:
        batch_axis, channel_axis = info_or_axes
    elif hasattr(info_or_axes, "batch_axis"):
        batch_axis = info_or_axes.batch_axis
        channel_axis = getattr(info_or_axes, "channel_axis", 1)
    else:
        raise ICSTypeError(
            "`info_or_axes` must be a CaptureInfo, a pair (batch_axis, channel_axis), a dict "
            f"with those keys, or None; got {type(info_or_axes).__name__}"
        )
    if channel_axis is None:  # 1-D capture: no channel axis, every view is (N, 1)
        channel_axis = 0 if batch_axis != 0 else -1
    if name == "flatten" or name == "channel":
        if options:
            raise ICSValueError(
                f"options {sorted(options)} only apply to the 'pixel' view (and 'token'), "
                f"not {name!r}"
            )
        if name == "flatten":
            return flatten(t, batch_axis)
        return channel(t, batch_axis=batch_axis, channel_axis=channel_axis)
    if name == "token":
        unknown = set(options) - {"max_samples", "seed", "mask"}
        if unknown:
            raise ICSValueError(
                f"unknown token option(s) {sorted(unknown)}; use mask, max_samples, seed"
            )
        return token(t, batch_axis=batch_axis, channel_axis=channel_axis, **options)
    unknown = set(options) - {"max_samples", "seed"}
    if unknown:
        raise ICSValueError(f"unknown pixel option(s) {sorted(unknown)}; use max_samples, seed")
    return pixel(t, batch_axis=batch_axis, channel_axis=channel_axis, **options)
