"""The terms of the normalization bounds U3 and U5: what makes each bound loose.

Each bound of :mod:`ics_toolkit.bounding` is a sum of terms; reported one by one, they
say which part dominates (docs/theory.md, "Why the bounds are loose"):

U3 (BatchNorm) = ``U3_core`` + ``U3_gamma`` + ``U3_beta``

- ``U3_core`` = max|gamma| sqrt(2 d'(1 - rho)): the normalized values' move. It is
  at most max|gamma| * 2 sqrt(d') and reaches sqrt(2 d') max|gamma| when rho -> 0;
  it follows the correlation rho of the normalized values, not their distances, so
  it is loose whenever the step is small compared with sqrt(d').
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
from ics_toolkit.bounding import _mean_dot, _mean_sq_norm, _Norm, _norms_over_k

__all__ = ["bound_terms"]


def _u3_terms(a: _Norm, b: _Norm) -> dict[str, float]:
    d = a.x_hat.shape[1]
    m2x, m2y = _mean_sq_norm(a.x_hat), _mean_sq_norm(b.x_hat)
    d_eff = max(float(d), m2x, m2y)
    c = _mean_dot(a.x_hat, b.x_hat)
    core = math.sqrt(max(2.0 * (d_eff - c), 0.0))
    column_sq = torch.linalg.vector_norm(b.x_hat, dim=0).square() / b.x_hat.shape[0]
    gamma = math.sqrt(max(float(torch.dot((a.weight - b.weight).square(), column_sq)), 0.0))
    beta = float(torch.linalg.vector_norm(a.bias - b.bias))
    names = _vocab.BOUND_TERMS["U3"]
    return dict(zip(names, (float(a.weight.abs().max()) * core, gamma, beta), strict=True))


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
    gets them); the returned terms sum to the bound.
    """
    if a.form == "batchnorm":
        return _u3_terms(a, b)
    if a.form == "embedded":
        return _u5_terms(a, b)
    return {}
