"""Load weights saved by the authors' CBAM code into refimpl's modules.

The official code (github.com/Jongchan/attention-module, ``MODELS/cbam.py`` and
``MODELS/model_resnet.py``) names its parameters after ``nn.Sequential`` indices and its
own class names; refimpl's modules name them after the paper. The tensors are the same,
in the same layout, so converting is renaming:

==========================================  =====================================
official key                                refimpl key
==========================================  =====================================
``ChannelGate.mlp.1.{weight,bias}``         ``channel.reduce.{weight,bias}`` (W0)
``ChannelGate.mlp.3.{weight,bias}``         ``channel.expand.{weight,bias}`` (W1)
``SpatialGate.spatial.conv.weight``         ``spatial.conv.weight`` (f^{7x7})
``SpatialGate.spatial.bn.*``                ``spatial.bn.*``
``layerS.B.cbam.<any of the above>``        ``layerS.B.attention.<renamed>``
``layerS.B.downsample.{0,1}.*``             ``layerS.B.downsample.{conv,bn}.*``
``module.<key>`` (saved from DataParallel)  ``<key>``
==========================================  =====================================

Load the result into the official form: ``CBAM(channels, variant="official")`` for one
module, or ``cbam_resnet50(layout="torchvision", variant="official")`` for the
official CBAM-ResNet-50, which strides its 3x3 convolutions (the torchvision layout).
A checkpoint saved with ``no_spatial=True`` has no ``SpatialGate`` keys; its channel
gates load into :class:`~refimpl.cbam.ChannelAttention` (drop the ``channel.`` prefix).

The MLP biases and the spatial batch norm show in the keys; the order of the pooled maps
does not: official weights load strictly into a CBAM with ``bias=True, spatial_bn=True``
and the paper's [avg; max] order, and compute another function.
:func:`load_official_state_dict` refuses that; :func:`convert_official_state_dict` is the
bare renaming.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

# (pattern, replacement) on whole dotted components; applied in this order to every key.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^module\.", ""),
        (r"(^|\.)cbam\.", r"\1attention."),
        (r"(^|\.)ChannelGate\.mlp\.1\.", r"\1channel.reduce."),
        (r"(^|\.)ChannelGate\.mlp\.3\.", r"\1channel.expand."),
        (r"(^|\.)SpatialGate\.spatial\.conv\.", r"\1spatial.conv."),
        (r"(^|\.)SpatialGate\.spatial\.bn\.", r"\1spatial.bn."),
        (r"(^|\.)downsample\.0\.", r"\1downsample.conv."),
        (r"(^|\.)downsample\.1\.", r"\1downsample.bn."),
    )
)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an official CBAM (or CBAM-ResNet) ``state_dict`` to refimpl's keys.

    Args:
        state_dict: the official module's or network's ``state_dict()``, with or without
            the ``module.`` prefix of ``nn.DataParallel``; a whole training checkpoint
            (a dict with a ``"state_dict"`` entry, as the official ``train_imagenet.py``
            saves) is accepted too.

    Returns:
        A new dict with the same tensors under refimpl's names, in the same order; keys
        the table in the module docstring does not mention are kept as they are.

    Raises:
        ValueError: a ``ChannelGate`` or ``SpatialGate`` key that is not one of the
            official code's (the file comes from different code).
    """
    inner = state_dict.get("state_dict") if hasattr(state_dict, "get") else None
    if isinstance(inner, Mapping):
        state_dict = inner
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, replacement in _RENAMES:
            new = pattern.sub(replacement, new)
        if "ChannelGate" in new or "SpatialGate" in new:
            raise ValueError(
                f"convert_official_state_dict: unexpected key {key!r}; the official CBAM "
                "has ChannelGate.mlp.{1,3}.* and SpatialGate.spatial.{conv,bn}.*"
            )
        out[new] = value
    return out


def load_official_state_dict(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Load official CBAM weights into ``model``, refusing a spatial gate that stacks its
    pooled maps in the paper's order (the official code stacks [max; mean]).

    Args:
        model: a :class:`~refimpl.cbam.CBAM` or a network holding them, built with
            ``variant="official"`` (``cbam_resnet50(layout="torchvision",
            variant="official")``).
        checkpoint: the official module's or network's state dict, or the whole training
            checkpoint; ``module.`` prefixes are removed.

    Returns:
        ``model``, with the weights loaded strictly.

    Raises:
        ValueError: a spatial gate with another pooling order (the message names it).
        RuntimeError: missing, unexpected or misshaped keys (``load_state_dict``: e.g. a
            channel gate without biases, a spatial gate without batch norm).
    """
    from refimpl.cbam.torch_module import SpatialAttention

    official = ("max", "avg")
    wrong = [
        f"{name or 'SpatialAttention'} stacks {m.pooling}"
        for name, m in model.named_modules()
        if isinstance(m, SpatialAttention) and m.pooling != official
    ]
    if wrong:
        raise ValueError(
            "load_official_state_dict: the official spatial gate stacks its pooled maps "
            f"{official}, the weights compute another function in {len(wrong)} module(s): "
            f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}. Build with "
            'variant="official" (or spatial_pooling=("max", "avg")).'
        )
    model.load_state_dict(convert_official_state_dict(checkpoint))
    return model
