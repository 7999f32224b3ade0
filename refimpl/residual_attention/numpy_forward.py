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
mask branch (``down1`` ... ``downD``), r, and which levels have a skip connection
(``skip{i}``); the widths from the weights. The keys must then be exactly those of the
module of that structure, in the shapes it implies: a missing, unexpected or misshaped key
is an error naming the full key (see :mod:`refimpl._params`), so a unit with a missing
weight is an error, never a unit skipped. What the keys cannot say is an option with the
constructor's name: ``stride``, ``activation``, ``learning``, ``force_mask``,
``align_corners``, ``pooling``.

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
from refimpl._params import Params, Spec
from refimpl.residual_attention._pooling import MAX_POOL, check_pooling, check_pooling_size

ACTIVATIONS = ("mixed", "channel", "spatial")
LEARNINGS = ("arl", "nal")
#: f2's floor on the L2 norm, as ``torch.nn.functional.normalize``.
CHANNEL_EPS = 1e-12
#: f3's epsilon added to the variance, as ``torch.nn.InstanceNorm2d``.
SPATIAL_EPS = 1e-5


# ---------------------------------------------------------------------------------------
# Helpers: the structure and keys of each module (refimpl._params checks them)


def _count(p: Params, group: str) -> int:
    """How many units ``group.unit1``, ``group.unit2``, ... the keys name (the highest j)."""
    return max(p.sub(group).indices("unit"), default=0)


