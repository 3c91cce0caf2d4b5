r"""The Earth Mover (Wasserstein-1) engine: arrays in, a distance out.

Every function takes samples as numpy arrays or torch tensors on any device, one
sample per row: ``x`` of shape (n, d) and ``y`` of shape (m, d) (a 1-D array means
d = 1). Each row has weight 1/n (resp. 1/m). Distances are in the units of the
samples (Euclidean norm of a row difference), and are computed in float64 unless an
option asks otherwise.

.. math::

    W_1(P, Q) = \min_{\gamma \in \Pi(P, Q)} \mathbb{E}_\gamma \lVert X - Y \rVert_2
              = \sup_{\lVert f \rVert_{Lip} \le 1} \mathbb{E}_P f - \mathbb{E}_Q f

Methods, and the order they obey on the same samples (up to float error, see
:data:`ORDER_RTOL`)::

    sliced <= max_sliced <= exact <= paired,   sinkhorn <= exact <= (1 + rtol) sinkhorn

``exact``
    The empirical W1, solved as a transport problem by POT's network simplex
    (``ot.emd2``) on the float64 Euclidean cost matrix. O(n m) memory, roughly
    O(n^2 m) time: fine up to a few thousand samples. For d = 1 it is computed by
    sorting instead (the same number, no linear program).
``paired``
    mean_i ||x_i - y_i||: the cost of the coupling that matches row i to row i
    (requires n == m). Feasible, hence an upper bound of ``exact``: the theory's
    bound U1 when row i of ``x`` and of ``y`` come from the same probe input.
``sliced`` / ``max_sliced``
    Mean / max over L random unit directions of the exact 1-D W1 of the projected
    samples. Every projection is 1-Lipschitz, so both are *lower bounds* of W1. In
    high dimension they are far below W1 (see :func:`wasserstein`): use them as
    trend signals, not as W1 estimates.
``sinkhorn``
    W1 certified by entropic transport: the lower end of an interval around ``exact``
    narrower than ``rtol`` (default 0.5 %), in torch on the samples' device (see
    :func:`wasserstein`).
``per_coordinate``
    The exact 1-D W1 of each column (a vector of length d): the per-channel view.

Input checks raise :class:`~ics_toolkit.errors.ICSValueError` or
:class:`~ics_toolkit.errors.ICSTypeError` naming the argument. The engine never
touches the global random number generators: random directions and random splits
come from a private ``torch.Generator`` on the samples' device, seeded by ``seed``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ics_toolkit import _checks, _entropic, _scaling, _sliced, _vocab
from ics_toolkit._arrays import ArrayLike, as_pair, as_samples, check_finite_values, to_tensor
from ics_toolkit._pot import import_ot
from ics_toolkit.errors import ICSTypeError, ICSValueError, SolverError

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "METHODS",
    "ORDER_RTOL",
    "columnwise_w1",
    "default_num_iter_max",
    "projected_w1",
    "random_directions",
    "sampling_floor",
    "wasserstein",
    "wasserstein_many",
]

#: The valid ``method`` names (spelled in :mod:`ics_toolkit._vocab`).
METHODS: tuple[str, ...] = _vocab.METHODS

#: Relative tolerance of the estimator order ``sliced <= max_sliced <= exact <= paired``.
#: ``lo <= hi`` is taken to hold when ``lo <= hi + ORDER_RTOL * (|hi| + scale)``, where
#: ``scale`` is the largest absolute coordinate of the samples: the rounding error of a
#: float64 distance grows with the size of the coordinates, not with the distance
#: itself (two nearly equal large samples have a tiny W1 computed from large numbers).
#: Measured: the worst normalized violation over 1500 random float64 cases (scales
#: 1e-3 .. 1e3, translations down to 1e-12 of the scale, permutations, ties) is 2e-16;
#: 1e-9 leaves room for other BLAS and summation orders without hiding a real one.
ORDER_RTOL: float = 1e-9

#: Default ``memory_limit`` (bytes) of the ``exact`` and ``sinkhorn`` methods: 2 GiB,
#: about n = m = 6600 samples.
DEFAULT_MEMORY_LIMIT: int = 2 * 1024**3

# Measured peak memory per cell of the n x m problem, in bytes (n = m = 2000 and 3000,
# POT 0.9.7): ``ot.emd2`` needs 33 on top of the float64 cost matrix (8) -> 41; the
# certified Sinkhorn (torch): the float64 cost, one working buffer and a temporary of the
# rounded plan's potentials, 24, plus the cost matrix's own temporaries -> about 40.
# Rounded up to leave a margin.
_EXACT_BYTES_PER_CELL = 48
_SINKHORN_BYTES_PER_CELL = 48

_EMD_STATUS = {0: "infeasible", 1: "optimal", 2: "unbounded", 3: "max_iter_reached"}
# POT's own messages for a non-optimal emd2 result: we read `result_code` instead, so
# the message (shown once per code location by Python's warning filter) is muted.
_POT_EMD_WARNINGS = ("numItermax reached", "Problem infeasible", "Problem unbounded")

_FLOAT_OPTION = {"dtype": torch.float64}
_OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "exact": {"numItermax": None, "on_failure": "raise", "memory_limit": DEFAULT_MEMORY_LIMIT},
    "sinkhorn": {
        "rtol": 5e-3,
        "reg": None,
        "scaling": 0.5,
        "numItermax": 10_000,
        "on_failure": "raise",
        "memory_limit": DEFAULT_MEMORY_LIMIT,
    },
    "paired": dict(_FLOAT_OPTION),
    "sliced": dict(_FLOAT_OPTION),
    "max_sliced": dict(_FLOAT_OPTION),
    "per_coordinate": dict(_FLOAT_OPTION),
}
_BATCHED = _vocab.BATCHED_METHODS

Value = float | np.ndarray


# --------------------------------------------------------------------------- checks
def _parse_options(method: str, options: dict[str, Any], log: bool) -> dict[str, Any]:
    allowed = _OPTION_DEFAULTS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise ICSTypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method={method!r}; "
            f"valid options for this method: {valid}"
        )
    opts = {**allowed, **options}
    if "dtype" in opts:
        dt = opts["dtype"]
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ICSTypeError(
                f"`dtype` must be a floating torch dtype (e.g. torch.float64) or None "
                f"(keep the inputs' dtype), got {dt!r}"
            )
    if "numItermax" in opts and opts["numItermax"] is not None:
        opts["numItermax"] = _checks.integer(opts["numItermax"], "numItermax", 1)
    if "memory_limit" in opts:
        opts["memory_limit"] = _checks.positive_number(opts["memory_limit"], "memory_limit")
    for name in ("reg", "rtol", "scaling"):
        if opts.get(name, 0) is not None and name in opts:
            opts[name] = _checks.positive_number(opts[name], name)
    if "scaling" in opts and opts["scaling"] >= 1.0:
        raise ICSValueError(
            f"`scaling` (the ratio of successive eps) must be below 1, got {opts['scaling']!r}"
        )
    if "on_failure" in opts:
        if opts["on_failure"] not in ("raise", "flag"):
            raise ICSValueError(
                f"`on_failure` must be 'raise' or 'flag', got {opts['on_failure']!r}"
            )
        if opts["on_failure"] == "flag" and not log:
            raise ICSValueError(
                "`on_failure='flag'` needs log=True: the solver status is returned in the "
                "log, so a non-optimal value is never returned without it"
            )
    return opts


def _checked_call(
    method: object, log: object, options: dict[str, Any], n_projections: object, seed: object
) -> tuple[str, bool, dict[str, Any], int, int]:
    """The arguments every public estimator takes, checked once at the boundary."""
    method = _checks.method(method)
    log = _checks.boolean(log, "log")
    opts = _parse_options(method, options, log)
    return method, log, opts, _checks.integer(n_projections, "n_projections", 1), _checks.seed(seed)


def _convert_pair(
    x: ArrayLike,
    y: ArrayLike,
    names: tuple[str, str],
    *,
    dtype: torch.dtype | None,
    check_finite: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """as_pair, plus: a numpy array next to a tensor follows the tensor's device."""
    x_is_t, y_is_t = isinstance(x, torch.Tensor), isinstance(y, torch.Tensor)
    if x_is_t and y_is_t and x.device != y.device:
        raise ICSValueError(
            f"`{names[0]}` is on {x.device} but `{names[1]}` is on {y.device}; "
            "move both to one device"
        )
    if x_is_t and not y_is_t:
        y = to_tensor(y, names[1]).to(x.device)
    elif y_is_t and not x_is_t:
        x = to_tensor(x, names[0]).to(y.device)
    return as_pair(x, y, names=names, dtype=dtype, check_finite=check_finite)


