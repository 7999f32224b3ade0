"""Input checks of the PyTorch modules that need torch (the rest is in ``_checks``).

What "a mismatch" means, for the dtype and the device of an input against the module:

- Device: the input must be on the device of the module's parameters, always (torch
  would fail deep inside an operation, naming neither the module nor the input).
- Dtype: outside autocast, the input must have the dtype of the module's parameters
  (``SqueezeExcitation(64)(x.double())`` would fail in a matrix product, and a float16
  input to a float32 module would silently run some steps in float32). Under
  ``torch.autocast`` for the input's device, autocast chooses the dtype of each
  operation: a float32 module takes float32 input and also the float16 or bfloat16
  output of a preceding autocast layer, so the dtype is not checked there.

The checks read only dtypes, devices and the autocast state: under ``torch.compile`` they
are guards, not graph breaks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refimpl._checks import check_shape, describe


def check_torch_input(
    x: Any,
    channels: int | None,
    who: str,
    name: str = "input",
    module: nn.Module | None = None,
) -> None:
    """Check that ``x`` is a floating point NCHW tensor with ``channels`` channels, and,
    given ``module``, on the module's device and of its dtype (see the module docstring).

    Raises:
        TypeError: ``x`` is not a tensor, or not of a real floating point dtype, or (outside
            autocast) not of the dtype of ``module``'s parameters.
        ValueError: ``x`` is not 4-dimensional, has the wrong channel count, is empty, or
            is on another device than ``module``'s parameters.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{who} expects {name} of a floating point dtype (float16, bfloat16, float32, "
            f"float64), got {describe(x)}"
        )
    check_shape(x, channels, who, name)
    if module is not None:
        check_matches_module(x, module, who, name)


def _reference(module: nn.Module) -> torch.Tensor | None:
    """The module's first floating point parameter (or buffer), which sets its dtype and
    device; None for a module without any."""
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for t in module.buffers():
        if t.is_floating_point():
            return t
    return None


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``x``'s device type (never on the meta device,
    which autocast does not know)."""
    device_type = x.device.type
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def check_matches_module(x: torch.Tensor, module: nn.Module, who: str, name: str) -> None:
    """Check that ``x`` is on ``module``'s device and (outside autocast) of its dtype.

    Raises:
        ValueError: another device.
        TypeError: another dtype, outside ``torch.autocast`` for ``x``'s device.
    """
    ref = _reference(module)
    if ref is None:
        return
    if x.device != ref.device:
        raise ValueError(
            f"{who} holds its parameters on {ref.device}, got {name} on {x.device} "
            f"({describe(x)}); move the module (module.to({str(x.device)!r})) or the input"
        )
    if x.dtype != ref.dtype and not autocast_enabled(x):
        raise TypeError(
            f"{who} holds {ref.dtype} parameters, got {name} of dtype {x.dtype} "
            f"({describe(x)}); convert the module (module.to({x.dtype})) or the input, or "
            "run under torch.autocast, which chooses each operation's dtype"
        )


def check_same_device(x: torch.Tensor, y: torch.Tensor, who: str, names=("X", "Y")) -> None:
    """Check that the two inputs of a fusion are on the same device.

    Raises:
        ValueError: the devices differ.
    """
    if x.device != y.device:
        raise ValueError(
            f"{who} expects {names[0]} and {names[1]} on the same device, got {x.device} "
            f"and {y.device}"
        )
