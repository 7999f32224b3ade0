r"""The double attention block of A^2-Nets in NumPy, equation by equation (Chen et al., 2018).

Read it beside ``torch_module.py``: the same steps, names and order. This side computes
every quantity of the paper as written (A, B, V, G, Z); the PyTorch side computes the same
output with the products re-associated for speed (see its docstring).

Glossary (the paper's symbols, Section 3; hw = H * W positions, flattened row-major):
    X        the block's input, ``x``                                     (N, c, H, W)
    A        phi(X), the features to gather: a 1x1 convolution ``phi``     (N, m, hw)
    B        theta(X), one attention map per global descriptor, ``theta``  (N, n, hw)
    V        rho(X), one attention vector per position, ``rho``            (N, n, hw)
    softmax(B)  each of the n rows a softmax over the hw positions          (N, n, hw)
    G        the n global descriptors, G = A softmax(B)^T, Eq. (3)         (N, m, n)
    softmax(V)  each of the hw columns v_i a softmax over the n descriptors (N, n, hw)
    Z        the distributed features, z_i = G v_i, Eqs. (4)-(5)          (N, m, hw)
    out      ``expand`` (1x1 convolution m -> c) of Z, plus X              (N, c, H, W)

Equation numbers follow arXiv 1810.11579v1 as we recall it (the body of the paper was
not reachable to re-check them while this was written): (2) bilinear pooling
A B^T, (3) gathering with softmax(B), (4) distribution z_i = G v_i, (5) the block
Z = [phi softmax(theta)^T] softmax(rho), (6) the same product associated the other way,
through an hw x hw matrix.

``params`` is ``DoubleAttention(...).state_dict()`` (any mapping of arrays with the same
keys), and exactly those keys (a missing, unexpected or misshaped key is an error naming
the full key, see :mod:`refimpl._params`): ``phi.*``, ``theta.*``, ``rho.*`` and, when the
block has its output convolution, ``expand.*``. The widths c, m, n are read from the
weights. Two optional groups are selected by their keys: the output convolution (any
``expand.*`` key) and the biases (any ``*.bias`` key: then every convolution has one).
Only ``residual`` is an option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_numpy_input
from refimpl._params import Params, Spec


def conv1x1(x: np.ndarray, params: Mapping[str, Any], name: str) -> np.ndarray:
    r"""A 1x1 convolution ``name`` of the block applied to the flattened map.

    :math:`Y = W X + b` with W of shape (k, c): every position transformed alike.

    Shape: x (N, c, hw) -> (N, k, hw).
    """
    p = checked_params(params, "conv1x1")
    weight = p[f"{name}.weight"]  # (k, c, 1, 1)
    bias = p.get(f"{name}.bias")
    y = np.einsum("kc,ncp->nkp", weight[:, :, 0, 0], x)  # (N, k, hw)
    if bias is not None:
        y = y + bias[None, :, None]
    return y


def feature_gathering(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    r"""Eq. (3): :math:`G = A\, \mathrm{softmax}(B)^\top`, the n global descriptors.

    Each row b_j of B becomes a probability distribution over the hw positions, and the
    descriptor g_j (column j of G) is the sum of A's columns weighted by it:
    :math:`g_j = \sum_i \mathrm{softmax}(b_j)_i\, a_i`. A weighted *sum* with weights that
    add up to 1, so g_j is a convex combination of the features a_i. It is the bilinear
    pooling :math:`A B^\top` of Eq. (2) with B's rows normalised into attention maps.

    Shape: A (N, m, hw), B (N, n, hw) -> G (N, m, n).
    """
    B_bar = nf.softmax(B, dim=-1)  # each map sums to 1 over positions, (N, n, hw)
    return A @ B_bar.transpose(0, 2, 1)  # (N, m, hw) @ (N, hw, n) -> (N, m, n)


def feature_distribution(G: np.ndarray, V: np.ndarray) -> np.ndarray:
    r"""Eqs. (4)-(5): :math:`z_i = G v_i`, i.e. :math:`Z = G\, \mathrm{softmax}(V)`.

    Each column v_i of V becomes a probability distribution over the n descriptors, and
    position i receives the descriptors mixed by it: a convex combination of G's columns.

    Shape: G (N, m, n), V (N, n, hw) -> Z (N, m, hw).
    """
    V_bar = nf.softmax(V, dim=1)  # each vector sums to 1 over descriptors, (N, n, hw)
    return G @ V_bar  # (N, m, n) @ (N, n, hw) -> (N, m, hw)


def naive_order(A: np.ndarray, B: np.ndarray, V: np.ndarray) -> np.ndarray:
    r"""Eq. (6): :math:`Z = A\, [\mathrm{softmax}(B)^\top \mathrm{softmax}(V)]`, the other order.

    The same Z as ``feature_distribution(feature_gathering(A, B), V)`` (matrix products
    are associative), but through the hw x hw matrix
    :math:`\mathrm{softmax}(B)^\top \mathrm{softmax}(V)`, whose entry (j, i) says how
    much position j sends to position i (a non-local, self-attention-like map of rank at
    most n). It costs O(n (hw)^2 + m (hw)^2) per image instead of O(m n hw): kept here
    only to show, in the tests and the tutorial, that the paper's order gives the same
    result.

    Shape: A (N, m, hw), B (N, n, hw), V (N, n, hw) -> Z (N, m, hw).
    """
    B_bar = nf.softmax(B, dim=-1)  # (N, n, hw)
    V_bar = nf.softmax(V, dim=1)  # (N, n, hw)
    position_to_position = B_bar.transpose(0, 2, 1) @ V_bar  # (N, hw, hw)
    return A @ position_to_position  # (N, m, hw)


def double_attention(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    residual: bool = True,
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The double attention block: gather (Eq. (3)), distribute (Eq. (4)), project, add.

    Args:
        x: the feature map X, (N, c, H, W), real floating point.
        params: ``DoubleAttention.state_dict()`` or the same keys as arrays. Without
            ``expand.*`` keys the block has no output convolution and returns Z itself
            (then Z has m channels).
        residual: add X to the result (the paper's block); False for the bare operator.
        training: accepted so that every NumPy forward of refimpl has the same signature;
            the block has no batch norm, so both modes compute the same.
        return_maps: also return ``{"softmax_B": ..., "softmax_V": ..., "G": ...}``: the
            n gathering maps (N, n, H, W), each summing to 1 over positions; the
            distribution weights (N, n, H, W), summing to 1 over the n descriptors at
            every position; and the descriptors G (N, m, n).

    Returns:
        The output, (N, c, H, W) (or (N, m, H, W) without the output convolution);
        with ``return_maps``, ``(out, maps)``.
    """
    params = checked_params(params, "double_attention")
    X = check_numpy_input(x, params.shape("phi.weight")[1], "double_attention", "x")
    N, c, H, W = X.shape
    has_expand = "expand.weight" in params
    m = params.shape("phi.weight")[0]
    if residual and not has_expand and m != c:
        raise ValueError(
            f"double_attention: residual=True without an output convolution needs m == c, "
            f"got m={m} and c={c}"
        )
    X_flat = X.reshape(N, c, H * W)  # positions in row-major order, (N, c, hw)
    A = conv1x1(X_flat, params, "phi")  # (N, m, hw)
    B = conv1x1(X_flat, params, "theta")  # (N, n, hw)
    V = conv1x1(X_flat, params, "rho")  # (N, n, hw)
    G = feature_gathering(A, B)  # Eq. (3), (N, m, n)
    Z = feature_distribution(G, V)  # Eqs. (4)-(5), (N, m, hw)
    out = conv1x1(Z, params, "expand") if has_expand else Z  # back to c channels
    if residual:
        out = X_flat + out
    out = out.reshape(N, out.shape[1], H, W)
    if not return_maps:
        return out
    maps = {
        "softmax_B": nf.softmax(B, dim=-1).reshape(N, -1, H, W),
        "softmax_V": nf.softmax(V, dim=1).reshape(N, -1, H, W),
        "G": G,
    }
    return out, maps


