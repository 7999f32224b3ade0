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

Loading official weights safely. The three differences above change no shape: official
weights load *strictly* into a default ``AFF`` or ``IAFF`` and then compute another
function (half the output, another second-stage branch, or M and 1 - M exchanged).
:func:`load_official_state_dict` is the way in: it takes a module's or a network's state
dict, or the whole training checkpoint (``{"epoch", "state_dict", ...}``), with or
without ``nn.DataParallel``'s ``module.`` prefix, refuses a model whose AFF or iAFF
modules lack the options the weights need (:data:`OFFICIAL_OPTIONS`) with a message
naming the module and the option, swaps X and Y where the official networks call the
fusion the other way round, and loads strictly. :func:`convert_official_state_dict`
stays the bare renaming, for those who choose the options themselves; it warns when it
renames official keys, since on its own it cannot tell whether they will be used right.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from refimpl.backbones import convert_torchvision_state_dict

#: The options our modules need to compute what the official PyTorch modules compute.
OFFICIAL_OPTIONS: dict[str, dict[str, bool]] = {
    "AFF": {"factor_two": True},  # returns 2 * Eq. (4)
    "IAFF": {"share_global": True},  # the second stage reuses global_att
    "MSCAM": {},
}

#: Sequential index -> our submodule name, per kind of branch.
OFFICIAL_INDICES: dict[str, dict[str, str]] = {
    "local_att": {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"},
    "global_att": {"1": "conv1", "2": "bn1", "4": "conv2", "5": "bn2"},
}

_OFFICIAL_KEY = re.compile(r"(^|\.)(local_att|global_att)(2?)\.(\d+)\.")
_OURS_KEY = re.compile(r"(^|\.)(local_att|global_att)(2?)\.(conv1|bn1|conv2|bn2)\.")


def convert_official_state_dict(
    state_dict: Mapping[str, Any],
    *,
    share_global: bool = False,
    swap_xy: bool = False,
    warn: bool = True,
) -> dict[str, Any]:
    """Rename an official-layout state dict to refimpl's names (see the module docstring).

    Works on a fusion module's state dict (``local_att.0.weight``, ...) and on a whole
    network's (``layer3.0.fuse_mode.local_att.0.weight``, ``layer1.0.downsample.0.weight``,
    ...); every other key is kept as it is.

    The bare renaming: it does not know which modules the result will be loaded into,
    and official AFF / iAFF weights load strictly into default modules that compute
    another function; :func:`load_official_state_dict` checks that. A warning says so
    when official keys are renamed (silence it with ``warn=False`` where the options
    are chosen, as the module docstring says).

    Args:
        state_dict: the official module's or network's ``state_dict()``, with or without
            the ``module.`` prefix of ``nn.DataParallel``; a whole training checkpoint
            (a dict with a ``"state_dict"`` entry) is accepted too.
        share_global: drop ``global_att2``, which the popular iAFF creates and never uses;
            load the result into ``IAFF(share_global=True)``.
        swap_xy: negate the last batch norm's weight and bias in every branch, for weights
            trained with the fusion called as ``(residual, identity)`` that are to be used
            as ``(identity, residual)`` (the official networks against ours).
        warn: warn when official keys are renamed (see above).

    Returns:
        A new dict; values are the same objects, except the negated ones (new tensors).

    Raises:
        KeyError: a branch key with an index that holds no weights in the official layout.
    """
    state_dict = _unwrap(state_dict)
    out: dict[str, Any] = {}
    official = False
    for key, value in convert_torchvision_state_dict(state_dict).items():
        key = re.sub(r"(^|\.)fuse_mode\.", r"\1fusion.", key)
        official = official or bool(_OFFICIAL_KEY.search(key))
        key = _OFFICIAL_KEY.sub(_rename_official, key)
        if share_global and re.search(r"(^|\.)global_att2\.", key):
            continue
        if swap_xy and _OURS_KEY.search(key) and re.search(r"\.bn2\.(weight|bias)$", key):
            value = -value
        out[key] = value
    if official and warn:
        warnings.warn(
            "convert_official_state_dict only renames keys: official AFF weights need "
            "AFF(factor_two=True), official iAFF weights IAFF(share_global=True) and "
            "share_global=True here, official networks swap_xy=True; without them the "
            "weights load strictly and compute another function. "
            "load_official_state_dict(model, checkpoint) checks and does all of it.",
            UserWarning,
            stacklevel=2,
        )
    return out


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict of a training checkpoint, without ``nn.DataParallel``'s prefix."""
    inner = state_dict.get("state_dict") if hasattr(state_dict, "get") else None
    if isinstance(inner, Mapping):
        state_dict = inner
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_official_state_dict(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    *,
    swap_xy: bool | None = None,
    factor_two: bool = True,
) -> nn.Module:
    """Load official AFF / iAFF weights into ``model``, refusing a model that would
    compute another function with them.

    Args:
        model: an :class:`~refimpl.feature_fusion.AFF`, :class:`~refimpl.feature_fusion.IAFF`
            or :class:`~refimpl.feature_fusion.MSCAM`, or a network holding them (built
            with the official options, :data:`OFFICIAL_OPTIONS`: e.g.
            ``aff_resnet50(reduction=4, fusion_stages=(1, 2, 3, 4), factor_two=True)``).
        checkpoint: the official module's or network's state dict, or the whole training
            checkpoint (``{"epoch", "state_dict", ...}``); ``module.`` prefixes are removed.
        swap_xy: whether the weights were trained with the fusion called as ``(residual,
            identity)``; default: yes for a network (the official networks do), no for a
            fusion module on its own (its X is the official module's first argument).
        factor_two: whether the weights come from code whose AFF returns twice Eq. (4):
            open-aff's official PyTorch and MXNet code (True, default); some copies drop
            the factor (seeds/003: False). Every AFF of ``model`` must match it.

    Returns:
        ``model``, with the weights loaded strictly.

    Raises:
        ValueError: ``model`` holds no fusion module, or one without the options the
            official weights need (the message names the module and the option).
        RuntimeError: missing, unexpected or misshaped keys (``load_state_dict``).
    """
    from refimpl.feature_fusion.torch_module import AFF, IAFF, MSCAM

    fusions = [(n, m) for n, m in model.named_modules() if isinstance(m, AFF | IAFF | MSCAM)]
    if not fusions:
        raise ValueError(
            f"load_official_state_dict: {type(model).__name__} holds no AFF, IAFF or MSCAM "
            "module; official AFF weights need one"
        )
    needed = {**OFFICIAL_OPTIONS, "AFF": {"factor_two": bool(factor_two)}}
    wrong = [
        f"{name or type(m).__name__} ({type(m).__name__}) has {option}={getattr(m, option)}"
        for name, m in fusions
        for option, value in needed[type(m).__name__].items()
        if getattr(m, option) != value
    ]
    if wrong:
        raise ValueError(
            "load_official_state_dict: the official weights compute another function in "
            f"{len(wrong)} module(s): {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}. "
            f"Build them with the options {dict((k, v) for k, v in needed.items() if v)} "
            "(the official AFF returns twice Eq. (4); the official iAFF's second stage "
            "reuses global_att)."
        )
    if swap_xy is None:
        swap_xy = not isinstance(model, AFF | IAFF | MSCAM)
    share_global = any(isinstance(m, IAFF) for _, m in fusions)
    state = convert_official_state_dict(
        checkpoint, share_global=share_global, swap_xy=swap_xy, warn=False
    )
    model.load_state_dict(state)
    return model


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
