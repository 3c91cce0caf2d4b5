"""capture / Recorder / dry_run: selection, keys, options, lifecycle and error messages."""

import copy
import gc
import io
import pickle
import subprocess
import sys
import weakref

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ics_toolkit as ics
from ics_toolkit.errors import ICSTypeError, ICSUsageError, ICSValueError
from ics_toolkit.recording import Recorder, _Hook, _Store


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Unitization(nn.Module):
    """Stand-in for ics_toolkit.nn's layer: selected by class name."""

    def forward(self, x):
        return x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.lrn = nn.LocalResponseNorm(3)
        self.unit = Unitization()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6)
        self.heads = nn.ModuleList([nn.Linear(6, 2), nn.Linear(6, 2)])
        self.unused = nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.unit(self.lrn(self.inorm(self.gn(self.bn(self.conv(x))))))
        h = self.rms(self.ln(self.fc(self.pool(h).flatten(1))))
        return self.heads[0](h) + self.heads[1](h)


NORMS = ["bn", "gn", "inorm", "lrn", "unit", "ln", "rms"]


# ------------------------------------------------------------------ selection
def test_norm_selector_finds_every_norm_type_in_call_order():
    model = Net()
    out = ics.capture(model, _x(4, 3, 5, 5), allow_missing=True)
    assert list(out) == NORMS  # "unused" never runs and is skipped on request
    assert Recorder(model).names == [*NORMS[:5], *NORMS[5:], "unused"]


def test_unused_selected_module_raises_naming_it():
    with pytest.raises(ICSValueError, match=r"'unused' never ran.*allow_missing=True"):
        ics.capture(Net(), _x(4, 3, 5, 5))


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (nn.BatchNorm2d, ["bn"]),
        ((nn.LayerNorm, nn.GroupNorm), ["gn", "ln"]),
        ("heads.*", ["heads.0", "heads.1"]),
        ("?n", ["bn", "gn", "ln"]),
        (["fc", "conv"], ["conv", "fc"]),
        (lambda name, m: isinstance(m, nn.Linear), ["fc", "heads.0", "heads.1"]),
        (
            "all",
            "conv bn gn inorm lrn unit pool fc ln rms heads.0 heads.1".split(),
        ),
    ],
)
def test_selectors(layers, expected):
    model = Net()
    rec = Recorder(model, layers, allow_missing=True)
    assert [n for n in rec.names if n != "unused"] == expected
    assert [k for k in rec.run(_x(4, 3, 5, 5))] == [n for n in expected]


def test_selector_by_module_objects_and_single_module():
    model = Net()
    assert Recorder(model, [model.ln, "bn", model.ln]).names == ["bn", "ln"]
    assert Recorder(model, model.fc).names == ["fc"]


def test_containers_are_skipped_by_patterns_but_can_be_named():
    model = Net()
    assert "heads" not in Recorder(model, "*").names
    with pytest.raises(ICSValueError, match="ModuleList / ModuleDict is a container"):
        ics.capture(model, _x(4, 3, 5, 5), layers=["heads"])


def test_selectors_matching_nothing_list_close_names():
    model = Net()
    with pytest.raises(ICSValueError, match=r"no module named 'bnn'; closest names: 'bn'"):
        Recorder(model, ["bnn"])
    with pytest.raises(ICSValueError, match=r"glob 'head.\*' matches no module; closest names"):
        Recorder(model, "head.*")
    with pytest.raises(ICSValueError, match="no module is a BatchNorm3d"):
        Recorder(model, nn.BatchNorm3d)
    with pytest.raises(ICSValueError, match="predicate returned False for all"):
        Recorder(model, lambda n, m: False)
    with pytest.raises(ICSValueError, match=r"has no normalization layer.*Conv2d"):
        Recorder(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))
    with pytest.raises(ICSValueError, match="not a submodule of the model"):
        Recorder(model, [nn.Linear(1, 1)])
    with pytest.raises(ICSTypeError, match="`layers` must be 'norm', 'all', a name glob"):
        Recorder(model, 3.5)
    with pytest.raises(ICSTypeError, match=r"must be nn.Module subclasses"):
        Recorder(model, (int,))
    with pytest.raises(ICSValueError, match="empty list"):
        Recorder(model, [])


