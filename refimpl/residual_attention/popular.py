r"""Transcriptions of popular forms of the attention module, for measurement and comparison.

Written here, from descriptions of what widely copied code does, so that the tutorial and
the benchmark can show the difference with numbers. The departures from the paper are
kept on purpose and listed per class. Not for use in models: use
:class:`refimpl.residual_attention.AttentionModule`.

:class:`FixedFactorAttentionModule`, the Keras form (the blog text of ``seeds/000``, the
most copied TensorFlow/Keras version):

* pools with 2x2 windows, stride 2, "same" padding (the output is ceil(H / 2));
* upsamples by a *fixed factor 2* (nearest neighbour), so the way up only returns to the
  input's size when every level's size is even: on an odd size the skip addition or the
  final product with the trunk fails with a shape error;
* one knob, ``encoder_depth`` (the number of poolings), with ``encoder_depth - 1`` skip
  connections, r units before each upsampling;
* the mask head is two 1x1 convolutions *with biases and nothing between them* (no batch
  norm, no ReLU: a single linear map written twice), then the sigmoid.

:class:`FixedSizeAttentionModule`, the form of several PyTorch ports: the upsampling
layers are built for the sizes of one input size (``nn.UpsamplingBilinear2d(size=...)``
computed for, e.g., 56x56), so any other input size fails; and on the way up they add the
bottom-up feature *and* the skip unit's output (the official prototxt adds the skip
unit's output only, which already contains the feature through its identity shortcut).

Both use :class:`~refimpl.residual_attention.ResidualUnit`'s layers for every residual
block (as :class:`PlainResidualUnit`: plain autograd in training, as a port's unit keeps its
graph, not refimpl's lean backward) and H = (1 + M) * T, so that what differs is the mask
branch alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.residual_attention.torch_module import ResidualUnit


class PlainResidualUnit(ResidualUnit):
    """:class:`ResidualUnit` on the plain autograd graph in training (what a port's
    BN-ReLU-conv unit saves for backward), with the same parameters and function."""

    def _lean(self, x: torch.Tensor) -> bool:
        return False


def _units(count: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict((f"unit{j}", PlainResidualUnit(channels)) for j in range(1, count + 1))
    )


class FixedFactorAttentionModule(nn.Module):
    """The Keras form: 2x2 "same" pooling, nearest upsampling by a fixed factor 2.

    Args:
        channels: C.
        encoder_depth: poolings in the mask branch (skips: encoder_depth - 1).
        p, t, r: residual units as in the paper.

    Shape:
        Input (N, C, H, W) where H and W stay even down to the deepest level; otherwise
        a ``RuntimeError`` about mismatched sizes (kept on purpose).
    """

    def __init__(
        self, channels: int, encoder_depth: int = 1, p: int = 1, t: int = 2, r: int = 1
    ) -> None:
        super().__init__()
        self.encoder_depth = encoder_depth
        self.pre = _units(p, channels)
        self.trunk = _units(t, channels)
        self.down = nn.ModuleList(_units(r, channels) for _ in range(encoder_depth))
        self.skip = nn.ModuleList(PlainResidualUnit(channels) for _ in range(encoder_depth - 1))
        self.up = nn.ModuleList(_units(r, channels) for _ in range(encoder_depth))
        self.conv1 = nn.Conv2d(channels, channels, 1)  # no BN, no ReLU between the two
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.post = _units(p, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        T = self.trunk(x)
        h = F.max_pool2d(x, 2, 2, ceil_mode=True)  # Keras MaxPool2D(padding="same")
        h = self.down[0](h)
        skips = []
        for i in range(1, self.encoder_depth):
            skips.append(self.skip[i - 1](h))
            h = self.down[i](F.max_pool2d(h, 2, 2, ceil_mode=True))
        for i, s in enumerate(reversed(skips)):
            h = F.interpolate(self.up[i](h), scale_factor=2, mode="nearest") + s
        h = F.interpolate(self.up[-1](h), scale_factor=2, mode="nearest")
        M = torch.sigmoid(self.conv2(self.conv1(h)))
        return self.post((1 + M) * T)


class FixedSizeAttentionModule(nn.Module):
    """The form of PyTorch ports with hard-coded sizes: bilinear upsampling to the sizes
    of one input size, fixed when the module is built; feature + skip + upsampled sum.

    Args:
        channels: C.
        size: the one input size (H, W) the module works for.
        depth: poolings (3x3/2, padding 1) in the mask branch; skips: depth - 1.
        p, t, r: residual units as in the paper.

    Shape:
        Input (N, C, *size) only; any other size fails with a ``RuntimeError`` (kept).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] = (56, 56),
        depth: int = 3,
        p: int = 1,
        t: int = 2,
        r: int = 1,
    ) -> None:
        super().__init__()
        self.depth = depth
        sizes = [tuple(size)]
        for _ in range(depth):  # the sizes the author computed by hand for this input
            sizes.append(tuple((n + 1) // 2 for n in sizes[-1]))
        self.pre = _units(p, channels)
        self.trunk = _units(t, channels)
        self.down = nn.ModuleList(
            _units(2 * r if i == depth - 1 else r, channels) for i in range(depth)
        )
        self.skip = nn.ModuleList(PlainResidualUnit(channels) for _ in range(depth - 1))
        self.up = nn.ModuleList(_units(r, channels) for _ in range(depth - 1))
        self.interpolations = nn.ModuleList(
            nn.UpsamplingBilinear2d(size=sizes[i]) for i in range(depth)
        )
        self.head = nn.Sequential(
            OrderedDict(
                [
                    ("bn1", nn.BatchNorm2d(channels)),
                    ("relu1", nn.ReLU()),
                    ("conv1", nn.Conv2d(channels, channels, 1, bias=False)),
                    ("bn2", nn.BatchNorm2d(channels)),
                    ("relu2", nn.ReLU()),
                    ("conv2", nn.Conv2d(channels, channels, 1, bias=False)),
                    ("sigmoid", nn.Sigmoid()),
                ]
            )
        )
        self.post = _units(p, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        T = self.trunk(x)
        features, h = [], x
        for i in range(self.depth):
            h = self.down[i](F.max_pool2d(h, 3, 2, 1))
            features.append(h)
        for i in range(self.depth - 1, 0, -1):  # feature + skip(feature) + upsampled
            h = self.interpolations[i](h) + features[i - 1] + self.skip[i - 1](features[i - 1])
            h = self.up[i - 1](h)
        M = self.head(self.interpolations[0](h))
        return self.post((1 + M) * T)
