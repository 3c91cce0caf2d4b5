"""The paper's claims, tested on a results table: statistic, interval over seeds, verdict.

A run of the main job (:func:`ics_toolkit.experiments.run_main`) trains every variant
with several seeds and a batch-size sweep; its ``design`` (one row per run: ``run``,
``variant``, ``seed``, ``batch_size``) says which run is which. :func:`evaluate_claims`
computes, for each claim of Huang and Yu (CVPR 2020), one number per seed from the
results table, the mean and Student-t interval of those numbers over the seeds
(:func:`ics_toolkit.uncertainty.t_interval`), and a verdict from a rule fixed in
advance (:data:`CLAIMS`): ``supported``, ``not supported`` or ``inconclusive`` (the
interval straddles the rule's threshold, or the run lacks what the claim needs).
Nothing here is written by hand: a different run gives different verdicts.

Every statistic uses the ``flatten`` view and averages over the measured steps of a
run, then over its layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ics_toolkit import _vocab
from ics_toolkit.uncertainty import DEFAULT_LEVEL, t_interval

__all__ = [
    "ACCURACY_MARGIN",
    "CLAIMS",
    "NO_GROWTH_SLOPES",
    "SQRT_D_SLOPES",
    "SWEEP_CLAIMS",
    "Claim",
    "SweepClaim",
    "add_per_lr",
    "claims_markdown",
    "evaluate_claims",
    "evaluate_sweep_claims",
    "lr_phases",
    "sweep_claims_markdown",
]

#: "Trains at least as well": accuracy no more than this below BatchNorm's (1 point).
ACCURACY_MARGIN = 0.01
#: "Free of noise": the bound changes by less than this factor across batch sizes.
NOISE_FREE = 1.25


@dataclass(frozen=True)
class Claim:
    """One claim: what it says, its statistic and the rule that gives the verdict."""

    key: str
    text: str
    statistic: str
    rule: str


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "bn_sqrt_d",
        "BatchNorm's bound grows like sqrt(d)",
        "slope of log(mean U3) against log(d) over BatchNorm's layers",
        "supported if the interval lies in [0.25, 0.75], not supported if it lies outside",
    ),
    Claim(
        "bn_bounds_not_reduces",
        "BatchNorm bounds ICS but does not reduce it",
        "mean relative ICS of BatchNorm / that of no normalization (U3 held in every row)",
        "supported if the interval is >= 1 and U3 always held, not supported if it is < 1",
    ),
    Claim(
        "moments_lower",
        "higher moments, not the mean, drive the lower bound (BatchNorm)",
        "share of BatchNorm rows whose best lower bound is L2 or L3 rather than L1",
        "supported if the interval is > 0.5, not supported if it is < 0.5",
    ),
    Claim(
        "noise_lower",
        "noise drives the lower bound (BatchNorm)",
        "mean relative best lower bound at the smallest batch / at the largest",
        "supported if the interval is > 1, not supported if it is < 1",
    ),
    Claim(
        "bn_bound_noise",
        "BatchNorm's bound degrades with noise",
        "mean relative U3 at the smallest batch / at the largest",
        "supported if the interval is > 1, not supported if it is < 1",
    ),
    Claim(
        "unit_bound_alpha",
        "the Unitization bound is set by alpha alone, free of noise",
        "mean relative U5 of Unitization alpha = 1 at the smallest batch / at the largest",
        f"supported if the interval lies in [1/{NOISE_FREE}, {NOISE_FREE}], not supported "
        "if it lies outside",
    ),
    Claim(
        "unit_trains",
        "Unitization (alpha = 1) trains at least as well as BatchNorm",
        "test accuracy of Unitization alpha = 1 minus BatchNorm's",
        f"supported if the interval is >= -{ACCURACY_MARGIN:g}, not supported if it is < 0",
    ),
    Claim(
        "unit0_trains",
        "Unitization as the authors start it (alpha = 0) trains at least as well as BatchNorm",
        "test accuracy of Unitization alpha = 0 minus BatchNorm's",
        f"supported if the interval is >= -{ACCURACY_MARGIN:g}, not supported if it is < 0",
    ),
)


def _verdict(key: str, low: float, high: float, extra: bool = True) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if key == "bn_sqrt_d" or key == "unit_bound_alpha":
        lo, hi = (0.25, 0.75) if key == "bn_sqrt_d" else (1 / NOISE_FREE, NOISE_FREE)
        if lo <= low and high <= hi:
            return "supported"
        if high < lo or low > hi:
            return "not supported"
        return "inconclusive"
    if key == "bn_bounds_not_reduces":
        if low >= 1 and extra:
            return "supported"
        return "not supported" if high < 1 else "inconclusive"
    if key == "moments_lower":
        return "supported" if low > 0.5 else "not supported" if high < 0.5 else "inconclusive"
    if key in ("noise_lower", "bn_bound_noise"):
        return "supported" if low > 1 else "not supported" if high < 1 else "inconclusive"
    if key in ("unit_trains", "unit0_trains"):
        if low >= -ACCURACY_MARGIN:
            return "supported"
        return "not supported" if high < 0 else "inconclusive"
    raise KeyError(key)


# ---------------------------------------------------------------------- per-run numbers
def _flat(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[(table["view"] == "flatten").fillna(False).astype(bool)]
    return rows[rows["quantity"].notna() & rows["layer"].notna()]


def _layer_means(rows: pd.DataFrame, run: str, quantity: str) -> pd.Series:
    """Mean over steps of ``quantity`` per layer of ``run`` (index: layer)."""
    sel = rows[(rows["run"] == run) & (rows["quantity"] == quantity)]
    return sel.groupby("layer", sort=False)["value"].mean()


def _run_mean(rows: pd.DataFrame, run: str, quantity: str) -> float:
    means = _layer_means(rows, run, quantity)
    return float(means.mean()) if len(means) else math.nan


def _best_lower_rel(rows: pd.DataFrame, run: str) -> float:
    """Mean over layers and steps of max(L1, L2, L3) / scale."""
    sel = rows[(rows["run"] == run) & rows["quantity"].isin([*_vocab.THEORY_LOWER, "scale"])]
    wide = sel.pivot_table(index=["layer", "step"], columns="quantity", values="value")
    lows = [q for q in _vocab.THEORY_LOWER if q in wide.columns]
    if not lows or "scale" not in wide.columns:
        return math.nan
    return float((wide[lows].max(axis=1) / wide["scale"]).mean())


def _relative_mean(rows: pd.DataFrame, run: str, quantity: str) -> float:
    """Mean over layers and steps of quantity / scale (bounds have no relative row)."""
    sel = rows[(rows["run"] == run) & rows["quantity"].isin([quantity, "scale"])]
    wide = sel.pivot_table(index=["layer", "step"], columns="quantity", values="value")
    if quantity not in wide.columns or "scale" not in wide.columns:
        return math.nan
    return float((wide[quantity] / wide["scale"]).mean())


def _share_moment_lower(rows: pd.DataFrame, run: str) -> float:
    sel = rows[(rows["run"] == run) & rows["quantity"].isin(_vocab.THEORY_LOWER)]
    wide = sel.pivot_table(index=["layer", "step"], columns="quantity", values="value")
    if not {"L1", "L2", "L3"} <= set(wide.columns) or wide.empty:
        return math.nan
    return float((wide[["L2", "L3"]].max(axis=1) > wide["L1"]).mean())


def _slope_sqrt_d(rows: pd.DataFrame, run: str) -> float:
    sel = rows[(rows["run"] == run) & (rows["quantity"] == "U3")]
    per_layer = sel.groupby("layer", sort=False).agg(value=("value", "mean"), dim=("dim", "first"))
    per_layer = per_layer[(per_layer["value"] > 0) & per_layer["dim"].notna()]
    dims = per_layer["dim"].astype("float64").to_numpy()
    if len(np.unique(dims)) < 2:
        return math.nan
    return float(np.polyfit(np.log(dims), np.log(per_layer["value"].to_numpy()), 1)[0])


def _u3_always_held(rows: pd.DataFrame, run: str) -> bool:
    sel = rows[(rows["run"] == run) & rows["quantity"].isin(["exact", "U3"])]
    wide = sel.pivot_table(index=["layer", "step"], columns="quantity", values="value")
    if not {"exact", "U3"} <= set(wide.columns):
        return False
    return bool((wide["exact"] <= wide["U3"] * (1 + 1e-6)).all())


# ---------------------------------------------------------------------- claims
def _runs(design: pd.DataFrame, variant: str, batch: int) -> dict[int, str]:
    sel = design[(design["variant"] == variant) & (design["batch_size"] == batch)]
    return {int(r.seed): str(r.run) for r in sel.itertuples(index=False)}


def _per_seed(
    design: pd.DataFrame,
    variants: Sequence[str],
    batches: Sequence[int],
    fn: Callable[..., float],
) -> dict[int, float]:
    """fn(run_a, run_b, ...) per seed that has every (variant, batch) run."""
    maps = [_runs(design, v, b) for v, b in zip(variants, batches, strict=True)]
    seeds = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    return {s: fn(*(m[s] for m in maps)) for s in seeds}


def evaluate_claims(
    table: pd.DataFrame,
    design: pd.DataFrame,
    accuracies: Mapping[str, float | None],
    *,
    level: float = DEFAULT_LEVEL,
) -> pd.DataFrame:
    """Test each claim of :data:`CLAIMS` on a results table.

    Parameters
    ----------
    table : pandas.DataFrame
        The tidy results table of the main job (``run`` = the design's run labels).
    design : pandas.DataFrame
        One row per run: ``run``, ``variant`` (``batch``, ``unitization``,
        ``unitization=1``, ``none``), ``seed``, ``batch_size``.
    accuracies : mapping of str to float
        Final test accuracy per run.
    level : float
        Level of the intervals over seeds.

    Returns
    -------
    pandas.DataFrame
        One row per claim: ``key``, ``claim``, ``statistic``, ``per_seed`` (the
        statistic of each seed, ``"seed: value"`` joined by commas), ``n_seeds``,
        ``mean``, ``low``, ``high`` (the Student-t interval over seeds at ``level``),
        ``verdict`` and ``rule``.
    """
    rows = _flat(table)
    design = design.copy()
    design["batch_size"] = design["batch_size"].astype(int)
    sizes = sorted(design["batch_size"].unique())
    small, large = (sizes[0], sizes[-1]) if sizes else (0, 0)
    held: list[bool] = []

    def acc(run: str) -> float:
        v = accuracies.get(run)
        return math.nan if v is None else float(v)

    def not_reduces(bn: str, none: str) -> float:
        held.append(_u3_always_held(rows, bn))
        return _run_mean(rows, bn, "relative_exact") / _run_mean(rows, none, "relative_exact")

    stats: dict[str, dict[int, float]] = {
        "bn_sqrt_d": _per_seed(design, ["batch"], [large], lambda r: _slope_sqrt_d(rows, r)),
        "bn_bounds_not_reduces": _per_seed(design, ["batch", "none"], [large] * 2, not_reduces),
        "moments_lower": _per_seed(
            design, ["batch"], [large], lambda r: _share_moment_lower(rows, r)
        ),
        "noise_lower": {},
        "bn_bound_noise": {},
        "unit_bound_alpha": {},
        "unit_trains": _per_seed(
            design, ["unitization=1", "batch"], [large] * 2, lambda u, b: acc(u) - acc(b)
        ),
        "unit0_trains": _per_seed(
            design, ["unitization", "batch"], [large] * 2, lambda u, b: acc(u) - acc(b)
        ),
    }
    if small != large:
        stats["noise_lower"] = _per_seed(
            design,
            ["batch", "batch"],
            [small, large],
            lambda a, b: _best_lower_rel(rows, a) / _best_lower_rel(rows, b),
        )
        stats["bn_bound_noise"] = _per_seed(
            design,
            ["batch", "batch"],
            [small, large],
            lambda a, b: _relative_mean(rows, a, "U3") / _relative_mean(rows, b, "U3"),
        )
        stats["unit_bound_alpha"] = _per_seed(
            design,
            ["unitization=1", "unitization=1"],
            [small, large],
            lambda a, b: _relative_mean(rows, a, "U5") / _relative_mean(rows, b, "U5"),
        )
    out = []
    for claim in CLAIMS:
        values = stats[claim.key]
        mean, low, high = t_interval(values.values(), level)
        extra = all(held) and bool(held) if claim.key == "bn_bounds_not_reduces" else True
        out.append(
            {
                "key": claim.key,
                "claim": claim.text,
                "statistic": claim.statistic,
                "per_seed": ", ".join(f"{s}: {v:.3g}" for s, v in values.items()),
                "n_seeds": sum(math.isfinite(v) for v in values.values()),
                "mean": mean,
                "low": low,
                "high": high,
                "verdict": _verdict(claim.key, low, high, extra),
                "rule": claim.rule,
            }
        )
    return pd.DataFrame(out)


def claims_markdown(claims: pd.DataFrame, level: float = DEFAULT_LEVEL) -> str:
    """The "Claims" section of ``summary.md`` from :func:`evaluate_claims`'s table."""
    from ics_toolkit.report import markdown_table

    def fmt(v: float) -> str:
        if not math.isfinite(v):
            return "–"
        return f"{0.0 if abs(v) < 1e-12 else v:.3g}"  # a mean of +-x is 0, not 4e-17

    lines = [
        "## Claims",
        "",
        "Each claim of Huang and Yu (CVPR 2020) with the statistic that tests it on this run, "
        f"its value per seed, the mean and {level:.0%} Student-t interval over the seeds, and "
        "the verdict of the rule given (computed from the results table; *inconclusive*: the "
        "interval straddles the rule's threshold, or the run lacks the runs it needs). "
        "Relative values are divided by the layer's RMS output norm (`scale`).",
        "",
        markdown_table(
            ["claim", "statistic", "per seed", "mean", f"{level:.0%} interval", "verdict"],
            align="llllrl",
            rows=[
                (
                    r.claim,
                    r.statistic,
                    r.per_seed or "–",
                    fmt(r.mean),
                    f"[{fmt(r.low)}, {fmt(r.high)}]",
                    f"**{r.verdict}**",
                )
                for r in claims.itertuples(index=False)
            ],
        ),
        "",
        "Rules: "
        + "; ".join(f"*{r.claim}*: {r.rule}" for r in claims.itertuples(index=False))
        + ".",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- learning rate
def add_per_lr(table: pd.DataFrame, training: pd.DataFrame) -> pd.DataFrame:
    """Add ``<q>_per_lr`` rows (kind ``rate``): ``exact`` and ``relative_exact`` / lr.

    ``training`` has columns ``run``, ``step``, ``lr`` (the learning rate of the
    update t -> t+1, as ``training.csv`` writes it).
    """
    wanted = ["exact", _vocab.relative_name("exact")]
    sel = table[table["quantity"].isin(wanted)]
    lr = training[["run", "step", "lr"]].drop_duplicates(["run", "step"])
    lr = lr.assign(step=lr["step"].astype("Int64"))
    merged = sel.merge(lr, on=["run", "step"], how="inner")
    merged = merged[merged["lr"] > 0]
    if merged.empty:
        return table
    extra = merged.assign(
        value=merged["value"] / merged["lr"],
        quantity=merged["quantity"].map(_vocab.per_lr_name),
        kind="rate",
        wall_time_s=0.0,
    ).drop(columns="lr")
    return pd.concat([table, extra], ignore_index=True)


def lr_phases(table: pd.DataFrame, training: pd.DataFrame, run: str) -> dict[str, Any]:
    """Mean relative ICS and relative ICS per unit lr in the first and last lr phase of a run.

    Returns ``{"ics": (first, last), "per_lr": (first, last), "lrs": (first, last)}``
    (NaN when the run has a single learning rate).
    """
    rows = _flat(table)
    lr = training[training["run"] == run][["step", "lr"]]
    if lr.empty or lr["lr"].nunique() < 2:
        return {"ics": (math.nan,) * 2, "per_lr": (math.nan,) * 2, "lrs": (math.nan,) * 2}
    first, last = float(lr["lr"].iloc[0]), float(lr["lr"].iloc[-1])
    out: dict[str, Any] = {"lrs": (first, last)}
    for key, q in (
        ("ics", _vocab.relative_name("exact")),
        ("per_lr", _vocab.per_lr_name(_vocab.relative_name("exact"))),
    ):
        sel = rows[(rows["run"] == run) & (rows["quantity"] == q)].merge(
            lr.assign(step=lr["step"].astype("Int64")), on="step"
        )
        out[key] = (
            float(sel[sel["lr"] == first]["value"].mean()),
            float(sel[sel["lr"] == last]["value"].mean()),
        )
    return out


# ---------------------------------------------------------------------- the dimension sweep
#: Slopes of log(value) against log(d) read as "grows like sqrt(d)" (0.5 +- 0.25) and as
#: "does not grow with d" (at most 0.25): 0.25 is half way between flat and sqrt(d).
SQRT_D_SLOPES: tuple[float, float] = (0.25, 0.75)
NO_GROWTH_SLOPES: tuple[float, float] = (-math.inf, 0.25)


@dataclass(frozen=True)
class SweepClaim:
    """A claim about how a variant's quantity scales with the width d (``sweep-dim``).

    ``quantities``: the sweep quantities that test it (each present one is judged);
    ``slopes``: the range of slopes that supports it.
    """

    key: str
    text: str
    variant: str
    quantities: tuple[str, ...]
    slopes: tuple[float, float]

    @property
    def rule(self) -> str:
        """The verdict's rule, in words."""
        lo, hi = self.slopes
        if lo == -math.inf:
            return (
                f"supported if the interval of the slope lies at or below {hi:g}, not "
                "supported if it lies above"
            )
        return (
            f"supported if the interval of the slope lies in [{lo:g}, {hi:g}], not supported "
            "if it lies outside"
        )


#: The claims :func:`evaluate_sweep_claims` judges from the slopes of a dimension sweep.
SWEEP_CLAIMS: tuple[SweepClaim, ...] = (
    SweepClaim(
        "sweep_bn_ics", "BatchNorm's ICS grows like sqrt(d)", "batch", ("exact",), SQRT_D_SLOPES
    ),
    SweepClaim(
        "sweep_bn_bound",
        "BatchNorm's bound grows like sqrt(d)",
        "batch",
        ("U3", "U3_tight"),
        SQRT_D_SLOPES,
    ),
    SweepClaim(
        "sweep_unit_bound",
        "the bound of Unitization (alpha = 1) does not grow with d",
        "unitization=1",
        ("U4", "U5"),
        NO_GROWTH_SLOPES,
    ),
    SweepClaim(
        "sweep_unit_ics",
        "the ICS of Unitization (alpha = 1) does not grow with d",
        "unitization=1",
        ("exact",),
        NO_GROWTH_SLOPES,
    ),
)


def _range_verdict(low: float, high: float, lo: float, hi: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if lo <= low and high <= hi:
        return "supported"
    if high < lo or low > hi:
        return "not supported"
    return "inconclusive"


def evaluate_sweep_claims(
    slopes: pd.DataFrame, claims: Sequence[SweepClaim] = SWEEP_CLAIMS
) -> pd.DataFrame:
    """Verdicts of the dimension claims from the slopes of a sweep, per batch size.

    Parameters
    ----------
    slopes : pandas.DataFrame
        :func:`ics_toolkit.report.fit_slopes` of a sweep table (``variant``,
        ``quantity``, ``slope``, ``low``, ``high``, ``n_seeds``; ``batch_size`` if any).
    claims : sequence of SweepClaim
        The claims judged (default :data:`SWEEP_CLAIMS`).

    Returns
    -------
    pandas.DataFrame
        One row per claim, quantity present and batch size: ``key``, ``claim``,
        ``variant``, ``quantity``, ``batch_size``, ``slope``, ``low``, ``high``,
        ``n_seeds``, ``verdict`` (``supported`` / ``not supported`` / ``inconclusive``:
        the interval straddles an end of the range, or there is no interval) and
        ``rule``. A claim none of whose quantities the sweep has gets one inconclusive
        row.

    Examples
    --------
    >>> slopes = pd.DataFrame({"variant": ["batch", "unitization=1"], "batch_size": 8,
    ...                        "quantity": ["U3", "U4"], "slope": [0.5, 0.0],
    ...                        "low": [0.45, -0.02], "high": [0.55, 0.03], "n_seeds": 3})
    >>> evaluate_sweep_claims(slopes)["verdict"].tolist()
    ['inconclusive', 'supported', 'supported', 'inconclusive']
    """
    slopes = slopes.copy()
    if "batch_size" not in slopes.columns:
        slopes["batch_size"] = math.nan
    out = []
    for claim in claims:
        sel = slopes[
            (slopes["variant"] == claim.variant) & slopes["quantity"].isin(claim.quantities)
        ]
        base = {"key": claim.key, "claim": claim.text, "variant": claim.variant}
        if sel.empty:
            out.append(
                {
                    **base,
                    "quantity": claim.quantities[0],
                    "batch_size": math.nan,
                    "slope": math.nan,
                    "low": math.nan,
                    "high": math.nan,
                    "n_seeds": 0,
                    "verdict": "inconclusive",
                    "rule": claim.rule,
                }
            )
            continue
        for r in sel.itertuples(index=False):
            low, high = float(r.low), float(r.high)
            out.append(
                {
                    **base,
                    "quantity": r.quantity,
                    "batch_size": r.batch_size,
                    "slope": float(r.slope),
                    "low": low,
                    "high": high,
                    "n_seeds": int(r.n_seeds),
                    "verdict": _range_verdict(low, high, *claim.slopes),
                    "rule": claim.rule,
                }
            )
    return pd.DataFrame(out)


def sweep_claims_markdown(verdicts: pd.DataFrame, level: float = DEFAULT_LEVEL) -> str:
    """The claims table of ``sweep_summary.md`` from :func:`evaluate_sweep_claims`.

    Per claim and quantity, the slope at each batch size with its interval and verdict,
    then one line per claim and quantity: the verdict when every batch size agrees,
    else each batch size's.
    """
    from ics_toolkit.report import markdown_table

    def fmt(v: float) -> str:
        return "–" if not math.isfinite(v) else f"{v + 0.0:.3f}"

    def batch(b: Any) -> str:
        return "–" if isinstance(b, float) and not math.isfinite(b) else str(b)

    table = markdown_table(
        ["claim", "quantity", "batch", "slope", f"{level:.0%} interval", "seeds", "verdict"],
        align="llrrrrl",
        rows=[
            (
                r.claim,
                r.quantity,
                batch(r.batch_size),
                fmt(r.slope),
                f"[{fmt(r.low)}, {fmt(r.high)}]",
                r.n_seeds,
                f"**{r.verdict}**",
            )
            for r in verdicts.itertuples(index=False)
        ],
    )
    overall = []
    for (claim, quantity), g in verdicts.groupby(["claim", "quantity"], sort=False):
        found = list(dict.fromkeys(g["verdict"]))
        if len(found) == 1:
            said = f"**{found[0]}** at every batch size"
        else:
            said = ", ".join(
                f"{v} at batch {batch(b)}"
                for b, v in zip(g["batch_size"], g["verdict"], strict=True)
            )
        overall.append(f"- *{claim}* ({quantity}): {said}.")
    by_rule: dict[str, list[str]] = {}
    for text, rule in dict(zip(verdicts["claim"], verdicts["rule"], strict=True)).items():
        by_rule.setdefault(rule, []).append(f"*{text}*")
    rules = "; ".join(f"{', '.join(texts)}: {rule}" for rule, texts in by_rule.items())
    return "\n".join([table, "", *overall, "", f"Rules: {rules}."])
