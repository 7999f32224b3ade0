"""Input checks shared by the NumPy forwards and the PyTorch modules.

Both sides raise the same errors with the same messages, so a user who feeds a wrong
tensor to either gets told what was expected and what came. The checks only read
shapes and dtypes; under ``torch.compile`` they become guards, not graph breaks.

This module never imports torch: the NumPy oracle must run without it. The checks that
need torch live in :mod:`refimpl._torch_checks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def describe(x: Any) -> str:
    return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"


def check_numpy_input(x: Any, channels: int | None, who: str, name: str = "input") -> np.ndarray:
    """The NumPy twin of :func:`check_torch_input`; returns ``x`` as an ndarray.

    Accepts anything ``np.asarray`` turns into a real floating point array.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{who} expects {name} of a real floating point dtype (float32, float64), "
            f"got {describe(x)}"
        )
    check_shape(x, channels, who, name)
    return x


def check_shape(x: Any, channels: int | None, who: str, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{who} expects {name} of shape (N, C, H, W), got {x.ndim} dimensions: {describe(x)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{who} was built for {channels} channels, got {name} with {x.shape[1]} "
            f"channels: {describe(x)}"
        )
    if 0 in tuple(x.shape):
        raise ValueError(f"{who} expects a non-empty {name}, got {describe(x)}")


def check_same_shape(x: Any, y: Any, who: str, names: tuple[str, str] = ("X", "Y")) -> None:
    """Check that two inputs to be fused have the same shape (AFF, iAFF)."""
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(
            f"{who} expects {names[0]} and {names[1]} of the same shape, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def check_choice(value: Any, choices: tuple[str, ...], who: str, name: str) -> None:
    """Check that a string option is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {choices}, got {value!r}")


def check_positive_int(value: Any, who: str, name: str) -> None:
    """Check that an integer option (channels, reduction, widths) is >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")


def hidden_width(
    channels: Any,
    reduction: Any,
    hidden_channels: Any = None,
    who: str = "hidden_width",
    name: str = "hidden_channels",
) -> int:
    """The hidden width of a reduction bottleneck (SE, CBAM, BAM, MS-CAM, A^2's m and n):
    ``hidden_channels`` if given, else ``max(1, channels // reduction)``, never 0 (the
    official AFF and many ports compute ``channels // r``, 0 for C < r).

    Args:
        channels: C, the input width.
        reduction: r, the reduction ratio.
        hidden_channels: the width given directly, or None for C // r.
        who: the caller, for the messages.
        name: the width's name in the caller's signature (``"hidden_channels"``, ``"m"``).

    Raises:
        ValueError: ``channels``, ``reduction`` or the width is not a positive integer,
            naming it and the value that came.
    """
    check_positive_int(channels, who, "channels")
    check_positive_int(reduction, who, "reduction")
    width = max(1, channels // reduction) if hidden_channels is None else hidden_channels
    check_positive_int(width, who, name)
    return int(width)
