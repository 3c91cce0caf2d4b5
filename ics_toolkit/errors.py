"""Error and warning types of ics_toolkit.

Every error also inherits the builtin a caller would naturally catch
(``ValueError``, ``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps
working, while ``except ICSError`` catches everything the toolkit raises.
"""

from __future__ import annotations

__all__ = [
    "ICSError",
    "ICSMemoryError",
    "ICSRuntimeWarning",
    "ICSTypeError",
    "ICSUsageError",
    "ICSValueError",
    "ICSWarning",
    "SolverError",
]


class ICSError(Exception):
    """Base class of every error raised by ics_toolkit."""


class ICSValueError(ICSError, ValueError):
    """An argument has the right type but a bad value (shape, NaN, unknown name)."""


class ICSTypeError(ICSError, TypeError):
    """An argument has a type the toolkit cannot use."""


class ICSMemoryError(ICSError, MemoryError):
    """A measured step would not fit in memory, whatever the monitor adapts (at construction)."""


class ICSUsageError(ICSError, RuntimeError):
    """An object was used out of order (attached twice, detached while not attached)."""


class SolverError(ICSError, RuntimeError):
    """An optimal-transport solver stopped before it reached a trustworthy value.

    Attributes
    ----------
    value : float
        The value the solver returned, which must not be trusted as W1.
    status : str
        The solver's status (for POT ``emd2``: ``"max_iter_reached"``,
        ``"infeasible"`` or ``"unbounded"``; for sinkhorn ``"max_iter_reached"`` or
        ``"unresolved"``).
    """

    def __init__(self, message: str, *, value: float = float("nan"), status: str = "") -> None:
        super().__init__(message)
        self.value = value
        self.status = status


class ICSWarning(UserWarning):
    """A measurement is questionable (a violated bound, a non-finite layer output)."""


class ICSRuntimeWarning(ICSWarning, RuntimeWarning):
    """Something happened at run time that the user should know (a skipped step)."""
