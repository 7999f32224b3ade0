r"""Residual Attention Network in NumPy, step by step (Wang et al., CVPR 2017).

Read it beside ``torch_module.py``: the same steps, names and order.

Glossary (the paper's symbols, Section 3):
    x        the attention module's input                              (N, C, H, W)
    T        trunk branch output T(x): t residual units                (N, C, H, W)
    M        soft mask branch output M(x), the mask                     (N, C, H, W)
    H        the module's attention-aware output before the last units:
             Eq. (3) (attention residual learning, ARL)  H = (1 + M) * T
             Eq. (1) (naive attention learning, NAL)     H = M * T
    p, t, r  residual units before the split, in the trunk, and between two
             poolings of the mask branch (the paper uses p = 1, t = 2, r = 1)
    f1 f2 f3 the mask activations of Sec. 3.3 on the mask logits s = x_{i,c}
             (i a position, c a channel): mixed f1 = sigmoid(s); channel
             f2 = s / ||s_i|| (L2 over channels at each position); spatial
             f3 = sigmoid((s - mean_c) / std_c) (statistics over the positions
             of channel c)

Equation numbers are our reading of arXiv 1704.06904v1, Sec. 3.1: (1) is H = M * T, (2) the
mask's gradient, (3) is H = (1 + M) * F (not re-checked against the PDF while writing
this; the search tool reached summaries only). The activations are cited by name.

``params`` is the PyTorch module's ``state_dict()`` (any mapping of arrays with the same
keys). The structure is read from the keys, so no option repeats what the weights already
say: the number of units of each group (``pre.unit1``, ``pre.unit2``, ...), the depth of the
mask branch (``down1`` ... ``downD``) and which levels have a skip connection (``skip{i}``).
What the keys cannot say is an option with the constructor's name: ``stride``,
``activation``, ``learning``, ``force_mask``, ``align_corners``.

Numerical choices (the same on both sides):
    * f2 divides by ``max(||s_i||, 1e-12)`` (``torch.nn.functional.normalize``): unit norm
      wherever the logit vector is not (almost) zero, exactly zero where it is zero.
    * f3 standardises with the population variance (divide by H W; the sample variance
      is undefined at 1x1) and ``sqrt(var + 1e-5)`` (instance norm's epsilon): a constant
      channel, and every channel of a 1x1 map, gives z = 0 and a mask of exactly 1/2, and
      float32 rounding noise in a near-constant channel is not blown up to O(1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_choice, check_numpy_input

ACTIVATIONS = ("mixed", "channel", "spatial")
LEARNINGS = ("arl", "nal")
#: f2's floor on the L2 norm, as ``torch.nn.functional.normalize``.
CHANNEL_EPS = 1e-12
#: f3's epsilon added to the variance, as ``torch.nn.InstanceNorm2d``.
SPATIAL_EPS = 1e-5


# ---------------------------------------------------------------------------------------
# Helpers: reading the state dict


def _sub(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in params.items() if k.startswith(start)}


def _count(params: Mapping[str, Any], pattern: str) -> int:
    """How many of ``pattern.format(1)``, ``pattern.format(2)``, ... are keys, in a row."""
    n = 0
    while pattern.format(n + 1) in params:
        n += 1
    return n


def _bn_relu(x: np.ndarray, params: Mapping[str, Any], name: str, training: bool) -> np.ndarray:
    """Batch norm ``name`` then ReLU: the pre-activation of every convolution here."""
    y = nf.batch_norm(
        x,
        np.asarray(params[f"{name}.running_mean"]),
        np.asarray(params[f"{name}.running_var"]),
        np.asarray(params[f"{name}.weight"]),
        np.asarray(params[f"{name}.bias"]),
        training=training,
    )
    return nf.relu(y)


def _units(x: np.ndarray, params: Mapping[str, Any], group: str, training: bool) -> np.ndarray:
    """The residual units ``group.unit1``, ``group.unit2``, ... applied in order (none: x)."""
    for j in range(1, _count(params, group + ".unit{}.conv1.weight") + 1):
        x = residual_unit(x, _sub(params, f"{group}.unit{j}"), training=training)
    return x


# ---------------------------------------------------------------------------------------
# The pre-activation residual unit (He et al. 2016, the paper's trunk and mask unit)


def residual_unit(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    stride: int = 1,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""Pre-activation bottleneck unit: :math:`y = s(x) + \mathcal{F}(x)`.

    :math:`\mathcal{F}` is BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride ``stride``),
    BN-ReLU-conv1x1, without biases. The shortcut s is the identity, or, when the unit
    changes width or strides, a strided 1x1 convolution (``shortcut.weight``) of the
    *activated* input relu(bn1(x)), as the official model definition does.

    Args:
        x: input, (N, C_in, H, W).
        params: ``ResidualUnit.state_dict()``.
        stride: stride of the 3x3 convolution and of the projection shortcut.
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"F": residual branch}``.

    Returns:
        (N, C_out, ceil(H / stride), ceil(W / stride)); with ``return_maps``, ``(y, maps)``.
    """
    in_channels = np.asarray(params["conv1.weight"]).shape[1]
    x = check_numpy_input(x, in_channels, "residual_unit", "x")
    a = _bn_relu(x, params, "bn1", training)  # pre-activation, (N, C_in, H, W)
    f = nf.conv2d(a, np.asarray(params["conv1.weight"]))  # 1x1, (N, C_hidden, H, W)
    f = _bn_relu(f, params, "bn2", training)
    f = nf.conv2d(f, np.asarray(params["conv2.weight"]), stride=stride, padding=1)  # 3x3
    f = _bn_relu(f, params, "bn3", training)
    f = nf.conv2d(f, np.asarray(params["conv3.weight"]))  # 1x1, (N, C_out, H', W')
    if "shortcut.weight" in params:
        s = nf.conv2d(a, np.asarray(params["shortcut.weight"]), stride=stride)  # projection
    elif stride != 1 or f.shape[1] != in_channels:
        raise ValueError(
            f"residual_unit with stride {stride} from {in_channels} to {f.shape[1]} channels "
            "needs a projection shortcut, and params has no 'shortcut.weight'"
        )
    else:
        s = x  # identity
    y = s + f
    return (y, {"F": f}) if return_maps else y


