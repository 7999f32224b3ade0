r"""BAM-ResNet-50: ResNet-50 with a BAM at each of its three bottlenecks.

BAM is not a per-block attention: the paper places one module "at each bottleneck of
models where the downsampling of feature maps occurs", between the stages. In ResNet-50
that is after stage 1 (256 channels, 56 x 56 at 224 input), after stage 2 (512, 28 x 28)
and after stage 3 (1024, 14 x 14); the output of stage 4 goes straight to the
classifier. The modules sit on the main path (the stage's output, after the last
block's addition and ReLU), not on a residual branch, and refine what the next stage
downsamples:

    x = layer1(stem(x)); x = bam1(x)
    x = layer2(x);       x = bam2(x)
    x = layer3(x);       x = bam3(x)
    x = layer4(x);       logits = fc(avgpool(x))

The backbone's ``attention=`` hook would put a module inside every bottleneck block (SE
and CBAM's placement), which is not BAM's; :class:`BAMResNet` subclasses
:class:`refimpl.backbones.ResNet` and adds the three modules as ``bam1``, ``bam2``,
``bam3``, the official code's names, so an official checkpoint loads after
:func:`refimpl.bam.convert.convert_official_state_dict`.

Published numbers and what we measure (224 x 224, 1000 classes, r = 16, d = 4; MACs
from :func:`refimpl.backbones.count_macs`, convolutions and matrix products only):

=============================  ==========  =========================================
network                        published   measured
=============================  ==========  =========================================
ResNet-50                      25.56M      25.557M; 3.858 GMAC (v1), 4.089 (torchv.)
BAM-ResNet-50, paper form      25.9M       25.918M (+0.361M); 3.940 GMAC (v1)
BAM-ResNet-50, official form   25.9M       25.915M (+0.358M); 4.171 GMAC (torchv.)
=============================  ==========  =========================================

The three modules add 0.36M parameters (1.4%) and 82M MACs (2.1%), almost all in the
spatial branch, which costs the same at each bottleneck: C * C/r * HW for the reduction
and 2 * 9 * (C/r)^2 * HW for the dilated convolutions, with C * HW constant (256 * 56^2
= 512 * 28^2 = 1024 * 14^2). The two forms differ only in where the batch norms sit
(paper: 2C + 2 affine parameters per module at the branch ends; official: 2 * C/r in
the channel branch and 3 * 2 * C/r in the spatial one), 2 694 parameters in all;
both round to the published 25.9M. The official form's count, 25 915 099, is the count
osmr's imgclsmob reproduces for the official BAM-ResNet-50 weights.

Deviations: none in the structure. The official ResNet strides the 3x3 convolution
(``layout="torchvision"``); the default here is ``"v1"``, the layout of the BAM paper's
ResNet-50 baseline numbers (the same parameters either way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from refimpl._torch_checks import check_torch_input
from refimpl.backbones import EXPANSION, ResNet
from refimpl.bam.torch_module import BAM


class BAMResNet(ResNet):
    r"""A bottleneck ResNet with a BAM after each of the chosen stages.

    Args:
        layers: blocks per stage; (3, 4, 6, 3) is ResNet-50.
        num_classes: outputs of the classifier.
        bam_stages: the stages, numbered from 1, followed by a BAM; the paper's
            bottlenecks are (1, 2, 3), every downsampling but the last.
        reduction: r of every BAM (paper: 16).
        dilation: d of every BAM (paper: 4).
        norm: ``"output"`` (paper) or ``"hidden"`` (official code), see :class:`BAM`.
        combine: ``"sum"`` (paper) or ``"product"`` (official code).
        device, dtype: where and of which dtype the parameters (and buffers) are created.
        **kwargs: further arguments of :class:`~refimpl.backbones.ResNet` (``layout``,
            ``in_channels``, ``widths``, ...); not ``attention`` or ``fusion``, which place
            modules inside the blocks.

    Shape:
        Input (N, in_channels, H, W); output (N, num_classes). Training mode needs N >= 2
        (the batch norm after BAM's global pooling).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        *,
        bam_stages: Iterable[int] = (1, 2, 3),
        reduction: int = 16,
        dilation: int = 4,
        norm: str = "output",
        combine: str = "sum",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("attention", "attention_options", "fusion", "fusion_options"):
            if name in kwargs:
                raise TypeError(
                    f"BAMResNet: {name} places modules inside the blocks; BAM sits between "
                    "the stages (bam_stages). Build refimpl.backbones.ResNet for another one."
                )
        super().__init__(layers, num_classes, device=device, dtype=dtype, **kwargs)
        bam_stages = tuple(bam_stages)
        if not set(bam_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"BAMResNet: bam_stages are numbered 1 to 4, got {bam_stages}")
        self.bam_stages = bam_stages
        for stage in range(1, 5):
            module = None
            if stage in bam_stages:
                channels = EXPANSION * self.widths[stage - 1]
                module = BAM(
                    channels,
                    reduction,
                    dilation=dilation,
                    norm=norm,
                    combine=combine,
                    device=device,
                    dtype=dtype,
                )
            setattr(self, f"bam{stage}", module)

    def reset_parameters(self) -> None:
        """The backbone's initialisation, then every BAM's own ``reset_parameters``."""
        super().reset_parameters()
        for stage in range(1, 5):
            module = getattr(self, f"bam{stage}", None)  # absent while ResNet.__init__ runs
            if module is not None:
                module.reset_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bam_stages={self.bam_stages}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the classifier, with BAM after the chosen stages."""
        check_torch_input(x, self.in_channels, "BAMResNet", "x", self)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            bam: nn.Module | None = getattr(self, f"bam{stage}")
            if bam is not None:
                x = bam(x)  # refines the stage's output, same shape
        return self.avgpool(x).flatten(1)  # (N, 2048)


def bam_resnet50(
    num_classes: int = 1000,
    reduction: int = 16,
    *,
    layout: str = "v1",
    dilation: int = 4,
    norm: str = "output",
    combine: str = "sum",
    **kwargs: Any,
) -> BAMResNet:
    """BAM-ResNet-50: ResNet-50 with a BAM after stages 1, 2 and 3.

    Args:
        num_classes: outputs of the classifier.
        reduction: r of every BAM (paper: 16).
        layout: ``"v1"`` (stride on the first 1x1 convolution) or ``"torchvision"``
            (stride on the 3x3, the official code's).
        dilation: d of every BAM (paper: 4).
        norm: ``"output"`` (paper) or ``"hidden"`` (official code).
        combine: ``"sum"`` (paper) or ``"product"`` (official code).
        **kwargs: further arguments of :class:`BAMResNet`.

    The official network: ``bam_resnet50(layout="torchvision", norm="hidden",
    combine="product")``, whose weights load after
    :func:`~refimpl.bam.convert.convert_official_state_dict`.
    """
    return BAMResNet(
        (3, 4, 6, 3),
        num_classes,
        reduction=reduction,
        layout=layout,
        dilation=dilation,
        norm=norm,
        combine=combine,
        **kwargs,
    )