#: Log entries that are lengths (in the samples' units): rescaled with the value.
_LOG_LENGTHS = ("per_direction", "std_error", "lower", "upper", "reg_absolute", "diameter")


def _compute_dtype(method: str, opts: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    """The dtype ``method`` computes in, for floating samples of ``dtype``."""
    if method in ("exact", "sinkhorn"):
        return torch.float64
    return opts["dtype"] or dtype


def _to_safe_scale(
    x: ArrayLike, y: ArrayLike, names: tuple[str, str], method: str, opts: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, int | np.ndarray]:
    """Both samples in the dtype ``method`` computes in, times a power of two, and its e.

    One ``2^-e`` for both (:mod:`._scaling`), chosen for that dtype; ``per_coordinate``
    (a length per column) one ``2^-e[k]`` per column.
    """
    tx, ty = _convert_pair(x, y, names, dtype=None, check_finite=False)
    (tx, ty), e = _safe_scale(method, opts, tx, ty)
    return tx, ty, e


def _safe_scale(
    method: str, opts: Mapping[str, Any], *samples: torch.Tensor
) -> tuple[list[torch.Tensor], int | np.ndarray]:
    """``samples`` times one power of two, in the dtype ``method`` computes in, and e.

    One ``2^-e`` for all (one per column for ``per_coordinate``): see :func:`_to_safe_scale`.
    """
    dtype = _compute_dtype(method, opts, samples[0].dtype)
    # scaled in the samples' dtype (exact), then converted: float64 samples at 1e100
    # computed in float32 must not pass through a float32 copy of themselves
    if method == "per_coordinate":
        e: int | np.ndarray = _scaling.column_exponents(*samples, dtype=dtype)
        scaled = [_scaling.scale_columns(t, e) for t in samples]
    else:
        e = _scaling.exponent(*samples, dtype=dtype)
        scaled = [_scaling.scale(t, e) for t in samples]
    return [t.to(dtype) for t in scaled], e


def _from_safe_scale(
    value: Value,
    info: dict[str, Any],
    e: int | np.ndarray,
    method: str,
    log: bool,
    names: tuple[str, str] = ("x", "y"),
) -> tuple[Value, dict[str, Any]]:
    """The value and the log's lengths of samples scaled by ``2^-e``, in the samples' units.

    The log's lengths only when the log is returned (``log``): a diameter float64
    cannot hold must not refuse a distance it can.
    """
    what = f"`{method}` distance of `{names[0]}` and `{names[1]}`"
    if isinstance(e, np.ndarray):  # per_coordinate: one power per column, no lengths in the log
        return _scaling.unscale_columns(value, e, what), info  # type: ignore[arg-type]
    if e == 0:
        return value, info
    value = _scaling.unscale(value, e, what)
    for key in (*_LOG_LENGTHS, "ci_low", "ci_high"):
        if log and info.get(key) is not None:
            info[key] = _scaling.unscale(info[key], e, f"log entry {key!r} of the {what}")
    info["rescaled_by"] = f"2^{-e}"
    return value, info


def _raise_non_finite(
    bad: Sequence[tuple[torch.Tensor, str]], what: str, dtype: torch.dtype
) -> None:
    """Name the argument holding NaN/Inf (a slow pass, taken only once a result is bad)."""
    for t, name in bad:
        check_finite_values(t, name)
    names = " or ".join(f"`{name}`" for _, name in bad)
    raise ICSValueError(
        f"the {what} of {names} overflow {dtype} although the samples are finite; "
        "rescale the samples or compute in float64 (dtype=torch.float64)"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------- public helpers
def default_num_iter_max(n: int, m: int) -> int:
    """Default ``numItermax`` of the ``exact`` method for an n x m problem.

    POT's own default (100000) stops the network simplex before optimality from
    about n = m = 2000 (independent Gaussian samples, d = 64, POT 0.9.7). The
    iterations needed, measured for n = m = 256 .. 3000 and d = 2 and 64, stay below
    0.08 n m, so the default is ``max(100000, n * m)``: a cap more than ten times
    above the need, reached only by a degenerate problem.

    Parameters
    ----------
    n, m : int
        Numbers of samples of ``x`` and ``y``.

    Returns
    -------
    int
        The iteration cap passed to ``ot.emd2``.

    Examples
    --------
    >>> default_num_iter_max(100, 100), default_num_iter_max(2000, 3000)
    (100000, 6000000)
    """
    return max(100_000, int(n) * int(m))


def random_directions(
    d: int,
    n_projections: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Random unit directions in R^d, drawn from a private generator on ``device``.

    The directions are Gaussian vectors (drawn in float64, then normalized and cast
    to ``dtype``), i.e. uniform on the unit sphere. The result depends only on
    ``(d, n_projections, seed, device type)``, never on the global RNG, whose state
    is left untouched; ``dtype`` only rounds the same directions.

    Parameters
    ----------
    d : int
        Dimension of the samples.
    n_projections : int
        Number L of directions.
    seed : int
        Seed of the private ``torch.Generator`` (>= 0).
    device : torch.device or str, optional
        Where to draw and return them (default CPU). CUDA generators give other
        streams than the CPU one, so directions differ between device types.
    dtype : torch.dtype
        Floating dtype of the result (default float64).

    Returns
    -------
    torch.Tensor
        Shape (d, L): column k is a unit vector.

    Examples
    --------
    >>> dirs = random_directions(3, 5, seed=0)
    >>> tuple(dirs.shape), bool(torch.allclose(dirs.norm(dim=0), torch.ones(5, dtype=dirs.dtype)))
    ((3, 5), True)
    """
    d = _checks.integer(d, "d", 1)
    n_projections = _checks.integer(n_projections, "n_projections", 1)
    seed = _checks.seed(seed)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ICSTypeError(f"`dtype` must be a floating torch dtype, got {dtype!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _directions(d, n_projections, seed, device, dtype).clone()


@functools.lru_cache(maxsize=8)
def _directions(
    d: int, n_projections: int, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Cached :func:`random_directions` (read-only): a monitor draws the same ones each step.

    Drawing d x L normals costs as much as a large part of the projection itself
    (d = 16384, L = 128: ~20 ms on a CPU), so every (d, L, seed, device, dtype) is drawn
    once. At most 8 are kept (8 * d * L values).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    z = torch.randn((n_projections, d), generator=gen, device=device, dtype=torch.float64)
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z.to(dtype).T


def projected_w1(x: ArrayLike, y: ArrayLike, directions: torch.Tensor) -> torch.Tensor:
    """Exact 1-D W1 of the projections of ``x`` and ``y`` on each given direction.

    For a unit direction theta, ``W1(<theta, x>, <theta, y>) <= W1(x, y)`` (the
    projection is 1-Lipschitz), so every entry is a lower bound of the exact W1.

    Parameters
    ----------
    x : array_like, shape (n, d)
        Samples (numpy or torch; a numpy array is moved to ``directions``' device).
    y : array_like, shape (m, d)
        Samples with the same d.
    directions : torch.Tensor, shape (d, L)
        Directions as columns (unit columns for a W1 lower bound, e.g. from
        :func:`random_directions`). Its dtype is the computation dtype.

    Returns
    -------
    torch.Tensor
        Shape (L,), on ``directions``' device and dtype: entry k is the 1-D W1 along
        column k, in the units of the samples.

    Examples
    --------
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    >>> projected_w1(x, x + torch.tensor([3.0, 4.0], dtype=torch.float64),
    ...              torch.eye(2, dtype=torch.float64)).tolist()
    [3.0, 4.0]
    """
    if not isinstance(directions, torch.Tensor):
        raise ICSTypeError(
            f"`directions` must be a torch.Tensor of shape (d, L), got {type(directions).__name__}"
        )
    if directions.ndim != 2 or directions.shape[1] == 0 or not directions.is_floating_point():
        raise ICSValueError(
            "`directions` must be a floating tensor of shape (d, L) with L >= 1, got "
            f"shape {tuple(directions.shape)} and dtype {directions.dtype}"
        )
    check_finite_values(directions, "directions")
    if not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor):
        x = to_tensor(x, "x").to(directions.device)
    tx, ty = _convert_pair(x, y, ("x", "y"), dtype=None, check_finite=False)
    if tx.device != directions.device:
        raise ICSValueError(
            f"`x` and `y` are on {tx.device} but `directions` is on {directions.device}; "
            "move them to one device"
        )
    if directions.shape[0] != tx.shape[1]:
        raise ICSValueError(
            f"`directions` has {directions.shape[0]} rows but the samples have d = "
            f"{tx.shape[1]} columns; pass directions of shape (d, L)"
        )
    # extreme scales: projected times 2^-e (exact), scaled back
    e = _scaling.exponent(tx, ty, dtype=directions.dtype)
    sx, sy = _scaling.scale(tx, e), _scaling.scale(ty, e)
    vals = _sliced.projected_group([sx], [sy], directions.T)[0]
    if not bool(torch.isfinite(vals).all()):
        _raise_non_finite([(tx, "x"), (ty, "y")], "projections", directions.dtype)
    return _scaling.unscale(vals, e, "projected W1 of `x` and `y`")


def columnwise_w1(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """Exact 1-D W1 between each column of ``a`` and the same column of ``b``.

    The same number as ``scipy.stats.wasserstein_distance(a[:, k], b[:, k])`` for
    every column k, computed for all columns at once by sorting (no cost matrix).

    Parameters
    ----------
    a : array_like, shape (n, L)
        n values per column (numpy or torch; 1-D means L = 1).
    b : array_like, shape (m, L)
        m values per column, same L and device.

    Returns
    -------
    torch.Tensor
        Shape (L,), on the inputs' device, in their floating dtype (integer inputs
        are cast to float64).

    Examples
    --------
    >>> columnwise_w1(torch.tensor([[0.0, 1.0], [2.0, 1.0]]),
    ...               torch.tensor([[1.0, 1.0], [3.0, 5.0]])).tolist()
    [1.0, 2.0]
    """
    ta, tb = _convert_pair(a, b, ("a", "b"), dtype=None, check_finite=False)
    # extreme scales: each column times its own 2^-e[k] (exact), scaled back
    ek = _scaling.column_exponents(ta, tb)
    sa, sb = _scaling.scale_columns(ta, ek), _scaling.scale_columns(tb, ek)
    vals = _sliced.coordinate_group([sa], [sb], ta.dtype)[0]
    if not bool(torch.isfinite(vals).all()):
        _raise_non_finite([(ta, "a"), (tb, "b")], "1-D distances", ta.dtype)
    return _scaling.unscale_columns(vals, ek, "1-D W1 of `a` and `b`")


# --------------------------------------------------------------- the estimators
def _check_memory(n: int, m: int, per_cell: int, limit: float, method: str) -> None:
    need = n * m * per_cell
    if need <= limit:
        return
    raise ICSValueError(
        f"method={method!r} on {n} x {m} samples needs about {need / 2**30:.2f} GiB for the "
        f"cost matrix and the solver's copies, above memory_limit={limit / 2**30:.2f} GiB. "
        "Alternatives: method='sliced' or 'max_sliced' (no cost matrix; lower bounds of "
        "W1), method='sinkhorn' (the same n x m matrix, but on the samples' device, "
        "e.g. a GPU), subsampling both samples (e.g. to 2000 rows each), or a larger "
        "memory_limit (bytes) if this machine has the memory"
    )


#: Entries of the squared cost below this fraction of ``|x_i|^2 + |y_j|^2`` (after
#: centering) are recomputed from the differences: there ``|x|^2 + |y|^2 - 2<x, y>``
#: would lose digits to cancellation. Above it the expansion loses at most a factor
#: 1 / fraction of the dtype's precision: ~1e-13 relative in float64 (1e-3), ~1e-6 in
#: float32 (0.1; a float32 analysis differs from float64 by well under 1e-4).
_CANCELLATION = {torch.float64: 1e-3, torch.float32: 0.1}


def _euclidean_cost(
    tx: torch.Tensor,
    ty: torch.Tensor,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    paired_dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise Euclidean distances, fast (one GEMM) and accurate for nearly equal points.

    The expansion ``|x|^2 + |y|^2 - 2<x, y>`` is a matrix product (5-10x faster than
    differencing every pair) but cancels catastrophically when ``x_i ~ y_j``, the
    typical ICS case of a small training step (row i before and after the step). So
    samples with a dominant common offset are centered first, and entries in danger
    are recomputed directly from differences of the original rows; if there are many,
    every pair is differenced. ``row_norms`` (||x_i||, ||y_j||) reuse what a caller has;
    so does ``paired_dist`` (||x_i - y_i|| of paired rows, the same differences): the
    diagonal entries in danger are taken from it instead of differenced again.
    """
    center = tx.mean(dim=0)
    if row_norms is None:
        row_norms = (torch.linalg.vector_norm(tx, dim=1), torch.linalg.vector_norm(ty, dim=1))
    xx = row_norms[0].square()
    if float(center.square().sum()) > 0.25 * float(xx.mean()):  # an offset dominates
        cx, cy = tx - center, ty - center
        xx = torch.linalg.vector_norm(cx, dim=1).square_()
        yy = torch.linalg.vector_norm(cy, dim=1).square_()
    else:  # centering would cost two copies of the samples for no accuracy
        cx, cy = tx, ty
        yy = row_norms[1].square()
    scale = xx[:, None] + yy[None, :]
    d2 = torch.addmm(scale, cx, cy.T, alpha=-2.0)
    near = d2 < _CANCELLATION.get(d2.dtype, 0.1) * scale
    count = int(near.sum())
    # differences of the original rows: centering itself rounds at the scale of |x|
    if count > 4 * (cx.shape[0] + cy.shape[0]):
        return torch.cdist(tx, ty, compute_mode="donot_use_mm_for_euclid_dist")
    if count and paired_dist is not None:
        diagonal = near.diagonal()
        d2.diagonal()[diagonal] = paired_dist[diagonal].square()
        near.diagonal().zero_()
        count = int(near.sum())
    if count:
        i, j = near.nonzero(as_tuple=True)
        step = max(1, 2**20 // tx.shape[1])  # ~8 MiB of differences at a time
        for lo in range(0, count, step):
            ii, jj = i[lo : lo + step], j[lo : lo + step]
            d2[ii, jj] = torch.linalg.vector_norm(tx[ii] - ty[jj], dim=1).square_()
    return d2.clamp_min_(0.0).sqrt_()


def _base_log(method: str, tx: torch.Tensor, ty: torch.Tensor) -> dict[str, Any]:
    return {
        "method": method,
        "n": tx.shape[0],
        "m": ty.shape[0],
        "d": tx.shape[1],
        "device": str(tx.device),
    }


def _exact(
    tx: torch.Tensor,
    ty: torch.Tensor,
    opts: dict[str, Any],
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    paired_dist: torch.Tensor | None = None,
    keep_cost: bool = False,
) -> tuple[float, dict[str, Any]]:
    n, m = tx.shape[0], ty.shape[0]
    info = _base_log("exact", tx, ty)
    info["dtype"] = _dtype_name(tx.dtype)  # of the cost matrix; the solver runs in float64
    if tx.shape[1] == 1:  # 1-D: exact by sorting, the same value as the LP
        value = float(_sliced.w1_sorted(torch.sort(tx[:, 0]).values, torch.sort(ty[:, 0]).values))
        info.update(solver="sorted_1d", status="optimal", result_code=1, numItermax=None)
        if n == m:  # the sorted matching keeps (i, i) where both ranks agree
            same = torch.argsort(tx[:, 0], stable=True) == torch.argsort(ty[:, 0], stable=True)
            info["identity_share"] = float(same.double().mean())
        return value, info
    _check_memory(n, m, _EXACT_BYTES_PER_CELL, opts["memory_limit"], "exact")
    ot = import_ot()  # lazily: importing POT is slow and may touch the GPU

    cost = _euclidean_cost(tx, ty, row_norms, paired_dist).cpu().numpy()
    cost = cost.astype(np.float64, copy=False)  # POT solves in float64
    value, plan, pot_log, num_iter = _emd(ot, cost, opts)
    code = int(pot_log["result_code"])
    status = _EMD_STATUS.get(code, f"result_code {code}")
    if n == m:  # the mass the optimal plan keeps on the pairs (i, i)
        info["identity_share"] = float(np.trace(plan))
    if keep_cost:  # the monitor's intervals solve resamples on its submatrices
        info["cost_matrix"] = cost
    info.update(
        solver="ot.emd",
        status=status,
        result_code=code,
        numItermax=num_iter,
        warning=pot_log.get("warning"),
    )
    if code != 1 and opts["on_failure"] == "raise":
        _raise_unsolved(cost.shape, status, num_iter, value)
    return value, info


def _emd(ot: Any, cost: np.ndarray, opts: Mapping[str, Any]) -> tuple[float, Any, dict, int]:
    """POT's network simplex on a float64 cost matrix, uniform weights: value, plan, log."""
    n, m = cost.shape
    num_iter = opts["numItermax"] or default_num_iter_max(n, m)
    # the simplex compares reduced costs with an absolute tolerance (~2e-15): costs near
    # it (samples at 1e-20) are ties to it, and W1 came out 11 % off. In units of a power
    # of two near the largest cost the plan is the same, and the value exact
    top = float(cost.max()) if cost.size else 0.0
    e = math.frexp(top)[1] if 0.0 < top < math.inf else 0
    with warnings.catch_warnings():
        for message in _POT_EMD_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        plan, pot_log = ot.emd(
            np.full(n, 1.0 / n),
            np.full(m, 1.0 / m),
            _scaling.scale(cost, e) if e else cost,
            numItermax=num_iter,
            log=True,
        )
    # cost: what ot.emd2 returns
    return _scaling.unscale(float(pot_log["cost"]), e, "exact W1"), plan, pot_log, num_iter


def _raise_unsolved(shape: tuple[int, ...], status: str, num_iter: int, value: float) -> None:
    raise SolverError(
        f"exact W1 (POT emd2) on {shape[0]} x {shape[1]} samples stopped before optimality "
        f"(status {status!r}, numItermax={num_iter}); its value {value:.6g} must not "
        "be trusted. Pass a larger numItermax, or on_failure='flag' with log=True to "
        "get the value with its status",
        value=value,
        status=status,
    )


def _solve_cost(cost: np.ndarray, opts: Mapping[str, Any]) -> float:
    """The exact W1 of a float64 (n, m) cost matrix with ``exact``'s options.

    Raises :class:`SolverError` when the solver stops early and ``on_failure`` is
    ``"raise"``.
    """
    value, _, pot_log, num_iter = _emd(import_ot(), cost, opts)
    code = int(pot_log["result_code"])
    if code != 1 and opts["on_failure"] == "raise":
        _raise_unsolved(cost.shape, _EMD_STATUS.get(code, f"result_code {code}"), num_iter, value)
    return value


def _sinkhorn(
    tx: torch.Tensor, ty: torch.Tensor, opts: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Certified entropic W1 (see :mod:`ics_toolkit._entropic`): value = its lower bound."""
    n, m = tx.shape[0], ty.shape[0]
    info = _base_log("sinkhorn", tx, ty)
    info.update(
        dtype="float64",  # the cost matrix and the iterations, on the samples' device
        rtol=opts["rtol"],
        reg=opts["reg"],
        scaling=opts["scaling"],
        numItermax=opts["numItermax"],
    )
    _check_memory(n, m, _SINKHORN_BYTES_PER_CELL, opts["memory_limit"], "sinkhorn")
    cost = _euclidean_cost(tx, ty).to(torch.float64)
    diameter = float(cost.max())
    if not math.isfinite(diameter):
        _raise_non_finite([(tx, "x"), (ty, "y")], "pairwise distances", tx.dtype)
    info["diameter"] = diameter
    if diameter == 0.0 or _entropic.same_samples(tx, ty):  # W1 = 0, nothing to solve
        info.update(lower=0.0, upper=0.0, reg_absolute=0.0, status="converged", niter=0)
        info.update(stages=0, marginal_error=0.0, rounding=0.0)
        return 0.0, info
    run = _entropic.certified_w1(
        cost,
        rtol=opts["rtol"],
        reg=opts["reg"],
        scaling=opts["scaling"],
        max_iter=opts["numItermax"],
    )
    if run.converged:
        status = "converged"
    else:
        status = "max_iter_reached" if run.resolved else "unresolved"
    info.update(
        lower=run.lower,
        upper=run.upper,
        reg_absolute=run.eps,
        status=status,
        niter=run.n_iter,
        stages=run.n_stages,
        marginal_error=run.marginal_error,
        rounding=run.rounding,
    )
    if not run.converged and opts["on_failure"] == "raise":
        if run.resolved:
            why = (
                f"after numItermax={opts['numItermax']} iterations W1 is only known to lie "
                f"in [{run.lower:.6g}, {run.upper:.6g}], wider than rtol={opts['rtol']:g}"
            )
            fix = "Raise numItermax or rtol, use method='exact'"
        else:
            why = (
                f"W1 lies in [{run.lower:.6g}, {run.upper:.6g}], which float64 cannot narrow "
                f"to rtol={opts['rtol']:g}: W1 is too small against the largest distance "
                f"{diameter:.3g} (the interval's rounding allowance alone is "
                f"{run.rounding:.3g})"
            )
            fix = "Raise rtol, use method='exact'"
        raise SolverError(
            f"sinkhorn on {n} x {m} samples: {why}; its value {run.lower:.6g} (the lower "
            f"end) must not be taken as W1. {fix}, or pass on_failure='flag' with log=True",
            value=run.lower,
            status=status,
        )
    return run.lower, info


def _sliced_result(
    per_direction: np.ndarray,
    method: str,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    shape: tuple[int, int, int],
) -> tuple[float, dict[str, Any]]:
    n_dir = per_direction.shape[0]
    info: dict[str, Any] = {
        "method": method,
        "n": shape[0],
        "m": shape[1],
        "d": shape[2],
        "device": str(device),
        "dtype": _dtype_name(dtype),
        "p": 1,
        "n_projections": n_dir,
        "seed": seed,
        "per_direction": per_direction,
    }
    if method == "sliced":
        value = float(np.mean(per_direction))
        info["std_error"] = (
            float(np.std(per_direction, ddof=1) / math.sqrt(n_dir)) if n_dir > 1 else math.nan
        )
    else:
        k = int(np.argmax(per_direction))
        value = float(per_direction[k])
        info["argmax"] = k
    return value, info


def _coordinate_result(
    per_column: np.ndarray, dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int]
) -> tuple[np.ndarray, dict[str, Any]]:
    info = {
        "method": "per_coordinate",
        "n": shape[0],
        "m": shape[1],
        "d": shape[2],
        "device": str(device),
        "dtype": _dtype_name(dtype),
    }
    return per_column, info


def _batched_group(
    method: str,
    txs: list[torch.Tensor],
    tys: list[torch.Tensor],
    names: list[tuple[str, str]],
    dtype: torch.dtype,
    directions_t: torch.Tensor | None,
    seed: int,
    memos: Sequence[Any] | None = None,
) -> list[tuple[Value, dict[str, Any]]]:
    """One group of pairs of equal (n, m, d, device, dtype): one kernel call."""
    if method == "per_coordinate":
        vals = _sliced.coordinate_group(txs, tys, dtype)
        what = "1-D distances"
    else:
        assert directions_t is not None
        vals = _sliced.projected_group(txs, tys, directions_t, memos)
        what = "projections"
    finite = torch.isfinite(vals).all(dim=1)
    if not bool(finite.all()):  # diagnose the first bad pair (slow path, errors only)
        i = int((~finite).nonzero()[0, 0])
        _raise_non_finite([(txs[i], names[i][0]), (tys[i], names[i][1])], what, dtype)
    host = vals.to("cpu", torch.float64).numpy()
    shape = (txs[0].shape[0], tys[0].shape[0], txs[0].shape[1])
    device = txs[0].device
    if method == "per_coordinate":
        return [_coordinate_result(host[i].copy(), dtype, device, shape) for i in range(len(txs))]
    return [
        _sliced_result(host[i].copy(), method, seed, dtype, device, shape) for i in range(len(txs))
    ]


def _paired(
    tx: torch.Tensor, ty: torch.Tensor, names: tuple[str, str] = ("x", "y")
) -> tuple[float, dict[str, Any]]:
    """mean_i ||x_i - y_i|| of two checked (n, d) tensors (the kernel, no argument checks)."""
    total = torch.linalg.vector_norm(tx - ty, dim=1).sum()
    if not bool(torch.isfinite(total)):
        _raise_non_finite([(tx, names[0]), (ty, names[1])], "row differences", tx.dtype)
    info = _base_log("paired", tx, ty)
    info["dtype"] = _dtype_name(tx.dtype)
    return float(total) / tx.shape[0], info


def _halves(t: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of n // 2 rows of ``t`` (a private generator on its device)."""
    first, second = _half_index(t.shape[0], seed, t.device)
    return t[first], t[second]


def _half_index(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The row indices of :func:`_halves` (so a caller can index its row norms alike)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    perm = torch.randperm(n, generator=gen, device=device)
    half = n // 2
    return perm[:half], perm[half : 2 * half]


def _many(
    method: str,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[tuple[str, str]],
    opts: Mapping[str, Any],
    n_projections: int,
    seed: int,
    memos: Sequence[Any] | None = None,
) -> list[tuple[Value, dict[str, Any]]]:
    """A batched method on many pairs of checked tensors: one kernel call per group.

    Pairs are grouped by (n, m, d, device, dtype); equal widths share their directions.
    ``memos`` (per pair, see :func:`ics_toolkit._sliced.projected_group`) keep each
    side's sorted projections for a caller that meets the same samples again.
    """
    results: list[Any] = [None] * len(pairs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (tx, ty) in enumerate(pairs):
        dtype = opts["dtype"] or tx.dtype
        key = (tx.shape[0], ty.shape[0], tx.shape[1], tx.device, dtype)
        groups.setdefault(key, []).append(i)
    for (_, _, d, device, dtype), idx in groups.items():
        directions_t = None
        if method != "per_coordinate":
            directions_t = _directions(d, n_projections, seed, device, dtype).T
        out = _batched_group(
            method,
            [pairs[i][0] for i in idx],
            [pairs[i][1] for i in idx],
            [names[i] for i in idx],
            dtype,
            directions_t,
            seed,
            None if memos is None else [memos[i] for i in idx],
        )
        for i, res in zip(idx, out, strict=True):
            results[i] = res
    return results


def _kernel(
    method: str,
    tx: torch.Tensor,
    ty: torch.Tensor,
    opts: Mapping[str, Any],
    n_projections: int,
    seed: int,
    names: tuple[str, str] = ("x", "y"),
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    paired_dist: torch.Tensor | None = None,
    keep_cost: bool = False,
) -> tuple[Value, dict[str, Any]]:
    """One pair of checked, finite tensors, any method (``exact``/``sinkhorn``: float64).

    ``row_norms`` (||x_i||, ||y_j||) and ``paired_dist`` (||x_i - y_i||), when a caller
    has them, spare ``exact`` passes over the samples. ``keep_cost``: ``exact``'s log
    keeps its float64 (n, m) cost matrix as ``cost_matrix`` (the monitor's intervals).

    The engine's entry below the argument checks: :func:`wasserstein` checks and
    converts, then comes here; the monitor, whose configuration was checked once when
    it was built, calls it directly.
    """
    if method == "exact":
        return _exact(tx, ty, dict(opts), row_norms, paired_dist, keep_cost)
    if method == "sinkhorn":
        return _sinkhorn(tx, ty, dict(opts))
    dtype = opts.get("dtype") or tx.dtype
    if tx.dtype != dtype:
        tx, ty = tx.to(dtype), ty.to(dtype)
    if method == "paired":
        return _paired(tx, ty, names)
    return _many(method, [(tx, ty)], [names], opts, n_projections, seed)[0]


def _single(
    x: ArrayLike,
    y: ArrayLike,
    names: tuple[str, str],
    method: str,
    opts: dict[str, Any],
    n_projections: int,
    seed: int,
) -> tuple[Value, dict[str, Any]]:
    """One pair, any method, arguments already validated; converts and checks the samples."""
    if method in ("exact", "sinkhorn"):
        tx, ty = _convert_pair(x, y, names, dtype=torch.float64, check_finite=True)
    else:
        tx, ty = _convert_pair(x, y, names, dtype=opts["dtype"], check_finite=False)
    if method == "paired" and tx.shape[0] != ty.shape[0]:
        raise ICSValueError(
            f"method='paired' matches row i of `{names[0]}` with row i of `{names[1]}` "
            f"and needs the same number of samples, got {tx.shape[0]} and "
            f"{ty.shape[0]}; use method='exact' for unpaired samples"
        )
    return _kernel(method, tx, ty, opts, n_projections, seed, names)


# ------------------------------------------------------------------ public API
def wasserstein(
    x: ArrayLike,
    y: ArrayLike,
    method: str = "exact",
    *,
    n_projections: int = 128,
    seed: int = 0,
    log: bool = False,
    ci: float | None = None,
    ci_resamples: int = 400,
    **options: Any,
) -> Value | tuple[Value, dict[str, Any]]:
    r"""Wasserstein-1 (Earth Mover) distance between two samples, or an estimate of it.

    The samples are the uniform empirical measures on the rows of ``x`` and ``y``.
    On the same samples the estimators obey (up to float error, see
    :data:`ORDER_RTOL`)::

        sliced <= max_sliced <= exact <= paired

    ``exact`` is the empirical W1; ``sliced``, ``max_sliced`` and every entry of
    ``per_coordinate`` are lower bounds of it; ``paired`` is an upper bound;
    ``sinkhorn`` is a lower bound of it, within ``rtol`` (its log holds the interval).

    Samples at any scale give the right value: outside the safe range of the dtype the
    method computes in, both are multiplied by one power of two (exact; one per column
    for ``per_coordinate``) and the result scaled back; a distance float64 cannot hold
    raises (docs/theory.md section 5.2).

    .. warning::
       In high dimension the sliced values are far below W1. For d = 4096, n = 512,
       X ~ N(0, I) and Y = X + 0.1 N(0, I): exact = paired = 6.40 (every point moves
       by about 0.1 sqrt(d)) but sliced = 0.021 and max_sliced = 0.029, because
       along any one direction the projected cloud hardly changes (its variance
       goes from 1 to 1.01). Sliced distances are lower bounds and trend signals,
       not W1 estimates; compare them only with each other (same d, L and seed).

    Parameters
    ----------
    x : array_like, shape (n, d)
        First sample, one row per sample (numpy or torch, any device; 1-D means
        d = 1; integer and bool arrays are cast to float).
    y : array_like, shape (m, d)
        Second sample, same d and device as ``x`` (a numpy array next to a tensor is
        moved to the tensor's device).
    method : str
        One of :data:`METHODS`:

        ``"exact"``
            POT ``ot.emd2`` on the float64 Euclidean cost matrix (not POT's default
            squared Euclidean), uniform float64 weights; the solver's
            ``result_code`` is read on every call. d = 1 is solved by sorting (the
            same number). Options: ``numItermax`` (default
            :func:`default_num_iter_max`), ``on_failure`` (``"raise"``, the
            default, raises :class:`~ics_toolkit.errors.SolverError` carrying the
            value and status; ``"flag"`` returns the value and puts the status in
            the log, and is allowed only with ``log=True``), ``memory_limit``
            (bytes, default :data:`DEFAULT_MEMORY_LIMIT`; larger problems are
            refused with a message naming the alternatives).
        ``"paired"``
            mean_i ||x_i - y_i|| (n == m required): the identity coupling's cost,
            an upper bound of ``exact``. Option ``dtype``.
        ``"sliced"``
            Mean over ``n_projections`` random unit directions of the exact 1-D W1
            of the projections: W1 (p = 1), *not* POT's default p = 2, whose value
            is (mean W_p^p)^(1/p). A lower bound of ``exact``; see the warning
            above. Option ``dtype``.
        ``"max_sliced"``
            The max over the same directions: between ``sliced`` and ``exact``.
            No optimisation of the direction is done. Option ``dtype``.
        ``"sinkhorn"``
            W1 certified by entropic optimal transport (torch only, on the
            samples' device; :mod:`ics_toolkit._entropic`, docs/theory.md section
            10). Log-domain Sinkhorn with epsilon scaling, eps from the cost's
            diameter down to ``reg`` times the W1 lower bound (the W1 scale, not the
            mean cost); after each stage two bounds that hold for any iterate: a
            lower bound from the dual (the double c-transform of the potentials)
            and an upper bound, the cost of a feasible coupling (the entropic plan
            rounded onto the marginals, or its row-wise argmax when that is a
            permutation). It stops once ``upper - lower <= rtol * lower`` and
            returns ``lower``: within ``rtol`` of ``exact`` (and <= it) by
            construction, whatever the pair. Options: ``rtol`` (default 5e-3),
            ``reg`` (default None: ``rtol / log(n m)``, where the entropic plan's
            excess cost is about ``rtol``), ``scaling`` (default 0.5, the ratio of
            successive eps), ``numItermax`` (default 10000 Sinkhorn iterations),
            ``on_failure`` and ``memory_limit`` as for ``exact``. Not closing the
            interval in ``numItermax`` counts as a failure (the error gives the
            interval), and so does a W1 so small against the largest distance
            (about 1e-13 of it) that float64 rounding alone keeps the interval wider
            than ``rtol`` (status ``"unresolved"``: use ``exact``). Both bounds
            include their float64 rounding allowance (log key ``rounding``). The
            cost matrix is computed in the samples' dtype, the iterations in
            float64. Measured (benchmarks/sinkhorn.py): at most 7.8e-6 from
            ``exact`` on ICS-like pairs, never above it.
        ``"per_coordinate"``
            The exact 1-D W1 of each column (the per-channel view), the same as
            ``scipy.stats.wasserstein_distance`` column by column; returns a
            vector. Option ``dtype``.
    n_projections : int
        Number L of random directions (``sliced``, ``max_sliced`` only).
    seed : int
        Seed of the private generator of the directions (``sliced``,
        ``max_sliced``). The directions depend only on (d, L, seed, device type):
        results are reproducible and independent of the global RNG, which is left
        untouched.
    log : bool
        Also return a dict describing the computation (method, sizes, dtype,
        device, and per method: ``status``/``result_code``/``numItermax`` for
        exact; ``per_direction`` (L,) values and ``std_error`` (the Monte-Carlo
        standard error of ``sliced``: the standard deviation of the per-direction
        values, ddof = 1, over sqrt(L)) for sliced; ``argmax`` for max_sliced;
        ``lower`` and ``upper`` (the certified interval around W1),
        ``reg_absolute`` (the last eps), ``stages``, ``niter``, ``marginal_error``,
        ``diameter``, ``rounding`` (the float64 rounding allowance inside the
        interval), ``status`` (``"converged"``, ``"max_iter_reached"`` or
        ``"unresolved"``) for sinkhorn). For ``exact`` with
        n == m also ``identity_share``: the mass the optimal plan keeps on the pairs
        (i, i), in [0, 1]. 1 means the same-row coupling is optimal (exact = paired:
        the step moved every point less than the gaps between points); 0 for a
        derangement of well separated points.
    ci : float, optional
        A confidence level in (0, 1) (e.g. 0.95): with ``log=True``, the log gains
        ``ci_low``, ``ci_high``, ``ci_level`` and ``ci_how``, a paired basic
        (reverse-percentile) bootstrap interval that resamples the rows (the same
        indices of ``x`` and ``y``: row i of both is the same probe input), for the
        methods ``exact``,
        ``paired``, ``sliced`` and ``max_sliced`` (n == m needed); see
        :mod:`ics_toolkit.uncertainty`. An exact W1 whose optimal plan is the
        identity is resampled in closed form (it equals the resampled paired mean);
        otherwise 30 resamples are solved.
    ci_resamples : int
        Bootstrap resamples of the closed-form intervals (>= 10).
    **options
        Method options listed above; ``dtype`` (a floating torch dtype, or None for
        the inputs' dtype) sets the computation dtype of paired / sliced /
        max_sliced / per_coordinate, float64 by default. Unknown options raise.

    Returns
    -------
    float or numpy.ndarray
        The distance, in the units of the samples: a float, or for
        ``per_coordinate`` a float64 vector of shape (d,).
    dict
        Only with ``log=True``: the log described above.

    Raises
    ------
    ICSValueError
        Bad shapes, NaN/Inf, fewer than 2 samples, unknown method, different
        devices, n != m for ``paired``, a problem above ``memory_limit``.
    ICSTypeError
        Non-numeric input, unknown options, wrongly typed options.
    SolverError
        ``exact`` or ``sinkhorn`` stopped before a trustworthy value.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    >>> y = x + [3.0, 4.0]                      # a translation by a vector of norm 5
    >>> wasserstein(x, y), wasserstein(x, y, "paired")
    (5.0, 5.0)
    >>> value, info = wasserstein(x, y, "sliced", n_projections=16, log=True)
    >>> value <= 5.0, info["per_direction"].shape
    (True, (16,))
    >>> wasserstein(x, y, "per_coordinate")
    array([3., 4.])
    """
    method, log, opts, n_projections, seed = _checked_call(
        method, log, options, n_projections, seed
    )
    if ci is not None:
        ci, ci_resamples = _check_ci(ci, ci_resamples, log)
    # extreme scales: computed on the samples times 2^-e, lengths scaled back (exact)
    tx, ty, e = _to_safe_scale(x, y, ("x", "y"), method, opts)
    value, info = _single(tx, ty, ("x", "y"), method, opts, n_projections, seed)
    if ci is not None:
        _add_interval(method, tx, ty, info, opts, n_projections, seed, ci, ci_resamples)
    value, info = _from_safe_scale(value, info, e, method, log)
    return (value, info) if log else value


def _check_ci(ci: Any, ci_resamples: Any, log: bool) -> tuple[float, int]:
    from ics_toolkit import uncertainty

    level = uncertainty.check_level(ci)
    if not log:
        raise ICSValueError(
            "`ci` returns the interval in the log: pass log=True as well, e.g. "
            "value, info = wasserstein(x, y, ci=0.95, log=True)"
        )
    return level, uncertainty.resamples_arg(ci_resamples)


def _add_interval(
    method: str,
    x: ArrayLike,
    y: ArrayLike,
    info: dict[str, Any],
    opts: dict[str, Any],
    n_projections: int,
    seed: int,
    level: float,
    n_resamples: int,
) -> None:
    """Put the probe-resampling interval of one estimate into its log."""
    from ics_toolkit import uncertainty

    tx, ty = _convert_pair(x, y, ("x", "y"), dtype=torch.float64, check_finite=True)

    def solve(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(_exact(a, b, {**opts, "on_failure": "raise"})[0])

    directions = None
    if method in ("sliced", "max_sliced"):
        directions = _directions(tx.shape[1], n_projections, seed, tx.device, torch.float64)
    low, high, how = uncertainty.interval(
        method, tx, ty, info, solve, level, n_resamples, seed, directions
    )
    info.update(ci_low=low, ci_high=high, ci_level=level, ci_how=how)


def wasserstein_many(
    pairs: Sequence[tuple[ArrayLike, ArrayLike]] | Mapping[Any, tuple[ArrayLike, ArrayLike]],
    method: str = "sliced",
    *,
    n_projections: int = 128,
    seed: int = 0,
    log: bool = False,
    **options: Any,
) -> list[Value] | dict[Any, Value] | tuple[Any, Any]:
    """:func:`wasserstein` for many pairs at once (e.g. one pair per layer).

    For ``sliced``, ``max_sliced`` and ``per_coordinate`` the pairs are grouped by
    (n, m, d, device, dtype) and each group is computed by one batched kernel on the
    device (a matrix product per sample, one sort and one reduction per group);
    layers of equal width share the same random directions. Results equal
    per-pair :func:`wasserstein` calls with the same ``seed`` (up to summation
    order). Other methods loop over the pairs.

    Parameters
    ----------
    pairs : sequence of (x, y) or mapping name -> (x, y)
        Each ``x`` (n_i, d_i) and ``y`` (m_i, d_i) as in :func:`wasserstein`; sizes
        and widths may differ between pairs. Errors name the pair, e.g.
        ``pairs['conv1'][0]``.
    method : str
        One of :data:`METHODS` (default ``"sliced"``).
    n_projections, seed, log, **options
        As in :func:`wasserstein`, applied to every pair.

    Returns
    -------
    list or dict
        One value per pair: a list in the order of ``pairs``, or a dict with the
        same keys (and order) when ``pairs`` is a mapping. A value is a float, or
        a (d_i,) float64 vector for ``per_coordinate``.
    list or dict
        Only with ``log=True``: the per-pair logs, in the same container shape.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> layers = {"fc1": (rng.normal(size=(8, 4)), rng.normal(size=(8, 4))),
    ...           "fc2": (rng.normal(size=(8, 2)), rng.normal(size=(6, 2)))}
    >>> out = wasserstein_many(layers, "sliced", n_projections=8)
    >>> list(out) == ["fc1", "fc2"], out["fc2"] == wasserstein(*layers["fc2"], "sliced",
    ...                                                       n_projections=8)
    (True, True)
    """
    method, log, opts, n_projections, seed = _checked_call(
        method, log, options, n_projections, seed
    )

    is_mapping = isinstance(pairs, Mapping)
    if is_mapping:
        keys = list(pairs.keys())
        items = [pairs[k] for k in keys]
    elif isinstance(pairs, (torch.Tensor, np.ndarray, str, bytes)) or not hasattr(
        pairs, "__iter__"
    ):
        raise ICSTypeError(
            "`pairs` must be a sequence of (x, y) pairs or a mapping name -> (x, y), "
            f"got {type(pairs).__name__}"
        )
    else:
        items = list(pairs)
        keys = list(range(len(items)))
    names: list[tuple[str, str]] = []
    for key, item in zip(keys, items, strict=True):
        label = f"pairs[{key!r}]"
        if isinstance(item, (torch.Tensor, np.ndarray)) or not (
            isinstance(item, Sequence) and len(item) == 2
        ):
            raise ICSTypeError(f"`{label}` must be an (x, y) pair, got {type(item).__name__}")
        names.append((f"{label}[0]", f"{label}[1]"))

    scaled = [_to_safe_scale(x, y, names[i], method, opts) for i, (x, y) in enumerate(items)]
    if method in _BATCHED:
        converted = [(tx, ty) for tx, ty, _ in scaled]
        results = _many(method, converted, names, opts, n_projections, seed)
    else:
        results = [
            _single(tx, ty, names[i], method, opts, n_projections, seed)
            for i, (tx, ty, _) in enumerate(scaled)
        ]
    results = [
        _from_safe_scale(*r, e, method, log, names[i])  # type: ignore[misc]
        for i, (r, (_, _, e)) in enumerate(zip(results, scaled, strict=True))
    ]

    values = [r[0] for r in results]  # type: ignore[index]
    logs = [r[1] for r in results]  # type: ignore[index]
    if is_mapping:
        out_values: Any = dict(zip(keys, values, strict=True))
        out_logs: Any = dict(zip(keys, logs, strict=True))
    else:
        out_values, out_logs = values, logs
    return (out_values, out_logs) if log else out_values


def sampling_floor(
    x: ArrayLike,
    method: str = "exact",
    *,
    n_projections: int = 128,
    seed: int = 0,
    log: bool = False,
    **options: Any,
) -> Value | tuple[Value, dict[str, Any]]:
    """W1 between two disjoint random halves of one sample: the estimate's noise level.

    Two halves of the same sample come from the same distribution, so any distance
    between them is sampling noise: the floor is the accuracy of a W1 between two
    samples as an estimate of the W1 between their populations. (An ICS measured on
    the same probe inputs at two steps can lie far below it and still be exactly the
    shift of that probe; see docs/theory.md.) The halves have n // 2 rows each
    (one row is left out when n is odd), so the floor is that of a sample of size
    n / 2, somewhat above the noise at size n (W1 noise shrinks with the sample
    size, slowly in high dimension).

    Parameters
    ----------
    x : array_like, shape (n, d)
        One sample (numpy or torch, any device), n >= 4.
    method : str
        Any of :data:`METHODS` (default ``"exact"``), with its options.
    n_projections : int
        As in :func:`wasserstein`.
    seed : int
        Seeds both the random split (a private generator on ``x``'s device) and the
        directions of the sliced methods.
    log : bool
        Also return the log of :func:`wasserstein`, plus ``half_size``.
    **options
        Options of ``method``, as in :func:`wasserstein`.

    Returns
    -------
    float or numpy.ndarray
        The distance between the halves (a (d,) vector for ``per_coordinate``).
    dict
        Only with ``log=True``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(40, 3))
    >>> floor = sampling_floor(x, "exact", seed=1)
    >>> 0.0 < floor < wasserstein(x, x + 10.0, "exact")
    True
    """
    method, log, opts, n_projections, seed = _checked_call(
        method, log, options, n_projections, seed
    )
    t = as_samples(x, "x", dtype=None, check_finite=False, min_samples=2)
    n = t.shape[0]
    if n < 4:
        raise ICSValueError(
            f"`x` has {n} samples; sampling_floor splits it into two halves of at least "
            "2 samples each, so it needs at least 4"
        )
    (t,), e = _safe_scale(method, opts, t)
    first, second = _halves(t, seed)
    value, info = _single(first, second, ("x", "x"), method, opts, n_projections, seed)
    value, info = _from_safe_scale(value, info, e, method, log, ("x", "x"))
    info["half_size"] = n // 2
    return (value, info) if log else value
