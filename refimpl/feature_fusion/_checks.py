"""Input checks of the fusion modules that refimpl._checks does not have.

Both sides (NumPy and PyTorch) call them, so both raise the same errors with the same
messages. They only read shapes, dtypes and the training flag: under ``torch.compile``
they become guards, not graph breaks.
"""

from __future__ import annotations

from typing import Any


def check_batch_statistics(x: Any, training: bool, who: str, *, pooled: bool = True) -> None:
    """Raise a clear ValueError where training-mode batch norm would see one value per channel.

    After global average pooling (``pooled``) the batch norm sees N values per channel, one
    per image, so training needs N >= 2. The local branch sees N * H * W values.

    Raises:
        ValueError: in training mode with a single value per channel.
    """
    n, _, h, w = x.shape
    count = n if pooled else n * h * w
    if training and count < 2:
        where = (
            "after global average pooling, where each image gives one value per channel"
            if pooled
            else "of the local context, which here has one position in one image"
        )
        raise ValueError(
            f"{who} in training mode needs more than one value per channel for the batch "
            f"norm {where}; got an input of shape {tuple(x.shape)}. Train with a batch of "
            f"at least 2 images, or use eval mode (no batch statistics needed there)."
        )


def check_same_dtype(x: Any, y: Any, who: str, names: tuple[str, str] = ("X", "Y")) -> None:
    """Check that the two inputs of a fusion have the same dtype.

    Raises:
        TypeError: the dtypes differ.
    """
    if x.dtype != y.dtype:
        raise TypeError(
            f"{who} expects {names[0]} and {names[1]} of the same dtype, got {x.dtype} and "
            f"{y.dtype}"
        )
