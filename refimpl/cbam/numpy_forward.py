r"""CBAM in NumPy, equation by equation (Woo et al., ECCV 2018, Section 3).

Read it beside ``torch_module.py``: the same steps, names and order.

Glossary (the paper's symbols):
    F          the module's input feature map, here ``x``                   (N, C, H, W)
    F^c_avg    average of each channel over the positions (avg-pooled)      (N, C)
    F^c_max    maximum of each channel over the positions (max-pooled)      (N, C)
    W0         ``reduce.weight``, the shared MLP's first layer, C -> C/r     (C/r, C)
    W1         ``expand.weight``, the shared MLP's second layer, C/r -> C    (C, C/r)
    M_c        channel attention map, Eq. (2): "what" to attend to          (N, C, 1, 1)
    F'         the channel-refined feature, Eq. (1): M_c(F) * F             (N, C, H, W)
    F^s_avg    average over the channels at each position                   (N, 1, H, W)
    F^s_max    maximum over the channels at each position                   (N, 1, H, W)
    f^{7x7}    ``conv.weight``, a convolution from the pooled maps to one    (1, 2, k, k)
    M_s        spatial attention map, Eq. (3): "where" to attend            (N, 1, H, W)
    F''        the output, Eq. (1): M_s(F') * F'                            (N, C, H, W)

Products ``*`` broadcast the maps: M_c over positions, M_s over channels.

``params`` is the PyTorch module's ``state_dict()`` (any mapping of arrays with the same
keys), and exactly those keys (a missing, unexpected or misshaped key is an error naming
the full key, see :mod:`refimpl._params`): ``reduce.*``/``expand.*`` for the channel gate,
``conv.*``/``bn.*`` for the spatial gate, under ``channel.`` and ``spatial.`` in CBAM. What
the weights tell is read from them: the widths from ``reduce.weight``, the kernel size
from ``conv.weight``. Three optional groups are selected by their keys: the MLP biases
(``reduce.bias`` and ``expand.bias``, both or neither), the spatial convolution's bias
(``conv.bias``) and the spatial batch norm (``bn.weight``, ``bn.bias``,
``bn.running_mean``, ``bn.running_var``, all four; ``bn.num_batches_tracked`` optional).
What the weights cannot tell (which poolings, in which order; the arrangement of the two
gates) are keyword options, named as the module's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from refimpl import numpy_functional as nf
from refimpl._checks import check_choice, check_numpy_input
from refimpl._params import Params, Spec
from refimpl.cbam._options import ARRANGEMENTS, check_variant, parse_pooling

# ---------------------------------------------------------------------------------------
# Channel attention: "what" (Section 3, Channel attention module)


def channel_descriptors(F: np.ndarray, pooling: tuple[str, ...]) -> list[np.ndarray]:
    r"""The spatial context of each channel: :math:`F^c_{avg}` and/or :math:`F^c_{max}`.

    Shape: F (N, C, H, W) -> a list of (N, C), one per pooling, in the order given.
    """
    pools = {"avg": lambda: F.mean(axis=(2, 3)), "max": lambda: F.max(axis=(2, 3))}
    return [pools[name]() for name in pooling]


def shared_mlp(z: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    r""":math:`W_1\, \delta(W_0 z)`, the MLP with one hidden layer shared by all descriptors.

    :math:`\delta` is ReLU, applied after :math:`W_0` (the paper's note under Eq. (2)). The
    biases are there only if ``params`` has them (the official code; Eq. (2) has none).

    Shape: z (N, C) -> (N, C).
    """
    p = _channel_params(params, "shared_mlp")
    W0, b0 = p["reduce.weight"], p.get("reduce.bias")
    W1, b1 = p["expand.weight"], p.get("expand.bias")
    hidden = nf.relu(nf.linear(z, W0, b0))  # delta(W0 z), (N, C/r)
    return nf.linear(hidden, W1, b1)  # W1 delta(W0 z), (N, C)


def channel_attention_map(
    F: np.ndarray, params: Mapping[str, Any], pooling: tuple[str, ...] = ("avg", "max")
) -> np.ndarray:
    r"""Eq. (2): :math:`M_c(F) = \sigma(MLP(F^c_{avg}) + MLP(F^c_{max}))`.

    With one pooling only (the paper's Table 1 ablation) the sum has one term.

    Shape: F (N, C, H, W) -> M_c (N, C, 1, 1).
    """
    p = _channel_params(params, "channel_attention_map")
    logits = sum(shared_mlp(z, p) for z in channel_descriptors(F, pooling))  # (N, C)
    return nf.sigmoid(logits)[:, :, None, None]  # (N, C, 1, 1)


def channel_attention(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    pooling: Any = ("avg", "max"),
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The channel attention module: :math:`F' = M_c(F) \otimes F`.

    Args:
        x: the feature map F, (N, C, H, W), real floating point.
        params: ``ChannelAttention.state_dict()`` or the same keys as arrays.
        pooling: the descriptors, ``("avg", "max")`` (paper) or one of them (Table 1);
            also the strings ``"avg"``, ``"max"``, ``"avg+max"``.
        training: accepted so that every NumPy forward has the same signature; the
            channel gate has no batch norm, so both modes compute the same.
        return_maps: also return ``{"M_c": M_c}``.

    Returns:
        F', same shape as ``x``; with ``return_maps``, ``(F', maps)``.
    """
    pooling = parse_pooling(pooling, "channel_attention")
    p = _channel_params(params, "channel_attention")
    F = check_numpy_input(x, p.shape("reduce.weight")[1], "channel_attention", "x")
    M_c = channel_attention_map(F, p, pooling)  # Eq. (2), (N, C, 1, 1)
    F_prime = M_c * F  # Eq. (1), first line, (N, C, H, W)
    return (F_prime, {"M_c": M_c}) if return_maps else F_prime


# ---------------------------------------------------------------------------------------
# Spatial attention: "where" (Section 3, Spatial attention module)


def spatial_descriptors(F: np.ndarray, pooling: tuple[str, ...]) -> np.ndarray:
    r""":math:`[F^s_{avg}; F^s_{max}]`: pooling across the channels, stacked in the given order.

    Shape: F (N, C, H, W) -> (N, P, H, W), P = len(pooling).
    """
    pools = {
        "avg": lambda: F.mean(axis=1, keepdims=True),
        "max": lambda: F.max(axis=1, keepdims=True),
    }
    return np.concatenate([pools[name]() for name in pooling], axis=1)  # (N, P, H, W)


def spatial_attention_map(
    F: np.ndarray,
    params: Mapping[str, Any],
    pooling: tuple[str, ...] = ("avg", "max"),
    training: bool = False,
) -> np.ndarray:
    r"""Eq. (3): :math:`M_s(F) = \sigma(f^{7 \times 7}([F^s_{avg}; F^s_{max}]))`.

    :math:`f^{k \times k}` is a convolution with one output channel and zero padding
    k // 2, so M_s has F's height and width at every size (1 x 1 included). In the
    official form it has no bias and a batch norm follows it (used here whenever
    ``params`` has ``bn.*`` keys, then all four; batch statistics when ``training``).

    Shape: F (N, C, H, W) -> M_s (N, 1, H, W).
    """
    p = _spatial_params(params, len(pooling), "spatial_attention_map")
    weight = p["conv.weight"]  # (1, P, k, k)
    descriptors = spatial_descriptors(F, pooling)  # (N, P, H, W)
    logits = nf.conv2d(
        descriptors, weight, p.get("conv.bias"), padding=weight.shape[-1] // 2
    )  # (N, 1, H, W)
    if "bn.weight" in p:
        logits = nf.batch_norm(
            logits,
            p["bn.running_mean"],
            p["bn.running_var"],
            p["bn.weight"],
            p["bn.bias"],
            training=training,
        )
    return nf.sigmoid(logits)  # (N, 1, H, W)


def spatial_attention(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    pooling: Any = None,
    variant: str = "paper",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""The spatial attention module: :math:`F'' = M_s(F') \otimes F'`, here of its input.

    Args:
        x: the feature map (F' inside CBAM), (N, C, H, W), real floating point.
        params: ``SpatialAttention.state_dict()`` or the same keys as arrays.
        pooling: the pooled maps in the order they are stacked; None takes the
            variant's, ``("avg", "max")`` (paper) or ``("max", "avg")`` (official).
        variant: ``"paper"`` or ``"official"``; here it only decides ``pooling``.
        training: batch statistics in the batch norm (official form), else running ones.
        return_maps: also return ``{"M_s": M_s}``.

    Returns:
        The refined map, same shape as ``x``; with ``return_maps``, ``(out, maps)``.
    """
    preset = check_variant(variant, "spatial_attention")
    pooling = parse_pooling(
        preset["spatial_pooling"] if pooling is None else pooling, "spatial_attention"
    )
    F = check_numpy_input(x, None, "spatial_attention", "x")
    p = _spatial_params(params, len(pooling), "spatial_attention")
    M_s = spatial_attention_map(F, p, pooling, training)  # Eq. (3), (N, 1, H, W)
    out = M_s * F  # Eq. (1), second line, (N, C, H, W)
    return (out, {"M_s": M_s}) if return_maps else out


# ---------------------------------------------------------------------------------------
# CBAM: the two gates in sequence (Eq. (1)), or the paper's other arrangements


def cbam(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    pooling: Any = ("avg", "max"),
    spatial_pooling: Any = None,
    arrangement: str = "channel-spatial",
    variant: str = "paper",
    training: bool = False,
    return_maps: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    r"""CBAM, Eq. (1): :math:`F' = M_c(F) \otimes F,\ F'' = M_s(F') \otimes F'`.

    Args:
        x: the feature map F, (N, C, H, W), real floating point.
        params: ``CBAM.state_dict()``: the channel gate's keys under ``channel.``, the
            spatial gate's under ``spatial.``.
        pooling: the channel gate's descriptors (see :func:`channel_attention`).
        spatial_pooling: the spatial gate's pooled maps in order; None takes the variant's.
        arrangement: ``"channel-spatial"`` (Eq. (1), the paper's choice),
            ``"spatial-channel"`` (M_s of F first, then M_c of the result) or
            ``"parallel"`` (both maps of F, both multiplied into F:
            :math:`M_s(F) \otimes M_c(F) \otimes F`); the paper's Table 3.
        variant: ``"paper"`` or ``"official"``; here it only decides ``spatial_pooling``.
        training: batch statistics in the spatial batch norm (official form).
        return_maps: also return ``{"M_c": M_c, "M_s": M_s}``.

    Returns:
        F'', same shape as ``x``; with ``return_maps``, ``(F'', maps)``.
    """
    preset = check_variant(variant, "cbam")
    pooling = parse_pooling(pooling, "cbam")
    if spatial_pooling is None:
        spatial_pooling = preset["spatial_pooling"]
    spatial_pooling = parse_pooling(spatial_pooling, "cbam", "spatial_pooling")
    check_choice(arrangement, ARRANGEMENTS, "cbam", "arrangement")
    p = Params.of(params, "cbam")
    channel_params, spatial_params = p.sub("channel"), p.sub("spatial")
    spec = Spec().include("channel.", _channel_spec(channel_params))
    p.check(spec.include("spatial.", _spatial_spec(spatial_params, len(spatial_pooling))))
    F = check_numpy_input(x, channel_params.shape("reduce.weight")[1], "cbam", "x")

    if arrangement == "channel-spatial":
        M_c = channel_attention_map(F, channel_params, pooling)  # Eq. (2), (N, C, 1, 1)
        F_prime = M_c * F  # Eq. (1), (N, C, H, W)
        M_s = spatial_attention_map(F_prime, spatial_params, spatial_pooling, training)  # Eq. (3)
        F_double_prime = M_s * F_prime  # Eq. (1), (N, C, H, W)
    elif arrangement == "spatial-channel":
        M_s = spatial_attention_map(F, spatial_params, spatial_pooling, training)  # (N, 1, H, W)
        F_prime = M_s * F
        M_c = channel_attention_map(F_prime, channel_params, pooling)  # (N, C, 1, 1)
        F_double_prime = M_c * F_prime
    else:  # parallel: both maps from F
        M_c = channel_attention_map(F, channel_params, pooling)  # (N, C, 1, 1)
        M_s = spatial_attention_map(F, spatial_params, spatial_pooling, training)  # (N, 1, H, W)
        F_double_prime = M_s * (M_c * F)
    return (F_double_prime, {"M_c": M_c, "M_s": M_s}) if return_maps else F_double_prime


# ---------------------------------------------------------------------------------------
# Helpers: the keys of each gate (refimpl._params checks them)


def _channel_spec(p: Params) -> Spec:
    """``ChannelAttention``'s keys: ``reduce.weight`` (C/r, C), ``expand.weight`` (C, C/r),
    and both biases or neither."""
    hidden = p.dim(("reduce.weight", 2, 0), ("expand.weight", 2, 1))
    channels = p.dim(("reduce.weight", 2, 1), ("expand.weight", 2, 0))
    bias = p.has_any(("reduce.bias", "expand.bias"))
    spec = Spec().linear("reduce", hidden, channels, bias).linear("expand", channels, hidden, bias)
    return spec.maybe("reduce.bias", "expand.bias")


def _channel_params(params: Mapping[str, Any], who: str) -> Params:
    p = Params.of(params, who)
    p.check(_channel_spec(p))
    return p


def _spatial_spec(p: Params, n_pooled: int) -> Spec:
    """``SpatialAttention``'s keys: ``conv.weight`` (1, P, k, k) with odd k for P pooled
    maps, ``conv.bias`` (1,) if present, and a complete batch norm ``bn.*`` if present."""
    k = p.dim(("conv.weight", 4, 3))
    shape = p.shape("conv.weight") if "conv.weight" in p else None
    if shape is not None and (shape[:2] != (1, n_pooled) or shape[2] != k or k % 2 == 0):
        want = f"(1, {n_pooled}, {k}, {k})" if k % 2 else f"(1, {n_pooled}, k, k) with odd k"
        raise ValueError(
            f"{p.who}: params['{p.full('conv.weight')}'] has shape {shape}, expected {want} "
            f"for {n_pooled} pooled map(s)"
        )
    spec = Spec().conv("conv", 1, n_pooled, k, bias="conv.bias" in p)
    bn_keys = ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    if p.has_any((*bn_keys, "bn.num_batches_tracked")):
        spec.batch_norm("bn", 1)
    else:
        spec.maybe(*bn_keys)
    return spec.maybe("conv.bias")


def _spatial_params(params: Mapping[str, Any], n_pooled: int, who: str) -> Params:
    p = Params.of(params, who)
    p.check(_spatial_spec(p, n_pooled))
    return p
