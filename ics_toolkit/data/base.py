"""The dataset container and the helpers every loader shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ics_toolkit.errors import ICSError, ICSValueError

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "MissingExtraError",
    "standardize",
    "stratified_split",
]


class DatasetNotFoundError(ICSError, FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says where to put them."""


class MissingExtraError(ICSError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


@dataclass(frozen=True, repr=False)
class Dataset:
    """A labelled train/test split held as torch tensors.

    Attributes
    ----------
    name : str
        The dataset's name (``"digits"``, ``"cifar10"``, ...).
    x_train, x_test : torch.Tensor
        Inputs, float32, shape (n, *input_shape): (n, C, H, W) images or (n, d) vectors.
    y_train, y_test : torch.Tensor
        Integer class labels in ``[0, num_classes)``, int64, shape (n,).
    num_classes : int
        Number of classes.
    class_names : tuple of str
        One name per class (may be empty).

    Examples
    --------
    >>> data = Dataset("toy", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]),
    ...                torch.zeros(2, 2), torch.tensor([1, 0]), num_classes=2)
    >>> data
    Dataset('toy', train=4, test=2, input_shape=(2,), num_classes=2)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise ICSValueError(f"`x_{split}` and `y_{split}` must be torch tensors")
            if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
                raise ICSValueError(
                    f"`x_{split}` must be (n, ...) and `y_{split}` (n,) with the same n, got "
                    f"{tuple(x.shape)} and {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ICSValueError(
                    f"`y_{split}` must hold labels in [0, {self.num_classes}), got "
                    f"[{int(y.min())}, {int(y.max())}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ICSValueError(
                f"train and test inputs differ in shape: {tuple(self.x_train.shape[1:])} vs "
                f"{tuple(self.x_test.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 8, 8) or (16,)."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_features(self) -> int:
        """Number of input features per sample (the product of :attr:`input_shape`)."""
        return math.prod(self.input_shape)

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor on ``device``."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
            self.class_names,
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """Return the first ``n_train`` training and ``n_test`` test samples (None: all)."""
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
            self.class_names,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that each class keeps its share in both parts.

    Each class contributes ``round(test_fraction * n_class)`` samples to the test
    part (at least one if it has two or more); both index arrays are shuffled. Uses a
    private ``numpy.random.Generator(seed)``.

    Examples
    --------
    >>> tr, te = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=0)
    >>> sorted(np.bincount(np.array([0, 0, 0, 0, 1, 1, 1, 1])[te]).tolist())
    [2, 2]
    """
    if not 0.0 < test_fraction < 1.0:
        raise ICSValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(test_fraction * len(idx))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def standardize(
    x_train: np.ndarray, x_test: np.ndarray, axis: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the training mean and divide by the training std (over ``axis``).

    ``axis=None`` uses one scalar mean and std; e.g. ``axis=(0, 2, 3)`` gives
    per-channel statistics of (n, C, H, W) images. Returns float32 arrays.
    """
    xt = x_train.astype(np.float64)
    mean = xt.mean(axis=axis, keepdims=axis is not None)
    std = xt.std(axis=axis, keepdims=axis is not None)
    std = np.where(std > 0, std, 1.0)
    return (
        ((xt - mean) / std).astype(np.float32),
        ((x_test.astype(np.float64) - mean) / std).astype(np.float32),
    )
