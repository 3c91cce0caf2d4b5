"""Views of captured tensors: shapes, contents against explicit loops, seeded subsampling."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ics_toolkit.errors import ICSTypeError, ICSValueError
from ics_toolkit.recording import CaptureInfo
from ics_toolkit.views import channel, flatten, pixel, view


def _nchw(n=3, c=4, h=2, w=5):
    return torch.arange(n * c * h * w, dtype=torch.float64).reshape(n, c, h, w)


def test_flatten_is_one_row_per_input():
    x = _nchw()
    out = flatten(x)
    assert out.shape == (3, 40)
    for i in range(3):
        assert torch.equal(out[i], x[i].reshape(-1))


def test_flatten_batch_axis_and_numpy():
    x = _nchw().numpy()
    out = flatten(np.moveaxis(x, 0, 2), batch_axis=2)
    assert out.shape == (3, 40)
    assert np.array_equal(out.numpy(), x.reshape(3, -1))


def test_pixel_rows_are_positions_with_channel_vectors():
    x = _nchw()
    out = pixel(x)
    assert out.shape == (3 * 2 * 5, 4)
    row = 0
    for n in range(3):  # input-major, then spatial positions in order
        for i in range(2):
            for j in range(5):
                assert torch.equal(out[row], x[n, :, i, j])
                row += 1


def test_channel_columns_are_per_channel_samples():
    x = _nchw()
    out = channel(x)
    for c in range(4):
        assert torch.equal(out[:, c].sort().values, x[:, c].reshape(-1).sort().values)


def test_sequence_tokens_as_pixels():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    out = pixel(x, channel_axis=-1)
    assert out.shape == (21, 5)
    assert torch.equal(out[7 + 2], x[1, 2])
    seq_first = x.transpose(0, 1)  # (T, N, C), batch axis 1
    assert torch.equal(pixel(seq_first, batch_axis=1, channel_axis=-1), out)


def test_two_dimensional_and_one_dimensional_inputs():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    for out in (flatten(x), pixel(x), channel(x)):
        assert torch.equal(out, x)
    v = torch.arange(5.0)
    for out in (flatten(v), pixel(v), channel(v)):
        assert out.shape == (5, 1)


def test_pixel_subsample_is_seeded_private_and_paired():
    x = _nchw(n=8, c=3, h=6, w=6)
    state = torch.get_rng_state()
    a = pixel(x, max_samples=50, seed=7)
    b = pixel(x + 1.0, max_samples=50, seed=7)  # a second capture of the same layer
    c = pixel(x, max_samples=50, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (50, 3)
    assert torch.equal(a + 1.0, b)  # same rows: stays paired
    assert not torch.equal(a, c)
    full = pixel(x)
    # every kept row is a row of the full view, without repetition, in order
    idx = [int((full == r).all(1).nonzero()[0]) for r in a]
    assert idx == sorted(set(idx))


def test_pixel_cap_above_size_keeps_everything():
    x = _nchw()
    assert torch.equal(pixel(x, max_samples=10_000), pixel(x))


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=3),
    channels_last=st.booleans(),
)
def test_view_shapes(n, c, spatial, channels_last):
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    x = torch.zeros(shape)
    chan = -1 if channels_last else 1
    positions = int(np.prod(spatial)) if spatial else 1
    assert flatten(x).shape == (n, c * positions)
    assert pixel(x, channel_axis=chan).shape == (n * positions, c)
    assert channel(x, channel_axis=chan).shape == (n * positions, c)


def test_view_dispatcher_uses_info_pairs_and_dicts():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    info = CaptureInfo(
        key="ln",
        name="ln",
        call=1,
        site="output",
        module_type="LayerNorm",
        module=torch.nn.LayerNorm(3),
        shape=(2, 5, 3),
        batch_axis=0,
        channel_axis=2,
        source_dtype=torch.float32,
        source_shape=(2, 5, 3),
    )
    expected = pixel(x, channel_axis=-1)
    assert torch.equal(view(x, "pixel", info), expected)
    assert torch.equal(view(x, "channel", (0, -1)), expected)
    assert torch.equal(view(x, "pixel", {"batch_axis": 0, "channel_axis": 2}), expected)
    assert torch.equal(view(x, "flatten", info), flatten(x))
    assert view(x, "pixel", info, max_samples=4, seed=1).shape == (4, 3)
    assert torch.equal(view(x, "flatten"), flatten(x))


def test_view_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ICSValueError, match="unknown view 'pixels'; use one of 'flatten'"):
        view(x, "pixels")
    with pytest.raises(ICSValueError, match="only apply to the 'pixel' view"):
        view(x, "flatten", max_samples=3)
    with pytest.raises(ICSTypeError, match="`info_or_axes` must be a CaptureInfo"):
        view(x, "pixel", 3)
    with pytest.raises(ICSValueError, match="unknown pixel option"):
        view(x, "pixel", seeds=3)


def test_axis_and_argument_errors():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ICSValueError, match="`channel_axis`=5 is out of range"):
        pixel(x, channel_axis=5)
    with pytest.raises(ICSValueError, match="are the same axis"):
        channel(x, batch_axis=0, channel_axis=-3)
    with pytest.raises(ICSTypeError, match="`batch_axis` must be an int"):
        flatten(x, batch_axis=0.5)
    with pytest.raises(ICSValueError, match="`max_samples` must be a positive int"):
        pixel(x, max_samples=0)
    with pytest.raises(ICSValueError, match="must hold a batch of samples"):
        flatten(torch.tensor(1.0))
    with pytest.raises(ICSTypeError, match="`seed` must be an int"):
        pixel(x, max_samples=2, seed="a")
