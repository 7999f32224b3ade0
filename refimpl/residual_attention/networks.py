r"""Attention-56 and Attention-92 (ImageNet) and their CIFAR-sized variants.

The ImageNet networks follow the official model definitions
(github.com/fwang91/residual-attention-network, ``Attention-56-deploy.prototxt`` and
``Attention-92-deploy.prototxt``), layer for layer:

=========  ==========  ===================================================================
stage      output      layers
=========  ==========  ===================================================================
stem       112, 56     conv 7x7/2 (64, no bias)-BN-ReLU, max pool 3x3/2
stage 1    56 x 56     unit 64 -> 256 (projection); m1 attention modules, depth 3, 2 skips
stage 2    28 x 28     unit 256 -> 512, stride 2; m2 modules, depth 2, 1 skip
stage 3    14 x 14     unit 512 -> 1024, stride 2; m3 modules, depth 1, no skip
stage 4    7 x 7       unit 1024 -> 2048, stride 2; 2 units of 2048
head       1 x 1       BN-ReLU, global average pool, fully connected (with bias)
=========  ==========  ===================================================================

with (m1, m2, m3) = (1, 1, 1) for Attention-56 and (1, 2, 3) for Attention-92, and every
attention module p = 1, t = 2, r = 1. Each mask branch pools down to 7x7 at 224x224 input.
Counting the trunk's weighted layers (stem 1, 4 units of 3 per module, 6 more units, the
classifier 1) gives 56 and 92, the networks' names.

Published numbers and what we count (224 x 224, 1000 classes; parameters as the papers
count them, MACs from :func:`refimpl.backbones.count_macs`, convolutions and the fully
connected layer only):

============  =====================  ===========  ==========  ===========================
network       published              parameters   MACs        difference
============  =====================  ===========  ==========  ===========================
Attention-56  31.9M, 6.2 GFLOPs      31,810,728   6.271 G     -0.28%, MACs +1.1%
Attention-92  51.3M, 10.4 GFLOPs     52,466,344   10.534 G    +2.27%, MACs +1.3%
============  =====================  ===========  ==========  ===========================

Attention-56 matches the paper to the rounding of its table. Attention-92 as the official
model definition builds it comes out 2.27% (1.17M) above the paper's 51.3M; we rebuild the
definition as it is rather than bend it to the number (PAPERS.md reports the same gap).
Our MACs at 224 x 224 come within 1.3% of the paper's FLOPs for both networks, so we
read its table as counted at 224 x 224, although its Attention-92 errors are measured on a
320 x 320 test crop (at 320 x 320 our Attention-92 counts 21.5 GMACs).

Deviations from the prototxt, none of which changes a parameter or a MAC:

* Max poolings (stem and mask branches) are 3x3/2 with padding 1 (floor rounding), not
  Caffe's 3x3/2 without padding and ceil rounding: the same sizes at 224 x 224, windows
  one pixel apart (see ``torch_module.py``). ``pooling="caffe"`` gives the prototxt's
  pooling, in the stem and in every mask branch. Measured in Attention-56 with the same
  weights (PyTorch's default initialisation, eval mode, one N(0, 1) input), relative
  change of the logits: 6-7% at 224 x 224 (21-28% at 64 x 64), of which the mask
  branches alone account for 0.1% (0.6%); most of it is the stem's pooling, whose shift
  every later layer sees. (PAPERS.md's ~0.4 was not reproduced.)
* The final pooling is a global average (the prototxt's is a 7x7 average, the same thing
  at 224 x 224), so any input size works.
* The mask activation is the paper's sigmoid (an older revision of the prototxts used
  TanH); ``activation`` and ``learning`` reach every module.

CIFAR (32 x 32 input, :func:`attention56_cifar`, :func:`attention92_cifar`): the paper
describes the CIFAR networks only as 3 stages of m attention modules each, 36m + 20 trunk
layers, and gives Attention-92 (m = 2) 1.9M parameters (our reading of its Sec. 4.1 and
CIFAR table, not re-checked against the PDF while writing this). We keep the ImageNet
layout with a 3x3 stride-1 stem of 16 channels without pooling, attention stages of
widths 64, 128, 256 (the widths of the pre-activation ResNet-164 the paper compares with)
at 32, 16 and 8 pixels, mask depths 3, 2, 1 so that every mask reaches 4x4 as ImageNet's
reach 7x7, and a last stage of three 256-wide units that neither widens nor strides
(widening it to 512 as ImageNet does would give 2.69M, far from 1.9M). That
reconstruction is ours, not the authors'; it counts 1,959,738 parameters for m = 2 (+3.1%
on 1.9M) and 1,148,858 for m = 1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from refimpl._checks import check_choice, check_positive_int
from refimpl._torch_checks import check_torch_input
from refimpl.residual_attention._pooling import MAX_POOL, check_pooling
from refimpl.residual_attention.torch_module import AttentionModule, ResidualUnit

STEMS = ("imagenet", "cifar")


class ResidualAttentionNetwork(nn.Module):
    r"""A Residual Attention Network: stem, three attention stages, a residual stage, head.

    Args:
        modules_per_stage: attention modules in stages 1, 2, 3 ((1, 1, 1): Attention-56;
            (1, 2, 3): Attention-92).
        num_classes: outputs of the classifier.
        widths: output channels of stages 1-4 (each unit's bottleneck is a quarter).
        depths: mask-branch depths of stages 1-3 (poolings); skips are depth - 1.
        stem: ``"imagenet"`` (7x7/2 conv, 3x3/2 max pool: 224 -> 56) or ``"cifar"`` (3x3
            conv, stride 1, no pool: 32 -> 32).
        stem_channels: output channels of the stem convolution.
        in_channels: input channels (3 for RGB).
        last_stride: stride of the first unit of stage 4 (2 for ImageNet).
        pooling: every max pooling of the network (the ImageNet stem's and every mask
            branch's): ``"paper"`` (3x3/2, padding 1) or ``"caffe"`` (3x3/2, no padding,
            ceil rounding: the official prototxt; needs inputs of at least 2^depth pixels
            at each mask branch: 31 x 31 at the input of the ImageNet networks).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.
        **module_options: options of every :class:`AttentionModule` (``p``, ``t``, ``r``,
            ``activation``, ``learning``, ``align_corners``, ...).

    Shape:
        Input (N, in_channels, H, W); output (N, num_classes).
    """

    def __init__(
        self,
        modules_per_stage: Sequence[int] = (1, 1, 1),
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = (256, 512, 1024, 2048),
        depths: Sequence[int] = (3, 2, 1),
        stem: str = "imagenet",
        stem_channels: int = 64,
        in_channels: int = 3,
        last_stride: int = 2,
        pooling: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **module_options: Any,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = "ResidualAttentionNetwork"
        if len(modules_per_stage) != 3 or len(depths) != 3 or len(widths) != 4:
            raise ValueError(
                f"{who}: expects 3 modules_per_stage, 3 depths and 4 widths, got "
                f"{tuple(modules_per_stage)}, {tuple(depths)}, {tuple(widths)}"
            )
        for name, values in (("modules_per_stage", modules_per_stage), ("widths", widths)):
            for v in values:
                check_positive_int(v, who, name)
        for name, value in (("num_classes", num_classes), ("stem_channels", stem_channels)):
            check_positive_int(value, who, name)
        check_positive_int(in_channels, who, "in_channels")
        check_positive_int(last_stride, who, "last_stride")
        check_choice(stem, STEMS, who, "stem")
        check_pooling(pooling, who)
        self.in_channels, self.num_classes, self.stem_kind = in_channels, num_classes, stem
        self.modules_per_stage, self.depths = tuple(modules_per_stage), tuple(depths)

        if stem == "imagenet":
            layers = [
                ("conv", nn.Conv2d(in_channels, stem_channels, 7, 2, 3, bias=False, **fk)),
                ("bn", nn.BatchNorm2d(stem_channels, **fk)),
                ("relu", nn.ReLU(inplace=True)),
                ("pool", nn.MaxPool2d(**MAX_POOL[pooling])),
            ]
        else:
            layers = [
                ("conv", nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False, **fk)),
                ("bn", nn.BatchNorm2d(stem_channels, **fk)),
                ("relu", nn.ReLU(inplace=True)),
            ]
        self.stem = nn.Sequential(OrderedDict(layers))

        previous = stem_channels
        for s in range(3):  # the attention stages: a unit, then the modules
            stage = [("unit", ResidualUnit(previous, widths[s], 1 if s == 0 else 2, **fk))]
            stage += [
                (
                    f"module{k}",
                    AttentionModule(
                        widths[s], depth=depths[s], pooling=pooling, **module_options, **fk
                    ),
                )
                for k in range(1, modules_per_stage[s] + 1)
            ]
            self.add_module(f"stage{s + 1}", nn.Sequential(OrderedDict(stage)))
            previous = widths[s]
        self.stage4 = nn.Sequential(
            OrderedDict(
                [
                    ("unit1", ResidualUnit(previous, widths[3], last_stride, **fk)),
                    ("unit2", ResidualUnit(widths[3], **fk)),
                    ("unit3", ResidualUnit(widths[3], **fk)),
                ]
            )
        )
        self.bn = nn.BatchNorm2d(widths[3], **fk)  # the last units' missing post-activation
        self.fc = nn.Linear(widths[3], num_classes, **fk)

    def reset_parameters(self) -> None:
        """Re-initialise every layer as PyTorch's defaults do."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"modules_per_stage={self.modules_per_stage}, depths={self.depths}, "
            f"stem={self.stem_kind!r}, num_classes={self.num_classes}"
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the global pooling: (N, widths[3], H/32, W/32) for ImageNet."""
        check_torch_input(x, self.in_channels, "ResidualAttentionNetwork", "x", self)
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.relu(self.bn(self.stage4(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores, (N, num_classes)."""
        return self.fc(self.forward_features(x).mean((2, 3)))


def attention56(num_classes: int = 1000, **kwargs: Any) -> ResidualAttentionNetwork:
    """Attention-56 for ImageNet: one attention module per stage."""
    return ResidualAttentionNetwork((1, 1, 1), num_classes, **kwargs)


def attention92(num_classes: int = 1000, **kwargs: Any) -> ResidualAttentionNetwork:
    """Attention-92 for ImageNet: 1, 2 and 3 attention modules in stages 1, 2, 3."""
    return ResidualAttentionNetwork((1, 2, 3), num_classes, **kwargs)


#: The CIFAR-sized layout (our reconstruction, see the module docstring).
CIFAR_LAYOUT: dict[str, Any] = {
    "widths": (64, 128, 256, 256),
    "depths": (3, 2, 1),
    "stem": "cifar",
    "stem_channels": 16,
    "last_stride": 1,
}


def attention_cifar(m: int = 1, num_classes: int = 10, **kwargs: Any) -> ResidualAttentionNetwork:
    """A CIFAR-sized network (32 x 32 input) of m modules per stage: Attention-(36m + 20)."""
    return ResidualAttentionNetwork((m, m, m), num_classes, **{**CIFAR_LAYOUT, **kwargs})


def attention56_cifar(num_classes: int = 10, **kwargs: Any) -> ResidualAttentionNetwork:
    """Attention-56 for 32 x 32 inputs (m = 1)."""
    return attention_cifar(1, num_classes, **kwargs)


def attention92_cifar(num_classes: int = 10, **kwargs: Any) -> ResidualAttentionNetwork:
    """Attention-92 for 32 x 32 inputs (m = 2, the paper's CIFAR Attention-92)."""
    return attention_cifar(2, num_classes, **kwargs)
