r"""CBAM-ResNet-50: ResNet-50 with a CBAM module in every bottleneck.

As in SE-ResNet-50, the module sits on the residual branch, after the third
convolution's batch norm and before the addition (the paper's Fig. 3):
``out = relu(identity + CBAM(BN3(...)))``. The backbone is
:func:`refimpl.backbones.resnet50`, by default in the original ``"v1"`` layout (stride 2
on the first 1x1 convolution), the layout of the paper's Table 4 baseline (3.858 GMAC).

Published numbers and what we measure (224 x 224, 1000 classes, r = 16, kernel 7;
"GMAC" is what the paper calls GFLOPs; MACs from :func:`refimpl.backbones.count_macs`,
which counts convolutions and matrix products):

=========================  ===============  ==================  =========================
network                    published        measured            note
=========================  ===============  ==================  =========================
ResNet-50 (v1)             25.56M, 3.858G   25.557M, 3.858G     exact
CBAM, ``"official"``       28.09M, 3.864G   28.0896M, 3.8644G   exact
CBAM, official, no BN      --               28.0896M, 3.8644G   the BN adds 32 parameters
CBAM, ``"paper"``          --               28.0735M, 3.8644G   -0.06%: no MLP biases
CBAM, official, torchvis.  --               28.0896M, 4.0956G   the official code's layout
=========================  ===============  ==================  =========================

The spatial convolutions add 16 x 98 parameters and 1.36M MACs (2 x 49 per position of
each block); the channel gates' MLPs have SE's weights, but run on two descriptors, so
their MACs are twice SE's (5.0M rather than 2.5M). The published 28.09M needs the MLP
biases of the official code (16 048 parameters, Eq. (2) has none); the spatial batch
norm (2 per block) is below the rounding, so with or without it 28.09M comes out.

``variant="official"`` is the default here, unlike in the modules: the published numbers
and the released weights are those of the official code. The official code builds the
torchvision layout (stride on the 3x3): to load its checkpoints build
``cbam_resnet50(layout="torchvision", variant="official")`` and convert with
:func:`refimpl.cbam.convert_official_state_dict`. Its ResNet also initialises every
spatial batch norm's weight to 0, so that each M_s starts at exactly 0.5; our
``reset_parameters`` keeps the batch norm's default (weight 1), see
:func:`zero_init_spatial_bn_` for the official start.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from refimpl.backbones import ResNet, resnet50
from refimpl.cbam.torch_module import CBAM, SpatialAttention


def cbam_resnet50(
    num_classes: int = 1000,
    reduction: int = 16,
    *,
    layout: str = "v1",
    variant: str = "official",
    kernel_size: int = 7,
    cbam_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ResNet:
    """CBAM-ResNet-50: :func:`~refimpl.backbones.resnet50` with CBAM in every bottleneck.

    Args:
        num_classes: outputs of the classifier.
        reduction: r, the channel gate's reduction ratio (16 in the paper).
        layout: ``"v1"`` (stride on the first 1x1 convolution, the paper's tables) or
            ``"torchvision"`` (stride on the 3x3, the official code).
        variant: ``"official"`` (default: the published network) or ``"paper"``.
        kernel_size: the spatial convolution's kernel (7; 3 in Table 2).
        cbam_options: further :class:`~refimpl.cbam.CBAM` options (``pooling``,
            ``arrangement``, ``spatial_bn``, ...).
        **kwargs: further arguments of :class:`~refimpl.backbones.ResNet`
            (``in_channels``, ``widths``, ``fusion``, ...); not ``attention``.

    Shape:
        Input (N, 3, H, W); output (N, num_classes).
    """
    if "attention" in kwargs or "attention_options" in kwargs:
        raise TypeError("cbam_resnet50: the attention is CBAM; build ResNet(...) for another one")
    attention = functools.partial(
        CBAM,
        reduction=reduction,
        variant=variant,
        kernel_size=kernel_size,
        **dict(cbam_options or {}),
    )
    return resnet50(num_classes, layout=layout, attention=attention, **kwargs)


def zero_init_spatial_bn_(model: nn.Module) -> nn.Module:
    """Set the weight and bias of every spatial gate's batch norm to 0, as the official
    ResNet initialises them: every M_s then starts at exactly sigmoid(0) = 0.5, and the
    spatial gates begin as a uniform halving. In place; returns ``model``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SpatialAttention) and module.bn is not None:
                module.bn.weight.zero_()
                module.bn.bias.zero_()
    return model
