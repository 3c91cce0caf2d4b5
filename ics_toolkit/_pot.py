"""Import POT without touching the process's random streams.

``import ot`` runs module-level code that draws from Python's ``random`` (one number
on first import, POT 0.9.7) and may touch numpy's global RNG; a training loop that
uses either would end differently on the first measured step. :func:`import_ot` is
the one place the toolkit imports POT: it saves Python's and numpy's global states
around the import and puts them back.
"""

from __future__ import annotations

import random
import sys
from types import ModuleType

import numpy as np

__all__ = ["import_ot"]


def import_ot() -> ModuleType:
    """Return the ``ot`` module, imported with Python's and numpy's global RNGs preserved.

    Returns
    -------
    module
        POT's ``ot`` package.
    """
    module = sys.modules.get("ot")
    if module is not None:
        return module
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002
    try:
        import ot
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    return ot
