r"""Squeeze-and-Excitation in NumPy, equation by equation (Hu et al., CVPR 2018).

Read it beside ``torch_module.py``: the same steps, names and order.

Glossary (the paper's symbols, Section 3):
    u   the block's input feature map U, here ``x``          (N, C, H, W)
    z   channel descriptor, Eq. (2): squeeze of u             (N, C)
    s   channel weights, Eq. (3): excitation of z             (N, C)
    W1  ``reduce.weight``, dimensionality reduction            (C/r, C)
    W2  ``expand.weight``, dimensionality increase             (C, C/r)
    x~  the output, Eq. (4): each channel u_c scaled by s_c    (N, C, H, W)

``params`` is ``SqueezeExcitation(...).state_dict()`` (any mapping of arrays with the
same keys), and exactly those keys (a missing, unexpected or misshaped key is an error,
see :mod:`refimpl._params`). The width C and the hidden width C/r are read from
``reduce.weight``; whether the two fully connected layers have biases is read from the
keys present: ``reduce.bias`` and ``expand.bias`` together, or neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_choice, check_numpy_input
from refimpl._params import Params, Spec

POOLINGS = ("avg", "max")
GATES = ("sigmoid", "tanh", "relu")


def squeeze(u: np.ndarray, pooling: str = "avg") -> np.ndarray:
    r"""Eq. (2): :math:`z_c = \frac{1}{H W} \sum_{i, j} u_c(i, j)`, global average pooling.

    ``pooling="max"`` is the global max pooling of the paper's squeeze ablation (Table 11).

    Shape: u (N, C, H, W) -> z (N, C).
    """
    check_choice(pooling, POOLINGS, "squeeze", "pooling")
    if pooling == "avg":
        return u.mean(axis=(2, 3))
    return u.max(axis=(2, 3))


def excitation(z: np.ndarray, params: Mapping[str, Any], gate: str = "sigmoid") -> np.ndarray:
    r"""Eq. (3): :math:`s = \sigma(W_2\, \delta(W_1 z))`, two fully connected layers.

    :math:`\delta` is ReLU; :math:`\sigma` the gate: sigmoid in the paper, tanh or ReLU
    in its excitation ablation (Table 12).

    Shape: z (N, C) -> s (N, C).
    """
    check_choice(gate, GATES, "excitation", "gate")
    p = checked_params(params, "excitation")
    W1, b1 = p["reduce.weight"], p.get("reduce.bias")
    W2, b2 = p["expand.weight"], p.get("expand.bias")
    hidden = nf.relu(nf.linear(z, W1, b1))  # delta(W1 z), (N, C/r)
    logits = nf.linear(hidden, W2, b2)  # W2 delta(W1 z), (N, C)
    if gate == "sigmoid":
        return nf.sigmoid(logits)
    if gate == "tanh":
        return nf.tanh(logits)
    return nf.relu(logits)


def scale(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    r"""Eq. (4): :math:`\tilde{x}_c = F_{scale}(u_c, s_c) = s_c \cdot u_c`.

    Shape: u (N, C, H, W), s (N, C) -> (N, C, H, W).
    """
    return u * s[:, :, None, None]  # s broadcast over positions, (N, C, 1, 1)


def squeeze_excitation(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    pooling: str = "avg",
    gate: str = "sigmoid",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The SE block: squeeze, excite, scale.

    Args:
        x: the feature map U, (N, C, H, W), real floating point.
        params: ``SqueezeExcitation.state_dict()`` or the same keys as arrays.
        pooling: the squeeze, ``"avg"`` (paper) or ``"max"`` (ablation, Table 11).
        gate: ``"sigmoid"`` (paper), ``"tanh"`` or ``"relu"`` (ablation, Table 12).
        training: accepted so that every NumPy forward of refimpl has the same signature;
            the SE block has no batch norm, so both modes compute the same.
        return_maps: also return ``{"z": z, "s": s}``.

    Returns:
        :math:`\tilde{X}`, same shape as ``x``; with ``return_maps``, ``(x~, maps)``.
    """
    p = checked_params(params, "squeeze_excitation")
    u = check_numpy_input(x, p.shape("reduce.weight")[1], "squeeze_excitation", "x")
    z = squeeze(u, pooling)  # Eq. (2), (N, C)
    s = excitation(z, p, gate)  # Eq. (3), (N, C)
    out = scale(u, s)  # Eq. (4), (N, C, H, W)
    return (out, {"z": z, "s": s}) if return_maps else out


def checked_params(params: Mapping[str, Any], who: str) -> Params:
    """``params`` checked against the keys of ``SqueezeExcitation``: ``reduce.weight``
    (C/r, C), ``expand.weight`` (C, C/r), and both biases or neither."""
    p = Params.of(params, who)
    hidden = p.dim(("reduce.weight", 2, 0), ("expand.weight", 2, 1), ("reduce.bias", 1, 0))
    channels = p.dim(("reduce.weight", 2, 1), ("expand.weight", 2, 0), ("expand.bias", 1, 0))
    bias = p.has_any(("reduce.bias", "expand.bias"))  # the biases come as a pair
    spec = Spec().linear("reduce", hidden, channels, bias).maybe("reduce.bias", "expand.bias")
    p.check(spec.linear("expand", channels, hidden, bias))
    return p
