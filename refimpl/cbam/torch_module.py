r"""CBAM as PyTorch modules (Woo et al., ECCV 2018, Section 3).

Read it beside ``numpy_forward.py``: the same steps, names and order.

Glossary (the paper's symbols):
    F          the module's input feature map, here ``x``                   (N, C, H, W)
    F^c_avg    average of each channel over the positions (avg-pooled)      (N, C)
    F^c_max    maximum of each channel over the positions (max-pooled)      (N, C)
    W0         ``reduce.weight``, the shared MLP's first layer, C -> C/r     (C/r, C)
    W1         ``expand.weight``, the shared MLP's second layer, C/r -> C    (C, C/r)
    M_c        channel attention map, Eq. (2): "what" to attend to          (N, C, 1, 1)
    F'         the channel-refined feature, Eq. (1): M_c(F) * F             (N, C, H, W)
    F^s_avg    average over the channels at each position                   (N, 1, H, W)
    F^s_max    maximum over the channels at each position                   (N, 1, H, W)
    f^{7x7}    ``conv.weight``, a convolution from the pooled maps to one    (1, 2, k, k)
    M_s        spatial attention map, Eq. (3): "where" to attend            (N, 1, H, W)
    F''        the output, Eq. (1): M_s(F') * F'                            (N, C, H, W)

Deviations. The paper's equations and the authors' code (github.com/Jongchan/
attention-module, ``MODELS/cbam.py``) differ in three places; ``variant="paper"`` (the
default) follows the equations, ``variant="official"`` the code, and each difference is
also an option of its own:

- MLP biases (``bias``): Eq. (2) has none; the code's ``nn.Linear`` layers have them,
  so the output bias is added once per pooled descriptor (twice with avg and max).
- Spatial pooling order (``spatial_pooling``): Eq. (3) stacks [avg; max]; the code's
  ``ChannelPool`` stacks [max; mean]. Weights trained one way are wrong the other way.
- Batch norm after the spatial convolution (``spatial_bn``): the code's ``BasicConv``
  is a bias-free convolution followed by ``BatchNorm2d(1, eps=1e-5, momentum=0.01)``;
  Eq. (3) has the convolution alone. Its official ResNet also initialises that batch
  norm's weight to 0 (every M_s starts at exactly 0.5); ``reset_parameters`` here uses
  the batch norm's default, weight 1 (``networks.zero_init_spatial_bn_`` gives the
  official start).

One more option, ``spatial_bias`` (default False): a bias in the spatial convolution,
which neither Eq. (3) nor the code has but some re-implementations add.

The official code's pooling options "lp" and "lse" (not in the paper) are not offered;
its ``no_spatial`` CBAM is :class:`ChannelAttention` alone. The most copied
re-implementation (``ChannelAttention``/``SpatialAttention`` with 1x1 convolutions) is
``variant="paper"`` exactly, except that it hard-codes the padding for kernel 3 or 7
(any odd kernel works here) and has a typo (``rotio``) that makes it crash as
published; see ``popular.py``. timm's ``CbamModule`` is the paper's form with the
official batch norm (``spatial_bn=True``; its momentum is 0.1, which changes only the
running statistics) and rounds C/r to the nearest integer where we take the floor.

The paper's "parallel" arrangement (Table 3) is not spelt out; here both maps are
computed from F and both multiply it, :math:`M_s(F) \otimes M_c(F) \otimes F`, as the
abstract describes the maps being "multiplied to the input feature map". (BAM, by the
same authors, combines parallel maps differently: ``refimpl.bam``.)

Speed and memory: the channel gate reads F twice (sum, max) and pushes both
descriptors through the MLP as one (P, N, C) batch; F' is made once and read three
times (sum, max, product). Without gradients, M_s multiplies into F' in place: one
allocation of the input's size, not two. With gradients, three choices keep the
backward cheap (each explained where it is made): max pooling keeps its argmax, means
are scaled sums (in float32 and float64; half precision takes the mean, which cannot
overflow), and the last product keeps F and the first map instead of F'
(:class:`_SecondProduct`). The bytes saved for backward are then the input's plus maps
of 1/C and 1/(HW) of it, 1.03-1.12x the input at the benchmark's shapes, where autograd
on the plain formula (and timm, and the popular code) saves 2.0-2.1x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import check_choice, check_positive_int, hidden_width
from refimpl._torch_checks import check_torch_input, conv2d
from refimpl.cbam._options import (
    ARRANGEMENTS,
    POOLINGS,
    VARIANTS,
    check_kernel_size,
    check_variant,
    parse_pooling,
)

__all__ = [
    "ARRANGEMENTS",
    "CBAM",
    "POOLINGS",
    "VARIANTS",
    "ChannelAttention",
    "SpatialAttention",
]

#: Batch norm of the official spatial gate (``BasicConv`` in the authors' code).
BN_EPS, BN_MOMENTUM = 1e-5, 0.01


# The maxima: ``amax`` is the fastest forward, but its backward builds a mask of the whole
# input (``input == max``) and divides by the count of ties, several full-size passes;
# when a gradient is needed, the max with indices costs more forward and far less
# backward (a scatter of the gradient to one index): 4x less for both together on CPU.
# The two differ only at exact ties, where amax shares the gradient among the tied.


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


# With gradients, the means are sums scaled afterwards: the same forward, but the backward
# of a sum is a broadcast view of the incoming gradient, where the backward of ``mean``
# materialises a full-size division by the count. Only in float32 and float64: in half
# precision the sum can overflow before it is scaled (float16 tops out at 65 504; 48 x 48
# positions of value 40 sum to 92 160, 512 channels of 200 to 102 400), so ``mean`` there.


def _sum_then_scale(F_: torch.Tensor) -> bool:
    return _needs_grad(F_) and F_.dtype in (torch.float32, torch.float64)


def _pool_positions(F_: torch.Tensor, name: str) -> torch.Tensor:
    """Global pooling over the positions, (N, C, H, W) -> (N, C)."""
    if not _needs_grad(F_) or (name == "avg" and not _sum_then_scale(F_)):
        return F_.mean((2, 3)) if name == "avg" else F_.amax((2, 3))
    if name == "avg":
        return F_.sum((2, 3)) * (1.0 / (F_.shape[2] * F_.shape[3]))
    if F_.is_contiguous():  # keeps the argmax for backward
        return F_.flatten(2).max(2)[0]
    return F.adaptive_max_pool2d(F_, 1).flatten(1)  # channels_last: flatten(2) would copy


def _pool_channels(F_: torch.Tensor, name: str) -> torch.Tensor:
    """Pooling across the channels at each position, (N, C, H, W) -> (N, 1, H, W)."""
    if not _needs_grad(F_) or (name == "avg" and not _sum_then_scale(F_)):
        return F_.mean(1, keepdim=True) if name == "avg" else F_.amax(1, keepdim=True)
    if name == "avg":
        return F_.sum(1, keepdim=True) * (1.0 / F_.shape[1])
    return F_.max(1, keepdim=True)[0]  # keeps the argmax for backward


class ChannelAttention(nn.Module):
    r"""The channel attention module: :math:`F' = M_c(F) \otimes F`, Eq. (2).

    Args:
        channels: C, the channel count of the input.
        reduction: r, the reduction ratio; the hidden width is ``max(1, channels // r)``.
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        pooling: the descriptors, ``("avg", "max")`` (paper) or one of them (Table 1);
            also ``"avg"``, ``"max"``, ``"avg+max"``.
        variant: ``"paper"`` (no MLP biases, Eq. (2)) or ``"official"`` (biases).
        bias: biases in the MLP; None takes the variant's.
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any N, H, W >= 1, any floating dtype and device.
        Output (N, C, H, W), same dtype, device and memory format.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden_channels: int | None = None,
        pooling: Any = ("avg", "max"),
        variant: str = "paper",
        bias: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = type(self).__name__
        hidden_channels = hidden_width(channels, reduction, hidden_channels, who)
        preset = check_variant(variant, who)
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.pooling = parse_pooling(pooling, who)
        self.variant = variant
        bias = preset["bias"] if bias is None else bool(bias)
        self.reduce = nn.Linear(channels, hidden_channels, bias=bias, **fk)  # W0
        self.expand = nn.Linear(hidden_channels, channels, bias=bias, **fk)  # W1

    def reset_parameters(self) -> None:
        """Re-initialise both layers as ``nn.Linear`` does."""
        self.reduce.reset_parameters()
        self.expand.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"pooling={self.pooling}, bias={self.reduce.bias is not None}"
        )

    def attention_map(self, F_: torch.Tensor) -> torch.Tensor:
        r"""Eq. (2): :math:`M_c = \sigma(\sum_p W_1 \delta(W_0 F^c_p))`. (N, C, 1, 1)."""
        z = torch.stack([_pool_positions(F_, p) for p in self.pooling])  # F^c_p, (P, N, C)
        # The shared MLP on all descriptors at once; F.linear on the parameters avoids the
        # per-call module overhead that dominates at small shapes.
        hidden = F.relu(F.linear(z, self.reduce.weight, self.reduce.bias))  # (P, N, C/r)
        logits = F.linear(hidden, self.expand.weight, self.expand.bias).sum(0)  # (N, C)
        return torch.sigmoid(logits).view(*logits.shape, 1, 1)  # (N, C, 1, 1)

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """F' = M_c(F) * F; with ``return_maps`` also ``{"M_c": M_c}``."""
        check_torch_input(x, self.channels, type(self).__name__, "x", self)
        M_c = self.attention_map(x)  # Eq. (2), (N, C, 1, 1)
        F_prime = x * M_c  # Eq. (1), first line, (N, C, H, W)
        return (F_prime, {"M_c": M_c}) if return_maps else F_prime


