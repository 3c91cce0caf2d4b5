"""Claims and verdicts computed from a results table; the main job's design and summary."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ics_toolkit import claims as cl
from ics_toolkit.experiments import _design, run_main
from ics_toolkit.uncertainty import t_interval


def _rows(run, layer, dim, values, steps=(0, 10)):
    return [
        {
            "run": run,
            "step": s,
            "layer": layer,
            "view": "flatten",
            "quantity": q,
            "value": v,
            "dim": dim,
        }
        for s in steps
        for q, v in values.items()
    ]


def synthetic(seeds=(0, 1, 2), noise=0.0):
    """A table whose statistics are known: U3 = 3 sqrt(d) (slope 1/2), BN relative ICS twice
    that of none, L2 the best lower bound, U3 and the lower bound 1.5 x larger at batch 8,
    U5 equal at both batch sizes."""
    rng = np.random.default_rng(0)
    design = pd.DataFrame(
        _design(
            ["batch", "unitization=1", "none"], ["batch", "unitization=1"], list(seeds), 128, [8]
        )
    )
    rows = []
    for r in design.itertuples(index=False):
        jitter = 1 + noise * rng.normal()
        boost = 1.5 if r.batch_size == 8 else 1.0
        for layer, dim in (("a", 64), ("b", 256), ("c", 1024)):
            vals = {
                "scale": 2.0,
                "exact": 0.2 * jitter,
                "L1": 0.01,
                "L2": 0.1 * boost,
                "L3": 0.05,
                "relative_exact": 0.1 * jitter,
            }
            if r.variant == "batch":
                vals["U3"] = 3 * math.sqrt(dim) * boost * jitter
            if r.variant == "unitization=1":
                vals["U5"] = 4.0
            if r.variant == "none":
                vals["relative_exact"] = 0.05 * jitter
            rows += _rows(r.run, layer, dim, vals)
    acc = {
        r.run: 0.9 + (0.02 if r.variant == "unitization=1" else 0.0)
        for r in design.itertuples(index=False)
    }
    return pd.DataFrame(rows), design, acc


def test_claims_follow_the_table():
    table, design, acc = synthetic(noise=0.01)
    out = cl.evaluate_claims(table, design, acc).set_index("key")
    assert list(out.index) == [c.key for c in cl.CLAIMS]
    assert out.loc["bn_sqrt_d", "mean"] == pytest.approx(0.5, abs=0.02)
    assert out.loc["bn_sqrt_d", "verdict"] == "supported"
    assert out.loc["bn_bounds_not_reduces", "mean"] == pytest.approx(2.0, rel=0.05)
    assert out.loc["bn_bounds_not_reduces", "verdict"] == "supported"
    assert out.loc["moments_lower", "mean"] == 1.0
    assert out.loc["noise_lower", "mean"] == pytest.approx(1.5, rel=1e-9)
    assert out.loc["noise_lower", "verdict"] == "supported"
    assert out.loc["bn_bound_noise", "verdict"] == "supported"
    assert out.loc["unit_bound_alpha", "mean"] == pytest.approx(1.0)
    assert out.loc["unit_bound_alpha", "verdict"] == "supported"
    assert out.loc["unit_trains", "mean"] == pytest.approx(0.02)
    assert out.loc["unit_trains", "verdict"] == "supported"
    # no alpha = 0 Unitization in this design: nothing to test, so no verdict either way
    assert out.loc["unit0_trains", "verdict"] == "inconclusive"
    assert out.loc["unit0_trains", "n_seeds"] == 0
    # the interval is the Student-t interval of the per-seed values
    per_seed = [float(v.split(": ")[1]) for v in out.loc["bn_sqrt_d", "per_seed"].split(", ")]
    mean, low, high = t_interval(per_seed)
    assert out.loc["bn_sqrt_d", "mean"] == pytest.approx(mean, rel=1e-2)
    assert out.loc["bn_sqrt_d", "low"] == pytest.approx(low, rel=1e-2)
    assert out.loc["bn_sqrt_d", "high"] == pytest.approx(high, rel=1e-2)


def test_verdicts_change_with_the_data():
    table, design, acc = synthetic()
    # Unitization one point and a half below BatchNorm in every seed: not supported
    worse = {k: (v - 0.035 if "unitization=1" in k else v) for k, v in acc.items()}
    out = cl.evaluate_claims(table, design, worse).set_index("key")
    assert out.loc["unit_trains", "verdict"] == "not supported"
    # BatchNorm's relative ICS below that of no normalization: BN reduces it
    t = table.copy()
    bn = (t["quantity"] == "relative_exact") & t["run"].str.startswith("batch")
    t.loc[bn, "value"] = 0.01
    out = cl.evaluate_claims(t, design, acc).set_index("key")
    assert out.loc["bn_bounds_not_reduces", "verdict"] == "not supported"
    # one seed: no interval, so no verdict
    table1, design1, acc1 = synthetic(seeds=(0,))
    out = cl.evaluate_claims(table1, design1, acc1)
    assert set(out["verdict"]) == {"inconclusive"}


def test_per_lr_rows_divide_by_the_step_learning_rate():
    table, design, _ = synthetic(seeds=(0,))
    training = pd.DataFrame(
        [
            {"run": r, "step": s, "lr": 0.05 if s < 10 else 0.005}
            for r in design["run"]
            for s in range(20)
        ]
    )
    out = cl.add_per_lr(table, training)
    rates = out[out["quantity"] == "exact_per_lr"]
    assert set(rates["kind"]) == {"rate"}
    exact = out[out["quantity"] == "exact"].set_index(["run", "layer", "step"])["value"]
    for r in rates.itertuples(index=False):
        lr = 0.05 if r.step < 10 else 0.005
        assert r.value == pytest.approx(exact[(r.run, r.layer, r.step)] / lr)
    ph = cl.lr_phases(out, training, "batch")
    assert ph["lrs"] == (0.05, 0.005)


def test_main_job_writes_claims_from_its_own_runs(tmp_path):
    tiny = {
        "model": "mlp",
        "dataset": "blobs",
        "steps": 6,
        "every": 3,
        "probe_size": 16,
        "batch_size": 16,
        "width": 8,
        "n_projections": 8,
        "progress": False,
        "formats": (),
    }
    res = run_main(
        tmp_path,
        norms="batch,unitization=1,none",
        seeds=2,
        sweep_batch_sizes=(8,),
        sweep_norms="batch",
        **tiny,
    )
    config = json.loads((tmp_path / "config.json").read_text())
    runs = [d["run"] for d in config["design"]]
    assert runs == [
        "batch",
        "unitization=1",
        "none",
        "batch-b8",
        "batch-s1",
        "unitization=1-s1",
        "none-s1",
        "batch-b8-s1",
    ]
    assert set(res.table["run"]) == set(runs)
    text = res.summary
    assert "## Claims" in text and "**" in text
    claims_part = text.split("## Claims")[1].split("\n## ")[0]
    for claim in cl.CLAIMS[:-1]:  # no alpha = 0 variant in this run
        assert claim.text in claims_part
    # per-layer tables only for the base runs (seed 0, batch 16)
    assert "## batch-s1" not in text and "## batch\n" in text
    q = set(res.table["quantity"])
    assert {"scale", "identity_share", "exact_ci_low", "relative_exact", "exact_per_lr"} <= q
    assert {"U3_core", "U5_unit"} <= q
    with pytest.raises(ValueError, match=r"`sweep_norms` names \['unitization'\]"):
        run_main(tmp_path / "x", norms="batch", sweep_norms="unitization", **tiny)


# ---------------------------------------------------------------------- the dimension sweep
def _sweep_table(bn_slope, unit_slope, seeds=(0, 1, 2), dims=(16, 64, 256, 1024, 4096)):
    """A sweep table whose slopes are known: per seed a jitter of +-0.02 around each slope."""
    rows = []
    for seed in seeds:
        jitter = 0.02 * (seed - 1)
        for b in (8, 128):
            for d in dims:
                for variant, quantity, slope in (
                    ("batch", "exact", bn_slope),
                    ("batch", "U3", bn_slope),
                    ("unitization=1", "exact", unit_slope),
                    ("unitization=1", "U4", unit_slope),
                    ("unitization=1", "U1", 1.0),  # not a claim's quantity
                ):
                    rows.append({"variant": variant, "dim": d, "batch_size": b, "seed": seed,
                                 "quantity": quantity, "kind": "upper",
                                 "value": 0.3 * d ** (slope + jitter), "n_steps": 3,
                                 "bounds_hold": True})  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("bn_slope", "unit_slope", "bn_verdict", "unit_verdict"),
    [
        (0.5, 0.0, "supported", "supported"),  # the paper's picture
        (0.0, 0.5, "not supported", "not supported"),  # the opposite
        (0.25, 0.25, "inconclusive", "inconclusive"),  # intervals straddle the thresholds
        (0.5, -0.6, "supported", "supported"),  # shrinking with d does not grow with d
    ],
)
def test_sweep_verdicts_follow_the_slopes(bn_slope, unit_slope, bn_verdict, unit_verdict):
    from ics_toolkit.experiments import sweep_summary
    from ics_toolkit.report import fit_slopes

    table = _sweep_table(bn_slope, unit_slope)
    slopes = fit_slopes(table)
    got = cl.evaluate_sweep_claims(slopes)
    assert set(got["batch_size"]) == {8, 128}
    by_key = got.groupby("key")["verdict"].agg(set)
    assert by_key["sweep_bn_ics"] == by_key["sweep_bn_bound"] == {bn_verdict}
    assert by_key["sweep_unit_ics"] == by_key["sweep_unit_bound"] == {unit_verdict}
    bn = got[got.key == "sweep_bn_bound"]
    assert bn["quantity"].tolist() == ["U3", "U3"] and bn["slope"].tolist() == pytest.approx(
        [bn_slope] * 2
    )
    # the summary computes the same verdicts from the table
    text = sweep_summary(table)
    line = f"- *BatchNorm's bound grows like sqrt(d)* (U3): **{bn_verdict}** at every batch size."
    assert line in text
    assert "| unitization=1 | 8 | U1 |" not in text  # U1 follows the displacement: no slope


def test_sweep_claims_without_their_quantities_are_inconclusive():
    slopes = pd.DataFrame(
        {"variant": ["batch"], "batch_size": [8], "quantity": ["exact"], "slope": [0.5],
         "low": [0.4], "high": [0.6], "n_seeds": [3]}
    )  # fmt: skip
    got = cl.evaluate_sweep_claims(slopes).set_index("key")
    assert got.loc["sweep_bn_ics", "verdict"] == "supported"
    for key in ("sweep_bn_bound", "sweep_unit_bound", "sweep_unit_ics"):
        assert got.loc[key, "verdict"] == "inconclusive" and got.loc[key, "n_seeds"] == 0
    one_seed = slopes.assign(low=np.nan, high=np.nan)
    assert cl.evaluate_sweep_claims(one_seed).set_index("key").loc["sweep_bn_ics", "verdict"] == (
        "inconclusive"
    )


def test_sweep_claims_judge_every_form_of_the_bound_present():
    slopes = pd.DataFrame(
        {"variant": "batch", "batch_size": 8, "quantity": ["U3", "U3_tight"],
         "slope": [0.5, 0.05], "low": [0.45, 0.0], "high": [0.55, 0.1], "n_seeds": 3}
    )  # fmt: skip
    got = cl.evaluate_sweep_claims(slopes)
    bound = got[got.key == "sweep_bn_bound"].set_index("quantity")["verdict"]
    assert bound.to_dict() == {"U3": "supported", "U3_tight": "not supported"}
