"""The terms of the normalization bounds U3 and U5: what makes each bound loose.

Each bound of :mod:`ics_toolkit.bounding` is a sum of terms; reported one by one, they
say which part dominates (docs/theory.md, "Why the bounds are loose"):

U3 (BatchNorm, the paper's form) = ``U3_core`` + ``U3_eps`` + ``U3_gamma`` + ``U3_beta``,
and U3_tight (the same bound with the measured second moments) = ``U3_core`` +
``U3_gamma`` + ``U3_beta`` = U3 - ``U3_eps``:

- ``U3_core`` = max|gamma| sqrt(m2(x_hat) + m2(y_hat) - 2c) = max|gamma| times the RMS
  displacement sqrt(mean ||x_hat_i - y_hat_i||^2) of the normalized values: the step
  itself, through the correlation c of the normalized values. It reaches
  max|gamma| sqrt(2d) (the paper's sqrt(d) cap) only when the step decorrelates them.
- ``U3_eps`` = max|gamma| (sqrt(2 d'(1 - rho)) - sqrt(m2(x_hat) + m2(y_hat) - 2c))
  = max|gamma| e / (sqrt(e + r^2) + r) with e = 2 (d' - (m2(x_hat) + m2(y_hat)) / 2)
  and r^2 = m2(x_hat) + m2(y_hat) - 2c: what replacing the measured second moments by
  d' = max(d, m2(x_hat), m2(y_hat)) adds. In train mode, d - m2 = sum_j eps / (var_j + eps)
  over the coordinates: channels with a variance near or below eps (dead units); in
  eval mode or on a subsampled view also the gap between the two sides' moments.
  U3_core + U3_eps = max|gamma| sqrt(2 d'(1 - rho)) is the paper's core.
- ``U3_gamma`` = sqrt(mean_i ||(gamma - gamma') y_hat_i||^2): the change of the scale.
- ``U3_beta`` = ||beta - beta'||: the change of the shift.

U5 (the authors' Unitization) = ``U5_unit`` + ``U5_bn`` + ``U5_alpha`` + ``U5_gamma``
+ ``U5_beta``

- ``U5_unit`` = max|gamma| 2 k max|alpha|: the unitized part, a constant set by alpha
  and k only (no noise, no d when k = 1); for the authors' k = P it is the largest
  term of all as soon as alpha is away from 0.
- ``U5_bn`` = max|gamma| max|1 - alpha| sqrt(mean ||x_hat_i - y_hat_i||^2): the
  BatchNorm part.
- ``U5_alpha`` = max|gamma| max|alpha - alpha'| (k + sqrt(mean ||y_hat_i||^2)).
- ``U5_gamma``, ``U5_beta``: the affine changes, as for U3.

Every function computes in float64 from the prepared states of
:func:`ics_toolkit.bounding` and returns Python floats; the terms sum to the bound
(tested against :func:`ics_toolkit.bounds`).
"""

from __future__ import annotations

import math

import torch

from ics_toolkit import _vocab
from ics_toolkit.bounding import _mean_sq_norm, _Norm, _norms_over_k, _u3_parts

__all__ = ["bound_terms"]


def _u3_terms(a: _Norm, b: _Norm) -> dict[str, float]:
    names = _vocab.BOUND_TERMS["U3"]
    return dict(zip(names, _u3_parts(a, b), strict=True))


def _u5_terms(a: _Norm, b: _Norm) -> dict[str, float]:
    assert a.alpha is not None and b.alpha is not None
    k = max(a.k, b.k)
    g = float(a.weight.abs().max())
    unit = g * 2.0 * k * float(a.alpha.abs().max())
    bn = g * float((1.0 - a.alpha).abs().max()) * math.sqrt(_mean_sq_norm(a.x_hat - b.x_hat))
    alpha = g * float((a.alpha - b.alpha).abs().max()) * (k + math.sqrt(_mean_sq_norm(b.x_hat)))
    a_after = b.x_hat * (b.alpha * torch.reciprocal(_norms_over_k(b)) + 1.0 - b.alpha)
    gamma = math.sqrt(_mean_sq_norm((a.weight - b.weight) * a_after))
    beta = float(torch.linalg.vector_norm(a.bias - b.bias))
    names = _vocab.BOUND_TERMS["U5"]
    return dict(zip(names, (unit, bn, alpha, gamma, beta), strict=True))


def bound_terms(a: _Norm, b: _Norm) -> dict[str, float]:
    """The terms of U3 (``form="batchnorm"``) or U5 (``form="embedded"``); {} otherwise.

    ``a`` and ``b`` are the prepared states of the two steps (as the bound kernel
    gets them); the returned terms sum to the bound, and for BatchNorm the terms of
    ``_vocab.BOUND_TERMS["U3_tight"]`` (all but ``U3_eps``) sum to U3_tight.
    """
    if a.form == "batchnorm":
        return _u3_terms(a, b)
    if a.form == "embedded":
        return _u5_terms(a, b)
    return {}