class SpatialAttention(nn.Module):
    r"""The spatial attention module: :math:`M_s(F) \otimes F`, Eq. (3).

    Args:
        channels: C, the channel count of the input (checked; the gate has no per-channel
            weights).
        kernel_size: k of the convolution, any odd size (7 in the paper, 3 in Table 2);
            zero padding k // 2 keeps H x W, also when H or W is smaller than k.
        pooling: the maps pooled across channels, in the order they are stacked; None
            takes the variant's, ``("avg", "max")`` (paper) or ``("max", "avg")`` (code).
        variant: ``"paper"`` or ``"official"`` (see the module docstring).
        bias: a bias in the convolution (neither variant has one).
        bn: a ``BatchNorm2d(1)`` after the convolution; None takes the variant's.
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any N, H, W >= 1 (batch norm in training mode needs
        N * H * W > 1), any floating dtype and device. Output (N, C, H, W), same dtype,
        device and memory format.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        *,
        pooling: Any = None,
        variant: str = "paper",
        bias: bool = False,
        bn: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = type(self).__name__
        check_positive_int(channels, who, "channels")
        check_kernel_size(kernel_size, who)
        preset = check_variant(variant, who)
        self.channels = channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.pooling = parse_pooling(preset["spatial_pooling"] if pooling is None else pooling, who)
        self.variant = variant
        bn = preset["spatial_bn"] if bn is None else bool(bn)
        self.conv = nn.Conv2d(  # f^{k x k}
            len(self.pooling), 1, kernel_size, padding=self.padding, bias=bool(bias), **fk
        )
        self.bn = nn.BatchNorm2d(1, eps=BN_EPS, momentum=BN_MOMENTUM, **fk) if bn else None

    def reset_parameters(self) -> None:
        """Re-initialise the convolution as ``nn.Conv2d`` does; batch norm to weight 1, bias 0."""
        self.conv.reset_parameters()
        if self.bn is not None:
            self.bn.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, "
            f"pooling={self.pooling}, bias={self.conv.bias is not None}, bn={self.bn is not None}"
        )

    def attention_map(self, F_: torch.Tensor) -> torch.Tensor:
        r"""Eq. (3): :math:`M_s = \sigma(f^{k \times k}([F^s_{avg}; F^s_{max}]))`. (N, 1, H, W)."""
        descriptors = torch.cat([_pool_channels(F_, p) for p in self.pooling], 1)  # (N, P, H, W)
        # conv2d: F.conv2d, in float32 on thin bfloat16 CPU maps (a torch bug, see there)
        logits = conv2d(descriptors, self.conv.weight, self.conv.bias, padding=self.padding)
        if self.bn is not None:  # the official form's batch norm
            logits = self.bn(logits)
        return torch.sigmoid(logits)  # (N, 1, H, W)

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """M_s(x) * x; with ``return_maps`` also ``{"M_s": M_s}``."""
        check_torch_input(x, self.channels, type(self).__name__, "x", self)
        M_s = self.attention_map(x)  # Eq. (3), (N, 1, H, W)
        out = x * M_s  # Eq. (1), second line, (N, C, H, W)
        return (out, {"M_s": M_s}) if return_maps else out


class CBAM(nn.Module):
    r"""CBAM, Eq. (1): :math:`F' = M_c(F) \otimes F`, :math:`F'' = M_s(F') \otimes F'`.

    Args:
        channels: C, the channel count of the input.
        reduction: r, the channel gate's reduction ratio (16 in the paper).
        hidden_channels: the MLP's hidden width given directly; overrides ``reduction``.
        pooling: the channel gate's descriptors: ``("avg", "max")`` (paper), ``("avg",)``
            or ``("max",)`` (Table 1); also ``"avg"``, ``"max"``, ``"avg+max"``.
        kernel_size: the spatial convolution's odd kernel (7 in the paper; 3 in Table 2).
        spatial_pooling: the spatial gate's pooled maps in stacking order; None takes the
            variant's, ``("avg", "max")`` (paper) or ``("max", "avg")`` (official).
        arrangement: ``"channel-spatial"`` (Eq. (1)), ``"spatial-channel"`` or
            ``"parallel"`` (:math:`M_s(F) \otimes M_c(F) \otimes F`), the paper's Table 3.
        variant: ``"paper"`` (the equations) or ``"official"`` (the authors' code); the
            presets of the options below left as None.
        bias: biases in the channel gate's MLP (paper: no, official: yes).
        spatial_bias: a bias in the spatial convolution (no in both).
        spatial_bn: a batch norm after the spatial convolution (paper: no, official: yes).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any N, H, W >= 1 (with ``spatial_bn`` in training mode,
        N * H * W > 1), any floating dtype and device. Output (N, C, H, W), same dtype,
        device and memory format.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden_channels: int | None = None,
        pooling: Any = ("avg", "max"),
        kernel_size: int = 7,
        spatial_pooling: Any = None,
        arrangement: str = "channel-spatial",
        variant: str = "paper",
        bias: bool | None = None,
        spatial_bias: bool = False,
        spatial_bn: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        check_positive_int(channels, "CBAM", "channels")
        check_choice(arrangement, ARRANGEMENTS, "CBAM", "arrangement")
        check_variant(variant, "CBAM")
        self.channels = channels
        self.arrangement = arrangement
        self.variant = variant
        self.channel = ChannelAttention(
            channels,
            reduction,
            hidden_channels=hidden_channels,
            pooling=pooling,
            variant=variant,
            bias=bias,
            **fk,
        )
        if spatial_pooling is not None:
            spatial_pooling = parse_pooling(spatial_pooling, "CBAM", "spatial_pooling")
        self.spatial = SpatialAttention(
            channels,
            kernel_size,
            pooling=spatial_pooling,
            variant=variant,
            bias=spatial_bias,
            bn=spatial_bn,
            **fk,
        )

    @property
    def hidden_channels(self) -> int:
        """The channel gate's hidden width C/r."""
        return self.channel.hidden_channels

    def reset_parameters(self) -> None:
        """Re-initialise both gates (``nn.Linear``, ``nn.Conv2d`` and batch norm defaults)."""
        self.channel.reset_parameters()
        self.spatial.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, arrangement={self.arrangement!r}, variant={self.variant!r}"
        )

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """F'' of Eq. (1); with ``return_maps`` also ``{"M_c": M_c, "M_s": M_s}``."""
        check_torch_input(x, self.channels, "CBAM", "x", self)
        if self.arrangement == "channel-spatial":
            M_c = self.channel.attention_map(x)  # Eq. (2), (N, C, 1, 1)
            F_prime = x * M_c  # Eq. (1), (N, C, H, W)
            M_s = self.spatial.attention_map(F_prime)  # Eq. (3), (N, 1, H, W)
            out = _scale(F_prime, M_s, x, M_c, True)  # Eq. (1): F'' = M_s * F'
        elif self.arrangement == "spatial-channel":
            M_s = self.spatial.attention_map(x)  # (N, 1, H, W)
            F_prime = x * M_s
            M_c = self.channel.attention_map(F_prime)  # (N, C, 1, 1)
            out = _scale(F_prime, M_c, x, M_s, False)
        else:  # parallel: both maps from F
            M_c = self.channel.attention_map(x)  # (N, C, 1, 1)
            M_s = self.spatial.attention_map(x)  # (N, 1, H, W)
            out = _scale(x * M_c, M_s, x, M_c, True)
        return (out, {"M_c": M_c, "M_s": M_s}) if return_maps else out


