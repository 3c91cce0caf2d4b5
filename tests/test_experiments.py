"""The experiments as functions: option parsing, models, run_main and sweep_dim (small sizes)."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.data import make_blobs
from ics_toolkit.errors import ICSValueError
from ics_toolkit.experiments import (
    SWEEP_COLUMNS,
    _norm_slots,
    build_model,
    draw_results,
    parse_methods,
    parse_norms,
    run_main,
    sweep_dim,
)
from ics_toolkit.nn import Unitization

# a tiny run: MLP on generated blobs, no figures
TINY = {
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
    "seeds": 1,
    "sweep_batch_sizes": (),
}


def test_parse_norms():
    out = parse_norms(["batch", "unitization=0.5", "none"])
    assert [name for name, _ in out] == ["batch", "unitization=0.5", "none"]
    layer = out[1][1](4, 1)
    assert isinstance(layer, Unitization) and float(layer.alpha[0].detach()) == 0.5
    with pytest.raises(ICSValueError, match=r"`norms`: unknown normalization 'bn'; choose from"):
        parse_norms("batch,bn")
    with pytest.raises(ICSValueError, match=r"unknown normalization 'unitization=x'"):
        parse_norms("unitization=x")
    with pytest.raises(ICSValueError, match=r"names \['none'\] more than once"):
        parse_norms("none,none")
    with pytest.raises(ICSValueError, match="--norms is empty"):
        parse_norms("", "--norms")


def test_parse_methods():
    assert parse_methods(["exact", "sliced", "exact"]) == ("exact", "sliced")
    with pytest.raises(ICSValueError, match=r"--methods: unknown method\(s\) \['emd'\]"):
        parse_methods("exact,emd", "--methods")


def test_build_model_checks_the_data_shape():
    blobs = make_blobs(32, 16, dim=5)
    assert isinstance(build_model("mlp", "batch", blobs, width=4), nn.Module)
    with pytest.raises(ICSValueError, match=r"model 'cnn' needs image inputs.*use model 'mlp'"):
        build_model("cnn", "batch", blobs)
    with pytest.raises(ICSValueError, match=r"unknown model 'vgg'; choose from cnn, mlp"):
        build_model("vgg", "batch", blobs)


@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet20"])
def test_norm_slots_are_the_same_names_in_every_variant(model):
    from ics_toolkit.data import make_shapes

    data = make_shapes(16, 8, size=8)
    slots = _norm_slots(model, data, None, quick=True)
    assert slots
    for name, spec in parse_norms("batch,unitization,none"):
        modules = dict(build_model(model, spec, data, quick=True).named_modules())
        kinds = {type(modules[s]).__name__ for s in slots}
        expected = {"batch": "BatchNorm", "unitization": "Unitization", "none": "Identity"}[name]
        assert all(k.startswith(expected) for k in kinds), (name, kinds)


def test_variants_start_from_the_same_seed():
    data = make_blobs(32, 16, dim=5)
    a = build_model("mlp", "batch", data, width=4, seed=3)
    b = build_model("mlp", "unitization", data, width=4, seed=3)
    assert torch.equal(a.features[1].weight, b.features[1].weight)  # the first Linear


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    state = torch.random.get_rng_state()
    result = run_main(out, norms="batch,unitization=1,none", **TINY)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    return result


def test_run_main_writes_a_table_of_every_variant(tiny_run):
    out = tiny_run.out_dir
    table = ics.load_results(out / "results.csv")
    assert set(table.run) == {"batch", "unitization=1", "none"}
    layers = {run: set(g.layer.dropna()) for run, g in table.groupby("run")}
    assert layers["batch"] == layers["none"] == layers["unitization=1"]
    assert len(layers["batch"]) == 3  # the MLP's three norm positions
    steps = set(table[table.quantity == "exact"].step)
    assert steps == {0, 3}
    assert table.bounds_hold.dropna().all()
    # U3 for BatchNorm, U5 (and, while alpha stays 1, maybe U4) for Unitization, none for none
    q = {run: set(g.quantity) for run, g in table.groupby("run")}
    assert "U3" in q["batch"] and "U5" in q["unitization=1"]
    assert not {"U3", "U4", "U5"} & q["none"]
    pd.testing.assert_frame_equal(
        table.drop(columns="wall_time_s"),
        tiny_run.table.drop(columns="wall_time_s"),
        check_dtype=False,
    )
    # overview, claims, 3 variants
    assert (out / "summary.md").read_text().count("\n## ") == 5
    training = pd.read_csv(out / "training.csv")
    assert len(training) == 3 * TINY["steps"]
    config = json.loads((out / "config.json").read_text())
    assert config["norms"] == ["batch", "unitization=1", "none"] and config["steps"] == 6
    assert set(tiny_run.accuracies) == {"batch", "unitization=1", "none"}
    assert all(0.0 <= a <= 1.0 for a in tiny_run.accuracies.values())


def test_run_main_is_reproducible_and_replaces_its_parts(tiny_run, tmp_path):
    # same seed, fresh folder: identical measurements
    again = run_main(tmp_path, norms="batch,unitization=1,none", **TINY)
    cols = ["run", "step", "layer", "quantity", "value"]
    a = tiny_run.table[cols].dropna(subset=["layer"]).reset_index(drop=True)
    b = again.table[cols].dropna(subset=["layer"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    # a re-run into the same folder is refused: its variants would mix with the old ones
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ICSValueError, match=r"holds an earlier run .*pass --overwrite"):
        run_main(tmp_path, norms="none", **{**TINY, "steps": 3})
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing touched
    # --overwrite removes what the earlier run owned (stale temporaries too), nothing else
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".results.csv.tmp").write_text("half a tab")
    (tmp_path / "parts" / ".part-batch-000009-r3-c00000000.csv.tmp").write_text("half")
    res = run_main(tmp_path, norms="none", overwrite=True, **{**TINY, "steps": 3})
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(parts) == 1 and parts[0].startswith("part-none-")
    assert set(ics.load_results(tmp_path / "results.csv").run) == {"none"}
    assert set(ics.load_results(tmp_path / "parts").run) == {"none"}
    assert set(pd.read_csv(tmp_path / "training.csv").run) == {"none"}
    assert set(res.table.run) == {"none"}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.rglob("*.tmp"))


def test_run_main_rejects_bad_options(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(ICSValueError, match=r"`out_dir` .* is a file; pass a folder"):
        run_main(afile, **TINY)
    with pytest.raises(ICSValueError, match=r"`views`: unknown view\(s\) \['pixels'\]"):
        run_main(tmp_path / "a", **{**TINY, "views": "pixels"})
    with pytest.raises(ICSValueError, match="`steps` must be a positive int"):
        run_main(tmp_path / "a", **{**TINY, "steps": 0})
    with pytest.raises(ICSValueError, match="`every` string must be"):
        run_main(tmp_path / "a", **{**TINY, "every": "every-5"})
    with pytest.raises(ICSValueError, match="unknown dataset 'mnist'"):
        run_main(tmp_path / "a", **{**TINY, "dataset": "mnist"})
    assert not (tmp_path / "a").exists()  # nothing is created before the options are checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_main_cuda_without_a_gpu(tmp_path):
    with pytest.raises(ICSValueError, match=r"asks for CUDA, but torch\.cuda\.is_available"):
        run_main(tmp_path, device="cuda", **TINY)


def test_draw_results_without_formats_draws_nothing(tiny_run, tmp_path):
    assert draw_results(tiny_run.table, tmp_path / "figs", formats=()) == []
    assert not (tmp_path / "figs").exists()


# ---------------------------------------------------------------------- the dimension sweep


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return sweep_dim(out, quick=True, progress=False, formats=())


def test_sweep_dim_trains_every_variant_width_batch_and_seed(quick_sweep):
    t = quick_sweep.table
    assert list(t.columns) == list(SWEEP_COLUMNS)
    runs = t.groupby(["variant", "dim", "batch_size", "seed"]).size()
    assert len(runs) == 3 * 2 * 2 * 2  # variants x widths x batch sizes x seeds
    assert sorted(t.variant.unique()) == ["batch", "unitization=0", "unitization=1"]
    assert sorted(t.dim.unique()) == [16, 64] and sorted(t.batch_size.unique()) == [16, 64]
    assert sorted(t.seed.unique()) == [0, 1]
    assert t.bounds_hold.all()
    measured = t[t.quantity != "test_accuracy"]
    assert (measured.n_steps == 2).all()  # steps 0 and 4 of 8
    # each variant carries its own bounds: U3 BatchNorm, U5 Unitization, U4 where alpha = 1
    have = t.groupby("variant")["quantity"].agg(set)
    assert {"exact", "U3", "floor_exact", "relative_exact"} <= have["batch"]
    assert "U5" not in have["batch"]
    assert "U5" in have["unitization=0"] and "U4" not in have["unitization=0"]
    assert {"U4", "U5"} <= have["unitization=1"]
    exact = measured[measured.quantity == "exact"]
    assert (exact.value > 0).all()
    # alpha held at 1 (a buffer, not a parameter): U4 = 2 max|gamma| k + changes >= 2 |alpha| k
    u4 = t[t.quantity == "U4"]
    assert (u4.value >= 2.0 - 1e-9).all()
    acc = t[t.quantity == "test_accuracy"].value
    assert ((acc > 0) & (acc <= 1)).all()
    assert set(quick_sweep.accuracies) == {f"{v}-d{d}-b{b}-s{s}" for v, d, b, s in runs.index}


def test_sweep_dim_holds_alpha_fixed_in_its_unitization_variants():
    from ics_toolkit.experiments import _sweep_specs

    specs = dict(_sweep_specs(["batch", "unitization=1", "unitization"]))
    layer = specs["unitization=1"](8, 1)
    assert not layer.learn_alpha and "alpha" not in dict(layer.named_parameters())
    assert float(layer.alpha.min()) == float(layer.alpha.max()) == 1.0
    assert specs["unitization"] == "unitization"  # the authors' layer, alpha learned from 0
    assert specs["batch"] == "batch"


def test_sweep_table_is_the_mean_of_its_parts(quick_sweep):
    """sweep.csv, re-derived independently from the monitor's per-step parts."""
    out = quick_sweep.out_dir
    parts = ics.load_results(out / "sweep_parts")
    on_disk = pd.read_csv(out / "sweep.csv")
    assert len(on_disk) == len(quick_sweep.table)
    at = parts[(parts.layer == "features.2") & (parts.view == "flatten")]
    for (variant, d, b, s), q in [
        (("batch", 64, 16, 1), "U3"),
        (("unitization=1", 16, 64, 0), "exact"),
    ]:
        steps = at[(at.run == f"{variant}-d{d}-b{b}-s{s}") & (at.quantity == q)]
        assert len(steps) == 2
        row = on_disk[
            (on_disk.variant == variant) & (on_disk.dim == d) & (on_disk.batch_size == b)
            & (on_disk.seed == s) & (on_disk.quantity == q)
        ]  # fmt: skip
        assert row.value.item() == pytest.approx(steps.value.mean(), rel=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "complete" and len(config["finished"]) == 24
    assert config["experiment"] == "sweep-dim"


def test_sweep_summary_reports_slopes_with_intervals_and_verdicts(quick_sweep):
    text = quick_sweep.summary
    assert (quick_sweep.out_dir / "sweep_summary.md").read_text() == text
    table = text.split("## Slopes against d")[1].split("## Claims")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| batch |")]
    assert {ln.split("|")[3].strip() for ln in rows} == {
        "exact",
        "relative_exact",
        "U3",
        "U3_tight",
    }
    for ln in rows:
        low, high = (float(x) for x in ln.split("|")[5].strip(" []").split(","))
        slope = float(ln.split("|")[4])
        assert low <= slope <= high and low < high  # two seeds: a real interval
    assert "BatchNorm's bound grows like sqrt(d)" in text
    verdicts = re.findall(r"\*\*(supported|not supported|inconclusive)\*\*", text)
    assert len(verdicts) >= 4 * 2  # four claims (U4 and U5 both) x two batch sizes


def test_sweep_summary_fits_every_form_of_a_bound_present():
    from ics_toolkit.experiments import slope_quantities, sweep_summary

    rows = [
        {"variant": "batch", "dim": d, "batch_size": 8, "seed": s, "quantity": q,
         "kind": "upper", "value": d**k * (1 + 0.01 * s), "n_steps": 2, "bounds_hold": True}
        for d in (16, 256)
        for s in (0, 1)
        for q, k in (("exact", 0.3), ("U3", 0.5), ("U3_tight", 0.2), ("U3_core", 0.5), ("U1", 0.3))
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    assert slope_quantities(table) == ["exact", "U3", "U3_tight"]
    text = sweep_summary(table)
    assert "| batch | 8 | U3_tight | 0.200 |" in text and "| batch | 8 | U3 | 0.500 |" in text
    assert "U3_core" not in text.split("## Claims")[0] and "| U1 |" not in text
    assert "*BatchNorm's bound grows like sqrt(d)* (U3_tight): **not supported** at every" in text


def test_sweep_dim_is_seeded_and_replaces_an_earlier_sweep(tmp_path):
    small = {"dims": (16, 32), "batch_sizes": (16,), "seeds": 1, "steps": 2, "every": 1,
             "probe_size": 16, "progress": False, "formats": ()}  # fmt: skip
    first = sweep_dim(tmp_path, **small)
    n_parts = len(list((tmp_path / "sweep_parts").iterdir()))
    again = sweep_dim(tmp_path, **small)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert len(list((tmp_path / "sweep_parts").iterdir())) == n_parts  # old parts removed
    other = sweep_dim(tmp_path / "other", **{**small, "seed": 1})
    pick = (first.table.quantity == "exact") & (first.table.variant == "batch")
    pick_o = (other.table.quantity == "exact") & (other.table.variant == "batch")
    assert not np.allclose(first.table[pick].value, other.table[pick_o].value)


def test_sweep_dim_rejects_bad_options(tmp_path):
    with pytest.raises(ICSValueError, match="`dims` entries must be a positive int"):
        sweep_dim(tmp_path, dims=(16, 0), formats=(), progress=False)
    with pytest.raises(ICSValueError, match="`batch_sizes` is empty"):
        sweep_dim(tmp_path, batch_sizes=(), formats=(), progress=False)
    with pytest.raises(ICSValueError, match="`probe_size` must be at least 4"):
        sweep_dim(tmp_path, probe_size=2, formats=(), progress=False)
    with pytest.raises(ICSValueError, match="`lr` must be a positive number"):
        sweep_dim(tmp_path, lr=float("nan"), formats=(), progress=False)
    with pytest.raises(ICSValueError, match="unknown normalization 'bn'"):
        sweep_dim(tmp_path, norms="batch,bn", formats=(), progress=False)
    main_run = tmp_path / "main"
    (main_run / "parts").mkdir(parents=True)
    with pytest.raises(ICSValueError, match="holds a run of `ics-toolkit run`"):
        sweep_dim(main_run, quick=True, formats=(), progress=False)
    assert not list(tmp_path.glob("*.csv"))  # refused before anything was written


# The synthetic pairs below are a check of the bound formulas on known inputs, not
# evidence about normalization: every coordinate moves independently by about
# `step`, so ||x_hat - y_hat|| grows like sqrt(d) by construction.
def _bn(z, eps):
    return (z - z.mean(0, keepdim=True)) / (z.var(0, unbiased=False, keepdim=True) + eps).sqrt()


def _synthetic_pair(d, n, step, seed):
    """Activations with per-coordinate means and scales, and the same after a random update."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + d)
    f64 = torch.float64
    sigma = 0.5 + 1.5 * torch.rand(d, generator=gen, dtype=f64)
    z = torch.randn(d, generator=gen, dtype=f64) + sigma * torch.randn(
        n, d, generator=gen, dtype=f64
    )
    perm = torch.randperm(d, generator=gen)
    signs = torch.randint(0, 2, (d,), generator=gen).to(f64) * 2 - 1
    after = (
        z + step * signs * z[:, perm] + 0.3 * sigma * torch.randn(n, d, generator=gen, dtype=f64)
    )
    return z, after


def test_bound_formulas_on_synthetic_pairs_against_an_independent_computation():
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    from ics_toolkit.bounding import NormState
    from ics_toolkit.nn.functional import unitization

    eps, n = 1e-5, 24
    u3 = {}
    for d in (4, 64, 1024):
        z, after = _synthetic_pair(d, n, 0.1, 5)
        x, y = _bn(z, eps), _bn(after, eps)
        u = unitization(z, alpha=1.0, training=True, eps=eps, norm="l2")
        v = unitization(after, alpha=1.0, training=True, eps=eps, norm="l2")
        bn = ics.bounds(x, y, before=NormState(x_hat=x, eps=eps), after=NormState(x_hat=y, eps=eps))
        unit = NormState(x_hat=x, alpha=1.0, k=1.0, eps=eps, form="unitization")
        un = ics.bounds(u, v, before=unit, after=NormState(x_hat=y, alpha=1.0, k=1.0, eps=eps,
                                                          form="unitization"))  # fmt: skip
        u3[d] = bn["U3"]
        # U3 = max|g| sqrt(m2(X) + m2(Y) - 2c) with d' = max(d, m2): here sqrt(2 d' (1 - rho))
        xn, yn = x.numpy(), y.numpy()
        d_eff = max(d, (xn**2).sum(1).mean(), (yn**2).sum(1).mean())
        rho = (xn * yn).sum(1).mean() / d_eff
        assert bn["U3"] == pytest.approx(np.sqrt(2 * d_eff * (1 - rho)), rel=1e-9)
        assert un["U4"] == 2.0  # 2 |alpha| k
        cost = cdist(u.numpy(), v.numpy())
        r, c = linear_sum_assignment(cost)
        assert float(ics.wasserstein(u, v)) == pytest.approx(cost[r, c].mean(), rel=1e-9)
        assert cost[r, c].mean() <= 2.0
    # the generator's own slope: iid per-coordinate moves give sqrt(d) by construction
    slope = np.polyfit(np.log(list(u3)), np.log(list(u3.values())), 1)[0]
    assert slope == pytest.approx(0.5, abs=0.05)
