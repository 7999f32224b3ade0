r"""Attentional feature fusion in NumPy, equation by equation (Dai et al., WACV 2021).

Read it beside ``torch_module.py``: the same steps, names and order.

Glossary (the paper's symbols, Sections 3 and 4; equation numbers of arXiv 2009.14082v2):
    X       a feature map; in AFF and iAFF the identity branch          (N, C, H, W)
    Y       the other feature map, the residual branch (larger
            receptive field), same shape as X                           (N, C, H, W)
    L(X)    local channel context, Eq. (2): B(PWConv2(delta(B(PWConv1(X))))), computed
            at every position                                           (N, C, H, W)
    g(X)    global channel context: the same chain on the global average pooling of X,
            Eq. (1); one vector per image, broadcast over positions     (N, C, 1, 1)
    M(X)    MS-CAM attention weights sigmoid(L(X) + g(X)), Eq. (3)      (N, C, H, W)
    X'      MS-CAM output X * M(X), Eq. (3)                             (N, C, H, W)
    Z       AFF output M(X + Y) * X + (1 - M(X + Y)) * Y, Eq. (4)       (N, C, H, W)
    X (+) Y iAFF's initial integration, Eq. (5): itself an AFF of X and Y with a first
            MS-CAM, fed to a second MS-CAM that gives the final weights (N, C, H, W)
    r       channel reduction ratio: PWConv1 maps C -> C/r channels, PWConv2 C/r -> C
    B       batch normalisation; delta ReLU; PWConv a point-wise (1x1) convolution

``params`` is the PyTorch module's ``state_dict()`` (any mapping of arrays with the same
keys). A context branch has the keys ``conv1.weight`` (C/r, C, 1, 1), ``conv1.bias``,
``bn1.weight``, ``bn1.bias``, ``bn1.running_mean``, ``bn1.running_var``, and the same for
``conv2`` (C, C/r, 1, 1) and ``bn2``; MS-CAM prefixes them with ``local_att.`` and
``global_att.``, iAFF's second MS-CAM with ``local_att2.`` and ``global_att2.``. The keys
must be exactly those (a missing, unexpected or misshaped key is an error naming the full
key, see :mod:`refimpl._params`). The widths C and C/r are read from ``conv1.weight``;
whether the convolutions have biases from the keys present: if any ``conv*.bias`` key is
there, every convolution of the module must have one.

``training=True`` normalises with batch statistics (the running statistics are not
updated: the functions are pure). The batch norm after global pooling then sees one value
per channel per image, so training needs at least 2 images; with one image the functions
raise a ValueError saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_numpy_input, check_same_shape
from refimpl._params import Params, Spec
from refimpl.feature_fusion._checks import check_batch_statistics, check_same_dtype

_BIASES = ("conv1.bias", "conv2.bias")


def _branch_spec(p: Params, bias: bool) -> Spec:
    """A context branch's keys: ``conv1`` (C/r, C, 1, 1), ``bn1`` (C/r), ``conv2``
    (C, C/r, 1, 1), ``bn2`` (C), the two convolutions with biases if ``bias``."""
    hidden = p.dim(("conv1.weight", 4, 0), ("conv2.weight", 4, 1), ("bn1.weight", 1, 0))
    channels = p.dim(("conv1.weight", 4, 1), ("conv2.weight", 4, 0), ("bn2.weight", 1, 0))
    spec = Spec().conv("conv1", hidden, channels, 1, bias).batch_norm("bn1", hidden)
    spec.conv("conv2", channels, hidden, 1, bias).batch_norm("bn2", channels)
    return spec.maybe(*_BIASES)


def _checked(params: Mapping[str, Any], branches: tuple[str, ...], who: str) -> Params:
    """``params`` checked against the module made of the context ``branches`` (prefixes
    without the dot; ``""`` for a lone branch); biases in every branch or in none."""
    p = Params.of(params, who)
    subs = [p.sub(b) if b else p for b in branches]
    bias = any(sub.has_any(_BIASES) for sub in subs)
    spec = Spec()
    for b, sub in zip(branches, subs, strict=True):
        spec.include(f"{b}." if b else "", _branch_spec(sub, bias))
    p.check(spec)
    return p


def _pointwise_bottleneck(x: np.ndarray, p: Params, training: bool) -> np.ndarray:
    r""":math:`B(PWConv_2(\delta(B(PWConv_1(x)))))` on an (N, C, H, W) array."""
    h = nf.conv2d(x, p["conv1.weight"], p.get("conv1.bias"))  # PWConv1, (N, C/r, H, W)
    h = nf.relu(_batch_norm(h, p, "bn1", training))  # delta(B(.))
    h = nf.conv2d(h, p["conv2.weight"], p.get("conv2.bias"))  # PWConv2, (N, C, H, W)
    return _batch_norm(h, p, "bn2", training)  # B(.)


def _batch_norm(h: np.ndarray, p: Params, name: str, training: bool):
    return nf.batch_norm(
        h,
        p[f"{name}.running_mean"],
        p[f"{name}.running_var"],
        p[f"{name}.weight"],
        p[f"{name}.bias"],
        training=training,
    )


def local_context(x: np.ndarray, params: Mapping[str, Any], *, training: bool = False):
    r"""Eq. (2): :math:`L(X) = B(PWConv_2(\delta(B(PWConv_1(X)))))`, at every position.

    A bottleneck of two point-wise convolutions: each position's channel vector is mixed
    on its own, C -> C/r -> C, so L(X) keeps the size of X and sees no neighbour.

    Args:
        x: X, (N, C, H, W), real floating point.
        params: ``LocalContext.state_dict()`` (``conv1.weight``, ``bn1.weight``, ...).
        training: batch norm with batch statistics instead of running ones.

    Returns:
        L(X), (N, C, H, W).
    """
    p = _checked(params, ("",), "local_context")
    X = check_numpy_input(x, p.shape("conv1.weight")[1], "local_context", "X")
    check_batch_statistics(X, training, "local_context", pooled=False)
    return _pointwise_bottleneck(X, p, training)  # Eq. (2), (N, C, H, W)


def global_context(x: np.ndarray, params: Mapping[str, Any], *, training: bool = False):
    r"""The global channel context: Eq. (2)'s chain on :math:`GAP(X)`, Eq. (1).

    :math:`g(X) = B(PWConv_2(\delta(B(PWConv_1(\frac{1}{HW} \sum_{i,j} X_{:, i, j})))))`,
    one C-vector per image: the SE-style channel context (with batch norms) of Sec. 3.

    Args:
        x: X, (N, C, H, W), real floating point.
        params: ``GlobalContext.state_dict()`` (same keys as :func:`local_context`).
        training: batch norm with batch statistics (needs N >= 2: one value per image).

    Returns:
        g(X), (N, C, 1, 1).
    """
    p = _checked(params, ("",), "global_context")
    X = check_numpy_input(x, p.shape("conv1.weight")[1], "global_context", "X")
    check_batch_statistics(X, training, "global_context")
    pooled = nf.adaptive_avg_pool2d(X, 1)  # Eq. (1), GAP(X), (N, C, 1, 1)
    return _pointwise_bottleneck(pooled, p, training)  # (N, C, 1, 1)


def attention_weights(
    X: np.ndarray, params: Mapping[str, Any], local: str, glob: str, training: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Eq. (3): :math:`M(X) = \sigma(L(X) \oplus g(X))`, with the branches under the
    prefixes ``local`` and ``glob`` (``"local_att."``, ``"global_att."``): ``params`` must
    hold exactly those two branches' keys under them (other keys are not checked here; the
    forwards of the modules check the whole key set). Returns (L, g, M)."""
    local, glob = local.rstrip("."), glob.rstrip(".")
    p = Params.of(params, "attention_weights")
    bias = p.sub(local).has_any(_BIASES) or p.sub(glob).has_any(_BIASES)
    for branch in (local, glob):
        p.sub(branch).check(_branch_spec(p.sub(branch), bias))
    L = _pointwise_bottleneck(X, p.sub(local), training)  # Eq. (2), (N, C, H, W)
    pooled = nf.adaptive_avg_pool2d(X, 1)  # Eq. (1), (N, C, 1, 1)
    g = _pointwise_bottleneck(pooled, p.sub(glob), training)  # (N, C, 1, 1)
    M = nf.sigmoid(L + g)  # Eq. (3), g broadcast over positions, (N, C, H, W)
    return L, g, M