def test_root_module_is_named_root():
    bn = nn.BatchNorm1d(3)
    out = ics.capture(bn, _x(5, 3))
    assert list(out) == ["<root>"]


# ------------------------------------------------------------------ keys and sites
def test_where_both_and_callable_key_grammar():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(inplace=True))
    x = _x(6, 3)
    rec = Recorder(
        model, "all", where=lambda n, m: "both" if isinstance(m, nn.BatchNorm1d) else "output"
    )
    out = rec.run(x)
    assert list(out) == ["0", "1:input", "1", "2"]
    assert torch.equal(out["1:input"], out["0"])
    assert torch.equal(out["2"], out["1"].clamp_min(0))
    assert rec.info["1:input"].site == "input" and rec.info["1"].site == "output"
    only_inputs = ics.capture(model, x, where="input")
    assert list(only_inputs) == ["1:input"]


def test_where_and_mode_errors():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ICSValueError, match="`where` must be 'output', 'input', 'both'"):
        Recorder(model, where="outputs")
    with pytest.raises(ICSValueError, match=r"callable returned 'x' for '0'"):
        Recorder(model, where=lambda n, m: "x")
    with pytest.raises(ICSValueError, match="`mode` must be one of"):
        Recorder(model, mode="training")


# ------------------------------------------------------------------ wrappers
def test_data_parallel_prefix_is_stripped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    wrapped = nn.DataParallel(model)
    x = _x(8, 3)
    out = ics.capture(wrapped, x)
    assert list(out) == ["1"]
    assert torch.equal(out["1"], ics.capture(model, x)["1"])
    assert Recorder(wrapped, ["module.1"]).names == ["1"]  # prefixed names accepted


def test_compiled_model_runs_eagerly_with_user_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.LayerNorm(4))
    compiled = torch.compile(model, backend="eager")
    x = _x(8, 3)
    out = ics.capture(compiled, x)
    assert list(out) == ["1", "3"]
    ref = ics.capture(model, x)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert Recorder(compiled, ["_orig_mod.3"]).names == ["3"]


def test_compiled_submodule_after_compilation_still_fires():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    x = _x(8, 3)
    ref = ics.capture(model, x)
    model[1] = torch.compile(model[1], backend="eager")
    with torch.no_grad():
        model(x)  # compiled before any hook exists (hooks added later would never fire)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = ics.capture(model, x)
    assert list(out) == ["1.1"]
    assert torch.equal(out["1.1"], ref["1.1"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ storage options
def test_dtype_device_and_bfloat16_upcast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    x = _x(6, 3).to(torch.bfloat16)
    rec = Recorder(model)
    out = rec.run(x)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    assert out["1"].dtype == torch.float32
    assert torch.equal(out["1"], expected.float())
    assert rec.info["1"].source_dtype == torch.bfloat16
    assert ics.capture(model, x, dtype=torch.float64)["1"].dtype == torch.float64
    for device in ("model", "cpu", torch.device("cpu")):
        assert ics.capture(model, x, device=device)["1"].device == torch.device("cpu")
    with pytest.raises(ICSTypeError, match=r"`dtype` must be a floating torch.dtype"):
        Recorder(model, dtype=torch.int64)
    with pytest.raises(ICSValueError, match="`device` must be 'cpu', 'model' or a torch device"):
        Recorder(model, device="gpu0")
    with pytest.raises(ICSTypeError, match="`device` must be"):
        Recorder(model, device=0)


def test_stored_values_are_independent_copies():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(inplace=True), nn.Identity())
    x = _x(8, 4)
    out = ics.capture(model, x, layers=["0", "2"])
    assert bool((out["0"] < 0).any())  # taken before the in-place ReLU
    out["0"].zero_()
    assert bool((out["2"] > 0).any())  # no aliasing between keys
    identity = ics.capture(nn.Sequential(nn.Identity()), x, layers="all", dtype=torch.float32)
    assert identity["0"].data_ptr() != x.data_ptr() and torch.equal(identity["0"], x)


def test_transform_runs_in_hook_and_is_copied():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))
    seen = []

    def first_two_channels(key, t):
        seen.append((key, t.dtype, t.requires_grad))
        return t[:, :2]  # a view of the activation: must still be copied

    rec = Recorder(model, transform=first_two_channels)
    out = rec.run(_x(4, 2, 3, 3))
    assert seen == [("1", torch.float32, False)]
    assert out["1"].shape == (4, 2, 3, 3)
    assert bool((out["1"] < 0).any())
    assert rec.info["1"].source_shape == (4, 3, 3, 3)

    sketch = Recorder(model, transform=lambda k, t: t.flatten(1)[:, :5]).run(_x(4, 2, 3, 3))
    assert sketch["1"].shape == (4, 5)
    rec2 = Recorder(model, transform=lambda k, t: t.flatten(1)[:, :5])
    rec2.run(_x(4, 2, 3, 3))
    assert (rec2.info["1"].batch_axis, rec2.info["1"].channel_axis) == (0, 1)
    with pytest.raises(ICSTypeError, match="transform returned list for '1'"):
        ics.capture(model, _x(4, 2, 3, 3), transform=lambda k, t: [t])
    with pytest.raises(ICSTypeError, match="`transform` must be a callable"):
        Recorder(model, transform=3)


