r"""NumPy building blocks, each matching the ``torch.nn.functional`` op of the same name.

Every paper's NumPy forward is written with these. They are vectorised (no Python loop
over pixels or batch items), compute in the dtype they are given (the oracle uses
float64), and follow torch's argument names and defaults so that a reader can hold a
line of NumPy next to a line of PyTorch. ``tests/test_numpy_functional.py`` checks each
one against torch with Hypothesis.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# --------------------------------------------------------------------------------------------
# Argument helpers


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as (height, width): a single int (or a one-element sequence) serves both."""
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    pair = tuple(int(v) for v in value)
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _positive_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = _pair(value, name)
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def _batched(input: np.ndarray, who: str) -> tuple[np.ndarray, bool]:
    """``input`` as (N, C, H, W), and whether it came unbatched as (C, H, W) like torch allows."""
    x = np.asarray(input)
    if x.ndim == 3:
        return x[np.newaxis], True
    if x.ndim != 4:
        raise ValueError(
            f"{who} expects input of shape (N, C, H, W) or (C, H, W), got shape {x.shape}"
        )
    return x, False


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> np.ndarray:
    """Every (dilated) kernel window of an already padded ``x``, taken with ``stride``.

    A view, no copy: (N, C, H, W) -> (N, C, out_h, out_w, kh, kw), where window (i, j) reads
    ``x[:, :, i * sh + a * dh, j * sw + b * dw]`` for ``a < kh``, ``b < kw``.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)  # the receptive field of one window
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw]


# --------------------------------------------------------------------------------------------
# Convolution and normalisation


def conv2d(
    input: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> np.ndarray:
    r"""``torch.nn.functional.conv2d``: cross-correlation with zero padding.

    :math:`y_{n,o,i,j} = b_o + \sum_{c,a,b} W_{o,c,a,b}\, x_{n,\,g(o) C_g + c,\, i s_h + a d_h,\,
    j s_w + b d_w}` over the zero-padded input, where output channel ``o`` sees only the
    ``C_g = C_in / groups`` input channels of its group ``g(o)``.

    Args:
        input: the image.
        weight: the kernels.
        bias: one offset per output channel, or None.
        stride: step between windows, int or (sh, sw).
        padding: zeros added on each side, int or (ph, pw); or ``"valid"`` (no padding) or
            ``"same"`` (output as large as the input, stride 1 only; an odd total padding puts
            the extra zero on the bottom / right, as torch does).
        dilation: step between kernel taps, int or (dh, dw).
        groups: number of channel groups convolved separately.

    Shape:
        input: (N, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in / groups, kh, kw);
        bias: (C_out,). Returns (N, C_out, H_out, W_out) with
        ``H_out = (H + 2 ph - dh (kh - 1) - 1) // sh + 1``, likewise W_out.
    """
    x, unbatched = _batched(input, "conv2d")
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(
            f"conv2d expects weight of shape (C_out, C_in / groups, kh, kw), got {weight.shape}"
        )
    c_out, c_group, kh, kw = weight.shape
    if groups < 1 or c_out % groups != 0 or x.shape[1] != c_group * groups:
        raise ValueError(
            f"conv2d with groups={groups} and weight of shape {weight.shape} expects "
            f"input with {c_group * groups} channels and C_out divisible by groups, "
            f"got input of shape {x.shape}"
        )
    if bias is not None and np.shape(bias) != (c_out,):
        raise ValueError(f"conv2d expects bias of shape ({c_out},), got {np.shape(bias)}")
    stride = _positive_pair(stride, "stride")
    dilation = _positive_pair(dilation, "dilation")

    # Padding as (before, after) per spatial axis.
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"conv2d: padding must be 'valid', 'same' or ints, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
        # "same": dilation (k - 1) zeros in all, the odd one after (bottom / right)
        totals = (dilation[0] * (kh - 1), dilation[1] * (kw - 1)) if padding == "same" else (0, 0)
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        ph, pw = _pair(padding, "padding")
        if min(ph, pw) < 0:
            raise ValueError(f"conv2d: padding must be non-negative, got {padding!r}")
        pads = ((ph, ph), (pw, pw))
    x = np.pad(x, ((0, 0), (0, 0), *pads))
    if x.shape[2] < dilation[0] * (kh - 1) + 1 or x.shape[3] < dilation[1] * (kw - 1) + 1:
        raise ValueError(
            f"conv2d: padded input of size {x.shape[2:]} is smaller than the dilated kernel "
            f"({dilation[0] * (kh - 1) + 1}, {dilation[1] * (kw - 1) + 1})"
        )

    windows = _windows(x, (kh, kw), stride, dilation)  # (N, C_in, H_out, W_out, kh, kw)
    n, _, h_out, w_out = windows.shape[:4]
    windows = windows.reshape(n, groups, c_group, h_out, w_out, kh, kw)
    kernels = weight.reshape(groups, c_out // groups, c_group, kh, kw)
    # y[n, g, o] = sum over the group's channels c and the taps (a, b)
    y = np.einsum("ngcijab,gocab->ngoij", windows, kernels, optimize=True)
    y = y.reshape(n, c_out, h_out, w_out)
    if bias is not None:
        y = y + np.asarray(bias).reshape(1, c_out, 1, 1)
    return y[0] if unbatched else y


def batch_norm(
    input: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> np.ndarray:
    r"""``torch.nn.functional.batch_norm``: normalise each channel, then scale and shift it.

    :math:`y = (x - \mu) / \sqrt{\sigma^2 + \epsilon} \cdot \gamma + \beta` per channel. In
    eval mode :math:`\mu, \sigma^2` are the running statistics; in training mode they are the
    mean and the biased variance of the batch over every axis but the channel axis (N and the
    spatial axes), as torch normalises with. The function is pure: unlike torch in training
    mode it does not update the running statistics, so ``momentum`` (kept for the signature)
    has no effect.

    Args:
        input: the batch.
        running_mean: running mean per channel, used in eval mode (may be None in training).
        running_var: running variance per channel, used in eval mode (may be None in training).
        weight: scale :math:`\gamma` per channel, or None for 1.
        bias: shift :math:`\beta` per channel, or None for 0.
        training: normalise with batch statistics instead of the running ones.
        momentum: unused (it only matters for updating running statistics).
        eps: added to the variance.

    Shape:
        input: (N, C), (N, C, L) or (N, C, H, W); the per-channel arrays: (C,). Returns the
        shape of input.

    Raises:
        ValueError: in training mode with a single value per channel (its variance is
            undefined), as torch; on missing running statistics in eval mode; on shapes.
    """
    x = np.asarray(input)
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    axes = (0, *range(2, x.ndim))  # every axis but the channel axis
    if training:
        if x.size // max(c, 1) == 1:
            raise ValueError(
                "batch_norm: expected more than 1 value per channel when training, "
                f"got input of shape {x.shape}"
            )
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased (divides by the count), as torch normalises with
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        mean, var = np.asarray(running_mean), np.asarray(running_var)
    for name, value in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if value is not None and np.shape(value) != (c,):
            raise ValueError(
                f"batch_norm expects {name} of shape ({c},) for input of shape {x.shape}, "
                f"got {np.shape(value)}"
            )

    per_channel = (1, c) + (1,) * (x.ndim - 2)  # broadcasts a (C,) array over input
    y = (x - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + eps)
    if weight is not None:
        y = y * np.asarray(weight).reshape(per_channel)
    if bias is not None:
        y = y + np.asarray(bias).reshape(per_channel)
    return y


def softmax(input: np.ndarray, dim: int) -> np.ndarray:
    r"""``torch.nn.functional.softmax``: :math:`e^{x_i} / \sum_j e^{x_j}` along axis ``dim``.

    The largest entry along ``dim`` is subtracted first, which changes nothing mathematically
    and keeps every exponential in (0, 1], so logits of 1e4 do not overflow.

    Shape:
        input: any shape; returns the same shape.
    """
    x = np.asarray(input)
    shifted = x - x.max(axis=dim, keepdims=True)  # <= 0, with a 0 on every slice
    e = np.exp(shifted)
    return e / e.sum(axis=dim, keepdims=True)


# --------------------------------------------------------------------------------------------
# Pooling


def _pool_geometry(
    who: str,
    size: tuple[int, int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
) -> tuple[tuple[int, int], ...]:
    """Kernel, stride, padding, dilation and output size of a pooling, checked as torch does.

    The output size is ``(H + 2p - d (k - 1) - 1) / s + 1`` rounded down, or up with
    ``ceil_mode``; in ceil mode a last window that would start in the right padding (or beyond)
    is dropped: every window starts inside the input or its left padding.
    """
    kernel = _positive_pair(kernel_size, "kernel_size")
    # torch treats stride=None (and an empty stride) as "the kernel size"
    if stride is None or (isinstance(stride, Sequence) and len(stride) == 0):
        stride = kernel
    stride = _positive_pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _positive_pair(dilation, "dilation")
    if any(p < 0 or p > k // 2 for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(
            f"{who}: padding must be between 0 and half the kernel size, "
            f"got padding={padding} and kernel_size={kernel}"
        )
    out = []
    for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True):
        o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1  # the last window would start in the right padding
        out.append(o)
    if min(out) < 1:
        raise ValueError(
            f"{who}: input of spatial size {size} is too small for kernel_size={kernel}, "
            f"dilation={dilation} and padding={padding}: the output would be {tuple(out)}"
        )
    return kernel, stride, padding, dilation, tuple(out)


def _pad_for_windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out: tuple[int, int],
    fill: float,
) -> np.ndarray:
    """Pad ``x`` with ``fill``: ``padding`` before, and after as far as the last window reaches
    (in ceil mode that may be past the padding) but at least ``padding``."""
    pads = []
    for n, k, s, p, d, o in zip(x.shape[2:], kernel, stride, padding, dilation, out, strict=True):
        reach = (o - 1) * s + d * (k - 1) + 1  # padded extent read by the windows
        pads.append((p, max(p, reach - p - n)))
    return np.pad(x, ((0, 0), (0, 0), *pads), constant_values=fill)


def max_pool2d(
    input: np.ndarray,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> np.ndarray:
    """``torch.nn.functional.max_pool2d``: the largest value in each (dilated) window.

    Padding is -inf, so it is never the maximum unless a window holds nothing else.

    Args:
        input: the image.
        kernel_size: window size, int or (kh, kw).
        stride: step between windows; None means kernel_size.
        padding: implicit -inf on each side, at most half the kernel size.
        dilation: step between window taps.
        ceil_mode: round the output size up instead of down, as long as the last window
            starts inside the input or its left padding.

    Shape:
        input: (N, C, H, W) or (C, H, W). Returns (N, C, H_out, W_out) with
        ``H_out = (H + 2 ph - dh (kh - 1) - 1) / sh + 1`` rounded down (up with ceil_mode,
        dropping a last window that would start in the right padding).
    """
    x, unbatched = _batched(input, "max_pool2d")
    kernel, stride, padding, dilation, (h_out, w_out) = _pool_geometry(
        "max_pool2d", x.shape[2:], kernel_size, stride, padding, dilation, ceil_mode
    )
    x = _pad_for_windows(x, kernel, stride, padding, dilation, (h_out, w_out), -np.inf)
    windows = _windows(x, kernel, stride, dilation)[:, :, :h_out, :w_out]
    y = windows.max(axis=(4, 5))
    return y[0] if unbatched else y


def avg_pool2d(
    input: np.ndarray,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> np.ndarray:
    """``torch.nn.functional.avg_pool2d``: the sum of each window over its divisor.

    The sum runs over the window's entries inside the input (padding is zero). The divisor is
    ``divisor_override`` if given; else, with ``count_include_pad``, the window's size clipped
    to the input plus its padding (a ceil-mode window reaching past the padding counts only up
    to the padding's edge, as torch); else the number of its entries inside the input.

    Args:
        input: the image.
        kernel_size: window size, int or (kh, kw).
        stride: step between windows; None means kernel_size.
        padding: implicit zeros on each side, at most half the kernel size.
        ceil_mode: round the output size up instead of down, as long as the last window
            starts inside the input or its left padding.
        count_include_pad: count the padding's zeros in the divisor.
        divisor_override: divide every window's sum by this instead.

    Shape:
        input: (N, C, H, W) or (C, H, W). Returns (N, C, H_out, W_out) as for ``max_pool2d``
        with dilation 1.
    """
    x, unbatched = _batched(input, "avg_pool2d")
    kernel, stride, padding, dilation, (h_out, w_out) = _pool_geometry(
        "avg_pool2d", x.shape[2:], kernel_size, stride, padding, 1, ceil_mode
    )
    if divisor_override == 0:
        raise ValueError("avg_pool2d: divisor_override must not be zero")
    padded = _pad_for_windows(x, kernel, stride, padding, dilation, (h_out, w_out), 0.0)
    sums = _windows(padded, kernel, stride, dilation)[:, :, :h_out, :w_out].sum(axis=(4, 5))

    if divisor_override is not None:
        divisor = divisor_override
    else:
        # A product of one count per axis: rows counted times columns counted.
        counts = []
        for n, k, s, p, o in zip(x.shape[2:], kernel, stride, padding, (h_out, w_out), strict=True):
            start = np.arange(o) * s - p  # first tap, in input coordinates
            end = start + k  # one past the last tap
            if count_include_pad:
                counts.append(np.minimum(end, n + p) - start)
            else:
                counts.append(np.minimum(end, n) - np.maximum(start, 0))
        divisor = np.multiply.outer(counts[0], counts[1]).astype(x.dtype)  # (H_out, W_out)
    y = sums / divisor
    return y[0] if unbatched else y


def _adaptive_output_size(
    who: str, output_size: int | Sequence[int | None], size: tuple[int, int]
) -> tuple[int, int]:
    """``output_size`` as a pair, None meaning the input's size on that axis."""
    if isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    if len(output_size) != 2:
        raise ValueError(f"{who}: output_size must be an int or a pair, got {output_size!r}")
    out = tuple(int(n) if o is None else int(o) for o, n in zip(output_size, size, strict=True))
    if min(out) < 0:
        raise ValueError(f"{who}: output_size must be non-negative, got {output_size!r}")
    return out


def _adaptive_bins(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive pooling bins: bin i covers ``floor(i n / o) <= k < ceil((i + 1) n / o)``.

    Bins cover the input, may overlap when o does not divide n, and repeat an entry when
    o > n; each holds at least one entry.
    """
    i = np.arange(out_size)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceiling division
    return start, end


def adaptive_avg_pool2d(input: np.ndarray, output_size: int | Sequence[int | None]) -> np.ndarray:
    """``torch.nn.functional.adaptive_avg_pool2d``: the mean of each of torch's bins.

    Averaging over bins is linear and separable: with ``A[i, k] = 1 / |bin i|`` for ``k`` in
    bin i (else 0) on each axis, the output is ``A_h x A_w^T`` for every image and channel.

    Args:
        input: the image.
        output_size: (H_out, W_out), or an int for both; None keeps the input's size.

    Shape:
        input: (N, C, H, W) or (C, H, W). Returns (N, C, H_out, W_out).
    """
    x, unbatched = _batched(input, "adaptive_avg_pool2d")
    out = _adaptive_output_size("adaptive_avg_pool2d", output_size, x.shape[2:])
    averages = []  # A_h (H_out, H), A_w (W_out, W)
    for n, o in zip(x.shape[2:], out, strict=True):
        start, end = _adaptive_bins(n, o)
        k = np.arange(n)
        in_bin = (start[:, None] <= k) & (k < end[:, None])  # (o, n)
        averages.append((in_bin / (end - start)[:, None]).astype(x.dtype))
    y = np.einsum("ih,nchw,jw->ncij", averages[0], x, averages[1], optimize=True)
    return y[0] if unbatched else y


def adaptive_max_pool2d(input: np.ndarray, output_size: int | Sequence[int | None]) -> np.ndarray:
    """``torch.nn.functional.adaptive_max_pool2d``: the largest value of each of torch's bins.

    Bins differ in width, so each is read through an index table as wide as the widest bin,
    short bins repeating their last index (a repeat does not change a maximum).

    Args:
        input: the image.
        output_size: (H_out, W_out), or an int for both; None keeps the input's size.

    Shape:
        input: (N, C, H, W) or (C, H, W). Returns (N, C, H_out, W_out).
    """
    x, unbatched = _batched(input, "adaptive_max_pool2d")
    out = _adaptive_output_size("adaptive_max_pool2d", output_size, x.shape[2:])
    tables = []  # (H_out, widest bin) and (W_out, widest bin) input indices
    for n, o in zip(x.shape[2:], out, strict=True):
        start, end = _adaptive_bins(n, o)
        width = int((end - start).max(initial=1))
        tables.append(np.minimum(start[:, None] + np.arange(width), end[:, None] - 1))
    rows, cols = tables
    bins = x[:, :, rows[:, :, None, None], cols[None, None, :, :]]  # (N, C, H_out, a, W_out, b)
    y = bins.max(axis=(3, 5))
    return y[0] if unbatched else y


# --------------------------------------------------------------------------------------------
# Resampling


# torch's CPU resampling runs one of two kernels: a "vectorised" one when the output is small
# (H_out + W_out <= 128, or the input is channels-last with more than 3 channels), else a
# generic one. They agree for "bilinear" but compute "nearest" source indices differently (see
# _nearest_sources); the oracle takes the input as contiguous NCHW and makes the same choice.
_SMALL_OUTPUT = 128


def _opmath(dtype: np.dtype) -> type[np.floating]:
    """The dtype torch computes source coordinates in: float64 for float64, else float32."""
    return np.float64 if dtype == np.float64 else np.float32


def _source_scale(
    opmath: type[np.floating], in_size: int, out_size: int, scale_factor: float | None
) -> np.floating:
    """Input steps per output step: ``1 / scale_factor`` if the caller gave one (so the output
    size's rounding does not enter), else ``in_size / out_size``."""
    if scale_factor is not None:
        return opmath(1.0 / scale_factor)
    return opmath(in_size) / opmath(out_size)


def _nearest_sources(
    in_size: int, out_size: int, scale_factor: float | None, dtype: np.dtype, small_output: bool
) -> np.ndarray:
    """torch's legacy "nearest" source index of every output index: ``floor(dst * scale)``.

    torch floors in float32 (``floorf``): a product that should be an integer but came out a
    hair below it is rounded up to that integer first. Its small-output kernel moreover
    computes the product in float32 whatever the dtype (so ``41 * (2 / 82)`` floors to 0, not
    1), and copies (``out == in``) or halves (``out == 2 in``) indices without arithmetic.
    """
    dst = np.arange(out_size)
    if small_output:
        if out_size == in_size:
            return dst
        if out_size == 2 * in_size:
            return dst // 2
        opmath = np.float32
    else:
        opmath = _opmath(dtype)
    scale = _source_scale(opmath, in_size, out_size, scale_factor)
    src = np.floor((dst.astype(opmath) * scale).astype(np.float32)).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _linear_taps(
    in_size: int, out_size: int, scale_factor: float | None, align_corners: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's 1-D linear interpolation as two taps per output index: ``y[i] = w_left[i]
    x[left[i]] + w_right[i] x[right[i]]``.

    Output index ``i`` reads the source coordinate

    * align_corners=True: ``i (in - 1) / (out - 1)`` (corner pixels map onto each other);
    * align_corners=False: ``max((i + 0.5) scale - 0.5, 0)`` (pixel centres map onto pixel
      centres), with ``scale`` from ``_source_scale``;

    and mixes the two input entries around it, ``left = floor`` (in float32, ``floorf``)
    and ``right = min(left + 1, in - 1)``. torch copies the input when the size does not
    change, whatever the scale factor: then both taps are ``i``.

    Returns:
        (left, right, w_left, w_right), each of length ``out_size``.
    """
    if out_size == in_size:
        index = np.arange(in_size)
        return index, index, np.ones(in_size, dtype=dtype), np.zeros(in_size, dtype=dtype)
    opmath = _opmath(dtype)
    dst = np.arange(out_size).astype(opmath)
    if align_corners:
        scale = opmath(in_size - 1) / opmath(out_size - 1) if out_size > 1 else opmath(0)
        src = scale * dst
    else:
        scale = _source_scale(opmath, in_size, out_size, scale_factor)
        src = np.maximum(scale * (dst + opmath(0.5)) - opmath(0.5), opmath(0))
    left = np.minimum(np.floor(src.astype(np.float32)).astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    lam = np.clip(src - left, 0, 1)  # weight of the right neighbour
    return left, right, (1 - lam).astype(dtype), lam.astype(dtype)


def interpolate(
    input: np.ndarray,
    size: int | Sequence[int] | None = None,
    scale_factor: float | Sequence[float] | None = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
) -> np.ndarray:
    """``torch.nn.functional.interpolate`` of an image, modes "nearest" and "bilinear".

    Matches torch with its default ``recompute_scale_factor=None`` and ``antialias=False``:
    with ``scale_factor`` the output size is ``floor(H * scale_factor)`` and the source
    coordinates use ``1 / scale_factor`` (not ``H / H_out``) as the scale.

    * "nearest" (torch's legacy nearest, not "nearest-exact"): output index i reads input
      index ``min(floor(i * scale), H - 1)``, rounded as torch does: in float32 when
      ``H_out + W_out <= 128``, so that at rare sizes (2 -> 82) a pixel comes from the
      neighbour of the one exact arithmetic would pick (see ``_nearest_sources``).
    * "bilinear": separable linear interpolation; ``align_corners`` chooses how output
      coordinates map to input coordinates (see ``_linear_taps``); None means False.
      Each output reads only the 2 x 2 input pixels of its stencil, so a NaN in the input
      reaches only the outputs whose stencil holds it (as in torch).

    Args:
        input: the image.
        size: (H_out, W_out), or an int for both.
        scale_factor: multiplier of the spatial size, a float or (s_h, s_w).
        mode: "nearest" or "bilinear".
        align_corners: bilinear only; map corner pixels' centres onto each other.

    Shape:
        input: (N, C, H, W). Returns (N, C, H_out, W_out).

    Raises:
        ValueError: as torch, for both or neither of size and scale_factor, for
            align_corners with "nearest", for an unknown mode or an empty output.
    """
    x = np.asarray(input)
    if x.ndim != 4:
        raise ValueError(f"interpolate expects input of shape (N, C, H, W), got shape {x.shape}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"interpolate: mode must be 'nearest' or 'bilinear', got {mode!r}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError(
            "interpolate: align_corners can only be set with the interpolating mode 'bilinear'"
        )
    if size is not None and scale_factor is not None:
        raise ValueError("interpolate: only one of size or scale_factor should be defined")
    if size is None and scale_factor is None:
        raise ValueError("interpolate: either size or scale_factor should be defined")

    in_size = x.shape[2:]
    if size is not None:
        out_size = _pair(size, "size")
        scales = (None, None)
    else:
        if isinstance(scale_factor, (int, float, np.integer, np.floating)):
            scale_factor = (scale_factor, scale_factor)
        scales = tuple(float(s) for s in scale_factor)
        if len(scales) != 2:
            raise ValueError(f"interpolate: scale_factor must be a float or a pair, got {scales}")
        out_size = tuple(int(n * s) for n, s in zip(in_size, scales, strict=True))
    if min(out_size) < 1 or min(in_size) < 1:
        raise ValueError(
            f"interpolate: input and output sizes must be positive, got input {in_size} "
            f"and output {out_size}"
        )

    axes = list(zip(in_size, out_size, scales, strict=True))  # (in, out, scale_factor) per axis
    if mode == "nearest":
        small_output = sum(out_size) <= _SMALL_OUTPUT
        rows, cols = (_nearest_sources(n, o, s, x.dtype, small_output) for n, o, s in axes)
        return x[:, :, rows[:, None], cols[None, :]]
    # Bilinear is separable: interpolate along the rows, then along the columns. Each output
    # reads only its 2 x 2 stencil (gathered, not a dense matrix product, in which a NaN
    # or inf times a zero weight would reach every output): a NaN stays local, as in torch.
    (top, bottom, w_top, w_bottom), (left, right, w_left, w_right) = (
        _linear_taps(n, o, s, bool(align_corners), x.dtype) for n, o, s in axes
    )
    rows = x[:, :, top, :] * w_top[:, None] + x[:, :, bottom, :] * w_bottom[:, None]
    return rows[:, :, :, left] * w_left + rows[:, :, :, right] * w_right  # (N, C, H_out, W_out)
