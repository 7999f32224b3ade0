"""Recompute in backward: a custom autograd Function that saves only its inputs.

Shared by the modules that trade computation for memory in training (feature fusion's
lean path, the residual attention module's ``checkpoint_mask``). Unlike
``torch.utils.checkpoint`` it saves its inputs through ``ctx.save_for_backward`` (so a
saved-tensor hook, the benchmark's counter, sees them) and keeps the batch norms' running
statistics to one update per training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Recompute(torch.autograd.Function):
    """``run(*inputs)`` that saves only ``inputs`` for backward and runs again there.

    The lean training path of MS-CAM, AFF and iAFF, and the residual attention module's
    activation checkpointing. Forward runs ``run`` without recording a graph and saves its
    tensor inputs (``ctx.save_for_backward``, so the benchmark's saved-tensor hook sees
    them); backward runs it again with the graph on, under the forward's autocast state, and
    differentiates it. ``run`` calls the batch norms as modules both times (so
    ``SyncBatchNorm`` synchronises statistics in both, and its backward is the module's
    own); the running statistics of ``modules`` are restored after the second run, so one
    training step updates them once, as plain autograd does. The recomputation gives the
    same values, so the gradients are plain autograd's. In double backward
    (``create_graph``) the second run is recorded on the saved inputs themselves, so
    gradgradcheck holds.
    """

    @staticmethod
    def forward(ctx, run, modules, n_inputs, *tensors):  # noqa: ANN001, ANN205
        ctx.run, ctx.modules = run, modules
        ctx.params = tensors[n_inputs:]  # the modules' own parameters: used, not saved
        save_autocast(ctx, tensors[0].device.type)
        ctx.save_for_backward(*tensors[:n_inputs])
        return run(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        grads = rerun_and_grad(ctx, ctx.run, ctx.modules, ctx.saved_tensors, ctx.params, 3, grad)
        return (None, None, None, *grads)


def rerun_and_grad(
    ctx,  # noqa: ANN001
    run: Callable[..., torch.Tensor],
    modules: tuple[nn.Module, ...],
    inputs: tuple[torch.Tensor | None, ...],
    params: tuple[torch.Tensor | None, ...],
    skip: int,
    grad: torch.Tensor,
) -> list[torch.Tensor | None]:
    """The backward of :class:`Recompute`: ``run(*inputs)`` again with the graph on, and
    the gradients of ``(*inputs, *params)`` wanted by ``ctx.needs_input_grad`` (whose
    first ``skip`` entries are the Function's non-tensor arguments).

    Also the double-backward path of Functions with a hand-written backward
    (:mod:`refimpl.feature_fusion._lean`); ``ctx`` carries the forward's autocast state
    (:func:`save_autocast`). ``None`` entries (absent biases) get ``None``.
    """
    create_graph = torch.is_grad_enabled()
    if not create_graph:  # a graph of its own, not hung on the forward's
        inputs = tuple(
            None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs
        )
    everything = (*inputs, *params)
    wanted = [
        i for i, t in enumerate(everything) if t is not None and ctx.needs_input_grad[skip + i]
    ]
    # The second run updates copies of the running statistics, thrown away after it:
    # the layers keep their own buffers (swapped, not written: the batch norms' graph
    # may hold them), so one training step updates them once.
    kept = [
        (m, name, b)
        for top in modules
        for m in top.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    for m, name, b in kept:
        m._buffers[name] = b.clone()
    try:
        with (
            torch.enable_grad(),
            torch.autocast(ctx.device_type, ctx.autocast_dtype, enabled=ctx.autocast),
        ):
            out = run(*inputs)
    finally:
        for m, name, b in kept:
            m._buffers[name] = b
    grads = torch.autograd.grad(
        out,
        [everything[i] for i in wanted],
        grad,
        create_graph=create_graph,
        allow_unused=True,
    )
    result: list[torch.Tensor | None] = [None] * len(everything)
    for i, g in zip(wanted, grads, strict=True):
        result[i] = g
    return result


def save_autocast(ctx, device_type: str) -> None:  # noqa: ANN001
    """Record the forward's autocast state on ``ctx`` for :func:`rerun_and_grad`."""
    ctx.device_type = device_type
    ctx.autocast = torch.is_autocast_enabled(device_type)
    ctx.autocast_dtype = torch.get_autocast_dtype(device_type)


def recompute(
    run: Callable[..., torch.Tensor], modules: tuple[nn.Module, ...], *inputs: torch.Tensor
) -> torch.Tensor:
    """``run(*inputs)``, saving only ``inputs`` for backward (see :class:`Recompute`)."""
    params = [p for m in modules for p in m.parameters()]
    return Recompute.apply(run, modules, len(inputs), *inputs, *params)
