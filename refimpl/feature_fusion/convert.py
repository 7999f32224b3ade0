r"""Load weights laid out like the official PyTorch AFF code into refimpl's modules.

The official PyTorch code (open-aff's ``aff_pytorch/aff_net/fusion.py``, copied by most
popular versions, seeds/003) builds every context branch as an ``nn.Sequential``:

======================  =====================================  ======================
official key            layer                                  refimpl key
======================  =====================================  ======================
``local_att.0.*``       PWConv1, ``Conv2d(C, C/r, 1)``          ``local_att.conv1.*``
``local_att.1.*``       ``BatchNorm2d(C/r)``                    ``local_att.bn1.*``
``local_att.2``         ReLU (no weights)
``local_att.3.*``       PWConv2, ``Conv2d(C/r, C, 1)``          ``local_att.conv2.*``
``local_att.4.*``       ``BatchNorm2d(C)``                      ``local_att.bn2.*``
``global_att.0``        ``AdaptiveAvgPool2d(1)`` (no weights)
``global_att.1.*``      PWConv1                                 ``global_att.conv1.*``
``global_att.2.*``      ``BatchNorm2d(C/r)``                    ``global_att.bn1.*``
``global_att.3``        ReLU (no weights)
``global_att.4.*``      PWConv2                                 ``global_att.conv2.*``
``global_att.5.*``      ``BatchNorm2d(C)``                      ``global_att.bn2.*``
======================  =====================================  ======================

and the same for iAFF's ``local_att2`` and ``global_att2``. Its networks
(``aff_pytorch/aff_net/aff_resnet.py``) are torchvision's ResNet with the fusion module
in an attribute ``fuse_mode`` (ours: ``fusion``) and ``downsample.0`` / ``downsample.1``
(ours: ``downsample.conv`` / ``downsample.bn``); :func:`convert_official_state_dict`
renames those too, so a whole network's state dict converts in one call.

Three differences between that code and the paper need options on our side to load its
weights as the same function:

- its iAFF never uses ``global_att2`` (the second stage reuses ``global_att``): build
  ``IAFF(share_global=True)`` and convert with ``share_global=True``, which drops the
  unused branch;
- its AFF returns twice Eq. (4): build ``AFF(factor_two=True)``;
- its networks call the fusion as ``fuse_mode(residual, identity)`` (X = the residual
  branch), ours as ``fusion(identity, residual)``: convert with ``swap_xy=True``. The
  weights M are computed from X + Y, which does not depend on the order, and
  :math:`1 - \sigma(t) = \sigma(-t)`; negating the weight and bias of the last batch norm
  (``bn2``) of every branch negates L and g, turns M into 1 - M, and so makes
  ``ours(identity, residual)`` equal ``official(residual, identity)`` exactly, in eval and
  in training mode, for AFF and iAFF (with or without the shared branch) alike.

The official code's r = 4 everywhere and its fusion in all four stages are plain
constructor arguments (``reduction=4``, ``fusion_stages=(1, 2, 3, 4)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from refimpl.backbones import convert_torchvision_state_dict

#: Sequential index -> our submodule name, per kind of branch.
OFFICIAL_INDICES: dict[str, dict[str, str]] = {
    "local_att": {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"},
    "global_att": {"1": "conv1", "2": "bn1", "4": "conv2", "5": "bn2"},
}

_OFFICIAL_KEY = re.compile(r"(^|\.)(local_att|global_att)(2?)\.(\d+)\.")
_OURS_KEY = re.compile(r"(^|\.)(local_att|global_att)(2?)\.(conv1|bn1|conv2|bn2)\.")


def convert_official_state_dict(
    state_dict: Mapping[str, Any], *, share_global: bool = False, swap_xy: bool = False
) -> dict[str, Any]:
    """Rename an official-layout state dict to refimpl's names (see the module docstring).

    Works on a fusion module's state dict (``local_att.0.weight``, ...) and on a whole
    network's (``layer3.0.fuse_mode.local_att.0.weight``, ``layer1.0.downsample.0.weight``,
    ...); every other key is kept as it is.

    Args:
        state_dict: the official module's or network's ``state_dict()``.
        share_global: drop ``global_att2``, which the popular iAFF creates and never uses;
            load the result into ``IAFF(share_global=True)``.
        swap_xy: negate the last batch norm's weight and bias in every branch, for weights
            trained with the fusion called as ``(residual, identity)`` that are to be used
            as ``(identity, residual)`` (the official networks against ours).

    Returns:
        A new dict; values are the same objects, except the negated ones (new tensors).

    Raises:
        KeyError: a branch key with an index that holds no weights in the official layout.
    """
    out: dict[str, Any] = {}
    for key, value in convert_torchvision_state_dict(state_dict).items():
        key = re.sub(r"(^|\.)fuse_mode\.", r"\1fusion.", key)
        key = _OFFICIAL_KEY.sub(_rename_official, key)
        if share_global and re.search(r"(^|\.)global_att2\.", key):
            continue
        if swap_xy and _OURS_KEY.search(key) and re.search(r"\.bn2\.(weight|bias)$", key):
            value = -value
        out[key] = value
    return out


def to_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse renaming: refimpl's branch names to the official ``nn.Sequential`` indices.

    Only the branch keys (``local_att.conv1.weight`` -> ``local_att.0.weight``) change; use
    it to copy our weights into the official modules or into
    :mod:`refimpl.feature_fusion.popular`.
    """
    out = {}
    for key, value in state_dict.items():
        out[_OURS_KEY.sub(_rename_ours, key)] = value
    return out


def _rename_official(match: re.Match[str]) -> str:
    lead, kind, two, index = match.groups()
    names = OFFICIAL_INDICES[kind]
    if index not in names:
        raise KeyError(
            f"official {kind}{two}.{index} holds no weights (layers with weights: "
            f"{sorted(names)}); is this an official-layout state dict?"
        )
    return f"{lead}{kind}{two}.{names[index]}."


def _rename_ours(match: re.Match[str]) -> str:
    lead, kind, two, name = match.groups()
    index = {v: k for k, v in OFFICIAL_INDICES[kind].items()}[name]
    return f"{lead}{kind}{two}.{index}."
