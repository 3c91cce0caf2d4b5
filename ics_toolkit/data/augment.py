"""Batched, seeded data augmentation for image batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ics_toolkit.errors import ICSValueError

__all__ = ["flip_and_shift"]


def flip_and_shift(
    x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Randomly flip images left-right and shift them by up to ``pad`` pixels.

    The CIFAR augmentation of He et al. and of Huang and Yu: zero-pad by ``pad``
    pixels on each side and crop a random window of the original size (a shift in
    ``[-pad, pad]`` per axis), then mirror half of the images. One batched gather,
    no Python loop over samples.

    Parameters
    ----------
    x : torch.Tensor
        Images of shape (N, C, H, W).
    generator : torch.Generator
        Source of randomness, on ``x``'s device (the global RNG is not used).
    pad : int
        Largest shift in pixels (>= 0).
    flip : bool
        Also mirror each image left-right with probability 1/2.

    Returns
    -------
    torch.Tensor
        Shape (N, C, H, W), a new tensor.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> flip_and_shift(torch.randn(5, 3, 8, 8), g, pad=2).shape
    torch.Size([5, 3, 8, 8])
    """
    if x.dim() != 4:
        raise ICSValueError(f"`x` must be images of shape (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ICSValueError(f"`pad` must be an int >= 0, got {pad!r}")
    n, _, h, w = x.shape
    dev = x.device
    out = x
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        rows = (torch.arange(h, device=dev) + oy[:, None])[:, None, :, None]  # (N, 1, H, 1)
        cols = (torch.arange(w, device=dev) + ox[:, None])[:, None, None, :]  # (N, 1, 1, W)
        out = padded.gather(2, rows.expand(n, x.shape[1], h, padded.shape[3]))
        out = out.gather(3, cols.expand(n, x.shape[1], h, w))
    if flip:
        mirror = torch.rand(n, generator=generator, device=dev) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()