def checked_params(params: Mapping[str, Any], who: str) -> Params:
    """``params`` checked against ``DoubleAttention``'s keys: ``phi.weight`` (m, c, 1, 1),
    ``theta.weight`` and ``rho.weight`` (n, c, 1, 1), ``expand.weight`` (c, m, 1, 1) if any
    ``expand.*`` key is there, and a bias for every convolution if any ``*.bias`` is."""
    p = Params.of(params, who)
    m = p.dim(("phi.weight", 4, 0), ("expand.weight", 4, 1))
    c = p.dim(("phi.weight", 4, 1), ("theta.weight", 4, 1), ("rho.weight", 4, 1))
    n = p.dim(("theta.weight", 4, 0), ("rho.weight", 4, 0))
    convs = {"phi": (m, c), "theta": (n, c), "rho": (n, c)}
    if p.has_any(("expand.weight", "expand.bias")):
        convs["expand"] = (c, m)
    bias = p.has_any(f"{name}.bias" for name in ("phi", "theta", "rho", "expand"))
    spec = Spec().maybe("expand.weight", *(f"{name}.bias" for name in (*convs, "expand")))
    for name, (out_channels, in_channels) in convs.items():
        spec.conv(name, out_channels, in_channels, 1, bias)
    p.check(spec)
    return p