# ---------------------------------------------------------------------------------------
# The mask activations f1, f2, f3 (Sec. 3.3) and the mask head


def mask_activation(s: np.ndarray, activation: str = "mixed") -> np.ndarray:
    r"""The mask M from the logits s, by the paper's f1, f2 or f3 (Sec. 3.3).

    * ``"mixed"``, f1: :math:`\sigma(s_{i,c})`, every element on its own.
    * ``"channel"``, f2: :math:`s_{i,c} / \lVert s_i \rVert_2`, the channel vector at each
      position scaled to unit length (divided by ``max(norm, 1e-12)``).
    * ``"spatial"``, f3: :math:`\sigma((s_{i,c} - \mathrm{mean}_c) / \mathrm{std}_c)`, each
      channel map standardised over its own positions (population variance, + 1e-5).

    Shape: s (N, C, H, W) -> M (N, C, H, W).
    """
    check_choice(activation, ACTIVATIONS, "mask_activation", "activation")
    if activation == "mixed":
        return nf.sigmoid(s)  # f1
    if activation == "channel":
        norm = np.sqrt((s * s).sum(axis=1, keepdims=True))  # ||s_i||, (N, 1, H, W)
        return s / np.maximum(norm, CHANNEL_EPS)  # f2
    mean = s.mean(axis=(2, 3), keepdims=True)  # mean_c, (N, C, 1, 1)
    var = s.var(axis=(2, 3), keepdims=True)  # std_c ** 2, population, (N, C, 1, 1)
    return nf.sigmoid((s - mean) / np.sqrt(var + SPATIAL_EPS))  # f3


