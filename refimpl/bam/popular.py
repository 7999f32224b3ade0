"""Transcriptions of the official and the popular BAM, for measurement and comparison.

Written here so that the benchmark and the tutorial can time and test our module against
the forms people actually run. They are deliberately plain eager re-writings of what
that code computes, bugs kept on purpose (listed below), except where a bug stops the
code from running at all. They are not for use in models: use :class:`refimpl.bam.BAM`.

:class:`OfficialBAM`, the authors' code (Jongchan/attention-module, ``MODELS/bam.py``):

- combines the branches by a product, ``1 + sigmoid(M_c * M_s)``, not the paper's sum;
- batch norm and ReLU after every hidden layer, no batch norm at the end of a branch
  (the paper: one at the end of each);
- pools the channel branch with ``avg_pool2d(x, kernel_size=H, stride=H)``: the global
  mean only on square inputs; a wide input (W > H) yields W // H pooled columns per
  channel and the MLP fails on the flattened size, a tall one (H > W) fails in the
  pooling itself;
- hidden width ``C // r`` with no floor at 1: C < r builds zero-width layers;
- expands both branch outputs to (N, C, H, W) views and allocates three full-size
  temporaries before the output (the product, its sigmoid, one plus the sigmoid), and
  saves about 3.4 times the input for backward (ours: 2.2);
- *fixed here*: its ``ChannelGate.__init__`` reads an undefined name
  (``self.gate_activation = gate_activation``), so the published module cannot be built;
  the line is left out.

Its ``state_dict`` has the official keys (``channel_att.gate_c.gate_c_fc_0.weight``, ...),
so official checkpoints load into it unchanged.

:class:`ZooBAM`, the most-copied attention zoo's form (External-Attention-pytorch,
``model/attention/BAM.py``, whose ``BAMBlock`` many repositories copy):

- three hidden layers in the channel MLP (each Linear, BatchNorm1d, ReLU) and three
  dilated 3x3 convolutions in the spatial branch, dilation 2 (paper: one hidden layer,
  two convolutions, dilation 4), summed as in the paper;
- ``legacy_padding=True`` reproduces the widely copied version that pads the dilated
  convolutions by 1 instead of by the dilation: each convolution shrinks the map by 2,
  so the spatial map is (H - 6) x (W - 6); it broadcasts back to the input only at
  7 x 7, where it has shrunk to a single number per image (no spatial attention at all),
  and fails at every other size. The current version pads ``"same"``.

It computes a different function from ours (no option of ours reproduces it); it is here
for timing and for the tutorial's comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.bam.torch_module import BAM


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class OfficialChannelGate(nn.Module):
    """The official channel branch: pool by a kernel of size H, then an MLP (see module doc)."""

    def __init__(self, gate_channel: int, reduction_ratio: int = 16, num_layers: int = 1) -> None:
        super().__init__()
        widths = [gate_channel] + [gate_channel // reduction_ratio] * num_layers + [gate_channel]
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", _Flatten())
        for i in range(len(widths) - 2):
            self.gate_c.add_module(f"gate_c_fc_{i}", nn.Linear(widths[i], widths[i + 1]))
            self.gate_c.add_module(f"gate_c_bn_{i + 1}", nn.BatchNorm1d(widths[i + 1]))
            self.gate_c.add_module(f"gate_c_relu_{i + 1}", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(widths[-2], widths[-1]))

    def forward(self, in_tensor: torch.Tensor) -> torch.Tensor:
        size = in_tensor.size(2)  # the height, used as the kernel on both axes
        pooled = F.avg_pool2d(in_tensor, size, stride=size)
        return self.gate_c(pooled).unsqueeze(2).unsqueeze(3).expand_as(in_tensor)


class OfficialSpatialGate(nn.Module):
    """The official spatial branch: 1x1, two dilated 3x3 (BN, ReLU after each), 1x1."""

    def __init__(
        self,
        gate_channel: int,
        reduction_ratio: int = 16,
        dilation_conv_num: int = 2,
        dilation_val: int = 4,
    ) -> None:
        super().__init__()
        hidden = gate_channel // reduction_ratio
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(gate_channel, hidden, 1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            conv = nn.Conv2d(hidden, hidden, 3, padding=dilation_val, dilation=dilation_val)
            self.gate_s.add_module(f"gate_s_conv_di_{i}", conv)
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, 1))

    def forward(self, in_tensor: torch.Tensor) -> torch.Tensor:
        return self.gate_s(in_tensor).expand_as(in_tensor)


class OfficialBAM(nn.Module):
    """The official BAM: ``x * (1 + sigmoid(channel_att(x) * spatial_att(x)))``.

    Args:
        gate_channel: C.
        reduction_ratio: r; the hidden width is ``C // r`` (no floor at 1).

    Shape:
        Input (N, C, H, H): square only (see the module docstring). Output the same.
    """

    def __init__(self, gate_channel: int, reduction_ratio: int = 16) -> None:
        super().__init__()
        self.channel_att = OfficialChannelGate(gate_channel, reduction_ratio)
        self.spatial_att = OfficialSpatialGate(gate_channel, reduction_ratio)

    def forward(self, in_tensor: torch.Tensor) -> torch.Tensor:
        att = 1 + torch.sigmoid(self.channel_att(in_tensor) * self.spatial_att(in_tensor))
        return att * in_tensor


class ZooBAM(nn.Module):
    """The attention zoo's ``BAMBlock`` (see the module docstring): sum, 3 + 3 layers, d = 2.

    Args:
        channel: C.
        reduction: r; the hidden width is ``C // r``.
        dia_val: the dilation of the spatial convolutions (the zoo's default 2).
        num_layers: hidden layers in the channel MLP and dilated convolutions (3).
        legacy_padding: pad the dilated convolutions by 1 (the widely copied bug) instead
            of ``"same"``.

    Shape:
        Input (N, C, H, W); output (N, C, H, W). With ``legacy_padding`` only H = W = 7
        (or H - 6 = W - 6 = 1 broadcasting otherwise fails).
    """

    def __init__(
        self,
        channel: int,
        reduction: int = 16,
        dia_val: int = 2,
        num_layers: int = 3,
        *,
        legacy_padding: bool = False,
    ) -> None:
        super().__init__()
        hidden = channel // reduction
        widths = [channel] + [hidden] * num_layers + [channel]
        self.ca = nn.Sequential()
        self.ca.add_module("flatten", _Flatten())
        for i in range(len(widths) - 2):
            self.ca.add_module(f"fc{i}", nn.Linear(widths[i], widths[i + 1]))
            self.ca.add_module(f"bn{i}", nn.BatchNorm1d(widths[i + 1]))
            self.ca.add_module(f"relu{i}", nn.ReLU())
        self.ca.add_module("last_fc", nn.Linear(widths[-2], widths[-1]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        padding: int | str = 1 if legacy_padding else "same"
        self.sa = nn.Sequential()
        self.sa.add_module("conv_reduce1", nn.Conv2d(channel, hidden, 1))
        self.sa.add_module("bn_reduce1", nn.BatchNorm2d(hidden))
        self.sa.add_module("relu_reduce1", nn.ReLU())
        for i in range(num_layers):
            conv = nn.Conv2d(hidden, hidden, 3, padding=padding, dilation=dia_val)
            self.sa.add_module(f"conv_{i}", conv)
            self.sa.add_module(f"bn_{i}", nn.BatchNorm2d(hidden))
            self.sa.add_module(f"relu_{i}", nn.ReLU())
        self.sa.add_module("last_conv", nn.Conv2d(hidden, 1, 1))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sa_out = self.sa(x).expand_as(x)
        ca_out = self.ca(self.avgpool(x)).unsqueeze(-1).unsqueeze(-1).expand_as(x)
        weight = self.sigmoid(sa_out + ca_out)
        return (1 + weight) * x


# ---------------------------------------------------------------------------------------
# Builders for the benchmark: (channels, hidden) -> module, and weight copies from ours.


def build_official_bam(channels: int, hidden: int) -> nn.Module:
    """:class:`OfficialBAM` of hidden width ``hidden`` (``channels`` must be a multiple)."""
    if channels % hidden != 0:
        raise ValueError(f"OfficialBAM needs hidden = C // r exactly, got C={channels}, {hidden}")
    return OfficialBAM(channels, channels // hidden)


def load_official_bam(peer: nn.Module, ours: nn.Module) -> None:
    """Copy the weights of our ``BAM(C, norm="hidden", combine="product")`` into ``peer``."""
    if not isinstance(ours, BAM) or ours.norm != "hidden":
        raise ValueError("load_official_bam: ours must be a BAM with norm='hidden'")
    pairs = {
        "channel_att.gate_c.gate_c_fc_0": "channel_gate.fc0",
        "channel_att.gate_c.gate_c_bn_1": "channel_gate.bn0",
        "channel_att.gate_c.gate_c_fc_final": "channel_gate.fc1",
        "spatial_att.gate_s.gate_s_conv_reduce0": "spatial_gate.conv0",
        "spatial_att.gate_s.gate_s_bn_reduce0": "spatial_gate.bn0",
        "spatial_att.gate_s.gate_s_conv_di_0": "spatial_gate.conv1",
        "spatial_att.gate_s.gate_s_bn_di_0": "spatial_gate.bn1",
        "spatial_att.gate_s.gate_s_conv_di_1": "spatial_gate.conv2",
        "spatial_att.gate_s.gate_s_bn_di_1": "spatial_gate.bn2",
        "spatial_att.gate_s.gate_s_conv_final": "spatial_gate.conv3",
    }
    ours_state = ours.state_dict()
    state = {}
    for theirs, mine in pairs.items():
        for key, value in ours_state.items():
            if key.startswith(mine + "."):
                state[theirs + key[len(mine) :]] = value
    peer.load_state_dict(state)


def build_zoo_bam(channels: int, hidden: int) -> nn.Module:
    """:class:`ZooBAM` (padding ``"same"``) of hidden width ``hidden``."""
    if channels % hidden != 0:
        raise ValueError(f"ZooBAM needs hidden = C // r exactly, got C={channels}, {hidden}")
    return ZooBAM(channels, channels // hidden)
