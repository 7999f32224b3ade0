r"""BAM in NumPy, equation by equation (Park, Woo, Lee, Kweon; BMVC 2018).

Read it beside ``torch_module.py``: the same steps, names and order.

Glossary (the paper's symbols, Section 3):
    F      the input feature map, here ``x``                                (N, C, H, W)
    M_c    channel attention, Eq. (3): BN(MLP(AvgPool(F)))                   (N, C)
    M_s    spatial attention, Eq. (4): BN(f3(f2(f1(f0(F)))))                 (N, H, W)
    M      the 3D attention map, Eq. (2): sigmoid(M_c + M_s), broadcast      (N, C, H, W)
    F'     the output, Eq. (1): F + F * M                                    (N, C, H, W)
    W0,b0  ``channel_gate.fc0``, the MLP's hidden layer                      (C/r, C)
    W1,b1  ``channel_gate.fc1``, the MLP's output layer                      (C, C/r)
    f0     ``spatial_gate.conv0``, 1x1 convolution C -> C/r
    f1,f2  ``spatial_gate.conv1``, ``conv2``: 3x3 convolutions C/r -> C/r, dilation d
    f3     ``spatial_gate.conv3``, 1x1 convolution C/r -> 1

Where the batch norms sit (``norm``):
    ``"output"`` (the paper, Eqs. (3) and (4)): one BN at the end of each branch,
        ``channel_gate.bn`` over the C outputs of the MLP and ``spatial_gate.bn`` over the
        one-channel map; ReLU after every hidden layer (the paper's equations leave the
        non-linearities out; without them each branch would collapse into one linear map).
    ``"hidden"`` (the official code): BN then ReLU after every hidden layer
        (``channel_gate.bn0`` after fc0; ``spatial_gate.bn0``, ``bn1``, ``bn2`` after
        conv0, conv1, conv2) and none at the end.

``params`` is ``BAM(...).state_dict()`` (any mapping of arrays with the same keys), and
exactly the keys that ``norm`` implies (a missing, unexpected or misshaped key is an error
naming the full key, see :mod:`refimpl._params`). The widths C and C/r are read from
``fc0.weight`` and ``conv0.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_choice, check_numpy_input, check_positive_int
from refimpl._params import Params, Spec

NORMS = ("output", "hidden")
COMBINES = ("sum", "product")


def channel_gate(
    x: np.ndarray, params: Mapping[str, Any], *, norm: str = "output", training: bool = False
) -> np.ndarray:
    r"""Eq. (3): :math:`M_c(F) = BN(W_1\, \delta(W_0\, AvgPool(F) + b_0) + b_1)`.

    Args:
        x: F, (N, C, H, W).
        params: ``ChannelGate.state_dict()``: ``fc0.*``, ``fc1.*`` and ``bn.*`` (``norm=
            "output"``) or ``bn0.*`` (``norm="hidden"``).
        norm: where the batch norm sits, see the module docstring.
        training: batch statistics in the batch norm instead of the running ones.

    Shape: x (N, C, H, W) -> M_c (N, C).
    """
    check_choice(norm, NORMS, "channel_gate", "norm")
    p = Params.of(params, "channel_gate")
    p.check(_channel_spec(p, norm))
    F = check_numpy_input(x, p.shape("fc0.weight")[1], "channel_gate", "x")
    _check_batch_for_training(F.shape[0], training, "channel_gate")
    F_c = F.mean(axis=(2, 3))  # AvgPool(F), the channel vector, (N, C)
    hidden = _linear(F_c, p, "fc0")  # W0 F_c + b0, (N, C/r)
    if norm == "hidden":
        hidden = _batch_norm(hidden, p, "bn0", training)
    hidden = nf.relu(hidden)  # delta, (N, C/r)
    M_c = _linear(hidden, p, "fc1")  # W1 delta(...) + b1, (N, C)
    if norm == "output":
        M_c = _batch_norm(M_c, p, "bn", training)  # Eq. (3): BN(MLP(AvgPool(F)))
    return M_c


def spatial_gate(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    dilation: int = 4,
    norm: str = "output",
    training: bool = False,
) -> np.ndarray:
    r"""Eq. (4): :math:`M_s(F) = BN(f_3^{1 \times 1}(f_2^{3 \times 3}(f_1^{3 \times 3}(
    f_0^{1 \times 1}(F)))))`.

    The two 3x3 convolutions have dilation d and zero padding d on every side, so each
    keeps the size H x W exactly, whatever it is: the dilated kernel spans 2d + 1
    positions and the padded input H + 2d, so H + 2d - 2d = H outputs. Taps that fall
    outside the image read zeros (at H = 1 only the centre tap sees data).

    Args:
        x: F, (N, C, H, W).
        params: ``SpatialGate.state_dict()``: ``conv0.*`` to ``conv3.*`` and ``bn.*``
            (``norm="output"``) or ``bn0.*``, ``bn1.*``, ``bn2.*`` (``norm="hidden"``).
        dilation: d, the dilation of the two 3x3 convolutions (4 in the paper).
        norm: where the batch norms sit, see the module docstring.
        training: batch statistics in the batch norms instead of the running ones.

    Shape: x (N, C, H, W) -> M_s (N, H, W).
    """
    check_choice(norm, NORMS, "spatial_gate", "norm")
    check_positive_int(dilation, "spatial_gate", "dilation")
    p = Params.of(params, "spatial_gate")
    p.check(_spatial_spec(p, norm))
    F = check_numpy_input(x, p.shape("conv0.weight")[1], "spatial_gate", "x")
    _check_positions_for_training(F.shape, training, "spatial_gate")
    h = _conv(F, p, "conv0")  # f0: 1x1 reduction C -> C/r, (N, C/r, H, W)
    h = _hidden_activation(h, p, "bn0", norm, training)
    h = _conv(h, p, "conv1", dilation)  # f1: 3x3, dilation d, (N, C/r, H, W)
    h = _hidden_activation(h, p, "bn1", norm, training)
    h = _conv(h, p, "conv2", dilation)  # f2: 3x3, dilation d, (N, C/r, H, W)
    h = _hidden_activation(h, p, "bn2", norm, training)
    M_s = _conv(h, p, "conv3")  # f3: 1x1 C/r -> 1, (N, 1, H, W)
    if norm == "output":
        M_s = _batch_norm(M_s, p, "bn", training)  # Eq. (4): BN(f3(...))
    return M_s[:, 0]  # (N, H, W)


def attention_map(M_c: np.ndarray, M_s: np.ndarray, combine: str = "sum") -> np.ndarray:
    r"""Eq. (2): :math:`M(F) = \sigma(M_c(F) + M_s(F))`, both maps broadcast to C x H x W.

    ``combine="product"`` is the official code's :math:`\sigma(M_c(F) \cdot M_s(F))`
    (the paper's Table 2 ablation found the sum best).

    Shape: M_c (N, C), M_s (N, H, W) -> M (N, C, H, W).
    """
    check_choice(combine, COMBINES, "attention_map", "combine")
    M_c4 = M_c[:, :, None, None]  # (N, C, 1, 1)
    M_s4 = M_s[:, None, :, :]  # (N, 1, H, W)
    logits = M_c4 + M_s4 if combine == "sum" else M_c4 * M_s4  # (N, C, H, W)
    return nf.sigmoid(logits)


def bam(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    dilation: int = 4,
    norm: str = "output",
    combine: str = "sum",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The Bottleneck Attention Module: :math:`F' = F + F \otimes M(F)`.

    Args:
        x: the feature map F, (N, C, H, W), real floating point.
        params: ``BAM.state_dict()`` or the same keys as arrays (``channel_gate.*``,
            ``spatial_gate.*``).
        dilation: d of the spatial branch's 3x3 convolutions (paper: 4).
        norm: ``"output"`` (paper: BN at the end of each branch) or ``"hidden"``
            (official code: BN after each hidden layer).
        combine: ``"sum"`` (paper, Eq. (2)) or ``"product"`` (official code).
        training: batch statistics in the batch norms instead of the running ones.
            Training needs N >= 2: the channel branch's batch norm sees one value per
            channel and item after the global pooling.
        return_maps: also return ``{"M_c": M_c, "M_s": M_s, "M": M}``.

    Returns:
        F', same shape as ``x``; with ``return_maps``, ``(F', maps)``.

    Raises:
        ValueError: a bad shape or option, or ``training`` with N = 1.
    """
    check_choice(norm, NORMS, "bam", "norm")
    check_choice(combine, COMBINES, "bam", "combine")
    p = Params.of(params, "bam")
    channel_params, spatial_params = p.sub("channel_gate"), p.sub("spatial_gate")
    spec = Spec().include("channel_gate.", _channel_spec(channel_params, norm))
    p.check(spec.include("spatial_gate.", _spatial_spec(spatial_params, norm)))
    F = check_numpy_input(x, channel_params.shape("fc0.weight")[1], "bam", "x")
    _check_batch_for_training(F.shape[0], training, "bam")
    M_c = channel_gate(F, channel_params, norm=norm, training=training)  # Eq. (3), (N, C)
    M_s = spatial_gate(
        F, spatial_params, dilation=dilation, norm=norm, training=training
    )  # Eq. (4), (N, H, W)
    M = attention_map(M_c, M_s, combine)  # Eq. (2), (N, C, H, W)
    F_prime = F + F * M  # Eq. (1)
    return (F_prime, {"M_c": M_c, "M_s": M_s, "M": M}) if return_maps else F_prime


# ---------------------------------------------------------------------------------------
# Helpers: the keys of each branch (refimpl._params checks them), one layer each.


def _channel_spec(p: Params, norm: str) -> Spec:
    """``ChannelGate``'s keys: ``fc0`` (C/r, C), ``fc1`` (C, C/r), with biases, and the
    batch norm ``bn`` (C) for ``norm="output"`` or ``bn0`` (C/r) for ``"hidden"``."""
    hidden = p.dim(("fc0.weight", 2, 0), ("fc1.weight", 2, 1))
    channels = p.dim(("fc0.weight", 2, 1), ("fc1.weight", 2, 0))
    spec = Spec().linear("fc0", hidden, channels, True).linear("fc1", channels, hidden, True)
    return spec.batch_norm("bn", channels) if norm == "output" else spec.batch_norm("bn0", hidden)


def _spatial_spec(p: Params, norm: str) -> Spec:
    """``SpatialGate``'s keys: ``conv0`` (C/r, C, 1, 1), ``conv1``, ``conv2`` (C/r, C/r, 3, 3),
    ``conv3`` (1, C/r, 1, 1), with biases; ``bn`` (1) for ``norm="output"``, else ``bn0``,
    ``bn1``, ``bn2`` (C/r)."""
    hidden = p.dim(("conv0.weight", 4, 0), ("conv3.weight", 4, 1))
    channels = p.dim(
        ("conv0.weight", 4, 1),
    )
    spec = Spec().conv("conv0", hidden, channels, 1, True)
    spec.conv("conv1", hidden, hidden, 3, True).conv("conv2", hidden, hidden, 3, True)
    spec.conv("conv3", 1, hidden, 1, True)
    if norm == "output":
        return spec.batch_norm("bn", 1)
    return spec.batch_norm("bn0", hidden).batch_norm("bn1", hidden).batch_norm("bn2", hidden)


def _linear(z: np.ndarray, p: Params, name: str) -> np.ndarray:
    return nf.linear(z, p[f"{name}.weight"], p[f"{name}.bias"])


def _conv(h: np.ndarray, p: Params, name: str, dilation: int = 1) -> np.ndarray:
    weight = p[f"{name}.weight"]
    padding = dilation * (weight.shape[-1] // 2)  # 0 for 1x1, d for a 3x3 with dilation d
    return nf.conv2d(h, weight, p[f"{name}.bias"], padding=padding, dilation=dilation)


def _batch_norm(h: np.ndarray, p: Params, name: str, training: bool) -> np.ndarray:
    return nf.batch_norm(
        h,
        p[f"{name}.running_mean"],
        p[f"{name}.running_var"],
        p[f"{name}.weight"],
        p[f"{name}.bias"],
        training=training,
    )


def _hidden_activation(h: np.ndarray, p: Params, bn: str, norm: str, training: bool) -> np.ndarray:
    """ReLU after a hidden layer, preceded by its batch norm in the official placement."""
    if norm == "hidden":
        h = _batch_norm(h, p, bn, training)
    return nf.relu(h)


def _check_batch_for_training(n: int, training: bool, who: str) -> None:
    """The channel branch's batch norm sees one value per channel and item: N >= 2."""
    if training and n < 2:
        raise ValueError(
            f"{who}: batch norm in training mode needs more than one value per channel; "
            "after the channel branch's global pooling there is one value per item, so "
            f"training needs a batch of N >= 2, got N = {n}. Use eval mode for single items."
        )


def _check_positions_for_training(shape: tuple[int, ...], training: bool, who: str) -> None:
    """The spatial branch's batch norms see N * H * W values per channel."""
    n, _, h, w = shape
    if training and n * h * w < 2:
        raise ValueError(
            f"{who}: batch norm in training mode needs more than one value per channel, "
            f"got N * H * W = {n * h * w} for input of shape {tuple(shape)}"
        )
