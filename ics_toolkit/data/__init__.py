"""Datasets as torch tensors, with nothing downloaded at run time.

- ``"digits"``: scikit-learn's 8x8 handwritten digits (the embedded real dataset;
  needs the ``data`` extra);
- ``"blobs"`` and ``"shapes"``: generated, seeded, need nothing;
- ``"cifar10"``, ``"cifar100"``: from a local folder in the standard python format.

All loaders return a :class:`Dataset`; :func:`load_dataset` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ics_toolkit.data.augment import flip_and_shift
from ics_toolkit.data.base import Dataset, DatasetNotFoundError, MissingExtraError
from ics_toolkit.data.cifar import load_cifar10, load_cifar100
from ics_toolkit.data.digits import load_digits
from ics_toolkit.data.synthetic import SHAPE_NAMES, make_blobs, make_shapes
from ics_toolkit.errors import ICSValueError

__all__ = [
    "DATASETS",
    "SHAPE_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "MissingExtraError",
    "flip_and_shift",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "make_blobs",
    "make_shapes",
]

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "blobs": make_blobs,
    "shapes": make_shapes,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
#: Names :func:`load_dataset` knows.
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : {"digits", "blobs", "shapes", "cifar10", "cifar100"}
        Which loader: :func:`load_digits`, :func:`make_blobs`, :func:`make_shapes`,
        :func:`load_cifar10`, :func:`load_cifar100`.
    **options
        Passed to the loader (e.g. ``seed=1``, ``root="~/data"``).

    Returns
    -------
    Dataset

    Examples
    --------
    >>> load_dataset("blobs", n_train=40, n_test=20, dim=3)
    Dataset('blobs', train=40, test=20, input_shape=(3,), num_classes=4)
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ICSValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    try:
        return loader(**options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ICSValueError(f"load_dataset({name!r}): {err}") from err
        raise