def test_axes_override_and_inference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LSTM(4, 3, batch_first=True))
    rec = Recorder(model, "all", axes={"1": (0, -1)})
    rec.run(_x(5, 7, 4))
    axes = {k: (i.batch_axis, i.channel_axis) for k, i in rec.info.items()}
    assert axes == {"0": (0, 2), "1": (0, 2), "2": (0, 2)}
    with pytest.raises(ICSValueError, match="`axes` names 'nope', which is not a selected layer"):
        Recorder(model, "all", axes={"nope": (0, 1)})
    with pytest.raises(ICSTypeError, match="must be a pair of ints"):
        Recorder(model, "all", axes={"1": 0})


# ------------------------------------------------------------------ lifecycle
class Boom(nn.Module):
    def forward(self, x):
        raise FloatingPointError("injected failure")


def _all_hooks_empty(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_and_state_restored_after_exception_in_forward():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(), Boom())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(FloatingPointError, match="injected failure"):
        ics.capture(model, _x(6, 3))
    assert _all_hooks_empty(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and model[1].training


def test_hooks_removed_after_error_raised_by_a_hook():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LSTM(4, 2))
    with pytest.raises(ICSValueError, match="no item output_select=3"):
        ics.capture(model, _x(6, 3), layers=["1", "2"], output_select=3)
    with pytest.raises(ICSValueError, match="at least 2 inputs"):
        ics.capture(model, _x(1, 3), layers=["1"])
    assert _all_hooks_empty(model)


def test_no_reference_to_captured_tensors_outlives_the_result():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    rec = Recorder(model)
    out = rec.run(_x(6, 3))
    ref = weakref.ref(out["1"])
    assert rec.info["1"].shape == (6, 4)
    del out
    gc.collect()
    assert ref() is None
    assert _all_hooks_empty(model)


SAVED = {}


class Saver(nn.Module):
    """Pickles the whole model from inside its forward, i.e. while hooks are attached."""

    def forward(self, x):
        SAVED["hooks"] = [len(m._forward_hooks) for m in SAVED["model"].modules()]
        SAVED["attrs"] = [sorted(vars(m)) for m in SAVED["model"].modules()]
        buf = io.BytesIO()
        torch.save(SAVED["model"], buf)
        SAVED["bytes"] = buf.getvalue()
        return x


def test_model_is_picklable_while_hooks_are_attached():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Saver())
    SAVED.clear()
    SAVED["model"] = model
    attrs = [sorted(vars(m)) for m in model.modules()]
    x = _x(6, 3)
    ics.capture(model, x, mode="eval")  # eval: the mid-pass buffers equal the final ones
    assert SAVED["hooks"][2] == 1  # BatchNorm1d had our hook at save time
    assert SAVED["attrs"] == attrs  # nothing written onto the modules
    loaded = torch.load(io.BytesIO(SAVED["bytes"]), weights_only=False)
    SAVED["model"] = loaded
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))  # the pickled hook is inert
    hook = _Hook(_Store([], dtype=torch.float32, device=None, transform=None, keep=True), 0, False)
    clone = pickle.loads(pickle.dumps(hook))
    assert clone(nn.Identity(), (x,), x) is None


