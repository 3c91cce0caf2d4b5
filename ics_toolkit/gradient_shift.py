"""The gradient-based ICS of Santurkar et al. (NeurIPS 2018).

For a layer i with weight W_i, let G be the gradient of the loss with respect to
W_i with every parameter at step t, and G' the same gradient after the layers that
run *before* layer i have been moved to step t+1 while layer i and the layers after
it stay at step t. Then

    grad_ics_l2  = ||G - G'||_2        (Frobenius norm over W_i's entries)
    grad_ics_cos = <G, G'> / (||G|| ||G'||)

measure how much the update of the preceding layers changes the problem layer i
is solving. This complements the distributional ICS (W1 of the layer's outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ics_toolkit._selection import is_norm
from ics_toolkit._state import preserved, seed_torch
from ics_toolkit.errors import ICSValueError

__all__ = ["gradient_ics", "weighted_layers"]


def weighted_layers(model: nn.Module) -> list[str]:
    """Names of the modules with their own ``weight`` parameter that are not norm layers.

    These are the layers (convolutions, linear maps, embeddings, ...) whose gradient
    Santurkar et al. compare.
    """
    names = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight")
        if isinstance(w, torch.Tensor) and w.requires_grad and not is_norm(module):
            names.append(name)
    return names


def _call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    from ics_toolkit.recording import _as_call  # the probe forms, read in one place

    args, kwargs = _as_call(inputs)
    return torch.func.functional_call(model, dict(params), args=args, kwargs=kwargs)


def gradient_ics(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    params_before: Mapping[str, torch.Tensor],
    params_after: Mapping[str, torch.Tensor] | None = None,
    *,
    layers: Sequence[str] | None = None,
    mode: str = "train",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Santurkar et al.'s gradient ICS of each weighted layer for one optimizer step.

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its parameters, buffers, ``.grad`` fields, modes and the global
        RNG states are the same after the call as before.
    loss_fn : callable
        ``loss_fn(model_output, targets) -> scalar tensor``.
    inputs : Tensor, tuple or dict
        The batch the gradients are taken on (positional args as a tuple, keyword
        args as a dict).
    targets : Any
        Passed to ``loss_fn``.
    params_before : mapping of str to Tensor
        Every parameter at step t, keyed as in ``model.named_parameters()`` (e.g. a
        ``{n: p.detach().clone()}`` snapshot taken before ``optimizer.step()``).
    params_after : mapping of str to Tensor, optional
        Every parameter at step t+1 (default: the model's current parameters).
    layers : sequence of str, optional
        Module names to measure (default: :func:`weighted_layers`). "Preceding" means
        earlier in the order the modules first run in the forward pass.
    mode : {"train", "eval"}
        Module mode for the passes (the passes run in train mode by default, as the
        training step does; BatchNorm running statistics are restored afterwards).
    seed : int
        Every pass reseeds a forked RNG with it, so dropout masks are the same in the
        computation of G and of G'.

    Returns
    -------
    dict
        ``{layer: {"grad_ics_l2": ||G - G'||, "grad_ics_cos": cos(G, G'),
        "grad_norm": ||G||}}``, floats computed in float64.
    """
    if mode not in ("train", "eval"):
        raise ICSValueError(f"`mode` must be 'train' or 'eval', got {mode!r}")
    named = dict(model.named_parameters())
    for label, snap in (("params_before", params_before), ("params_after", params_after)):
        if snap is None:
            continue
        missing = sorted(set(named) - set(snap))
        if missing:
            raise ICSValueError(
                f"`{label}` lacks the parameters {missing[:5]}; snapshot every "
                "model.named_parameters() entry"
            )
    after = {n: p.detach() for n, p in named.items()} if params_after is None else params_after
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else weighted_layers(model)
    for name in names:
        w = modules.get(name)._parameters.get("weight") if name in modules else None
        if not isinstance(w, torch.Tensor):
            raise ICSValueError(
                f"layer {name!r} has no `weight` parameter; pick layers from "
                f"ics_toolkit.gradient_shift.weighted_layers(model): {weighted_layers(model)[:8]}"
            )
    buffers = dict(model.named_buffers())

    # first-run order of the modules that own parameters
    order: list[str] = []
    module_names = {id(m): n for n, m in model.named_modules()}

    def record(module: nn.Module, args: Any) -> None:
        n = module_names[id(module)]
        if n not in order:
            order.append(n)

    def owner(param_name: str) -> str:
        return param_name.rpartition(".")[0]

    def grads(params: dict[str, torch.Tensor], wrt: Sequence[str]) -> list[torch.Tensor]:
        leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
        full = {**buffers, **params, **leaves}
        seed_torch(seed)  # the same dropout masks in every pass; preserved() restores the RNG
        loss = loss_fn(_call(model, full, inputs), targets)
        return list(torch.autograd.grad(loss, [leaves[n] for n in wrt]))

    weights = [f"{n}.weight" if n else "weight" for n in names]
    results: dict[str, dict[str, float]] = {}
    with preserved(model, mode=mode, grad=True):
        before = {n: params_before[n].detach() for n in named}
        handles = [m.register_forward_pre_hook(record) for m in model.modules()]
        try:
            g_all = grads(before, weights)
        finally:
            for h in handles:
                h.remove()
        rank = {n: i for i, n in enumerate(order)}
        for name, wname, g in zip(names, weights, g_all, strict=True):
            if name not in rank:
                raise ICSValueError(f"layer {name!r} never ran in the forward pass of `inputs`")
            mixed = {
                p: (after[p] if rank.get(owner(p), len(order)) < rank[name] else before[p])
                for p in named
            }
            (g2,) = grads(mixed, [wname])
            g64, g264 = g.double().flatten(), g2.double().flatten()
            norm, norm2 = float(g64.norm()), float(g264.norm())
            cos = float(g64 @ g264) / (norm * norm2) if norm > 0 and norm2 > 0 else float("nan")
            results[name] = {
                "grad_ics_l2": float((g64 - g264).norm()),
                "grad_ics_cos": cos,
                "grad_norm": norm,
            }
    return results