def _scale(
    F_prime: torch.Tensor,
    M: torch.Tensor,
    F_: torch.Tensor,
    M_first: torch.Tensor,
    spatial: bool,
) -> torch.Tensor:
    """The second product, ``F'' = M * F'`` where ``F' = M_first * F``.

    ``spatial`` says which map M is: M_s (N, 1, H, W), else M_c (N, C, 1, 1); the shapes
    alone cannot tell when C = 1 or H = W = 1. Without gradients, the product is made in
    place on F' (our own intermediate); with gradients, through :class:`_SecondProduct`,
    which keeps F and the first map for backward instead of F'.
    """
    if not torch.is_grad_enabled() or not (F_prime.requires_grad or M.requires_grad):
        return F_prime.mul_(M)
    return _SecondProduct.apply(F_prime, M, F_, M_first, spatial)


class _SecondProduct(torch.autograd.Function):
    r"""``F'' = M * F'`` whose backward recomputes F' from ``F' = M_first * F``.

    Autograd's own product would keep F' (the size of the input) for the gradient of M;
    F and M_first are kept anyway by the first product, so this halves the bytes saved for
    backward (2x the input -> 1x, plus the maps) at no extra pass:
    :math:`\partial L / \partial M = \sum g \, F' = \sum (g F) M_{first}` over the axes
    that M broadcasts along, as a batched matrix product with the small first map.
    F and M_first get no gradient from here: F' carries it, through the first product.
    """

    @staticmethod
    def forward(ctx, F_prime, M, F_, M_first, spatial):  # one-step form: less call overhead
        ctx.save_for_backward(M, F_, M_first)
        ctx.spatial = spatial
        return F_prime * M

    @staticmethod
    def backward(ctx, grad):  # differentiable ops only: double backward works too
        M, F_, M_first = ctx.saved_tensors
        grad_F_prime = grad * M if ctx.needs_input_grad[0] else None
        grad_M = None
        if ctx.needs_input_grad[1]:
            n, c, h, w = grad.shape
            gF = (grad * F_).reshape(n, c, h * w)  # a view for NCHW and channels_last
            if ctx.spatial:  # M spatial (N, 1, H, W), M_first channel (N, C, 1, 1)
                weights = M_first.reshape(n, 1, c).to(gF.dtype)
                grad_M = torch.bmm(weights, gF).reshape(n, 1, h, w)
            else:  # M channel (N, C, 1, 1), M_first spatial (N, 1, H, W)
                weights = M_first.reshape(n, h * w, 1).to(gF.dtype)
                grad_M = torch.bmm(gF, weights).reshape(n, c, 1, 1)
            grad_M = grad_M.to(M.dtype)
        return grad_F_prime, grad_M, None, None, None