def mscam(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The multi-scale channel attention module, Eq. (3): :math:`X' = X \otimes M(X)`.

    Args:
        x: X, (N, C, H, W), real floating point.
        params: ``MSCAM.state_dict()``: ``local_att.*`` and ``global_att.*``.
        training: batch norms with batch statistics (needs N >= 2).
        return_maps: also return ``{"L": L(X), "g": g(X), "M": M(X)}``.

    Returns:
        X', same shape as ``x``; with ``return_maps``, ``(X', maps)``.
    """
    params = _checked(params, ("local_att", "global_att"), "mscam")
    channels = params.shape("local_att.conv1.weight")[1]
    X = check_numpy_input(x, channels, "mscam", "X")
    check_batch_statistics(X, training, "mscam")
    L, g, M = attention_weights(X, params, "local_att.", "global_att.", training)
    out = X * M  # Eq. (3), (N, C, H, W)
    return (out, {"L": L, "g": g, "M": M}) if return_maps else out


def aff(
    x: np.ndarray,
    y: np.ndarray,
    params: Mapping[str, Any],
    *,
    factor_two: bool = False,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""Attentional feature fusion, Eq. (4): :math:`Z = M(X + Y) \otimes X + (1 - M(X + Y))
    \otimes Y`.

    A soft selection between X and Y, element by element, with weights computed by an
    MS-CAM from their sum (the initial integration).

    Args:
        x: X, the identity branch, (N, C, H, W), real floating point.
        y: Y, the residual branch, same shape as ``x``.
        params: ``AFF.state_dict()``: ``local_att.*`` and ``global_att.*``.
        factor_two: return 2 Z, as the paper-era official code does (not the paper).
        training: batch norms with batch statistics (needs N >= 2).
        return_maps: also return ``{"L": ..., "g": ..., "M": M(X + Y)}``.

    Returns:
        Z, same shape as ``x``; with ``return_maps``, ``(Z, maps)``.
    """
    params = _checked(params, ("local_att", "global_att"), "aff")
    channels = params.shape("local_att.conv1.weight")[1]
    X = check_numpy_input(x, channels, "aff", "X")
    Y = check_numpy_input(y, channels, "aff", "Y")
    check_same_shape(X, Y, "aff")
    check_same_dtype(X, Y, "aff")
    check_batch_statistics(X, training, "aff")
    L, g, M = attention_weights(X + Y, params, "local_att.", "global_att.", training)
    Z = M * X + (1 - M) * Y  # Eq. (4), (N, C, H, W)
    if factor_two:
        Z = 2 * Z  # the official code's 2 * (X M + Y (1 - M))
    return (Z, {"L": L, "g": g, "M": M}) if return_maps else Z


