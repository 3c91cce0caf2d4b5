"""Generated datasets that need nothing: Gaussian blobs (vectors) and shapes (images)."""

from __future__ import annotations

import numpy as np
import torch

from ics_toolkit.data.base import Dataset, standardize
from ics_toolkit.errors import ICSValueError

__all__ = ["SHAPE_NAMES", "make_blobs", "make_shapes"]

#: The classes of :func:`make_shapes`, in label order.
SHAPE_NAMES: tuple[str, ...] = (
    "hbar",
    "vbar",
    "diagonal",
    "antidiagonal",
    "plus",
    "times",
    "ring",
    "disk",
)


def _check_counts(**counts: int) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ICSValueError(f"`{name}` must be a positive int, got {v!r}")


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def make_blobs(
    n_train: int = 1000,
    n_test: int = 500,
    *,
    num_classes: int = 4,
    dim: int = 16,
    separation: float = 3.0,
    noise: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Draw a Gaussian mixture: one isotropic Gaussian per class.

    Class ``c`` has mean ``separation * u_c`` with ``u_c`` a random unit vector and
    covariance ``noise**2 * I``; classes are balanced (labels cycle through the
    classes, then are shuffled).

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test samples.
    num_classes, dim : int
        Number of classes and of features.
    separation : float
        Distance of each class mean from the origin.
    noise : float
        Standard deviation of every coordinate around its class mean.
    seed : int
        Seed of a private numpy generator; the same seed gives the same data.

    Returns
    -------
    Dataset
        ``x`` float32 of shape (n, dim), not standardized.

    Examples
    --------
    >>> make_blobs(100, 50, num_classes=3, dim=5, seed=1)
    Dataset('blobs', train=100, test=50, input_shape=(5,), num_classes=3)
    """
    _check_counts(n_train=n_train, n_test=n_test, num_classes=num_classes, dim=dim)
    if not noise > 0 or not separation >= 0:
        raise ICSValueError(
            f"`noise` must be > 0 and `separation` >= 0, got {noise!r} and {separation!r}"
        )
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, dim))
    centers *= separation / np.linalg.norm(centers, axis=1, keepdims=True)
    parts = []
    for n in (n_train, n_test):
        y = _balanced_labels(n, num_classes, rng)
        x = centers[y] + noise * rng.standard_normal((n, dim))
        parts += [torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))]
    return Dataset(
        "blobs", *parts, num_classes=num_classes, class_names=tuple(map(str, range(num_classes)))
    )


def _draw_shapes(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one jittered shape per label into an (n, size, size) float64 array."""
    n = len(labels)
    grid = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = grid[None, :, None], grid[None, None, :]
    cx = rng.uniform(0.35, 0.65, n)[:, None, None] * size
    cy = rng.uniform(0.35, 0.65, n)[:, None, None] * size
    half = rng.uniform(0.2, 0.32, n)[:, None, None] * size  # half length / radius
    thick = rng.uniform(0.06, 0.1, n)[:, None, None] * size  # half thickness
    dx, dy = xx - cx, yy - cy
    inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    hbar = (np.abs(dy) <= thick) & (np.abs(dx) <= half)
    vbar = (np.abs(dx) <= thick) & (np.abs(dy) <= half)
    diag = (np.abs(dx - dy) / np.sqrt(2) <= thick) & inside
    anti = (np.abs(dx + dy) / np.sqrt(2) <= thick) & inside
    radius = np.sqrt(dx**2 + dy**2)
    masks = {
        "hbar": hbar,
        "vbar": vbar,
        "diagonal": diag,
        "antidiagonal": anti,
        "plus": hbar | vbar,
        "times": diag | anti,
        "ring": np.abs(radius - half) <= thick,
        "disk": radius <= half,
    }
    out = np.zeros((n, size, size))
    for label, name in enumerate(SHAPE_NAMES):
        sel = labels == label
        out[sel] = masks[name][sel]
    return out


def make_shapes(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    size: int = 16,
    noise: float = 0.2,
    seed: int = 0,
    standardize_inputs: bool = True,
) -> Dataset:
    """Render a procedural image dataset of eight simple shapes.

    Classes (:data:`SHAPE_NAMES`): horizontal bar, vertical bar, diagonal,
    anti-diagonal, plus, times, ring and disk, each at a random position, size,
    stroke width and intensity (0.5 to 1.5), plus Gaussian pixel noise. Classes are
    balanced. Nothing is downloaded.

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test images.
    size : int
        Image side in pixels (at least 8).
    noise : float
        Standard deviation of the additive pixel noise (>= 0).
    seed : int
        Seed of a private numpy generator.
    standardize_inputs : bool
        Standardize with the training pixels' scalar mean and std.

    Returns
    -------
    Dataset
        ``x`` float32 of shape (n, 1, size, size), 8 classes.

    Examples
    --------
    >>> make_shapes(80, 16, size=8, seed=0).x_train.shape
    torch.Size([80, 1, 8, 8])
    """
    _check_counts(n_train=n_train, n_test=n_test, size=size)
    if size < 8:
        raise ICSValueError(f"`size` must be at least 8 pixels, got {size}")
    if not noise >= 0:
        raise ICSValueError(f"`noise` must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for n in (n_train, n_test):
        y = _balanced_labels(n, len(SHAPE_NAMES), rng)
        img = _draw_shapes(y, size, rng) * rng.uniform(0.5, 1.5, n)[:, None, None]
        img += noise * rng.standard_normal(img.shape)
        xs.append(img[:, None])
        ys.append(torch.from_numpy(y.astype(np.int64)))
    x_tr, x_te = xs
    if standardize_inputs:
        x_tr, x_te = standardize(x_tr, x_te)
    return Dataset(
        "shapes",
        torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32)),
        ys[0],
        torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32)),
        ys[1],
        num_classes=len(SHAPE_NAMES),
        class_names=SHAPE_NAMES,
    )
