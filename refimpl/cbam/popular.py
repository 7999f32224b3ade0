"""Transcriptions of the popular and the official CBAM code, for measurement and comparison.

Written here so that the benchmark and the tutorial can put numbers on "paper versus
popular versus official" without depending on somebody else's repository. They are
deliberately plain eager copies of each *form*, bugs and quirks kept on purpose (listed
below); they are not for use in models: use :class:`refimpl.cbam.CBAM`.

:class:`PopularCBAM`, the form most copied in blog posts and attention zoos
(``ChannelAttention`` and ``SpatialAttention`` of 1x1 convolutions, applied as
``out = ca(out) * out; out = sa(out) * out``). It computes what ``CBAM(variant="paper")``
computes. Quirks kept:

- the spatial padding is hard-coded, 3 for a 7x7 kernel and 1 for 3x3, and any other
  kernel is refused by an ``assert``;
- the hidden width is ``channels // ratio`` with no floor at 1: fewer channels than
  ``ratio`` build a convolution with 0 output channels;
- each gate is a module that returns its map, and the caller multiplies; pooling,
  MLP layers and sigmoids are module calls of their own (not bugs, but the overhead
  that a comparison of speed should include).

One bug is *not* kept: the most copied version names the constructor argument
``rotio`` and then reads ``ratio``, a ``NameError`` on every call; here it is ``ratio``.

:class:`OfficialCBAM`, the authors' ``MODELS/cbam.py`` (github.com/Jongchan/
attention-module): ``ChannelGate`` (global pooling by ``avg_pool2d``/``max_pool2d`` with
a kernel of the whole map, an ``nn.Sequential`` MLP with biases, applied to each pooled
descriptor separately) and ``SpatialGate`` ([max; mean] across channels, a bias-free 7x7
convolution, ``BatchNorm2d(1, momentum=0.01)``). Its ``state_dict`` has the official
keys, so it is also what :func:`refimpl.cbam.convert_official_state_dict` is checked
against. Quirks kept: the kernel is fixed at 7; the hidden width
``channels // reduction_ratio`` can be 0; the channel scale is expanded to the input's
shape before the product.

The ``build_*``/``load_*`` pairs are the benchmark's peer hooks: ``build(channels,
hidden) -> nn.Module`` (ImportError when a library is missing) and ``load(peer, ours)``,
which copies the weights of our module, built with the ``*_OURS_OPTIONS`` next to it,
into the peer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# The popular form


class PopularChannelAttention(nn.Module):
    """The popular channel gate: returns M_c, (N, C, 1, 1)."""

    def __init__(self, in_planes: int, ratio: int = 16, hidden: int | None = None) -> None:
        super().__init__()
        hidden = in_planes // ratio if hidden is None else hidden  # no floor at 1 (kept)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, in_planes, 1, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avgout = self.sharedMLP(self.avg_pool(x))
        maxout = self.sharedMLP(self.max_pool(x))
        return self.sigmoid(avgout + maxout)


class PopularSpatialAttention(nn.Module):
    """The popular spatial gate: returns M_s, (N, 1, H, W); kernel 3 or 7 only (kept)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        assert kernel_size in (3, 7), "kernel size must be 3 or 7"  # kept as published
        padding = 3 if kernel_size == 7 else 1
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avgout = torch.mean(x, dim=1, keepdim=True)
        maxout, _ = torch.max(x, dim=1, keepdim=True)
        x = torch.cat([avgout, maxout], dim=1)
        return self.sigmoid(self.conv(x))