def iaff(
    x: np.ndarray,
    y: np.ndarray,
    params: Mapping[str, Any],
    *,
    share_global: bool = False,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""Iterative attentional feature fusion, Eqs. (4) and (5).

    The initial integration is itself attentional, Eq. (5):
    :math:`X \uplus Y = M_1(X + Y) \otimes X + (1 - M_1(X + Y)) \otimes Y`; a second MS-CAM
    computes the final weights from it, Eq. (4):
    :math:`Z = M_2(X \uplus Y) \otimes X + (1 - M_2(X \uplus Y)) \otimes Y`.

    Args:
        x: X, the identity branch, (N, C, H, W), real floating point.
        y: Y, the residual branch, same shape as ``x``.
        params: ``IAFF.state_dict()``: ``local_att.*``, ``global_att.*`` (first MS-CAM),
            ``local_att2.*`` and, unless ``share_global``, ``global_att2.*`` (second).
        share_global: the second MS-CAM reuses the first one's global branch
            ``global_att.*``, as the popular PyTorch code does (not the paper).
        training: batch norms with batch statistics (needs N >= 2).
        return_maps: also return ``{"M1": M_1(X + Y), "M2": M_2(X \uplus Y)}`` and the
            contexts of both stages, ``"L1", "g1", "L2", "g2"``.

    Returns:
        Z, same shape as ``x``; with ``return_maps``, ``(Z, maps)``.
    """
    branches = ("local_att", "global_att", "local_att2")
    params = _checked(params, branches if share_global else (*branches, "global_att2"), "iaff")
    channels = params.shape("local_att.conv1.weight")[1]
    X = check_numpy_input(x, channels, "iaff", "X")
    Y = check_numpy_input(y, channels, "iaff", "Y")
    check_same_shape(X, Y, "iaff")
    check_same_dtype(X, Y, "iaff")
    check_batch_statistics(X, training, "iaff")
    L1, g1, M1 = attention_weights(X + Y, params, "local_att.", "global_att.", training)
    XY = M1 * X + (1 - M1) * Y  # Eq. (5), the initial integration X (+) Y
    glob2 = "global_att." if share_global else "global_att2."
    L2, g2, M2 = attention_weights(XY, params, "local_att2.", glob2, training)
    Z = M2 * X + (1 - M2) * Y  # Eq. (4) with M_2, (N, C, H, W)
    maps = {"L1": L1, "g1": g1, "M1": M1, "L2": L2, "g2": g2, "M2": M2}
    return (Z, maps) if return_maps else Z
