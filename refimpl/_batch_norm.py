"""Batch norm in training done by hand, exactly as the layer does it (issue 13).

The lean training paths (:mod:`refimpl.feature_fusion._lean`, the residual unit's
:class:`refimpl.residual_attention.torch_module._PreActivated`) write their own backward
and so cannot call a batch norm as a module. They take that path only where the layer is
plain (:func:`plain_batch_norm`), and then run what its ``forward`` runs: the same ATen
kernel (``native_batch_norm``), the same momentum rule and ``num_batches_tracked`` count
(:func:`batch_norm_train`); their backward calls ``native_batch_norm_backward``, the kernel
autograd calls for the layer. Any other layer (``nn.SyncBatchNorm``, whose statistics and
backward talk to the other processes; a subclass; a hooked layer) takes the general path,
which calls it as a module.

One exception to "the same kernel", for speed: on CPU, where a channel has many values,
the batch statistics are computed in a few vectorised passes (:func:`batch_stats`), not by
the kernel's scalar loop, which is 5 times slower there; the same mean, variance, running
statistics and ``num_batches_tracked``, to rounding (:data:`STATS_BY_PASSES`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from refimpl._torch_checks import autocast_enabled

#: torch's global module hooks (``register_module_forward_hook`` and its kin): registries
#: that torch fills and empties in place, so looked up once here (a module-level import
#: and generator in every call made :func:`plain_module` 1.3 us, with several per step).
_GLOBAL_HOOKS = tuple(
    getattr(module_globals, name)
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    if hasattr(module_globals, name)
)


def plain_module(m: nn.Module) -> bool:
    """Whether calling ``m`` runs nothing but its ``forward``: no hooks of its own, and no
    global module hooks."""
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        return False
    if getattr(m, "_backward_pre_hooks", None):
        return False
    return not any(_GLOBAL_HOOKS)


def plain_batch_norm(bn: nn.Module) -> bool:
    """Whether ``bn`` is exactly ``nn.BatchNorm2d``, training with batch statistics, affine,
    and :func:`plain_module`."""
    if type(bn) is not nn.BatchNorm2d or not bn.training or not bn.affine:
        return False
    return plain_module(bn)


def by_hand(x: torch.Tensor) -> bool:
    """Whether a hand-written backward may run on ``x``: float32 or float64 (half precision
    keeps torch's own kernels and their accumulation types), outside autocast."""
    return x.dtype in (torch.float32, torch.float64) and not autocast_enabled(x)


def momentum(bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """The running statistics ``bn`` updates in training and the factor it updates them
    with, counting the batch as ``bn.forward`` does (``num_batches_tracked``, and the
    cumulative average when ``momentum`` is None)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    else:
        factor = 0.0 if bn.momentum is None else bn.momentum
    if not bn.track_running_stats:
        return None, None, factor
    return bn.running_mean, bn.running_var, factor


#: :func:`by_passes`: the devices, and the fewest values per channel, where batch
#: statistics are computed in passes (:func:`batch_stats`) rather than by the layer's kernel.
#: Measured on CPU, one thread: ``batch_norm_update_stats`` and ``native_batch_norm`` run a
#: scalar Welford loop per channel over NCHW maps, 1.8 ms at 8x256x28x28 and 8.2 ms at
#: 32x64x56x56, where the passes (three sums, a subtraction, a square) take about 0.37 and
#: 3 ms. With few values per channel the passes' fixed cost wins nothing (52 against 39 us
#: for a 2x512x7x7 map, 15 against 17 us for 2x128x7x7): below 1024 values the kernel is
#: kept, and on other devices (CUDA's kernel is one fused pass). Channels-first maps only:
#: on channels_last maps the kernel's loop runs along the channels and beats the passes
#: (batch_norm_train 0.44 against 0.64 ms at 8x256x28x28, 2.7 against 5.9 ms at
#: 32x64x56x56; on NCHW maps 2.1 against 1.3 and 9.7 against 7.8 ms).
STATS_BY_PASSES = ("cpu",)
STATS_BY_PASSES_FROM = 1024


def by_passes(t: torch.Tensor, count: int) -> bool:
    """Whether :func:`batch_stats` computes the batch statistics of ``t`` (channels in dim 1),
    ``count`` values per channel (see :data:`STATS_BY_PASSES`)."""
    if t.device.type not in STATS_BY_PASSES or count < STATS_BY_PASSES_FROM:
        return False
    return t.is_contiguous()  # channels first


def _per_channel(t: torch.Tensor) -> tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """For ``t`` with channels in dim 1: the dims a channel's statistics run over, and a view
    of a (C,) vector that broadcasts over ``t``."""
    shape = (-1, *(1,) * (t.dim() - 2))
    return (0, *range(2, t.dim())), lambda v: v.view(shape)


def batch_stats(bn: nn.BatchNorm2d, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch statistics of ``t`` (channels in dim 1) for the training-mode ``bn`` in passes:
    the per-channel mean and biased variance; the running statistics move as the layer
    moves them (:func:`momentum`, the unbiased variance).

    Passes over the centred values, not one pass over t: the variance is the mean square of
    the centred values, exact to rounding however far the mean is from 0 (the one-pass
    E[t^2] - mean^2 is not)."""
    red, chan = _per_channel(t)
    mean = t.sum(red)
    count = t.numel() // mean.numel()
    mean.div_(count)
    centred = t - chan(mean)
    # the corrected two-pass algorithm: the centred values' own mean is the rounding error
    # of the first (the sum runs in t's dtype, the kernel's in double); without it float32
    # gradients of iAFF erred up to 4.6 times the plain graph's error (with it, 2.3 at most
    # over 4 seeds; the kernel 2.8)
    error = centred.sum(red).div_(count)
    var = centred.mul_(centred).sum(red).div_(count).sub_(error * error).clamp_(min=0)
    mean.add_(error)
    running_mean, running_var, factor = momentum(bn)
    if running_mean is not None and running_var is not None:  # as the layer's kernel does
        running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        running_var.mul_(1 - factor).add_(var, alpha=factor * count / (count - 1))
    return mean, var


def update_stats(bn: nn.BatchNorm2d, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance of ``t`` (channels in dim 1) for the training-mode
    ``bn``, its running statistics moved: in passes where they pay (:func:`by_passes`),
    else by the layer's statistics kernel (``batch_norm_update_stats``)."""
    if by_passes(t, t.numel() // t.shape[1]):
        return batch_stats(bn, t)
    running_mean, running_var, factor = momentum(bn)
    return torch.batch_norm_update_stats(t, running_mean, running_var, factor)


def batch_norm_train(
    bn: nn.BatchNorm2d, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bn(t)`` in training as the layer computes it (by its own kernel, or with the
    statistics in passes where they pay: :func:`by_passes`), and the batch mean and inverse
    deviation; the running statistics move as the layer moves them. ``t``: channels in dim
    1 ((N, C) or a map).

    Raises:
        ValueError: one value per channel, as the layer raises it (``F.batch_norm``).
    """
    if t.numel() <= t.shape[1]:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {t.size()}"
        )
    if t.dim() > 2 and by_passes(t, t.numel() // t.shape[1]):
        mean, var = batch_stats(bn, t)
        invstd = torch.rsqrt(var + bn.eps)
        return batch_norm_apply(t, weight, bias, mean, invstd, _per_channel(t)[1]), mean, invstd
    running_mean, running_var, factor = momentum(bn)
    return torch.native_batch_norm(t, weight, bias, running_mean, running_var, True, factor, bn.eps)


def batch_norm_backward(
    grad: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of a training-mode batch norm's input, weight and bias, given its
    input ``t``, batch mean and inverse deviation: the kernel autograd runs for the layer."""
    return torch.ops.aten.native_batch_norm_backward(
        grad, t, weight, None, None, mean, invstd, True, eps, [True, True, True]
    )


def batch_norm_apply(
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    chan: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """bn(t) from batch statistics as the layer's kernel applies it: with k = weight / sigma,
    k t + (bias - k mean), one ``addcmul`` into a tensor of ``t``'s layout. ``chan`` views a
    (C,) vector to broadcast over ``t``'s channels."""
    k = weight * invstd
    return torch.addcmul(chan(bias - mean * k), t, chan(k), out=torch.empty_like(t))


def relu_batch_norm(
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    chan: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """relu(bn(t)) rebuilt in backward from the batch statistics of the forward
    (:func:`batch_norm_apply`, then an in-place ReLU)."""
    return batch_norm_apply(t, weight, bias, mean, invstd, chan).relu_()