def test_importing_capture_and_views_is_light():
    code = (
        "import sys, torch, ics_toolkit.recording, ics_toolkit.views, ics_toolkit._state\n"
        "print(torch.cuda.is_initialized(), 'ot' in sys.modules, 'matplotlib' in sys.modules,"
        " 'pandas' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 5


# ------------------------------------------------------------------ bad input
class IntOut(nn.Module):
    def forward(self, x):
        return x.argmax(1), (x > 0)


def test_output_without_floating_tensor_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 4), IntOut())
    with pytest.raises(ICSValueError, match=r"layer '1' returned tuple\(Tensor\[5\] int64"):
        ics.capture(model, _x(5, 3), layers=["1"])


def test_output_select_errors():
    model = nn.Sequential(nn.LSTM(3, 4))
    x = _x(4, 5, 3)
    with pytest.raises(ICSValueError, match=r"has no item output_select=2; use an index in 0..1"):
        ics.capture(model, x, layers="all", output_select=2)
    with pytest.raises(ICSValueError, match=r"has no key 'hidden'; use an integer index"):
        ics.capture(model, x, layers="all", output_select="hidden")
    with pytest.raises(ICSTypeError, match="callable for layer '0' returned tuple"):
        ics.capture(model, x, layers="all", output_select=lambda o: o[1])
    with pytest.raises(ICSTypeError, match="`output_select` must be an int index"):
        Recorder(model, "all", output_select=1.5)
    with pytest.raises(ICSTypeError, match="got float"):
        Recorder(model, "all", output_select={"0": 1.5})
    with pytest.raises(ICSValueError, match="`output_select` names 'lstm'"):
        Recorder(model, "all", output_select={"lstm": 1})


def test_dict_key_errors_list_available_keys():
    class D(nn.Module):
        def forward(self, x):
            return {"a": x, "b": x * 2}

    with pytest.raises(ICSValueError, match=r"no key 'c'; keys: \['a', 'b'\]"):
        ics.capture(nn.Sequential(D()), _x(3, 2), layers="all", output_select="c")


def test_integer_input_site_raises():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    ids = torch.arange(12).reshape(3, 4) % 10
    assert ics.capture(model, ids)["1"].shape == (3, 4, 4)
    with pytest.raises(ICSValueError, match=r"no floating-point tensor input.*where='output'"):
        ics.capture(model, ids, layers=["0"], where="input")


def test_probe_of_one_sample_is_rejected_before_batchnorm_fails():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ICSValueError, match=r"layer '1' got a probe batch of 1 sample\(s\)"):
        ics.capture(model, _x(1, 3))
    seq_first = nn.Sequential(nn.LSTM(3, 4))  # batch axis 1
    with pytest.raises(ICSValueError, match="batch of 1 sample"):
        ics.capture(seq_first, _x(5, 1, 3), layers="all")


def test_model_and_probe_on_different_devices():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to("meta")
    with pytest.raises(
        ICSValueError, match="`inputs` holds a tensor on cpu but the model is on meta"
    ):
        ics.capture(model, _x(4, 3))


