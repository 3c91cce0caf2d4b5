"""Reusing the probe pass after step t as the one before step t+1.

When steps t and t+1 are both measured, the capture taken right after step t (at the
parameters of t+1) is what the capture before step t+1 would compute again, provided
nothing the probe pass reads changed in between: the training forward/backward of
step t+1 runs in between and updates BatchNorm's running statistics, which a probe
pass in ``mode="train"`` does not read (it normalizes with the probe's own batch
statistics) but one in ``"eval"`` (or ``"keep"`` on a layer in eval mode) does.

:func:`read_state` fingerprints what the probe pass reads: the identity and version
counter of every parameter and of every buffer it reads. Version counters move on
every in-place change made through autograd-visible tensors (optimizer steps,
``load_state_dict``, ``copy_``), so an equal fingerprint means equal values. A change
made through ``tensor.data`` bypasses the counter, as it bypasses autograd; a model
modified that way between two measured steps should be measured with
``reuse_probe=False``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["read_state", "unread_buffers"]

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def unread_buffers(model: nn.Module, mode: str) -> set[int]:
    """ids of buffers a probe pass in ``mode`` does not read (train-mode BatchNorm stats)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if mode != "train":
        return set()
    skip = set()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for name in _RUNNING:
                buf = module._buffers.get(name)
                if buf is not None:
                    skip.add(id(buf))
    return skip


def read_state(model: nn.Module, mode: str) -> tuple[tuple[int, int, int], ...]:
    """(id, data pointer, version) of every parameter and read buffer of ``model``."""
    skip = unread_buffers(model, mode)
    tensors = [p for p in model.parameters()]
    tensors += [b for b in model.buffers() if id(b) not in skip]
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)
