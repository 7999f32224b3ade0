"""The soft mask branch's max pooling, shared by the NumPy forward and the PyTorch modules
(no torch here).

=========  ===========================================  ===================================
pooling    window                                       sizes
=========  ===========================================  ===================================
"paper"    3x3, stride 2, padding 1, floor rounding     ceil(H / 2); defined down to 1x1
           (PyTorch ports, torchvision's ResNet stem)
"caffe"    3x3, stride 2, no padding, ceil rounding     ceil((H - 3) / 2) + 1: the same as
           (the official ``Attention-*-deploy``         "paper" at even H (56 -> 28 -> 14
           prototxts, Caffe's ``Pooling`` layer)        -> 7), one less at odd H; needs
                                                        H >= 2 per pooling
=========  ===========================================  ===================================

Caffe's windows start at 0, 2, 4, ... of the input and the last one may hang over the
right edge (it then reads what is inside); ours start one pixel earlier, in the padding.
A map of 1 pixel has no Caffe window at all, so a branch of ``depth`` Caffe poolings needs
an input of at least 2^depth pixels on each side (2^depth pools down to 2, ..., 2, 1;
2^depth - 1 reaches 1 one level early).
"""

from __future__ import annotations

from typing import Any

from refimpl._checks import check_choice

POOLINGS = ("paper", "caffe")

#: The keyword arguments of ``max_pool2d`` (NumPy and torch alike) of each pooling.
MAX_POOL: dict[str, dict[str, Any]] = {
    "paper": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": False},
    "caffe": {"kernel_size": 3, "stride": 2, "padding": 0, "ceil_mode": True},
}


def check_pooling(pooling: Any, who: str) -> None:
    """``pooling`` is ``"paper"`` or ``"caffe"``."""
    check_choice(pooling, POOLINGS, who, "pooling")


def min_size(pooling: str, depth: int) -> int:
    """The smallest height (and width) a branch of ``depth`` poolings accepts."""
    return 2**depth if pooling == "caffe" else 1


def check_pooling_size(size: tuple[int, ...], depth: int, pooling: str, who: str) -> None:
    """Raise a clear ValueError where Caffe pooling would make an empty map.

    Args:
        size: the input's spatial size (H, W).
        depth: the number of poolings of the mask branch.
        pooling: ``"paper"`` or ``"caffe"``.
        who: the caller, for the message.
    """
    smallest = min_size(pooling, depth)
    if min(size) < smallest:
        raise ValueError(
            f"{who}: pooling='caffe' (3x3, stride 2, no padding, ceil rounding) with depth "
            f"{depth} needs H, W >= 2^{depth} = {smallest} (a 1-pixel map has no window), "
            f"got spatial size {tuple(size)}; use pooling='paper' (padding 1), defined at any "
            "size"
        )
