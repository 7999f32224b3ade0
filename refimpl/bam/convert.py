"""Load weights laid out like the official BAM code (Jongchan/attention-module).

The official ``BAM`` keeps its layers in two ``nn.Sequential`` s with named entries,
``channel_att.gate_c.*`` and ``spatial_att.gate_s.*``; ours has named submodules. The
official BAM-ResNet (``MODELS/model_resnet.py``) holds three of them as ``bam1``,
``bam2``, ``bam3`` beside a torchvision-style ResNet, and its training script saves the
model wrapped in ``nn.DataParallel`` (every key prefixed ``module.``).

Official key                                  Ours
--------------------------------------------  -------------------------------
channel_att.gate_c.gate_c_fc_0.*              channel_gate.fc0.*    (W0, b0)
channel_att.gate_c.gate_c_bn_1.*              channel_gate.bn0.*
channel_att.gate_c.gate_c_fc_final.*          channel_gate.fc1.*    (W1, b1)
spatial_att.gate_s.gate_s_conv_reduce0.*      spatial_gate.conv0.*  (f0)
spatial_att.gate_s.gate_s_bn_reduce0.*        spatial_gate.bn0.*
spatial_att.gate_s.gate_s_conv_di_0.*         spatial_gate.conv1.*  (f1)
spatial_att.gate_s.gate_s_bn_di_0.*           spatial_gate.bn1.*
spatial_att.gate_s.gate_s_conv_di_1.*         spatial_gate.conv2.*  (f2)
spatial_att.gate_s.gate_s_bn_di_1.*           spatial_gate.bn2.*
spatial_att.gate_s.gate_s_conv_final.*        spatial_gate.conv3.*  (f3)

The official module places its batch norms after the hidden layers and combines the
branches by a product, so the converted weights go into modules built with
:data:`OFFICIAL_OPTIONS`: ``BAM(C, **OFFICIAL_OPTIONS)``, or for the network
``bam_resnet50(layout="torchvision", **OFFICIAL_OPTIONS)`` (the official ResNet strides
its 3x3 convolutions, the torchvision layout).

The batch-norm placement shows in the keys, the product does not: official weights load
strictly into ``BAM(C, norm="hidden")`` with the paper's ``combine="sum"`` and compute
another function. :func:`load_official_state_dict` refuses that (and takes the whole
training checkpoint the official script saves, ``{"epoch", "arch", "state_dict",
"best_prec1", "optimizer"}``); :func:`convert_official_state_dict` is the bare renaming.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from refimpl.backbones import convert_torchvision_state_dict

#: The options that make our BAM compute what the official module computes.
OFFICIAL_OPTIONS: dict[str, str] = {"norm": "hidden", "combine": "product"}

_RENAMES: tuple[tuple[str, str], ...] = (
    ("channel_att.gate_c.gate_c_fc_0.", "channel_gate.fc0."),
    ("channel_att.gate_c.gate_c_bn_1.", "channel_gate.bn0."),
    ("channel_att.gate_c.gate_c_fc_final.", "channel_gate.fc1."),
    ("spatial_att.gate_s.gate_s_conv_reduce0.", "spatial_gate.conv0."),
    ("spatial_att.gate_s.gate_s_bn_reduce0.", "spatial_gate.bn0."),
    ("spatial_att.gate_s.gate_s_conv_di_0.", "spatial_gate.conv1."),
    ("spatial_att.gate_s.gate_s_bn_di_0.", "spatial_gate.bn1."),
    ("spatial_att.gate_s.gate_s_conv_di_1.", "spatial_gate.conv2."),
    ("spatial_att.gate_s.gate_s_bn_di_1.", "spatial_gate.bn2."),
    ("spatial_att.gate_s.gate_s_conv_final.", "spatial_gate.conv3."),
)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the keys of an official BAM (or BAM-ResNet) ``state_dict`` to ours.

    Works on one module's state dict and on a whole network's: a ``module.`` prefix
    (``nn.DataParallel``) is removed, the BAM keys are renamed wherever they sit
    (``bam1.channel_att.gate_c.gate_c_fc_0.weight`` -> ``bam1.channel_gate.fc0.weight``),
    the ResNet's projection shortcuts ``downsample.0`` / ``downsample.1`` become
    ``downsample.conv`` / ``downsample.bn``, and every other key is kept. Values are not
    copied or changed.

    Args:
        state_dict: the official module's or network's ``state_dict()``, or the whole
            training checkpoint (a dict with a ``"state_dict"`` entry, as the official
            ``train_imagenet.py`` saves).

    Returns:
        A new dict with the same values in the same order, for a module built with
        :data:`OFFICIAL_OPTIONS`.

    Raises:
        ValueError: a key of the official gates that has no counterpart here (the
            official constructors' ``num_layers`` > 1 or ``dilation_conv_num`` != 2).
    """
    inner = state_dict.get("state_dict") if hasattr(state_dict, "get") else None
    if isinstance(inner, Mapping):  # a training checkpoint: {"epoch", "state_dict", ...}
        state_dict = inner
    out = {}
    for key, value in state_dict.items():
        new = key.removeprefix("module.")
        for old, ours in _RENAMES:
            if old in new:
                new = new.replace(old, ours, 1)
                break
        else:
            if "channel_att." in new or "spatial_att." in new:
                raise ValueError(
                    f"convert_official_state_dict: no counterpart for {key!r}; BAM here has "
                    "one hidden layer in the channel branch and two dilated convolutions "
                    "in the spatial branch, as the paper (official num_layers=1, "
                    "dilation_conv_num=2)"
                )
        out[new] = value
    return convert_torchvision_state_dict(out)


def load_official_state_dict(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Load official BAM weights into ``model``, refusing a model that would compute
    another function with them.

    Args:
        model: a :class:`~refimpl.bam.BAM` or a network holding them, every BAM built with
            :data:`OFFICIAL_OPTIONS` (``bam_resnet50(layout="torchvision",
            **OFFICIAL_OPTIONS)``).
        checkpoint: the official module's or network's state dict, or the whole training
            checkpoint; ``module.`` prefixes are removed.

    Returns:
        ``model``, with the weights loaded strictly.

    Raises:
        ValueError: ``model`` holds no BAM, or one without the official options (the
            message names the module and the option).
        RuntimeError: missing, unexpected or misshaped keys (``load_state_dict``).
    """
    from refimpl.bam.torch_module import BAM

    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, BAM)]
    if not modules:
        raise ValueError(
            f"load_official_state_dict: {type(model).__name__} holds no BAM module; "
            "official BAM weights need one"
        )
    wrong = [
        f"{name or 'BAM'} has {option}={getattr(m, option)!r}"
        for name, m in modules
        for option, value in OFFICIAL_OPTIONS.items()
        if getattr(m, option) != value
    ]
    if wrong:
        raise ValueError(
            "load_official_state_dict: the official weights compute another function in "
            f"{len(wrong)} place(s): {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}. "
            f"Build every BAM with {OFFICIAL_OPTIONS} (the official code places its batch "
            "norms after the hidden layers and combines the branches by a product)."
        )
    model.load_state_dict(convert_official_state_dict(checkpoint))
    return model
