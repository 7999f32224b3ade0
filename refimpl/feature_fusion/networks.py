r"""AFF-ResNet-50 and iAFF-ResNet-50: ResNet-50 whose residual additions are attentional.

In the blocks of the last two stages (conv4_x and conv5_x: 6 + 3 bottlenecks of 1024 and
2048 channels) the addition ``identity + residual`` is replaced by
``AFF(identity, residual)`` or ``IAFF(identity, residual)``, with r = 16 (the paper's
Sec. 5 and the official ImageNet code, ``start_layer=3``, ``r=16``); the ReLU after the
addition stays. The backbone is :func:`refimpl.backbones.resnet50` in the
``"torchvision"`` layout (stride on the 3x3 convolution), the layout of the official code.

Published numbers and what we measure (224 x 224, 1000 classes; "GFLOPs" in the paper
are multiply-accumulates; MACs from :func:`refimpl.backbones.count_macs`, which counts
convolutions and matrix products):

==================  ==========  ==========  ====================  =================
network             published   measured    difference            MACs (published)
==================  ==========  ==========  ====================  =================
ResNet-50           25.6M       25.557M     -0.17%                4.089G (4.1G)
AFF-ResNet-50       30.3M       30.354M     +0.18%                4.323G (4.3G)
iAFF-ResNet-50      35.1M       35.151M     +0.14%                4.556G (none)
==================  ==========  ==========  ====================  =================

Each fusion module of C channels has two branches of two 1x1 convolutions with biases
(C -> C/16 -> C) and two batch norms: 2 (2 C^2/16 + C/16 + C + 2 C/16 + 2 C) =
C^2/4 + 6C + 3C/8 parameters, 268 672 at C = 1024 and 1 061 632 at C = 2048; six of the
first and three of the second add 4.797M to ResNet-50's 25.557M. iAFF has two MS-CAMs,
twice that. Both counts are within 0.2% of the published ones but do not round to them
(30.354 -> 30.4); without the convolution biases (``bias=False``) they are 30.328M and
35.099M, which do. The paper does not say how it counted; the official code (MXNet and
PyTorch) has the biases, so ``bias=True`` stays the default, and the 0.2% is reported
rather than bent. ``share_global=True`` (the popular iAFF) drops the second global branch
and gives 32.752M (its unused ``global_att2`` counts in the popular code: 35.151M).
Each MS-CAM adds 2 C^2/16 multiply-accumulates per position in its local branch, 25.7M
per block at 224 x 224, and 2 C^2/16 per image in its global branch: 233.6M for AFF
(4.089G -> 4.323G, the paper's 4.1G -> 4.3G) and 467.1M for iAFF.

The official ImageNet models (MXNet ``AFFResNet``, defaults ``deep_stem=True``,
``avg_down=True``) also have the ResNet-D stem (three 3x3 convolutions 3 -> 32 -> 32 -> 64:
+19k parameters, +0.24 GMAC) and average-pooling shortcuts (no change in either count),
which this backbone does not have; the paper's table compares with the plain ResNet-50's
25.6M and 4.1G, which is what is built here.

Deviations: the fusion order. The paper fuses X = identity and Y = residual; the backbone
calls ``fusion(identity, residual)``. The official networks call their fusion as
``fuse(residual, identity)``; their weights load with
:func:`~refimpl.feature_fusion.convert.convert_official_state_dict` ``(swap_xy=True)``.
The official PyTorch networks also fuse in all four stages with r = 4 and AFF's factor 2:
``aff_resnet50(reduction=4, fusion_stages=(1, 2, 3, 4), factor_two=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from refimpl.backbones import ResNet, resnet50
from refimpl.feature_fusion.torch_module import AFF, IAFF


def aff_resnet50(
    num_classes: int = 1000,
    reduction: int = 16,
    *,
    layout: str = "torchvision",
    fusion_stages: Iterable[int] = (3, 4),
    bias: bool = True,
    factor_two: bool = False,
    **kwargs: Any,
) -> ResNet:
    """AFF-ResNet-50: ResNet-50 with :class:`~refimpl.feature_fusion.AFF` in place of the
    residual additions of ``fusion_stages``.

    Args:
        num_classes: outputs of the classifier.
        reduction: r of every AFF (16 in the paper's ImageNet networks).
        layout: ``"torchvision"`` (stride on the 3x3, the official code's) or ``"v1"``.
        fusion_stages: the stages (1 to 4) whose blocks fuse attentionally; the paper's
            AFF-ResNet-50 uses the last two.
        bias: biases in the fusion modules' 1x1 convolutions (official: yes).
        factor_two: AFF returns twice Eq. (4), as the paper-era official code.
        **kwargs: further arguments of :class:`~refimpl.backbones.ResNet` (``widths``,
            ``in_channels``, ``attention``, ...); not ``fusion``.

    Shape:
        Input (N, 3, H, W); output (N, num_classes). Training needs N >= 2.
    """
    if "fusion" in kwargs or "fusion_options" in kwargs:
        raise TypeError("aff_resnet50: the fusion is AFF; build ResNet(...) for another one")
    fusion = functools.partial(AFF, reduction=reduction, bias=bias, factor_two=factor_two)
    return resnet50(
        num_classes, layout=layout, fusion=fusion, fusion_stages=fusion_stages, **kwargs
    )


def iaff_resnet50(
    num_classes: int = 1000,
    reduction: int = 16,
    *,
    layout: str = "torchvision",
    fusion_stages: Iterable[int] = (3, 4),
    bias: bool = True,
    share_global: bool = False,
    **kwargs: Any,
) -> ResNet:
    """iAFF-ResNet-50: ResNet-50 with :class:`~refimpl.feature_fusion.IAFF` in place of the
    residual additions of ``fusion_stages``.

    Args:
        num_classes: outputs of the classifier.
        reduction: r of every iAFF (16 in the paper's ImageNet networks).
        layout: ``"torchvision"`` (stride on the 3x3, the official code's) or ``"v1"``.
        fusion_stages: the stages (1 to 4) whose blocks fuse attentionally; the paper's
            iAFF-ResNet-50 uses the last two.
        bias: biases in the fusion modules' 1x1 convolutions (official: yes).
        share_global: the second MS-CAM reuses the first one's global branch (the popular
            PyTorch code); default the paper's separate branch.
        **kwargs: further arguments of :class:`~refimpl.backbones.ResNet`; not ``fusion``.

    Shape:
        Input (N, 3, H, W); output (N, num_classes). Training needs N >= 2.
    """
    if "fusion" in kwargs or "fusion_options" in kwargs:
        raise TypeError("iaff_resnet50: the fusion is iAFF; build ResNet(...) for another one")
    fusion = functools.partial(IAFF, reduction=reduction, bias=bias, share_global=share_global)
    return resnet50(
        num_classes, layout=layout, fusion=fusion, fusion_stages=fusion_stages, **kwargs
    )
