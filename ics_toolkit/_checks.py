"""The argument checkers, one of each: every public entry point validates with these.

Each checker names the argument (``name`` is the bare argument name, quoted in
backticks, or a label that already holds backticks or a ``--flag``), says what is
expected and returns the normalized value. Below the boundary where a user hands an
argument over (a constructor, the CLI, a public function), code trusts its inputs and
does not call these again.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ics_toolkit._vocab import METHODS, VIEWS
from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = [
    "boolean",
    "choice",
    "integer",
    "method",
    "methods",
    "names",
    "positive_int",
    "positive_number",
    "seed",
    "views",
]


def _label(name: str) -> str:
    return name if ("`" in name or name.startswith("-")) else f"`{name}`"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str, *, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` as an int >= 1 (or None when ``allow_none``); ICSValueError otherwise.

    Examples
    --------
    >>> positive_int(3, "steps")
    3
    >>> positive_int(0, "steps")
    Traceback (most recent call last):
    ...
    ics_toolkit.errors.ICSValueError: `steps` must be a positive int, got 0
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or int(value) < 1:
        extra = " or None" if allow_none else ""
        raise ICSValueError(f"{_label(name)} must be a positive int{extra}{hint}, got {value!r}")
    return int(value)


def integer(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: ICSTypeError for a non-integer, else ICSValueError."""
    if not _is_int(value):
        raise ICSTypeError(f"{_label(name)} must be an integer, got {type(value).__name__}")
    if int(value) < minimum:
        raise ICSValueError(f"{_label(name)} must be >= {minimum}, got {value}")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """A seed of a private ``torch.Generator``: an int in [0, 2**63)."""
    if not _is_int(value):
        raise ICSTypeError(
            f"{_label(name)} must be an int in [0, 2**63) (it seeds private generators), got "
            f"{type(value).__name__} {value!r}; pass e.g. {name.strip('`')}=0"
        )
    if not 0 <= int(value) < 2**63:
        raise ICSValueError(
            f"{_label(name)} must be an int in [0, 2**63) (it seeds private generators), got "
            f"{value}; pass e.g. {name.strip('`')}=0"
        )
    return int(value)


def positive_number(value: Any, name: str, *, unit: str = "") -> float:
    """A finite real number > 0 (e.g. a tolerance, a timeout in seconds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ICSTypeError(
            f"{_label(name)} must be a positive number{unit}, got {type(value).__name__}"
        )
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ICSValueError(
            f"{_label(name)} must be a positive number{unit} (finite, > 0), got {value!r}"
        )
    return float(value)


def boolean(value: Any, name: str) -> bool:
    """True or False (numpy booleans accepted); ICSTypeError otherwise."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise ICSTypeError(f"{_label(name)} must be True or False, got {value!r}")


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    """One of ``options``, with a did-you-mean hint."""
    if isinstance(value, str) and value in options:
        return value
    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ICSValueError(
        f"{_label(name)} must be one of {', '.join(map(repr, options))}; got {value!r}{hint}"
    )


def method(value: Any, name: str = "method") -> str:
    """One W1 method name (:data:`ics_toolkit._vocab.METHODS`)."""
    return choice(value, name, METHODS)


def names(values: Any, name: str, options: Sequence[str], what: str) -> tuple[str, ...]:
    """A non-empty, duplicate-free tuple of names from ``options``.

    A single string means one name, a comma-separated string several (the CLI form).
    """
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    elif not isinstance(values, Iterable):
        raise ICSTypeError(
            f"{_label(name)} must be a {what} name or a sequence of them, got "
            f"{type(values).__name__}"
        )
    values = list(values)
    bad = [v for v in values if v not in options]
    if bad or not values:
        raise ICSValueError(
            f"{_label(name)}: unknown {what}(s) {bad or values}; choose from {', '.join(options)}"
        )
    return tuple(dict.fromkeys(values))


def methods(values: Any, name: str = "methods") -> tuple[str, ...]:
    """W1 method names (a sequence, one name or a comma-separated string)."""
    return names(values, name, METHODS, "method")


def views(values: Any, name: str = "views") -> tuple[str, ...]:
    """View names (:data:`ics_toolkit._vocab.VIEWS`)."""
    return names(values, name, VIEWS, "view")
