"""CIFAR-10 and CIFAR-100 from a local folder in the standard python pickle format.

Nothing is downloaded. Get ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``
from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into a folder
``root``, giving ``root/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``, ``batches.meta``) or ``root/cifar-100-python/`` (``train``, ``test``,
``meta``). ``root`` may also be that inner folder itself.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ics_toolkit.data.base import Dataset, DatasetNotFoundError, standardize
from ics_toolkit.errors import ICSValueError

__all__ = ["DATA_ENV", "default_root", "load_cifar10", "load_cifar100"]

#: Environment variable naming the default data folder.
DATA_ENV = "ICS_TOOLKIT_DATA"

_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "cifar-100-python.tar.gz"),
}


def default_root() -> Path:
    """The folder searched when no ``root`` is given: ``$ICS_TOOLKIT_DATA`` or ``./data``."""
    return Path(os.environ.get(DATA_ENV, "data"))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: the CIFAR files need no more."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a CIFAR file: the standard files "
            "hold only dicts, lists, bytes and numpy arrays"
        )


def _load_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        obj = _ArrayUnpickler(fh, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ICSValueError(f"{path} is not a CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _find_folder(name: str, root: str | os.PathLike[str] | None) -> Path:
    folder_name, train_files, test_files, meta, archive = _LAYOUT[name]
    base = default_root() if root is None else Path(root).expanduser()
    needed = [*train_files, *test_files, meta]
    for candidate in (base / folder_name, base):
        if all((candidate / f).is_file() for f in needed):
            return candidate
    missing = [f for f in needed if not (base / folder_name / f).is_file()]
    where = "the default folder ($" + DATA_ENV + " or ./data)" if root is None else "`root`"
    raise DatasetNotFoundError(
        f"{name}: no complete dataset under {where} = {str(base)!r} (missing "
        f"{', '.join(missing)} in {str(base / folder_name)!r}). Nothing is downloaded: get "
        f"{archive} from {_URL} and extract it there, so that "
        f"{str(base / folder_name / needed[0])!r} exists"
    )


def _to_images(data: Any, path: Path) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 2 or arr.shape[1] != 3072:
        raise ICSValueError(
            f"{path}: 'data' must have shape (n, 3072) (32x32 RGB rows), got {arr.shape}"
        )
    return arr.reshape(-1, 3, 32, 32)


def _read_split(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        batch = _load_pickle(folder / f)
        if "data" not in batch or label_key not in batch:
            raise ICSValueError(
                f"{folder / f}: expected keys 'data' and {label_key!r}, got {sorted(batch)}"
            )
        xs.append(_to_images(batch["data"], folder / f))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _names(meta: dict[str, Any], key: str) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in meta.get(key, []))


def _build(
    name: str,
    folder: Path,
    label_key: str,
    names_key: str,
    num_classes: int,
    standardize_inputs: bool,
) -> Dataset:
    _, train_files, test_files, meta_file, _ = _LAYOUT[name]
    x_tr, y_tr = _read_split(folder, train_files, label_key)
    x_te, y_te = _read_split(folder, test_files, label_key)
    if standardize_inputs:
        xf_tr, xf_te = standardize(x_tr, x_te, axis=(0, 2, 3))  # per channel
    else:
        xf_tr, xf_te = (
            (x_tr / np.float32(255)).astype(np.float32),
            (x_te / np.float32(255)).astype(np.float32),
        )
    return Dataset(
        name,
        torch.from_numpy(np.ascontiguousarray(xf_tr)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(xf_te)),
        torch.from_numpy(y_te),
        num_classes=num_classes,
        class_names=_names(_load_pickle(folder / meta_file), names_key),
    )


def load_cifar10(
    root: str | os.PathLike[str] | None = None, *, standardize_inputs: bool = True
) -> Dataset:
    """Load CIFAR-10 from ``root`` (python pickle format; nothing is downloaded).

    Parameters
    ----------
    root : path or None
        A folder holding ``cifar-10-batches-py/`` (or that folder itself). None
        means ``$ICS_TOOLKIT_DATA``, else ``./data``.
    standardize_inputs : bool
        Per-channel standardization with the training set's mean and std; otherwise
        intensities are scaled to [0, 1].

    Returns
    -------
    Dataset
        ``x`` float32 (n, 3, 32, 32), 10 classes (50000 / 10000 images).

    Raises
    ------
    DatasetNotFoundError
        The files are missing; the message says where to put them (also a
        ``FileNotFoundError``).
    """
    folder = _find_folder("cifar10", root)
    return _build("cifar10", folder, "labels", "label_names", 10, standardize_inputs)


def load_cifar100(
    root: str | os.PathLike[str] | None = None,
    *,
    labels: str = "fine",
    standardize_inputs: bool = True,
) -> Dataset:
    """Load CIFAR-100 from ``root`` (python pickle format; nothing is downloaded).

    Parameters
    ----------
    root : path or None
        A folder holding ``cifar-100-python/`` (or that folder itself). None means
        ``$ICS_TOOLKIT_DATA``, else ``./data``.
    labels : {"fine", "coarse"}
        The 100 fine classes or the 20 coarse superclasses.
    standardize_inputs : bool
        Per-channel standardization with the training set's mean and std.

    Returns
    -------
    Dataset
        ``x`` float32 (n, 3, 32, 32), 100 (or 20) classes.

    Raises
    ------
    DatasetNotFoundError
        The files are missing; the message says where to put them.
    """
    if labels not in ("fine", "coarse"):
        raise ICSValueError(f"`labels` must be 'fine' or 'coarse', got {labels!r}")
    folder = _find_folder("cifar100", root)
    return _build(
        "cifar100",
        folder,
        f"{labels}_labels",
        f"{labels}_label_names",
        100 if labels == "fine" else 20,
        standardize_inputs,
    )