class PopularCBAM(nn.Module):
    """The popular CBAM: ``out = ca(x) * x; out = sa(out) * out``.

    Args:
        channels: C.
        ratio: r; the hidden width is ``channels // ratio`` (no floor).
        kernel_size: 3 or 7.
        hidden: the hidden width given directly (for the benchmark); overrides ``ratio``.
    """

    def __init__(
        self, channels: int, ratio: int = 16, kernel_size: int = 7, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.ca = PopularChannelAttention(channels, ratio, hidden)
        self.sa = PopularSpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ca(x) * x
        out = self.sa(out) * out
        return out


# ---------------------------------------------------------------------------------------
# The official form (MODELS/cbam.py)


class BasicConv(nn.Module):
    """Convolution, then optionally batch norm (momentum 0.01) and ReLU."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        relu: bool = True,
        bn: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    """The official channel gate: returns x * M_c."""

    def __init__(
        self, gate_channels: int, reduction_ratio: int = 16, pool_types: Any = ("avg", "max")
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = tuple(pool_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_att_sum = None
        size = (x.size(2), x.size(3))
        for pool_type in self.pool_types:
            if pool_type == "avg":
                raw = self.mlp(F.avg_pool2d(x, size, stride=size))
            else:  # "max"; the official "lp" and "lse" are not transcribed
                raw = self.mlp(F.max_pool2d(x, size, stride=size))
            channel_att_sum = raw if channel_att_sum is None else channel_att_sum + raw
        scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    """[max; mean] across channels: the official order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    """The official spatial gate, kernel fixed at 7: returns x * M_s."""

    def __init__(self) -> None:
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(
            2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out = self.spatial(self.compress(x))
        return x * torch.sigmoid(x_out)


class OfficialCBAM(nn.Module):
    """The official CBAM module: ``SpatialGate(ChannelGate(x))``.

    Args:
        gate_channels: C.
        reduction_ratio: r; the hidden width is ``C // r`` (no floor).
        pool_types: the channel gate's poolings, ``("avg", "max")``.
        no_spatial: leave the spatial gate out.
    """

    def __init__(
        self,
        gate_channels: int,
        reduction_ratio: int = 16,
        pool_types: Any = ("avg", "max"),
        no_spatial: bool = False,
    ) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out


# ---------------------------------------------------------------------------------------
# Peer hooks for the benchmark: build(channels, hidden) and load(peer, ours)

#: Options that make ``refimpl.cbam.CBAM`` compute what each peer computes.
POPULAR_OURS_OPTIONS: dict[str, Any] = {"variant": "paper"}
OFFICIAL_OURS_OPTIONS: dict[str, Any] = {"variant": "official"}
TIMM_OURS_OPTIONS: dict[str, Any] = {"variant": "paper", "spatial_bn": True}


def build_popular_cbam(channels: int, hidden: int) -> nn.Module:
    """:class:`PopularCBAM` with the given hidden width and a 7x7 kernel."""
    return PopularCBAM(channels, hidden=hidden)


def load_popular_cbam(peer: nn.Module, ours: nn.Module) -> None:
    """Copy ``CBAM(variant="paper")`` weights into a :class:`PopularCBAM`."""
    with torch.no_grad():
        peer.ca.sharedMLP[0].weight.copy_(ours.channel.reduce.weight[:, :, None, None])
        peer.ca.sharedMLP[2].weight.copy_(ours.channel.expand.weight[:, :, None, None])
        peer.sa.conv.weight.copy_(ours.spatial.conv.weight)


def build_official_cbam(channels: int, hidden: int) -> nn.Module:
    """:class:`OfficialCBAM` whose ``C // r`` is ``hidden`` (r = C // hidden)."""
    ratio = max(1, channels // hidden)
    if channels // ratio != hidden:
        raise ValueError(f"the official CBAM cannot have {hidden} hidden of {channels} channels")
    return OfficialCBAM(channels, ratio)


def load_official_cbam(peer: nn.Module, ours: nn.Module) -> None:
    """Copy ``CBAM(variant="official")`` weights into an :class:`OfficialCBAM`."""
    mlp, spatial = peer.ChannelGate.mlp, peer.SpatialGate.spatial
    with torch.no_grad():
        for theirs, mine in ((mlp[1], ours.channel.reduce), (mlp[3], ours.channel.expand)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        spatial.conv.weight.copy_(ours.spatial.conv.weight)
        spatial.bn.load_state_dict(ours.spatial.bn.state_dict())


def build_timm_cbam(channels: int, hidden: int) -> nn.Module:
    """timm's ``CbamModule(channels, rd_channels=hidden)``: no MLP biases, [avg; max],
    bias-free 7x7 convolution with batch norm. ImportError when timm does not import."""
    try:
        from timm.layers.cbam import CbamModule  # not re-exported by timm.layers
    except ModuleNotFoundError as err:
        raise ImportError(f"timm is not installed ({err})") from err
    except Exception as err:  # timm imports torchvision, which may fail in other ways
        raise ImportError(f"timm does not import: {type(err).__name__}: {err}") from err
    return CbamModule(channels, rd_channels=hidden)


def load_timm_cbam(peer: nn.Module, ours: nn.Module) -> None:
    """Copy ``CBAM(variant="paper", spatial_bn=True)`` weights into timm's ``CbamModule``."""
    with torch.no_grad():
        peer.channel.fc1.weight.copy_(ours.channel.reduce.weight[:, :, None, None])
        peer.channel.fc2.weight.copy_(ours.channel.expand.weight[:, :, None, None])
        peer.spatial.conv.conv.weight.copy_(ours.spatial.conv.weight)
        peer.spatial.conv.bn.load_state_dict(ours.spatial.bn.state_dict())
