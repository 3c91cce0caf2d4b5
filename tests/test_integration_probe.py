"""The integrations draw their probe from the training dataloader without moving any RNG."""

from __future__ import annotations

import random

import numpy as np
import torch

from ics_toolkit.integrations import _common


class RandomlyAugmented(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        noise = random.random() + float(np.random.rand()) + float(torch.rand(()))  # noqa: NPY002 - the legacy global RNG is the one that must not move
        return torch.full((3,), float(i) + noise), i % 2


def _states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()  # noqa: NPY002


def test_the_callbacks_probe_draw_leaves_every_global_rng_as_it_was():
    loader = torch.utils.data.DataLoader(RandomlyAugmented(), batch_size=8, shuffle=True)
    before = _states()
    x, y = _common.draw_probe(loader, 16, 3)
    after = _states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert x.shape == (16, 3) and y.shape == (16,)
    again, _ = _common.draw_probe(loader, 16, 3)  # the same seed, the same probe
    assert torch.equal(x, again)
