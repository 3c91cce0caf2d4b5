"""The experiments as functions: option parsing, models, run_main and sweep_dim (small sizes)."""

import json

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


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return sweep_dim(
        out, dims=(4, 32, 256, 2048), noises=(0.0, 0.5), n=48, progress=False, formats=()
    )


def _slope(rows):
    rows = rows.sort_values("dim")
    return float(np.polyfit(np.log(rows.dim), np.log(rows.value), 1)[0])


def test_sweep_dim_shows_sqrt_d_for_batchnorm_and_flat_u4(small_sweep):
    t = small_sweep.table
    assert list(t.columns) == list(SWEEP_COLUMNS)
    assert t.bounds_hold.all()
    for noise in (0.0, 0.5):
        at = t[t.noise == noise]
        bn = at[at.variant == "batch"]
        unit = at[at.variant == "unitization"]
        # the theory: U3 = max|g| sqrt(2 d'(1 - rho)) with rho independent of d -> slope 1/2
        assert _slope(bn[bn.quantity == "U3"]) == pytest.approx(0.5, abs=0.05)
        assert _slope(bn[bn.quantity == "exact"]) == pytest.approx(0.5, abs=0.15)
        # U4 = 2 |alpha| k = 2 for k = 1, alpha = 1, whatever d
        assert np.allclose(unit[unit.quantity == "U4"].value, 2.0, rtol=1e-12)
        exact_u = unit[unit.quantity == "exact"]
        assert (exact_u.value <= 2.0).all()
        assert abs(_slope(exact_u)) < 0.2
    # more noise, more shift, for BatchNorm at every width (same activations, same update)
    bn = t[(t.variant == "batch") & (t.quantity == "exact")].pivot(
        index="dim", columns="noise", values="value"
    )
    assert (bn[0.5] > bn[0.0]).all()


def test_sweep_dim_matches_an_independent_computation():
    """Recompute one width's W1 with numpy and scipy's assignment solver on the same samples."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    from ics_toolkit.experiments import _sweep_point, _sweep_samples

    d, n, eps = 8, 24, 1e-5
    rows = _sweep_point(d, [0.3], n, 0.1, 5, eps)
    z, (after,) = _sweep_samples(d, [0.3], n, 0.1, 5)

    def bn(v):
        v = v.numpy()
        return (v - v.mean(0)) / np.sqrt(v.var(0) + eps)

    def unit(v):
        h = bn(v)
        return h / np.sqrt((h * h).sum(1, keepdims=True) + eps)

    def w1(a, b):
        cost = cdist(a, b)
        r, c = linear_sum_assignment(cost)
        return cost[r, c].mean()

    got = {(r["variant"], r["quantity"]): r["value"] for r in rows}
    assert got[("batch", "exact")] == pytest.approx(w1(bn(z), bn(after)), rel=1e-9)
    assert got[("unitization", "exact")] == pytest.approx(w1(unit(z), unit(after)), rel=1e-9)
    paired = np.linalg.norm(bn(z) - bn(after), axis=1).mean()
    assert got[("batch", "U1")] == pytest.approx(paired, rel=1e-9)
    assert got[("unitization", "U4")] == 2.0


def test_sweep_dim_is_seeded(small_sweep, tmp_path):
    again = sweep_dim(
        tmp_path, dims=(4, 32, 256, 2048), noises=(0.0, 0.5), n=48, progress=False, formats=()
    )
    pd.testing.assert_frame_equal(again.table, small_sweep.table)
    other = sweep_dim(tmp_path, dims=(4,), noises=(0.0,), n=48, seed=1, progress=False, formats=())
    first = small_sweep.table
    a = first[(first.dim == 4) & (first.noise == 0.0) & (first.quantity == "exact")].value
    b = other.table[other.table.quantity == "exact"].value
    assert not np.allclose(a.to_numpy(), b.to_numpy())


def test_sweep_dim_rejects_bad_options(tmp_path):
    with pytest.raises(ICSValueError, match="`dims` entries must be a positive int"):
        sweep_dim(tmp_path, dims=(4, 0), formats=(), progress=False)
    with pytest.raises(ICSValueError, match="`noises` must be non-negative numbers"):
        sweep_dim(tmp_path, noises=(-1.0,), formats=(), progress=False)
    with pytest.raises(ICSValueError, match="`n` must be at least 4"):
        sweep_dim(tmp_path, n=2, formats=(), progress=False)
