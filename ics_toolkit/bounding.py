"""Upper and lower bounds of the Wasserstein-1 distance between paired samples.

The theory (``docs/theory.md``) bounds ``W1(P_X, P_Y)`` between the empirical
distributions of a layer's outputs before (``X``) and after (``Y``) an optimizer
step, where row ``i`` of both is the output for the same probe input ``u_i``:

* lower bounds, one 1-Lipschitz test function each::

      L1 = || mean(X) - mean(Y) ||                 (f = <w, .>, w the unit mean gap)
      L2 = | mean ||X_i|| - mean ||Y_i|| |         (f = ||.||)
      L3 = max over tried directions of the 1-D W1 of the projections

* upper bounds, valid because the same-input coupling is one feasible coupling::

      U1 = mean ||X_i - Y_i||                      (= the ``paired`` estimator)
      U2 = sqrt(mean ||X_i - Y_i||^2)              (Jensen: U1 <= U2)
      U3   BatchNorm outputs: set by sqrt(d) and the correlation of the normalized values
      U3_tight  the same with the measured second moments instead of d (U3_tight <= U3)
      U4   unitized outputs: 2 |alpha| k, independent of noise (and of d when k = 1)
      U5   Unitization embedded in BatchNorm (the authors' layer)

so that, for the empirical measures and up to float error,
``L1, L2, L3 <= exact <= U1 <= U2`` and ``exact <= U3_tight <= U3``,
``exact <= U4, U5`` where they apply.

Every function computes in float64 and returns Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from ics_toolkit import _checks, _scaling, _vocab
from ics_toolkit._arrays import ArrayLike, as_pair, as_samples, to_tensor
from ics_toolkit._blocks import block_rows
from ics_toolkit.errors import ICSValueError

__all__ = [
    "LOWER_BOUNDS",
    "RTOL",
    "UPPER_BOUNDS",
    "BoundCheck",
    "NormState",
    "bounds",
    "check_order",
]

#: Relative tolerance of every inequality check. Distances and bounds are computed in
#: float64, but layer outputs are usually stored in float32 and the normalized values
#: that U3..U5 use are recomputed from the stored inputs, so two quantities that should
#: satisfy ``a <= b`` can differ by float32 rounding (~1e-7 relative). A check passes
#: when ``a <= b + RTOL * max(|a|, |b|) + ATOL * scale``.
RTOL = 1e-6
#: Slack relative to the size of the coordinates (``scale``, the largest absolute value
#: in the samples): float64 rounding of a distance is proportional to the size of the
#: points, not to the distance, so two nearly equal distributions need it.
ATOL = 1e-12

#: Quantities that must not exceed W1 (the ``wasserstein`` methods sliced and
#: max_sliced are lower bounds too); spelled in :mod:`ics_toolkit._vocab`.
LOWER_BOUNDS = _vocab.LOWER_BOUNDS
#: Quantities that must not fall below W1 (``paired`` is U1 under its method name).
UPPER_BOUNDS = _vocab.UPPER_BOUNDS

Form = Literal["batchnorm", "unitization", "embedded"]


@dataclass(frozen=True)
class NormState:
    """A normalization layer's internals at one training step, flattened per sample.

    The layer's output for sample ``i`` is, with ``g`` = ``weight``, ``b`` = ``bias``,
    ``a`` = ``alpha`` and ``s_i = sqrt(||x_hat_i||^2 / k^2 + eps)``:

    * ``form="batchnorm"``:   ``g * x_hat_i + b``
    * ``form="unitization"``: ``g * a * x_hat_i / s_i + b``  (pure unitization)
    * ``form="embedded"``:    ``g * x_hat_i * (a / s_i + 1 - a) + b``  (the authors' layer)

    Parameters
    ----------
    x_hat : array_like, shape (n, d)
        Normalized values before the affine map (zero mean, unit variance per channel
        in train-mode BatchNorm), one row per sample, flattened exactly like the
        layer outputs they explain.
    weight, bias : array_like, shape (d,), optional
        Affine scale ``gamma`` and shift ``beta`` broadcast to the flattened
        coordinates (a per-channel parameter repeated over spatial positions).
        May be None for ``form="unitization"``, whose bound U4 does not use it.
        None means 1 and 0.
    alpha : array_like, shape (d,) or scalar, optional
        Unitization strength per coordinate. Required for the unitization forms.
    k : float
        Norm scale of the unitization: ``||x_hat_i / s_i|| <= k``. 1 for the raw L2
        norm, ``P`` (spatial positions) for the authors' per-pixel scaling.
    eps : float
        The ``eps`` inside ``s_i``.
    form : {"batchnorm", "unitization", "embedded"}
        Which layer produced the outputs.
    s : array_like, shape (n,), optional
        ``sqrt(||x_hat||^2 / k^2 + eps)`` of the whole sample each row belongs to. By
        default it is computed from the rows of ``x_hat``; pass it when the rows are
        parts of samples (the ``pixel`` view: each row is one position of an image,
        and the layer divided by the norm of the whole image).
    """

    x_hat: ArrayLike | None
    weight: ArrayLike | None = None
    bias: ArrayLike | None = None
    alpha: ArrayLike | float | None = None
    k: float = 1.0
    eps: float = 0.0
    form: Form = "batchnorm"
    s: ArrayLike | None = None


@dataclass(frozen=True)
class BoundCheck:
    """Outcome of :func:`check_order` for one group of values.

    Attributes
    ----------
    holds : bool
        True when every lower bound <= exact <= every upper bound (and, without
        ``exact``, every lower bound <= every upper bound) within the tolerance.
    violations : tuple of str
        One readable line per violated inequality, e.g. ``"L2 = 1.3 > exact = 1.2"``.
    """

    holds: bool
    violations: tuple[str, ...] = ()


def _le(a: float, b: float, rtol: float, scale: float, slack: float = 0.0) -> bool:
    # ATOL * scale, not ATOL * max(scale, 1): samples at 1e-200 must not get a slack of
    # 1e-12, which would pass every violation
    return a <= b + slack + rtol * max(abs(a), abs(b)) + ATOL * scale


def check_order(
    values: Mapping[str, float],
    *,
    rtol: float = RTOL,
    scale: float = 1.0,
    resolution: float = 0.0,
) -> BoundCheck:
    """Check that every lower bound <= exact <= every upper bound.

    Parameters
    ----------
    values : mapping of str to float
        Quantity name to value, e.g. ``{"exact": 1.0, "L1": 0.5, "U1": 1.2}``. Names
        in :data:`LOWER_BOUNDS` are lower bounds, names in :data:`UPPER_BOUNDS` upper
        bounds; other names and NaN values are ignored.
    rtol : float
        Relative tolerance, see :data:`RTOL`.
    scale : float
        Largest absolute coordinate of the samples the values came from, see
        :data:`ATOL`.
    resolution : float
        Storage resolution of the samples (the ``resolution`` row): a comparison
        between a value from the stored samples and one of :data:`~ics_toolkit._vocab.NORM_BOUNDS`
        (computed from the normalization layer's states, not from the stored outputs)
        passes when it fails by at most this much (docs/theory.md, section 5.1).

    Returns
    -------
    BoundCheck
        Whether the order holds and which inequalities fail.

    Examples
    --------
    >>> check_order({"L1": 0.5, "exact": 1.0, "U1": 1.2}).holds
    True
    >>> check_order({"L1": 1.5, "exact": 1.0}).violations
    ('L1 = 1.5 > exact = 1',)
    """
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    lows = [(k, v) for k, v in finite.items() if k in LOWER_BOUNDS]
    highs = [(k, v) for k, v in finite.items() if k in UPPER_BOUNDS]
    pairs: list[tuple[str, float, str, float]] = []
    if "exact" in finite:
        ex = finite["exact"]
        pairs += [(k, v, "exact", ex) for k, v in lows]
        pairs += [("exact", ex, k, v) for k, v in highs]
    else:
        pairs += [(lk, lv, hk, hv) for lk, lv in lows for hk, hv in highs]
    if "sliced" in finite and "max_sliced" in finite:
        pairs.append(("sliced", finite["sliced"], "max_sliced", finite["max_sliced"]))
    norm = set(_vocab.NORM_BOUNDS)
    bad = tuple(
        f"{a} = {av:.6g} > {b} = {bv:.6g}"
        for a, av, b, bv in pairs
        if not _le(av, bv, rtol, scale, resolution * ((a in norm) != (b in norm)))
    )
    return BoundCheck(holds=not bad, violations=bad)


def _vector(value: ArrayLike | float | None, d: int, name: str, like: torch.Tensor, fill: float):
    """Broadcast a parameter to a float64 (d,) vector on ``like``'s device."""
    if value is None:
        return torch.full((d,), fill, dtype=torch.float64, device=like.device)
    t = to_tensor(value, name).to(device=like.device, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        return t.expand(d)
    if t.numel() != d:
        raise ICSValueError(
            f"`{name}` must have d = {d} entries (one per flattened coordinate; repeat a "
            f"per-channel parameter over spatial positions), got {t.numel()}"
        )
    return t


@dataclass(frozen=True)
class _Norm:
    """A NormState converted to float64 tensors of matching shapes."""

    x_hat: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor | None
    k: float
    eps: float
    form: str
    s: torch.Tensor | None


def _prepare(before: NormState, after: NormState, n: int, d: int, like: torch.Tensor):
    out = []
    for label, st in (("before", before), ("after", after)):
        if not isinstance(st, NormState):
            raise ICSValueError(f"`{label}` must be a NormState, got {type(st).__name__}")
        if st.form not in ("batchnorm", "unitization", "embedded"):
            raise ICSValueError(
                f"`{label}.form` must be 'batchnorm', 'unitization' or 'embedded', got {st.form!r}"
            )
        if st.form != "batchnorm" and st.alpha is None:
            raise ICSValueError(f"`{label}.alpha` is required for form={st.form!r}")
        if st.k <= 0:
            raise ICSValueError(f"`{label}.k` must be positive, got {st.k}")
        if st.x_hat is None:
            if st.form != "unitization":
                raise ICSValueError(f"`{label}.x_hat` is required for form={st.form!r}")
            xh = torch.empty(n, d, dtype=torch.float64, device=like.device)  # U4 ignores it
        else:
            xh = as_samples(st.x_hat, f"{label}.x_hat").to(like.device)
            if tuple(xh.shape) != (n, d):
                raise ICSValueError(
                    f"`{label}.x_hat` must have the shape of the samples {(n, d)}, "
                    f"got {tuple(xh.shape)}"
                )
        alpha = None if st.alpha is None else _vector(st.alpha, d, f"{label}.alpha", like, 0.0)
        out.append(
            _Norm(
                x_hat=xh,
                weight=_vector(st.weight, d, f"{label}.weight", like, 1.0),
                bias=_vector(st.bias, d, f"{label}.bias", like, 0.0),
                alpha=alpha,
                k=float(st.k),
                eps=float(st.eps),
                form=st.form,
                s=_per_sample(st.s, n, f"{label}.s", like),
            )
        )
    if out[0].form != out[1].form:
        raise ICSValueError(
            f"`before.form` ({out[0].form!r}) and `after.form` ({out[1].form!r}) differ; "
            "both steps must describe the same layer"
        )
    return out[0], out[1]


def _per_sample(value: ArrayLike | None, n: int, name: str, like: torch.Tensor):
    if value is None:
        return None
    t = to_tensor(value, name).to(device=like.device, dtype=torch.float64).reshape(-1, 1)
    if t.shape[0] != n:
        raise ICSValueError(f"`{name}` must have one entry per sample (n = {n}), got {t.shape[0]}")
    if not bool((t > 0).all()):
        raise ICSValueError(f"`{name}` must be positive (a norm plus eps)")
    return t


def _mean_sq_norm(t: torch.Tensor) -> float:
    """(1/n) sum_i ||t_i||^2, one pass and no temporary (these matrices can be large)."""
    return float(torch.linalg.vector_norm(t).square()) / t.shape[0]


def _mean_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """(1/n) sum_i <a_i, b_i>."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1))) / a.shape[0]


def _u3_split(m2x: float, m2y: float, gap_sq: float, d: int) -> tuple[float, float]:
    """The two parts of U3's core sqrt(2 d'(1 - rho)) = sqrt(2 (d' - c)).

    From ``m2x``, ``m2y`` (mean squared norms of the normalized values at both steps),
    ``gap_sq`` = mean_i ||x_hat_i - y_hat_i||^2 = m2x + m2y - 2c and the dimension
    ``d``: returns ``(rms, eps_part)`` with ``rms = sqrt(gap_sq)`` (U3_tight's core) and
    ``rms + eps_part = sqrt(e + gap_sq) = sqrt(2 (d' - c))``, where
    ``e = 2 d' - m2x - m2y >= 0`` and ``d' = max(d, m2x, m2y)`` (docs/theory.md, U3).
    ``eps_part = e / (sqrt(e + gap_sq) + rms)``: no cancellation of the two roots.
    """
    d_eff = max(float(d), m2x, m2y)  # m2 <= d holds exactly only in train mode without eps
    excess = max(2.0 * d_eff - m2x - m2y, 0.0)  # = 2 (d' - (m2x + m2y) / 2)
    rms = math.sqrt(max(gap_sq, 0.0))
    full = math.sqrt(excess + rms * rms)
    return rms, (excess / (full + rms) if excess > 0 else 0.0)


def _u3_parts(a: _Norm, b: _Norm) -> tuple[float, float, float, float]:
    """U3's terms (core, eps, gamma change, beta change) of prepared BatchNorm states.

    ``U3 = max|g| (rms + eps_part) + sqrt(mean ||(g - g') y_hat||^2) + ||b - b'||``,
    ``U3_tight`` the same without ``eps_part`` (see :func:`_u3_split`).
    """
    d = a.x_hat.shape[1]
    m2x, m2y = _mean_sq_norm(a.x_hat), _mean_sq_norm(b.x_hat)
    # the RMS gap from the differences, not m2x + m2y - 2c: no cancellation for small steps
    rms, eps_part = _u3_split(m2x, m2y, _mean_sq_norm(a.x_hat - b.x_hat), d)
    # mean_i ||(g - g') * y_i||^2 = sum_k (g_k - g'_k)^2 * mean_i y_ik^2
    column_sq = torch.linalg.vector_norm(b.x_hat, dim=0).square() / b.x_hat.shape[0]
    scale_change = math.sqrt(max(float(torch.dot((a.weight - b.weight).square(), column_sq)), 0))
    shift_change = float(torch.linalg.vector_norm(a.bias - b.bias))
    g = float(a.weight.abs().max())
    return g * rms, g * eps_part, scale_change, shift_change


def _u3(a: _Norm, b: _Norm) -> float:
    """BatchNorm: max|g| sqrt(2 d'(1 - rho)) + sqrt(mean ||(g - g') y_hat||^2) + ||b - b'||."""
    return sum(_u3_parts(a, b))


def _u3_tight(parts: tuple[float, float, float, float]) -> float:
    """U3_tight from U3's terms: U3 without its eps part (``parts[1]``).

    ``max|g| sqrt(m2x + m2y - 2c) + sqrt(mean ||(g - g') y_hat||^2) + ||b - b'||``.
    """
    core, _, scale_change, shift_change = parts
    return core + scale_change + shift_change


def _u3_stored(
    xa: torch.Tensor,
    xb: torch.Tensor,
    weights: tuple[torch.Tensor | None, torch.Tensor | None],
    biases: tuple[torch.Tensor | None, torch.Tensor | None],
) -> float:
    """U3 of the flatten view straight from stored normalized values (the monitor's path).

    The sum of :func:`_u3_stored_terms`.
    """
    return sum(_u3_stored_terms(xa, xb, weights, biases))


def _u3_float32_sums(
    fa: torch.Tensor, fb: torch.Tensor, channels: int, m2x: float | None = None
) -> tuple[float, float, float, torch.Tensor]:
    """Mean ||a_i||^2, mean ||b_i||^2, mean ||a_i - b_i||^2 and sum_i b_i^2 per channel.

    Of float32 (n, d) rows, without a float64 copy: float32 norms of short pieces of each
    channel combined in float64; mean ||b_i||^2 is the sum of b's per-channel sums.
    ``m2x``: mean ||a_i||^2 when a caller has it (the same formula on ``fa``, e.g. from
    the step before).
    """
    n = fa.shape[0]
    positions = fa.shape[1] // channels
    # float32 norms of pieces of at most 16 values, squared and summed in float64: each
    # norm rounds once, so the sums' error averages out over many pieces. U3's eps part
    # 2 d' - m2x - m2y is a difference of near-equal sums: on the 64 x 56 x 56 layer of
    # tests/test_precision_formulas.py this is within 9e-5 of it, one norm per channel
    # 6.6e-3 off, one per row 150 % (the test checks that order)
    piece = max(c for c in range(1, 17) if positions % c == 0)

    def channel_sq(t: torch.Tensor) -> torch.Tensor:  # (n, C): ||t_ic||^2 in float64
        pieces = t.reshape(n, channels, positions // piece, piece)
        return torch.linalg.vector_norm(pieces, dim=3).double().square().sum(dim=2)

    column_sq = channel_sq(fb).sum(dim=0)
    m2y = float(column_sq.sum()) / n
    if m2x is None:
        m2x = float(channel_sq(fa).sum()) / n
    # ||a_i - b_i|| in row blocks through one buffer: no n x d difference allocated
    step = block_rows(fa.shape[1], fa.device)
    buf = torch.empty((min(step, n), fa.shape[1]), dtype=fa.dtype, device=fa.device)
    gap = torch.zeros((), dtype=torch.float64, device=fa.device)
    for lo in range(0, n, step):
        diff = torch.sub(fa[lo : lo + step], fb[lo : lo + step], out=buf[: min(step, n - lo)])
        gap += torch.linalg.vector_norm(diff, dim=1).double().square().sum()
    return m2x, m2y, float(gap) / n, column_sq


def _u3_stored_terms(
    xa: torch.Tensor,
    xb: torch.Tensor,
    weights: tuple[torch.Tensor | None, torch.Tensor | None],
    biases: tuple[torch.Tensor | None, torch.Tensor | None],
    precise: bool = True,
    memo: tuple[dict, dict, Any] | None = None,
) -> tuple[float, float, float, float]:
    """The terms of U3 (core, eps, gamma change, beta change) from stored normalized values.

    ``xa``, ``xb`` are a BatchNorm layer's normalized values before and after the step,
    shape (n, C, *spatial) in their storage dtype; ``weights`` and ``biases`` the
    per-channel (C,) parameters (None: 1 and 0). The same formula as :func:`_u3_parts`
    on the flattened float64 values, but accumulated in float64 over row blocks
    converted one at a time: no float64 copy of the layer, one pass over each side.
    ``precise=False`` (the float32 analysis) sums float32 norms instead: within ~1e-6
    relative of the float64 sums; there ``memo`` = (cache of xa, cache of xb, key) keeps
    each side's mean squared norm (a monitor's capture reused as the next step's "before"
    brings it). U3 is the sum of the four terms, U3_tight the sum without the eps term
    (:func:`_u3_tight`).
    """
    n, channels = xa.shape[0], xa.shape[1]
    fa, fb = xa.reshape(n, -1), xb.reshape(n, -1)
    d = fa.shape[1]
    f64 = {"dtype": torch.float64, "device": xa.device}
    if not precise and fa.dtype == torch.float32:
        known = None if memo is None else memo[0].get(memo[2])
        m2x_, m2y_, gap_sq, column_sq = _u3_float32_sums(fa, fb, channels, known)
        if memo is not None:
            memo[0].setdefault(memo[2], m2x_)
            memo[1].setdefault(memo[2], m2y_)
    else:
        m2x, m2y, gap = (torch.zeros((), **f64) for _ in range(3))
        column_sq = torch.zeros(channels, **f64)
        step = block_rows(d, xa.device)
        for lo in range(0, n, step):
            # copies (also of float64 storage): the block is changed in place below
            a = fa[lo : lo + step].to(torch.float64, copy=True)
            b = fb[lo : lo + step].to(torch.float64, copy=True)
            m2x += torch.linalg.vector_norm(a).square()
            m2y += torch.linalg.vector_norm(b).square()
            # the RMS gap from the differences (U3_tight's core), not from the dot product:
            # no cancellation of the near-d sums for small steps
            gap += torch.linalg.vector_norm(a.sub_(b)).square()
            column_sq += b.square_().reshape(b.shape[0], channels, -1).sum(dim=(0, 2))
        m2x_, m2y_, gap_sq = float(m2x) / n, float(m2y) / n, float(gap) / n
    # 2 (d' - c) = (2 d' - m2x - m2y) + mean ||x_hat - y_hat||^2, split into its two roots
    rms, eps_part = _u3_split(m2x_, m2y_, gap_sq, d)

    def vec(t: torch.Tensor | None, fill: float) -> torch.Tensor:
        return torch.full((channels,), fill, **f64) if t is None else t.to(**f64).reshape(-1)

    wa, wb = vec(weights[0], 1.0), vec(weights[1], 1.0)
    ba, bb = vec(biases[0], 0.0), vec(biases[1], 0.0)
    scale_change = math.sqrt(max(float(torch.dot((wa - wb).square(), column_sq)) / n, 0.0))
    positions = d // channels  # a per-channel shift moves every position of its channel
    shift_change = math.sqrt(positions * float((ba - bb).square().sum()))
    g = float(wa.abs().max())
    return g * rms, g * eps_part, scale_change, shift_change


def _u4(a: _Norm, b: _Norm) -> float:
    """Pure unitization: k (max|g a| + max|g' a'|) + ||b - b'||  (= 2|alpha| k when held)."""
    assert a.alpha is not None and b.alpha is not None
    ra = float((a.weight * a.alpha).abs().max()) * a.k
    rb = float((b.weight * b.alpha).abs().max()) * b.k
    return ra + rb + float(torch.linalg.vector_norm(a.bias - b.bias))


def _u5(a: _Norm, b: _Norm) -> float:
    """The authors' layer, with the terms for a change of alpha, gamma and beta.

    With A_i = x_hat_i (alpha/s_i + 1 - alpha) and the same with primes after the step:
    A_i - A'_i = alpha (x_hat_i/s_i - y_hat_i/s'_i) + (1 - alpha)(x_hat_i - y_hat_i)
                 + (alpha - alpha')(y_hat_i/s'_i - y_hat_i),
    and the output gap is g (A_i - A'_i) + (g - g') A'_i + (b - b').
    """
    assert a.alpha is not None and b.alpha is not None
    k = max(a.k, b.k)
    gap = a.x_hat - b.x_hat
    core = (
        2.0 * k * float(a.alpha.abs().max())
        + float((1.0 - a.alpha).abs().max()) * math.sqrt(_mean_sq_norm(gap))
        + float((a.alpha - b.alpha).abs().max()) * (k + math.sqrt(_mean_sq_norm(b.x_hat)))
    )
    a_after = b.x_hat * (b.alpha * torch.reciprocal(_norms_over_k(b)) + 1.0 - b.alpha)
    scale_change = math.sqrt(_mean_sq_norm((a.weight - b.weight) * a_after))
    shift_change = float(torch.linalg.vector_norm(a.bias - b.bias))
    return float(a.weight.abs().max()) * core + scale_change + shift_change


def _norms_over_k(st: _Norm) -> torch.Tensor:
    """s_i = sqrt(||x_hat_i||^2 / k^2 + eps), so that ||x_hat_i / s_i|| <= k."""
    if st.s is not None:
        return st.s
    return torch.sqrt((st.x_hat * st.x_hat).sum(dim=1, keepdim=True) / st.k**2 + st.eps)


def _check_unitized(x: torch.Tensor, st: _Norm, label: str, rtol: float) -> None:
    """U4 assumes every output has norm <= max|g a| k around the shift; refuse otherwise."""
    assert st.alpha is not None
    radius = float((st.weight * st.alpha).abs().max()) * st.k
    norms = torch.linalg.vector_norm(x - st.bias, dim=1)
    worst = float(norms.max())
    if worst > radius * (1 + rtol) + 1e-9:
        raise ICSValueError(
            f"`{label}` samples are not unitized: the largest ||{label}_i - bias|| is "
            f"{worst:.6g} > max|weight * alpha| * k = {radius:.6g}; check `alpha` and `k`, "
            "or use form='embedded' for the authors' layer"
        )


def bounds(
    x: ArrayLike,
    y: ArrayLike,
    *,
    before: NormState | None = None,
    after: NormState | None = None,
    n_projections: int = 128,
    seed: int = 0,
    coordinate_axes: bool = True,
    rtol: float = RTOL,
) -> dict[str, float]:
    """Evaluate the theory's bounds of W1 between two paired samples.

    Parameters
    ----------
    x, y : array_like, shape (n, d) and (m, d)
        Layer outputs before and after the step (numpy or torch, any device; 1-D
        means d = 1). The upper bounds need paired rows (n == m, row i from the same
        probe input at both steps); with n != m only L1..L3 are returned.
    before, after : NormState, optional
        The normalization layer's internals at both steps. Given, the bound of that
        layer is added: U3 and U3_tight for ``form="batchnorm"``, U4 for
        ``form="unitization"``, U5 for ``form="embedded"`` (and U4 too when alpha == 1
        at both steps, where the authors' layer is a pure unitization).
    n_projections : int
        Random directions tried by L3 (POT's name); L3 also tries every coordinate
        axis (``coordinate_axes``) and the direction of the mean gap, so L3 >= L1 and
        L3 >= the ``max_sliced`` value of :func:`ics_toolkit.wasserstein` with the
        same ``seed`` and ``n_projections``. 0 tries no random direction (a caller
        that computed ``max_sliced`` already takes the larger of the two).
    seed : int
        Seed of L3's random directions (a private generator; global RNGs untouched).
    coordinate_axes : bool
        Whether L3 includes the d coordinate axes (the per-channel 1-D distances).
    rtol : float
        Tolerance of the premise check of U4 (outputs of norm <= |alpha| k).

    Returns
    -------
    dict of str to float
        ``L1``, ``L2``, ``L3`` always; ``U1`` (mean paired distance) and ``U2``
        (root mean square paired distance) when n == m; ``U3``/``U3_tight``/``U4``/``U5``
        as above. ``U3`` is the paper's form, ``max|g| sqrt(2 d'(1 - rho))`` with
        ``d' = max(d, m2(x_hat), m2(y_hat))``, plus the gamma- and beta-change terms;
        ``U3_tight`` (<= U3) the same with the measured second moments,
        ``max|g| sqrt(m2(x_hat) + m2(y_hat) - 2c)``: the difference is the eps part
        (docs/theory.md, U3). Lower bounds are <= the exact W1 and upper bounds >= it;
        check a set of values with :func:`check_order`.

    Examples
    --------
    A pure translation: the exact W1 is the length of the shift, and so are L1 and U1.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 3))
    >>> b = bounds(x, x + np.array([3.0, 4.0, 0.0]))
    >>> round(b["L1"], 9), round(b["U1"], 9), round(b["U2"], 9)
    (5.0, 5.0, 5.0)
    """
    tx, ty = as_pair(x, y)
    n, d = tx.shape
    if tx.shape[0] != ty.shape[0] and (before is not None or after is not None):
        raise ICSValueError(
            f"U3..U5 need paired samples (row i of `x` and `y` from the same probe input), "
            f"got {tx.shape[0]} and {ty.shape[0]} rows"
        )
    if (before is None) != (after is None):
        raise ICSValueError("pass both `before` and `after` NormState objects, or neither")
    n_projections = _checks.integer(n_projections, "n_projections", 0)
    seed = _checks.seed(seed)
    norms = None
    if before is not None and after is not None:
        norms = _prepare(before, after, n, d, tx)
        if norms[0].form == "unitization":
            _check_unitized(tx, norms[0], "x", rtol)
            _check_unitized(ty, norms[1], "y", rtol)
    # extreme scales: the sample bounds on x, y times 2^-e, scaled back (exact); the
    # normalization bounds come from the NormStates, not from x and y
    e = _scaling.exponent(tx, ty)
    x_s, y_s = _scaling.scale(tx, e), _scaling.scale(ty, e)
    out = _bounds(x_s, y_s, norms, n_projections, seed, coordinate_axes=coordinate_axes)
    for key in (*_vocab.THEORY_LOWER, "U1", "U2"):
        if key in out:
            out[key] = _scaling.unscale(out[key], e, f"bound {key} of `x` and `y`")
    return out


def _lower(
    tx: torch.Tensor,
    ty: torch.Tensor,
    n_projections: int,
    seed: int,
    coordinate_axes: bool,
    gap: torch.Tensor | None = None,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    column_abs_gap: torch.Tensor | None = None,
    norm_gap: float | None = None,
) -> dict[str, float]:
    """L1, L2 and L3 of checked samples (the kernel).

    ``gap`` (the mean gap), ``row_norms``, ``column_abs_gap`` (mean_i |x_ik - y_ik|) and
    ``norm_gap`` (mean_i ||x_i|| - mean_i ||y_i||) are reused when a caller has them.
    """
    from ics_toolkit import _sliced
    from ics_toolkit.distances import _directions

    out: dict[str, float] = {}
    if gap is None:
        gap = tx.mean(dim=0) - ty.mean(dim=0)
    out["L1"] = float(torch.linalg.vector_norm(gap))
    if norm_gap is None:
        if row_norms is None:
            row_norms = (torch.linalg.vector_norm(tx, dim=1), torch.linalg.vector_norm(ty, dim=1))
        norm_gap = float(row_norms[0].mean() - row_norms[1].mean())
    out["L2"] = abs(norm_gap)
    dirs = [(gap / gap.norm()).unsqueeze(0).to(tx.dtype)] if out["L1"] > 0 else []
    if n_projections:
        dirs.append(_directions(tx.shape[1], n_projections, seed, tx.device, tx.dtype).T)
    l3 = float(_sliced.projected_group([tx], [ty], torch.cat(dirs))[0].max()) if dirs else 0.0
    if coordinate_axes:
        l3 = _best_axis(tx, ty, l3, column_abs_gap)
    # the gap direction's W1 is >= L1 exactly; rounding (~1e-7 in float32) must not
    # put the max of the directions below the bound it contains
    out["L3"] = max(l3, out["L1"])
    return out


#: Columns sorted at a time by :func:`_best_axis`.
_AXIS_CHUNK = 256


def _best_axis(
    tx: torch.Tensor,
    ty: torch.Tensor,
    start: float,
    column_abs_gap: torch.Tensor | None = None,
) -> float:
    """The max over the coordinate axes k of the 1-D W1 of column k (or ``start`` if larger).

    For paired rows every column's W1 is at most ``mean_i |x_ik - y_ik|`` (the cost
    of the identity coupling of that column). Columns are
    sorted and measured in order of the upper value, and the search stops once no
    remaining column can beat the best measured one: the same maximum as measuring
    every column (the winning column is always measured, by the same kernel), at the
    cost of a few columns when the per-column shifts are translations.
    """
    from ics_toolkit import _sliced

    d = tx.shape[1]
    if tx.shape[0] != ty.shape[0]:  # unpaired: no cheap upper value, measure every column
        return max(start, float(_sliced.coordinate_group([tx], [ty], tx.dtype)[0].max()))
    upper = _differences(tx, ty).column_abs_gap if column_abs_gap is None else column_abs_gap
    best = start
    # the largest upper values a chunk at a time (top-k, O(d) each), not a sort of all d:
    # the search usually stops after a chunk or two
    remaining = upper.clone()
    for _ in range(0, d, _AXIS_CHUNK):
        values, cols = torch.topk(remaining, min(_AXIS_CHUNK, d))
        if float(values[0]) <= best:
            break
        cols = cols[values > best]  # the others cannot beat the best measured one
        w1 = _sliced.coordinate_group([tx[:, cols]], [ty[:, cols]], tx.dtype)[0]
        best = max(best, float(w1.max()))
        remaining[cols] = -math.inf
    return best


class _Paired(NamedTuple):
    """What one pass over x - y of paired samples gives (see :func:`_differences`)."""

    dist: torch.Tensor  # (n,) ||x_i - y_i||
    column_abs_gap: torch.Tensor  # (d,) mean_i |x_ik - y_ik|
    gap: torch.Tensor  # (d,) mean_i (x_ik - y_ik) = mean(x) - mean(y)
    norm_gap: float  # mean_i ||x_i|| - mean_i ||y_i||


def _differences(
    tx: torch.Tensor, ty: torch.Tensor, row_norms: tuple[torch.Tensor, torch.Tensor] | None = None
) -> _Paired:
    """One pass over x - y of paired samples, in row blocks (:mod:`ics_toolkit._blocks`).

    The mean gap and the gap of the mean row norms (L1's and L2's inputs) come from the
    differences, not from two means of nearly equal numbers: for a small step the
    difference of float32 means (or float32 row norms) of two samples of norm ``||x||``
    is off by about ``u ||x||``, as large as the W1 it would be compared with (L1 or L2
    > exact). ``||x_i|| - ||y_i|| = (<x_i - y_i, x_i> + <x_i - y_i, y_i>) / (||x_i|| +
    ||y_i||)`` has only the relative error of the differences (two dot products read
    the block again instead of writing x + y into a buffer: one write pass fewer).
    ``row_norms`` reuse a caller's.
    """
    n, d = tx.shape
    rows = block_rows(d, tx.device)
    dist = torch.empty(n, dtype=tx.dtype, device=tx.device)
    sq_gap = torch.empty(n, dtype=tx.dtype, device=tx.device)  # ||x_i||^2 - ||y_i||^2
    column = torch.zeros(d, dtype=tx.dtype, device=tx.device)
    signed = torch.zeros(d, dtype=tx.dtype, device=tx.device)
    buf = torch.empty((min(rows, n), d), dtype=tx.dtype, device=tx.device)
    for i in range(0, n, rows):
        k = min(rows, n - i)
        bx, by = tx[i : i + rows], ty[i : i + rows]
        diff = torch.sub(bx, by, out=buf[:k])
        dist[i : i + rows] = torch.linalg.vector_norm(diff, dim=1)
        sq_gap[i : i + rows] = torch.linalg.vecdot(diff, bx) + torch.linalg.vecdot(diff, by)
        if k == 1:  # a sum over one (wide) row is the row: no reduction kernel, same bits
            signed += diff[0]
            column += diff[0].abs_()
        else:
            signed += diff.sum(dim=0)
            column += diff.abs_().sum(dim=0)
    if row_norms is None:
        row_norms = (torch.linalg.vector_norm(tx, dim=1), torch.linalg.vector_norm(ty, dim=1))
    norm_sum = row_norms[0] + row_norms[1]
    # rows that are both zero have no norm gap (and 0 / 0 must not make a NaN)
    per_row = torch.where(norm_sum > 0, sq_gap / norm_sum.clamp_min(torch.finfo(tx.dtype).tiny), 0)
    return _Paired(dist, column / n, signed / n, float(per_row.double().mean()))


def _paired_upper(
    tx: torch.Tensor, ty: torch.Tensor, dist: torch.Tensor | None = None
) -> dict[str, float]:
    """U1 and U2 of paired checked samples; ``dist`` reuses the row distances ||x_i - y_i||."""
    n = tx.shape[0]
    if dist is None:
        dist = _differences(tx, ty).dist
    return {
        "U1": float(dist.mean()),
        "U2": float(torch.linalg.vector_norm(dist)) / math.sqrt(n),
    }


def _norm_bounds(a: _Norm, b: _Norm) -> dict[str, float]:
    """U3 and U3_tight / U4 / U5 of prepared (checked) norm states."""
    if a.form == "batchnorm":
        parts = _u3_parts(a, b)
        return {"U3": sum(parts), "U3_tight": _u3_tight(parts)}
    if a.form == "unitization":
        return {"U4": _u4(a, b)}
    out = {"U5": _u5(a, b)}
    assert a.alpha is not None and b.alpha is not None
    if bool((a.alpha == 1).all()) and bool((b.alpha == 1).all()):
        out["U4"] = _u4(a, b)
    return out


def _bounds(
    tx: torch.Tensor,
    ty: torch.Tensor,
    norms: tuple[_Norm, _Norm] | None,
    n_projections: int,
    seed: int,
    *,
    coordinate_axes: bool = True,
    gap: torch.Tensor | None = None,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    differences: _Paired | None = None,
) -> dict[str, float]:
    """Every bound of checked samples (the kernel behind :func:`bounds`).

    ``gap`` (mean(x) - mean(y)), ``row_norms`` and ``differences`` (what
    :func:`_differences` returns for paired rows) reuse what a caller computed; for
    paired rows the mean gap and the norm gap come from the differences.
    """
    paired = None
    if tx.shape[0] == ty.shape[0]:
        paired = differences or _differences(tx, ty, row_norms)
    out = _lower(
        tx,
        ty,
        n_projections,
        seed,
        coordinate_axes,
        gap if paired is None else paired.gap,
        row_norms,
        None if paired is None else paired.column_abs_gap,
        None if paired is None else paired.norm_gap,
    )
    if paired is not None:
        out.update(_paired_upper(tx, ty, paired.dist))
    if norms is not None:
        out.update(_norm_bounds(*norms))
    return out