def mask_head(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    activation: str = "mixed",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The end of the mask branch: BN-ReLU-conv1x1, BN-ReLU-conv1x1, then f1, f2 or f3.

    Args:
        x: the upsampled mask features, (N, C, H, W).
        params: ``MaskHead.state_dict()``.
        activation: ``"mixed"`` (f1, the paper's networks), ``"channel"`` (f2) or
            ``"spatial"`` (f3).
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"s": logits, "M": mask}``.

    Returns:
        M, (N, C, H, W); with ``return_maps``, ``(M, maps)``.
    """
    check_choice(activation, ACTIVATIONS, "mask_head", "activation")
    channels = np.asarray(params["conv1.weight"]).shape[1]
    x = check_numpy_input(x, channels, "mask_head", "x")
    s = nf.conv2d(_bn_relu(x, params, "bn1", training), np.asarray(params["conv1.weight"]))
    s = nf.conv2d(_bn_relu(s, params, "bn2", training), np.asarray(params["conv2.weight"]))
    M = mask_activation(s, activation)  # f1 / f2 / f3, (N, C, H, W)
    return (M, {"s": s, "M": M}) if return_maps else M


# ---------------------------------------------------------------------------------------
# The soft mask branch: bottom-up, top-down, head


def _upsample(x: np.ndarray, like: np.ndarray, align_corners: bool) -> np.ndarray:
    """Bilinear interpolation of ``x`` to exactly the spatial size of ``like``."""
    return nf.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=align_corners)


def soft_mask_branch(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    activation: str = "mixed",
    align_corners: bool = True,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The soft mask branch M(x) (Sec. 3.2, Fig. 3): bottom-up, top-down, head.

    Bottom-up, level i = 1 .. D: max pooling 3x3, stride 2, padding 1, then the units
    ``down{i}`` (r of them; 2r at the deepest level, D). Top-down, level i = D-1 .. 1: the
    deeper result is upsampled bilinearly to *exactly* the size of the bottom-up feature
    of level i (so any input size works, odd ones included), the skip connection
    ``skip{i}`` (a residual unit on that bottom-up feature, where present) is added, and
    the units ``up{i}`` follow. A last upsampling returns to the input's size; the head
    (:func:`mask_head`) makes the mask.

    Args:
        x: the mask branch's input (the output of the module's first p units), (N, C, H, W).
        params: ``SoftMaskBranch.state_dict()``.
        activation: f1 ``"mixed"``, f2 ``"channel"`` or f3 ``"spatial"``.
        align_corners: bilinear upsampling mapping corner pixels onto each other (True,
            as the official model definition's Interp layer) or pixel centres (False).
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"s": logits, "M": mask}``.

    Returns:
        M, (N, C, H, W); with ``return_maps``, ``(M, maps)``.
    """
    check_choice(activation, ACTIVATIONS, "soft_mask_branch", "activation")
    channels = np.asarray(params["head.conv1.weight"]).shape[1]
    x = check_numpy_input(x, channels, "soft_mask_branch", "x")
    depth = _count(params, "down{}.unit1.conv1.weight")

    # Bottom-up: features[i - 1] is the result of level i, each half the size of the last.
    features = []
    h = x
    for i in range(1, depth + 1):
        h = nf.max_pool2d(h, kernel_size=3, stride=2, padding=1)  # (N, C, ceil(H/2), ...)
        h = _units(h, params, f"down{i}", training)
        features.append(h)

    # Top-down: back up one level at a time, adding each level's skip connection.
    for i in range(depth - 1, 0, -1):
        h = _upsample(h, features[i - 1], align_corners)  # to level i's exact size
        if f"skip{i}.conv1.weight" in params:
            h = h + residual_unit(features[i - 1], _sub(params, f"skip{i}"), training=training)
        h = _units(h, params, f"up{i}", training)
    h = _upsample(h, x, align_corners)  # (N, C, H, W)

    return mask_head(
        h,
        _sub(params, "head"),
        activation=activation,
        training=training,
        return_maps=return_maps,
    )


# ---------------------------------------------------------------------------------------
# The attention module


def attention_module(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    activation: str = "mixed",
    learning: str = "arl",
    force_mask: float | None = None,
    align_corners: bool = True,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The attention module (Fig. 2): p units, then trunk T and mask M, then H, then p units.

    Args:
        x: input, (N, C, H, W).
        params: ``AttentionModule.state_dict()``.
        activation: the mask activation: f1 ``"mixed"``, f2 ``"channel"``, f3 ``"spatial"``.
        learning: ``"arl"``, H = (1 + M) * T (Eq. (3)), or ``"nal"``, H = M * T (Eq. (1)).
        force_mask: if not None, M is this constant and the mask branch is not run
            (``force_mask=0.0`` with ARL gives H = T exactly: the paper's identity argument).
        align_corners: the mask branch's bilinear upsampling (see :func:`soft_mask_branch`).
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"T": T, "M": M, "H": H}``.

    Returns:
        The module's output, (N, C, H, W); with ``return_maps``, ``(out, maps)``.
    """
    check_choice(activation, ACTIVATIONS, "attention_module", "activation")
    check_choice(learning, LEARNINGS, "attention_module", "learning")
    channels = np.asarray(params["mask.head.conv1.weight"]).shape[1]
    x = check_numpy_input(x, channels, "attention_module", "x")
    x = _units(x, params, "pre", training)  # p units, shared by both branches
    T = _units(x, params, "trunk", training)  # trunk branch, t units
    if force_mask is None:
        M = soft_mask_branch(
            x,
            _sub(params, "mask"),
            activation=activation,
            align_corners=align_corners,
            training=training,
        )
    else:
        M = np.full_like(T, force_mask)  # the hook: a constant mask
    H = (1 + M) * T if learning == "arl" else M * T  # Eq. (3) / Eq. (1)
    out = _units(H, params, "post", training)  # p units
    return (out, {"T": T, "M": M, "H": H}) if return_maps else out
