r"""SE-ResNet-50: ResNet-50 with a squeeze-and-excitation block in every bottleneck.

The SE block sits on the residual branch, after the third convolution's batch norm
and before the addition (the paper's Fig. 3): ``out = relu(identity + SE(BN3(...)))``.
The backbone is :func:`refimpl.backbones.resnet50`, by default in the original
``"v1"`` layout (stride 2 on the first 1x1 convolution), the layout of the official
Caffe SE-ResNet-50 and of the SE and CBAM papers' tables.

Published numbers and what we measure (224 x 224, 1000 classes, ``bias=True``;
"GMAC" is what the papers call GFLOPs; MACs from
:func:`refimpl.backbones.count_macs`, which counts convolutions and matrix products):

=====================  ==============  ===========  =====================
network                published       measured     note
=====================  ==============  ===========  =====================
ResNet-50 (v1)         25.6M, 3.86G    25.557M      3.858G; CBAM: 25.56M,
                       (CBAM: 3.858)                3.858G, exact
SE-ResNet-50, r = 16   28.1M, 3.87G    28.088M      3.8605G; CBAM: 28.09M,
                       (CBAM: 3.860)                3.860G, exact
SE, r = 2              45.7M           45.699M      -0.00%
SE, r = 4              35.7M           35.636M      -0.18%
SE, r = 8              30.7M           30.604M      -0.31%
SE, r = 32             26.9M           26.830M      -0.26%
=====================  ==============  ===========  =====================

The SE paper's 3.87 GMAC is ours plus the element-wise work of the blocks, which
:func:`~refimpl.backbones.count_macs` leaves out: the squeeze (one add per input
element) and the scale (one multiply per element) add 2 * sum(C H W) = 11.0M over the
16 blocks, and 3.8605G + 0.011G = 3.8715G rounds to 3.87G. The CBAM paper's numbers
for the same network (28.09M, 3.860G) count what we count and match to all digits.

The SE blocks add 2/r * sum_s N_s C_s^2 weights (the paper's Section 6) plus
sum_s N_s (C_s + C_s / r) biases, 15 104 + 15 104 / r. In the reduction-ratio table
r = 2 and r = 16 agree to the rounding; r = 4, 8, 32 are 0.06-0.10M higher than any
rounding of this count, and no single explanation we tried (biases or not, a 25.6M
baseline, counting batch-norm running statistics) reproduces all five entries at once;
we take them as the paper's rounding noise, within 0.5%.

Deviations: none in the structure. ``bias=False`` gives the SE blocks of the paper's
Table 10 ablation (no biases in the two fully connected layers); the released models
have them (``bias=True``, the default).
"""

from __future__ import annotations

import functools
from typing import Any

from refimpl.backbones import ResNet, resnet50
from refimpl.squeeze_excitation.torch_module import SqueezeExcitation


def se_resnet50(
    num_classes: int = 1000,
    reduction: int = 16,
    *,
    layout: str = "v1",
    bias: bool = True,
    **kwargs: Any,
) -> ResNet:
    """SE-ResNet-50: :func:`~refimpl.backbones.resnet50` with an SE block in every bottleneck.

    Args:
        num_classes: outputs of the classifier.
        reduction: r, the SE reduction ratio (16 in the paper's networks).
        layout: ``"v1"`` (stride on the first 1x1 convolution, the paper's) or
            ``"torchvision"`` (stride on the 3x3).
        bias: biases in the SE blocks' fully connected layers (released models: yes).
        **kwargs: further arguments of :class:`~refimpl.backbones.ResNet`
            (``in_channels``, ``widths``, ``fusion``, ...); not ``attention``.

    Shape:
        Input (N, 3, H, W); output (N, num_classes).
    """
    if "attention" in kwargs or "attention_options" in kwargs:
        raise TypeError("se_resnet50: the attention is SE; build ResNet(...) for another one")
    attention = functools.partial(SqueezeExcitation, reduction=reduction, bias=bias)
    return resnet50(num_classes, layout=layout, attention=attention, **kwargs)