def test_device_error_inside_forward_is_explained():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].to("meta")  # a model split over two devices: no up-front check possible
    with pytest.raises(ICSValueError, match="failed with a device mismatch") as info:
        ics.capture(model, _x(4, 3))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _all_hooks_empty(model)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_modules():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ICSValueError, match="TorchScript modules cannot be hooked"):
        Recorder(scripted)
    with pytest.raises(ICSTypeError, match="'1' is a TorchScript module"):
        Recorder(scripted, ["1"])
    # an eager model with a scripted part: the eager layers are captured, state restored
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), torch.jit.script(nn.BatchNorm1d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert list(ics.capture(model, _x(6, 3), layers=["1"])) == ["1"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distributed_data_parallel_runs_its_module():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        ddp = nn.parallel.DistributedDataParallel(model)
        x = _x(8, 3)
        out = ics.capture(ddp, x)
        assert list(out) == ["1"]
        assert torch.equal(out["1"], ics.capture(model, x)["1"])
        assert Recorder(ddp, ["module.1"]).names == ["1"]
    finally:
        dist.destroy_process_group()


def test_tensors_captured_before_a_failure_are_freed():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Boom())
    refs = []

    def keep_ref(key, t):
        out = t.clone()
        refs.append(weakref.ref(out))
        return out

    with pytest.raises(FloatingPointError) as info:
        ics.capture(model, _x(6, 3), transform=keep_ref)
    gc.collect()
    assert info.value is not None  # the traceback (and its frames) is still alive
    assert len(refs) == 1 and refs[0]() is None


def test_scalar_output_has_no_batch_axis():
    class Loss(nn.Module):
        def forward(self, x):
            return x.pow(2).mean()

    model = nn.Sequential(nn.Linear(3, 2), Loss())
    with pytest.raises(ICSValueError, match=r"layer '1' produced a tensor of shape \(\) without"):
        ics.capture(model, _x(4, 3), layers="all")


def test_lazy_modules_are_refused():
    model = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    with pytest.raises(ICSUsageError, match="uninitialized lazy parameters; run one ordinary"):
        ics.capture(model, _x(4, 3))


def test_forward_called_directly_is_reported():
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn.forward(x)  # skips hooks

    with pytest.raises(ICSValueError, match=r"'bn' never ran.*\.forward\(\) directly"):
        ics.capture(Direct(), _x(4, 3))


def test_mapping_inputs_need_string_keys_and_other_types():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ICSTypeError, match="non-string key 0"):
        ics.capture(model, {0: _x(3, 2)})
    with pytest.raises(ICSTypeError, match=r"`model` must be a torch.nn.Module"):
        ics.capture(lambda x: x, _x(3, 2))
    with pytest.raises(ICSTypeError, match="`seed` must be an int"):
        Recorder(model, seed="1")


def test_parameter_modified_in_forward():
    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            self.bn.weight.add_(1.0)
            return self.bn(x)

    model = Drifting()
    with pytest.raises(ICSUsageError, match=r"modified parameter.*copy_parameters=True"):
        ics.capture(model, _x(4, 2))
    weight = model.bn.weight.detach().clone()
    ics.capture(model, _x(4, 2), copy_parameters=True)
    assert torch.equal(model.bn.weight, weight)


# ------------------------------------------------------------------ dry run
def test_dry_run_without_inputs_runs_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), Boom(), nn.LayerNorm(3))
    frame = ics.dry_run(model)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["name", "type", "site", "calls"]
    assert frame[["name", "type", "site"]].values.tolist() == [
        ["0", "BatchNorm1d", "output"],
        ["2", "LayerNorm", "output"],
    ]
    assert frame["calls"].isna().all()


def test_dry_run_with_inputs_counts_without_side_effects():
    class WithSpare(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout())
            self.spare = nn.LayerNorm(4)

        def forward(self, x):
            return self[2](self[1](self[0](x)))

    model = WithSpare()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    frame = ics.dry_run(model, _x(6, 3), layers=["1", "spare", "2"], where="both")
    assert frame.values.tolist() == [
        ["1", "BatchNorm1d", "output", 1, (6, 4)],
        ["1", "BatchNorm1d", "input", 1, (6, 4)],
        ["2", "Dropout", "output", 1, (6, 4)],
        ["2", "Dropout", "input", 1, (6, 4)],
        ["spare", "LayerNorm", "output", 0, None],
        ["spare", "LayerNorm", "input", 0, None],
    ]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert _all_hooks_empty(model)


def test_recorder_reuse_gives_identical_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2))
    rec = Recorder(model, "all", seed=0)
    x = _x(4, 3, 6, 6)
    a, b = rec.run(x), rec.run(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bn = F.batch_norm(a["0"], None, None, model[1].weight, model[1].bias, training=True)
    torch.testing.assert_close(a["1"], bn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_storage_devices():  # pragma: no cover - runs on GPU machines only
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).cuda()
    x = _x(8, 3).cuda()
    assert ics.capture(model, x)["1"].device.type == "cpu"
    assert ics.capture(model, x, device="model")["1"].device.type == "cuda"
    with pytest.raises(ICSValueError, match="move the probe to the model's device"):
        ics.capture(model, x.cpu())