def _unit_spec(p: Params, stride: int = 1, channels: int | None = None) -> Spec:
    """``ResidualUnit``'s keys: ``bn1`` (C_in), ``conv1`` (C_h, C_in, 1, 1), ``bn2``, ``conv2``
    (C_h, C_h, 3, 3), ``bn3`` (C_h), ``conv3`` (C_out, C_h, 1, 1), and ``shortcut``
    (C_out, C_in, 1, 1) exactly when the unit strides or changes width. ``channels``: C_in =
    C_out given (a unit of a group), else read from the weights."""
    if channels is None:
        c_in = p.dim(("conv1.weight", 4, 1), ("bn1.weight", 1, 0), ("shortcut.weight", 4, 1))
        c_out = p.dim(("conv3.weight", 4, 0), ("shortcut.weight", 4, 0), default=c_in)
    else:
        c_in = c_out = channels
    hidden = p.dim(
        ("conv1.weight", 4, 0),
        ("conv2.weight", 4, 0),
        ("conv3.weight", 4, 1),
        ("bn2.weight", 1, 0),
        default=max(1, c_out // 4),  # ResidualUnit's default width
    )
    spec = Spec().batch_norm("bn1", c_in).conv("conv1", hidden, c_in, 1, False)
    spec.batch_norm("bn2", hidden).conv("conv2", hidden, hidden, 3, False)
    spec.batch_norm("bn3", hidden).conv("conv3", c_out, hidden, 1, False)
    if stride != 1 or c_out != c_in:
        spec.conv("shortcut", c_out, c_in, 1, False)
        spec.note(
            "shortcut.weight",
            f"a unit with stride {stride} from {c_in} to {c_out} channels has a projection "
            "shortcut",
        )
    return spec


def _group_spec(p: Params, group: str, count: int, channels: int) -> Spec:
    """The keys of ``count`` units of width ``channels`` under ``group``."""
    spec = Spec()
    for j in range(1, count + 1):
        spec.include(f"{group}.unit{j}.", _unit_spec(p.sub(f"{group}.unit{j}"), 1, channels))
    return spec


def _head_spec(p: Params) -> Spec:
    """``MaskHead``'s keys: ``bn1``, ``conv1`` (C, C, 1, 1), ``bn2``, ``conv2`` (C, C, 1, 1)."""
    c = p.dim(("conv1.weight", 4, 1), ("conv1.weight", 4, 0), ("conv2.weight", 4, 0))
    spec = Spec().batch_norm("bn1", c).conv("conv1", c, c, 1, False)
    return spec.batch_norm("bn2", c).conv("conv2", c, c, 1, False)


def _mask_structure(p: Params) -> dict[str, int]:
    """The channels C, depth D, r and skips of a ``SoftMaskBranch`` read from its keys.

    D is the highest ``down{i}``; r the largest count the groups imply (r units per level,
    2r at the deepest, r per ``up{i}``), so that a group with a unit short is reported as
    missing keys; skips the highest ``skip{i}``.
    """
    channels = p.dim(("head.conv1.weight", 4, 1), ("head.conv2.weight", 4, 0))
    depth = max(p.indices("down"), default=1)
    counts = [_count(p, f"down{i}") for i in range(1, depth)]
    counts += [-(-_count(p, f"down{depth}") // 2)]
    counts += [_count(p, f"up{i}") for i in range(1, depth)]
    skips = max(p.indices("skip"), default=0)
    return {"channels": channels, "depth": depth, "r": max(1, *counts), "skips": skips}


def _mask_spec(p: Params, structure: dict[str, int]) -> Spec:
    """``SoftMaskBranch``'s keys for ``structure`` (see :func:`_mask_structure`). Skips beyond
    depth - 1 are not part of it (then reported as unexpected)."""
    c, depth, r = structure["channels"], structure["depth"], structure["r"]
    spec = Spec()
    for i in range(1, depth + 1):
        spec.include("", _group_spec(p, f"down{i}", 2 * r if i == depth else r, c))
    for i in range(1, min(structure["skips"], depth - 1) + 1):
        spec.include(f"skip{i}.", _unit_spec(p.sub(f"skip{i}"), 1, c))
    for i in range(1, depth):
        spec.include("", _group_spec(p, f"up{i}", r, c))
    return spec.include("head.", _head_spec(p.sub("head")))


def _module_structure(p: Params) -> dict[str, int]:
    """The channels C, p and t of an ``AttentionModule`` read from its keys."""
    channels = p.dim(("mask.head.conv1.weight", 4, 1), ("mask.head.conv2.weight", 4, 0))
    return {
        "channels": channels,
        "p": max(_count(p, "pre"), _count(p, "post")),
        "t": _count(p, "trunk"),
    }


def _bn_relu(x: np.ndarray, p: Params, name: str, training: bool) -> np.ndarray:
    """Batch norm ``name`` then ReLU: the pre-activation of every convolution here."""
    y = nf.batch_norm(
        x,
        p[f"{name}.running_mean"],
        p[f"{name}.running_var"],
        p[f"{name}.weight"],
        p[f"{name}.bias"],
        training=training,
    )
    return nf.relu(y)


def _units(
    x: np.ndarray, p: Mapping[str, Any], group: str, training: bool, count: int | None = None
) -> np.ndarray:
    """The residual units ``group.unit1`` ... ``group.unit{count}`` in order (none: x);
    ``count`` None: as many as the keys name."""
    p = Params.of(p, "_units")
    for j in range(1, (_count(p, group) if count is None else count) + 1):
        x = _residual_unit(x, p.sub(f"{group}.unit{j}"), 1, training)
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
    p = Params.of(params, "residual_unit")
    p.check(_unit_spec(p, stride))
    x = check_numpy_input(x, p.shape("conv1.weight")[1], "residual_unit", "x")
    y, f = _residual_unit(x, p, stride, training, with_branch=True)
    return (y, {"F": f}) if return_maps else y


def _residual_unit(
    x: np.ndarray, p: Params, stride: int, training: bool, with_branch: bool = False
) -> Any:
    """:func:`residual_unit` on checked params: y, or (y, F) ``with_branch``."""
    a = _bn_relu(x, p, "bn1", training)  # pre-activation, (N, C_in, H, W)
    f = nf.conv2d(a, p["conv1.weight"])  # 1x1, (N, C_hidden, H, W)
    f = _bn_relu(f, p, "bn2", training)
    f = nf.conv2d(f, p["conv2.weight"], stride=stride, padding=1)  # 3x3
    f = _bn_relu(f, p, "bn3", training)
    f = nf.conv2d(f, p["conv3.weight"])  # 1x1, (N, C_out, H', W')
    if "shortcut.weight" in p:
        s = nf.conv2d(a, p["shortcut.weight"], stride=stride)  # projection
    else:
        s = x  # identity
    y = s + f
    return (y, f) if with_branch else y


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
    p = Params.of(params, "mask_head")
    p.check(_head_spec(p))
    x = check_numpy_input(x, p.shape("conv1.weight")[1], "mask_head", "x")
    s = nf.conv2d(_bn_relu(x, p, "bn1", training), p["conv1.weight"])
    s = nf.conv2d(_bn_relu(s, p, "bn2", training), p["conv2.weight"])
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
    pooling: str = "paper",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The soft mask branch M(x) (Sec. 3.2, Fig. 3): bottom-up, top-down, head.

    Bottom-up, level i = 1 .. D: max pooling 3x3, stride 2 (padding 1; see ``pooling``),
    then the units ``down{i}`` (r of them; 2r at the deepest level, D). Top-down, level
    i = D-1 .. 1: the deeper result is upsampled bilinearly to *exactly* the size of the
    bottom-up feature of level i (so any input size works, odd ones included), the skip connection
    ``skip{i}`` (a residual unit on that bottom-up feature, where present) is added, and
    the units ``up{i}`` follow. A last upsampling returns to the input's size; the head
    (:func:`mask_head`) makes the mask.

    Args:
        x: the mask branch's input (the output of the module's first p units), (N, C, H, W).
        params: ``SoftMaskBranch.state_dict()``.
        activation: f1 ``"mixed"``, f2 ``"channel"`` or f3 ``"spatial"``.
        align_corners: bilinear upsampling mapping corner pixels onto each other (True,
            as the official model definition's Interp layer) or pixel centres (False).
        pooling: ``"paper"`` (3x3, stride 2, padding 1, floor rounding; any size) or
            ``"caffe"`` (3x3, stride 2, no padding, ceil rounding, as the official prototxt;
            needs H, W >= 2^D). See ``refimpl/residual_attention/_pooling.py``.
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"s": logits, "M": mask}``.

    Returns:
        M, (N, C, H, W); with ``return_maps``, ``(M, maps)``.

    Deviations:
        The official prototxt pools without padding and with Caffe's ceil rounding
        (``pooling="caffe"``); the default pools with padding 1 as PyTorch ports do. The
        sizes agree at even sizes, the windows sit one pixel apart (measured in
        Attention-56, see ``networks.py``: the mask branches' pooling alone moves the
        logits by about 0.1% relative at 224 x 224).
    """
    check_choice(activation, ACTIVATIONS, "soft_mask_branch", "activation")
    check_pooling(pooling, "soft_mask_branch")
    p = Params.of(params, "soft_mask_branch")
    structure = _mask_structure(p)
    p.check(_mask_spec(p, structure))
    x = check_numpy_input(x, structure["channels"], "soft_mask_branch", "x")
    check_pooling_size(x.shape[2:], structure["depth"], pooling, "soft_mask_branch")
    h = _soft_mask_features(x, p, structure, align_corners, pooling, training)
    return mask_head(
        h, p.sub("head"), activation=activation, training=training, return_maps=return_maps
    )


def _soft_mask_features(
    x: np.ndarray,
    p: Params,
    structure: dict[str, int],
    align_corners: bool,
    pooling: str,
    training: bool,
) -> np.ndarray:
    """Bottom-up and top-down on checked params: the head's input, (N, C, H, W)."""
    depth, r, skips = structure["depth"], structure["r"], structure["skips"]
    # Bottom-up: features[i - 1] is the result of level i, each half the size of the last.
    features = []
    h = x
    for i in range(1, depth + 1):
        h = nf.max_pool2d(h, **MAX_POOL[pooling])  # (N, C, ceil(H/2), ...) with "paper"
        h = _units(h, p, f"down{i}", training, 2 * r if i == depth else r)
        features.append(h)

    # Top-down: back up one level at a time, adding each level's skip connection.
    for i in range(depth - 1, 0, -1):
        h = _upsample(h, features[i - 1], align_corners)  # to level i's exact size
        if i <= skips:
            h = h + _residual_unit(features[i - 1], p.sub(f"skip{i}"), 1, training)
        h = _units(h, p, f"up{i}", training, r)
    return _upsample(h, x, align_corners)  # (N, C, H, W)


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
    pooling: str = "paper",
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
        pooling: the mask branch's max pooling, ``"paper"`` (padding 1) or ``"caffe"`` (no
            padding, ceil rounding: the official prototxt; needs H, W >= 2^depth unless
            ``force_mask`` skips the branch); see :func:`soft_mask_branch`.
        training: batch norm with batch statistics (True) or running statistics.
        return_maps: also return ``{"T": T, "M": M, "H": H}``.

    Returns:
        The module's output, (N, C, H, W); with ``return_maps``, ``(out, maps)``.
    """
    check_choice(activation, ACTIVATIONS, "attention_module", "activation")
    check_choice(learning, LEARNINGS, "attention_module", "learning")
    check_pooling(pooling, "attention_module")
    p = Params.of(params, "attention_module")
    structure, mask = _module_structure(p), _mask_structure(p.sub("mask"))
    c, units = structure["channels"], structure["p"]
    spec = _group_spec(p, "pre", units, c).include("", _group_spec(p, "trunk", structure["t"], c))
    spec.include("", _group_spec(p, "post", units, c))
    p.check(spec.include("mask.", _mask_spec(p.sub("mask"), mask)))
    x = check_numpy_input(x, c, "attention_module", "x")
    if force_mask is None:
        check_pooling_size(x.shape[2:], mask["depth"], pooling, "attention_module")
    x = _units(x, p, "pre", training, units)  # p units, shared by both branches
    T = _units(x, p, "trunk", training, structure["t"])  # trunk branch, t units
    if force_mask is None:
        h = _soft_mask_features(x, p.sub("mask"), mask, align_corners, pooling, training)
        M = mask_head(h, p.sub("mask.head"), activation=activation, training=training)
    else:
        M = np.full_like(T, force_mask)  # the hook: a constant mask
    H = (1 + M) * T if learning == "arl" else M * T  # Eq. (3) / Eq. (1)
    out = _units(H, p, "post", training, units)  # p units
    return (out, {"T": T, "M": M, "H": H}) if return_maps else out
