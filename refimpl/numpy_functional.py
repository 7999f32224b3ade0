r"""NumPy building blocks, each matching the ``torch.nn.functional`` op of the same name.

Every paper's NumPy forward is written with these. They are vectorised (no Python loop
over pixels or batch items), compute in the dtype they are given (the oracle uses
float64), and follow torch's argument names and defaults so that a reader can hold a
line of NumPy next to a line of PyTorch. ``tests/test_numpy_functional.py`` checks each
one against torch with Hypothesis.
"""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    r"""``torch.nn.functional.linear``: :math:`y = x W^\top + b` over the last axis.

    Shape:
        x: (..., in_features); weight: (out_features, in_features); bias: (out_features,).
        Returns (..., out_features).
    """
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def relu(x: np.ndarray) -> np.ndarray:
    """``torch.nn.functional.relu``: max(x, 0) elementwise."""
    return np.maximum(x, 0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    r"""``torch.sigmoid``: :math:`1 / (1 + e^{-x})`, with no overflow warning for large |x|.

    With :math:`e = e^{-|x|} \in (0, 1]` this is :math:`1 / (1 + e)` for :math:`x \ge 0` and
    :math:`e / (1 + e)` for :math:`x < 0`: the exponential never overflows, and small
    values keep their full relative precision (``(1 + tanh(x / 2)) / 2`` would round
    sigmoid(-40) to 0).
    """
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def tanh(x: np.ndarray) -> np.ndarray:
    """``torch.tanh``."""
    return np.tanh(x)
