"""CBAM's options, shared by the NumPy forward and the PyTorch modules (no torch here).

The two presets say what the paper's equations and the official code each do; every
option left as ``None`` takes its value from the chosen ``variant``:

=====================  ===========================  ==============================
option                 ``"paper"`` (Eqs. (2), (3))  ``"official"`` (authors' code)
=====================  ===========================  ==============================
MLP biases             no (Eq. (2): W1, W0 only)    yes (``nn.Linear``)
spatial pooling order  [avg; max] (Eq. (3))         [max; mean] (``ChannelPool``)
spatial conv bias      no (Eq. (3): f^{7x7} only)   no
BatchNorm after conv   no                           yes (``BasicConv``)
=====================  ===========================  ==============================
"""

from __future__ import annotations

from typing import Any

from refimpl._checks import check_choice, check_positive_int

#: Global poolings of the channel gate (over positions) and of the spatial gate (over
#: channels): the average and the maximum.
POOLINGS = ("avg", "max")
VARIANTS = ("paper", "official")
ARRANGEMENTS = ("channel-spatial", "spatial-channel", "parallel")

#: What each variant fixes, for the options the caller leaves as None.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"bias": False, "spatial_pooling": ("avg", "max"), "spatial_bn": False},
    "official": {"bias": True, "spatial_pooling": ("max", "avg"), "spatial_bn": True},
}


def parse_pooling(value: Any, who: str, name: str = "pooling") -> tuple[str, ...]:
    """``value`` as a tuple of distinct pooling names, in the given order.

    Accepts a sequence (``("avg", "max")``) or a string: ``"avg"``, ``"max"`` or two names
    joined by ``+`` (``"avg+max"``, the paper's "avg & max").

    Raises:
        ValueError: an unknown name, a repeated one, or none.
    """
    names = tuple(value.split("+")) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        raise ValueError(
            f"{who}: {name} must be a sequence of names from {POOLINGS} (or 'avg+max'), "
            f"got {value!r}"
        ) from None
    if not names or len(set(names)) != len(names) or not set(names) <= set(POOLINGS):
        raise ValueError(
            f"{who}: {name} must be distinct names from {POOLINGS}, at least one, got {value!r}"
        )
    return names


def check_variant(variant: Any, who: str) -> dict[str, Any]:
    """The preset of ``variant`` ("paper" or "official")."""
    check_choice(variant, VARIANTS, who, "variant")
    return PRESETS[variant]


def check_kernel_size(kernel_size: Any, who: str) -> None:
    """The spatial convolution's kernel: an odd positive int, so padding k // 2 keeps H x W."""
    check_positive_int(kernel_size, who, "kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{who}: kernel_size must be odd (padding k // 2 keeps the size only for odd k), "
            f"got {kernel_size}"
        )
