"""scikit-learn's 8x8 handwritten digits: the embedded real dataset (nothing downloads)."""

from __future__ import annotations

import numpy as np
import torch

from ics_toolkit.data.base import Dataset, MissingExtraError, standardize, stratified_split

__all__ = ["load_digits"]


def load_digits(
    *, test_fraction: float = 0.25, seed: int = 0, standardize_inputs: bool = True
) -> Dataset:
    """Load the 1797 8x8 handwritten digits (UCI, via scikit-learn) as images.

    The data ship inside scikit-learn (the optional extra
    ``pip install "ics-toolkit[data]"``), so nothing is downloaded.

    Parameters
    ----------
    test_fraction : float
        Share of each class held out for testing (stratified split).
    seed : int
        Seed of the split (a private numpy generator).
    standardize_inputs : bool
        Subtract the training pixels' mean and divide by their std (one scalar
        each); otherwise the raw intensities 0..16 are kept.

    Returns
    -------
    Dataset
        ``x`` float32 of shape (n, 1, 8, 8), ``y`` int64 in 0..9; 1347 training and
        450 test images with the default ``test_fraction``.

    Raises
    ------
    MissingExtraError
        scikit-learn is not installed (also an ``ImportError``).

    Examples
    --------
    >>> data = load_digits()
    >>> data.x_train.shape, data.num_classes
    (torch.Size([1347, 1, 8, 8]), 10)
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise MissingExtraError(
            'the digits dataset ships with scikit-learn: pip install "ics-toolkit[data]" '
            "(or pip install scikit-learn)"
        ) from err
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)[:, None]  # (n, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    tr, te = stratified_split(labels, test_fraction, seed)
    x_tr, x_te = images[tr], images[te]
    if standardize_inputs:
        x_tr, x_te = standardize(x_tr, x_te)
    return Dataset(
        "digits",
        torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32)),
        torch.from_numpy(labels[tr]),
        torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32)),
        torch.from_numpy(labels[te]),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
    )
