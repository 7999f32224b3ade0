"""Input checks of the PyTorch modules that need torch (the rest is in ``_checks``)."""

from __future__ import annotations

from typing import Any

import torch

from refimpl._checks import check_shape, describe


def check_torch_input(x: Any, channels: int | None, who: str, name: str = "input") -> None:
    """Check that ``x`` is a floating point NCHW tensor with ``channels`` channels.

    Raises:
        TypeError: ``x`` is not a tensor, or not of a real floating point dtype.
        ValueError: ``x`` is not 4-dimensional, has the wrong channel count, or is empty.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{who} expects {name} of a floating point dtype (float16, bfloat16, float32, "
            f"float64), got {describe(x)}"
        )
    check_shape(x, channels, who, name)
