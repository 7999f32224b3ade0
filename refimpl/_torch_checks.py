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
import torch.nn.functional as F
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
    device; None for a module without any.

    The order of ``module.parameters()`` (then ``buffers()``): the module's own, then each
    child's, depth first. Walked here through the registries directly: every module call
    checks its input, and ``parameters()``' generators took 2.5 us of the check's 3.3 (a
    BAM checks three times per call, an attention module once per unit)."""
    found = _first_floating(module, "_parameters")
    return found if found is not None else _first_floating(module, "_buffers")


def _first_floating(module: nn.Module, registry: str) -> torch.Tensor | None:
    for t in getattr(module, registry).values():
        if t is not None and t.is_floating_point():
            return t
    for child in module._modules.values():
        if child is not None:
            found = _first_floating(child, registry)
            if found is not None:
                return found
    return None


def capturing_graph() -> bool:
    """Whether a graph is being captured (``torch.jit.trace``, ``torch.compile``,
    ``torch.export``): the fast paths that choose by size, dtype or thread count, or run a
    hand-written autograd Function, step aside there and leave the plain graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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


# ---------------------------------------------------------------------------------------
# A torch bug worked around: oneDNN's bfloat16 convolution on thin CPU maps

#: A map at most this many positions high or wide is "thin".
THIN = 2


def bfloat16_cpu_thin(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` would run oneDNN's bfloat16 CPU kernel on a thin map.

    Reported (refimpl issue 10): ``F.conv2d`` on a (2, 8, 11, 1) bfloat16 CPU tensor, 3x3,
    stride 2, padding 1, gave relative errors of 1 to 1e30, different on each call, in
    ``ResidualUnit`` under autocast and in the bfloat16 networks. Measured here (torch
    2.13.0, an AVX-512-BF16 CPU): the forward and the input gradient are right (1 075
    random convolutions, none off), but the *weight gradient* is garbage (1e19 to 1e36 or
    NaN, different on each call) when the input is one position wide (or two with stride
    3), the kernel wider than 1 and the stride along the width above 1; with C >= 16 in
    NCHW, any C in channels_last. One position *high* is fine; so is any map 3 wide. The
    condition here is wider than what was measured, since the reporter's CPU also broke
    the forward: a map at most :data:`THIN` positions high or wide, on the CPU, in
    bfloat16 or under a bfloat16 autocast. Such maps are small, so computing their
    convolutions (forward and backward) in float32 costs little.
    ``tests/test_training.py`` watches the raw behaviour on every run: it warns while
    torch still gets it wrong and fails if it goes wrong outside this condition.
    """
    if x.device.type != "cpu":
        return False
    # The dtype first, the size last: only a bfloat16 convolution guards on the map's size
    # (under torch.export with dynamic sizes, a size test would narrow their range).
    bfloat16 = x.dtype == torch.bfloat16 or (
        x.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return bfloat16 and min(x.shape[-2:]) <= THIN


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d``, computed in float32 where :func:`bfloat16_cpu_thin` says bfloat16 is
    unreliable; the result is bfloat16 there, as autocast or the input would make it."""
    if not bfloat16_cpu_thin(x):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    with torch.autocast("cpu", enabled=False):
        b = None if bias is None else bias.float()
        out = F.conv2d(x.float(), weight.float(), b, stride, padding, dilation, groups)
    return out.to(torch.bfloat16)


def call_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, a module call (hooks run), except where :func:`conv2d`'s workaround
    applies, which computes it in float32 from ``conv``'s parameters."""
    if not bfloat16_cpu_thin(x):
        return conv(x)
    return conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
