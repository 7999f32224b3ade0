r"""Attentional feature fusion as PyTorch modules (Dai et al., WACV 2021).

Read it beside ``numpy_forward.py``: the same steps, names and order.

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
    X (+) Y iAFF's initial integration, Eq. (5): an AFF of X and Y with a first MS-CAM,
            fed to a second MS-CAM that gives the final weights         (N, C, H, W)
    r       channel reduction ratio (``reduction``): PWConv1 maps C -> C/r, PWConv2 back

Every context branch is a :class:`LocalContext` or :class:`GlobalContext` with submodules
``conv1`` (PWConv1, a 1x1 ``nn.Conv2d``), ``bn1``, ``conv2`` (PWConv2) and ``bn2``; the
fusion modules name their branches ``local_att`` and ``global_att`` (iAFF's second stage
``local_att2`` and ``global_att2``), as the official code does, so its weights load after
:func:`refimpl.feature_fusion.convert.convert_official_state_dict` replaces its
``nn.Sequential`` indices by these names.

Deviations: the official and popular code differ from the paper in three places, each
behind an option whose default follows the paper.

- ``AFF(factor_two=True)``: the paper-era official code (the MXNet ``ASKCFuse`` and the
  PyTorch ``AFF`` of open-aff) returns ``2 * (X * M + Y * (1 - M))``, twice Eq. (4).
- ``IAFF(share_global=True)``: the popular PyTorch iAFF (open-aff's ``aff_pytorch``, copied
  by seeds/003) computes the second stage's global context with the *first* stage's
  branch ``global_att``; its ``global_att2`` is created and never used. The paper and the
  official MXNet code have a separate second branch (our default); with
  ``share_global=True`` the module has no ``global_att2``.
- r: the popular code uses r = 4 everywhere; the paper uses r = 4 on CIFAR and r = 16
  in its ImageNet networks (:mod:`refimpl.feature_fusion.networks`). Our modules default
  to 4, the networks to 16.

Both official networks also call the fusion as ``fuse(residual, identity)``, with the
residual branch as X, the opposite of the paper's Sec. 4 and of
:mod:`refimpl.backbones` (``fusion(identity, residual)``); since M(Y + X) = M(X + Y), this
is the same function with 1 - M in place of M, and the converter's ``swap_xy=True`` turns
such weights into ours exactly (it negates each branch's last batch norm). The hidden width
is ``max(1, channels // reduction)``; the official ``int(channels // r)`` is 0 for C < r.

Speed: the local context's 1x1 convolutions on NCHW input are ``torch.bmm`` on the
(N, C, H*W) view with the weight broadcast over images (oneDNN's NCHW 1x1 convolution is
several times slower on CPU, and ``torch.matmul`` would copy the input and keep the copy
for backward); channels_last input goes to ``conv2d``; in eval, float32 CPU maps of fewer
than 100 positions per image take each as one product over all images on a (C, N H*W) copy
(:func:`_eval_logits_cnl`). In eval mode the local branch's
second batch norm is folded into PWConv2 at forward time and the global context (computed
on the pooled (N, C) matrix with ``F.linear``) is added to that convolution's bias, so
L + g comes out of one matrix product; the first batch norm runs on the quarter-size
hidden map with PWConv1's bias moved into its shift. In-place steps (bias, ReLU, sigmoid)
act on fresh products, never on views (autograd would copy the base in backward), and the
soft selection of Eq. (4) is one ``torch.lerp``: ``Y + M (X - Y)``. Training mode does
what each batch norm layer does: a plain ``nn.BatchNorm2d`` through the layer's own ATen
kernels (statistics, running-statistics update, backward), any other layer (``nn.SyncBatchNorm``
after ``convert_sync_batchnorm``, a hooked or subclassed one) called as a module; only eval
mode folds them, reading the layers' buffers.
Saved for backward in training (issue 13; per byte of ONE input X, parameters excluded): each
attention stage (MS-CAM's one, AFF's one, iAFF's two) saves X, X + Y in place of Y (and
iAFF's second stage X (+) Y), PWConv1's output (C/r channels) and (N, C)-sized vectors, and
recomputes the rest in backward: MS-CAM 1.25 (was 3.50), AFF 2.25 (was 5.5; the popular code
6.5), iAFF 3.5 (was 9.0; the popular code 11.0). Where every batch norm is a plain
``nn.BatchNorm2d`` (and the maps float32/float64, NCHW- or channels_last-contiguous, outside
autocast) a stage is one autograd Function with a hand-written backward, global branch
included, that calls the layers' own ATen kernels (:mod:`refimpl.feature_fusion._lean`);
otherwise (``nn.SyncBatchNorm``, a hooked or subclassed layer, half precision) the stage runs
again in backward with its graph recorded (:class:`refimpl._recompute.Recompute`), calling
every batch norm as a module. ``recompute=False`` keeps the whole graph.
``torch.compile``/``torch.export`` and eval mode take the plain graph. Against an eager
transcription of the popular code (one thread, ``python -m refimpl bench``, runs of one
session): forward 1.0-4.5 times as fast; a training step 2.1-2.8 times as fast at (32, 64,
56, 56), 0.99-1.04 at (8, 256, 28, 28) (batch statistics in passes on CPU,
:mod:`refimpl._batch_norm`), and 0.84-0.88 at (2, 512, 7, 7), where the elementwise work
recomputed in backward and about 145 operations dispatched from a hand-written backward
in Python are not paid back (the seven matrix products cost less than the popular code's
six): see ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import check_positive_int, check_same_shape, hidden_width
from refimpl._recompute import recompute as _recompute
from refimpl._torch_checks import (
    capturing_graph,
    check_matches_module,
    check_same_device,
    check_torch_input,
    conv2d,
)
from refimpl.feature_fusion._checks import check_batch_statistics, check_same_dtype
from refimpl.feature_fusion._lean import CNL_BELOW, Stage, fast_layout, stage

# ---------------------------------------------------------------------------------------
# Functional helpers


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``bn(conv(x))`` in eval mode as one affine map: weight (O, I) and bias (O,).

    :math:`B(Wx + b) = s \odot (Wx + b - \mu) + \beta` with
    :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}`, so the weight is :math:`s W` and the
    bias :math:`s (b - \mu) + \beta`.
    """
    mean, conv_bias = bn.running_mean, conv.bias
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # s, (O,)
    weight = conv.weight.flatten(1) * scale.unsqueeze(1)  # (O, I)
    shift = -mean if conv_bias is None else conv_bias - mean
    return weight, torch.addcmul(bn.bias, shift, scale)  # (O, I), (O,)


def _batch_norm(
    bn: nn.BatchNorm2d, h: torch.Tensor, training: bool, conv_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``bn(h)`` for an (N, C), (N, C, L) or (N, C, H, W) ``h``, as ``nn.BatchNorm2d`` does.

    Training: the layer is *called*, on a 4-D view of ``h``, so that whatever it has been
    turned into (``nn.SyncBatchNorm.convert_sync_batchnorm``, a frozen or hooked batch
    norm) normalises, with its own statistics and running-statistics update. Eval: the
    running statistics of the layer as it now is, through ``torch.batch_norm`` directly
    (``F.batch_norm`` and the module add Python checks that cost more than the arithmetic
    at small sizes; the callers check); a ``conv_bias`` not yet added to ``h`` enters the
    shift instead (the same result as normalising ``h + conv_bias``, one pass over ``h``
    fewer).
    """
    if training:
        h4 = h.view(*h.shape, *(1,) * (4 - h.dim()))  # (N, C, L, 1) or (N, C, 1, 1), a view
        return bn(h4).view(h.shape)
    weight, bias, mean, var = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if conv_bias is not None:  # B(h + b) = s (h - mu) + beta + s b, s = gamma / sigma
        bias = torch.addcmul(bias, conv_bias, weight * torch.rsqrt(var + bn.eps))
    cudnn = torch.backends.cudnn.enabled
    return torch.batch_norm(h, weight, bias, mean, var, False, 0.0, bn.eps, cudnn)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as an (N, C, H*W) view if it is NCHW-contiguous, else ``x`` itself."""
    n, c, h, w = x.shape
    return x.view(n, c, h * w) if x.is_contiguous() else x


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) or (N, C) tensor viewed to broadcast over the positions of an ``ndim`` map."""
    return t.view(t.shape + (1,) * (ndim - 2))


def _conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A point-wise convolution with weight (O, I) and bias (O,) or (N, O), then
    ``activation`` in place (``torch.relu_``, ``torch.sigmoid_``) if given.

    ``x`` is (N, I, H*W) from :func:`_flat`, or an (N, I, H, W) map in another memory
    format; the output has the same form. A bias of shape (N, O) differs per image (the
    global context added to the local one).
    """
    if x.dim() == 3:  # NCHW: a matrix product per image on the (N, I, H*W) view
        # bmm with the weight broadcast over images: no copy of x (torch.matmul would
        # transpose it into an (N*H*W, I) copy, and keep that copy for backward).
        out = torch.bmm(weight.expand(x.shape[0], -1, -1), x)  # (N, O, H*W)
    else:  # channels_last (or strided): oneDNN's 1x1 convolution is fast there
        out = conv2d(x, weight[:, :, None, None])  # (N, O, H, W); see _torch_checks.conv2d
    if bias is not None:
        out.add_(_per_channel(bias, out.dim()))
    if activation is not None:
        activation(out)
    return out


# ---------------------------------------------------------------------------------------
# Lean training: recompute in backward what is cheap, save only the inputs


def _lean(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether ``module`` takes the lean training path on ``tensors``: training, gradient
    mode on, something to differentiate, and not being traced (``torch.compile`` and
    ``torch.export`` plan their own recomputation; they get the plain graph)."""
    if not (module.training and module.recompute and torch.is_grad_enabled()):
        return False
    if capturing_graph():
        return False
    return any(t.requires_grad for t in tensors) or any(
        p.requires_grad for p in module.parameters()
    )


# ---------------------------------------------------------------------------------------
# The two context branches


class _ContextBranch(nn.Module):
    """PWConv1 (C -> C/r), BN, ReLU, PWConv2 (C/r -> C), BN: the chain of Eq. (2)."""

    def __init__(
        self,
        channels: int,
        reduction: int,
        hidden_channels: int | None,
        bias: bool,
        who: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        check_positive_int(channels, who, "channels")
        check_positive_int(reduction, who, "reduction")
        if hidden_channels is None:
            hidden_channels = hidden_width(channels, reduction)
        check_positive_int(hidden_channels, who, "hidden_channels")
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.conv1 = nn.Conv2d(channels, hidden_channels, 1, bias=bias, **fk)  # PWConv1
        self.bn1 = nn.BatchNorm2d(hidden_channels, **fk)
        self.conv2 = nn.Conv2d(hidden_channels, channels, 1, bias=bias, **fk)  # PWConv2
        self.bn2 = nn.BatchNorm2d(channels, **fk)

    def reset_parameters(self) -> None:
        """Re-initialise the convolutions and batch norms as PyTorch does."""
        for m in (self.conv1, self.bn1, self.conv2, self.bn2):
            m.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"bias={self.conv1.bias is not None}"
        )


class LocalContext(_ContextBranch):
    r"""The local channel context, Eq. (2): :math:`L(X) = B(PWConv_2(\delta(B(PWConv_1(X)))))`.

    Each position's channel vector goes through the bottleneck on its own.

    Args:
        channels: C, the channel count of X.
        reduction: r; the hidden width is ``max(1, channels // r)``.
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in both 1x1 convolutions (the official code has them).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W); output L(X), (N, C, H, W). Training needs N H W >= 2.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, reduction, hidden_channels, bias, "LocalContext", device, dtype)

    def logits(
        self, x: torch.Tensor, g: torch.Tensor | None = None, gate: bool = False
    ) -> torch.Tensor:
        """L(x), plus the global context ``g`` (N, C) if given, through the sigmoid if
        ``gate`` (then it is Eq. (3)'s M). No input checks (the calling module made them).

        Shape: (N, C, H, W) -> (N, C, H, W).
        """
        sigmoid_ = torch.sigmoid_ if gate else None
        conv1, bn1, conv2, bn2 = self.conv1, self.bn1, self.conv2, self.bn2
        v = _flat(x)  # (N, C, H*W), or (N, C, H, W) channels_last
        weight1 = conv1.weight.flatten(1)  # (C/r, C)
        if self.training:
            out = self.tail(_conv1x1(v, weight1, conv1.bias), g, gate)  # PWConv1, the rest
        elif _few_positions(v):
            return _eval_logits_cnl(self, v, g, gate).view(x.shape)
        else:
            h = _conv1x1(v, weight1)  # PWConv1 without its bias, (N, C/r, ...)
            h = _batch_norm(bn1, h, False, conv1.bias).relu_()  # delta(B(.))
            weight2, bias2 = _fold(conv2, bn2)  # B(PWConv2(.)) as one affine map
            bias = bias2 if g is None else g + bias2  # (C,), or (N, C) with g added
            out = _conv1x1(h, weight2, bias, sigmoid_)  # (N, C, ...)
        return out.view(x.shape)  # (N, C, H, W)

    def tail(self, h: torch.Tensor, g: torch.Tensor | None, gate: bool) -> torch.Tensor:
        """Training: from PWConv1's output ``h`` (N, C/r, H*W) (or 4-D) on, the rest of
        :meth:`logits`: B, delta, PWConv2, B, plus ``g``, the sigmoid if ``gate``; the
        batch norms called as modules. Output (N, C, H*W) (or 4-D)."""
        # Out of place on the batch norms' outputs: they are views (of the 4-D call), and
        # an in-place op on a view makes autograd copy the whole base in backward.
        h = torch.relu(_batch_norm(self.bn1, h, True))  # delta(B(.))
        out = _conv1x1(h, self.conv2.weight.flatten(1), self.conv2.bias)  # PWConv2
        out = _batch_norm(self.bn2, out, True)  # L(x)
        if g is not None:
            out = out + _per_channel(g, out.dim())  # L(x) + g(x), g broadcast
            return torch.sigmoid_(out) if gate else out  # in place on the fresh sum
        return torch.sigmoid(out) if gate else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L(X), Eq. (2)."""
        check_torch_input(x, self.channels, "LocalContext", "X", self)
        check_batch_statistics(x, self.training, "LocalContext", pooled=False)
        return self.logits(x)


def _few_positions(v: torch.Tensor) -> bool:
    """Whether eval's :meth:`LocalContext.logits` takes (C, N H W) matrices for ``v`` (from
    :func:`_flat`): float32 NCHW maps on the CPU with fewer than :data:`_lean.CNL_BELOW`
    positions per image, as the lean training path does (and for the same reason). Not
    traced, exported or compiled, where the graph would guard on the map's size, and not
    in float64 (a dtype for checking, not for speed): there an exported graph computes
    bit for bit what the module computes; in float32 the two agree to rounding."""
    if v.dim() != 3 or v.dtype != torch.float32 or v.device.type != "cpu":
        return False
    if v.shape[2] >= CNL_BELOW:
        return False
    return not capturing_graph()


def _eval_logits_cnl(
    local: LocalContext, v: torch.Tensor, g: torch.Tensor | None, gate: bool
) -> torch.Tensor:
    """Eval's L(x) (+ g, through the sigmoid if ``gate``) on an (N, C, L) map of few
    positions, with both 1x1 convolutions as one matrix product each over all images on a
    (C, N L) copy of the map, and the result copied back to (N, C, L). Per image, a product
    has only L columns (49 at 7x7); measured, one thread, 2x512x7x7: the copy and one
    product take 140 us against 146 for the per-image products (C -> C/r), one product and
    the copy back 136 against 148 (C/r -> C)."""
    n, c, positions = v.shape
    conv1, bn1, conv2, bn2 = local.conv1, local.bn1, local.conv2, local.bn2
    rows = v.transpose(0, 1).reshape(c, n * positions)  # (C, N L), a copy
    h = conv1.weight.flatten(1).mm(rows)  # PWConv1 without its bias, (C/r, N L)
    h = _batch_norm(bn1, h[None], False, conv1.bias).relu_()  # delta(B(.)), (1, C/r, N L)
    weight2, bias2 = _fold(conv2, bn2)  # B(PWConv2(.)) as one affine map
    out = weight2.mm(h[0]).view(c, n, positions)  # (C, N, L)
    if g is None:
        out.add_(bias2.view(c, 1, 1))
    else:  # g (N, C) differs per image
        out.add_((g + bias2).t().unsqueeze(2))
    if gate:
        out.sigmoid_()
    return out.transpose(0, 1).contiguous()  # (N, C, L)


class GlobalContext(_ContextBranch):
    r"""The global channel context: Eq. (2)'s chain on the global average pooling of X.

    :math:`g(X) = B(PWConv_2(\delta(B(PWConv_1(GAP(X))))))`, one C-vector per image
    (Eq. (1) is the pooling). On the pooled (N, C) descriptor the 1x1 convolutions are
    ``F.linear`` with the same weights.

    Args:
        channels: C, the channel count of X.
        reduction: r; the hidden width is ``max(1, channels // r)``.
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in both 1x1 convolutions (the official code has them).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W); output g(X), (N, C, 1, 1). Training needs N >= 2.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, reduction, hidden_channels, bias, "GlobalContext", device, dtype)

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) as an (N, C) matrix. No input checks (the calling module made them)."""
        conv1, bn1, conv2, bn2 = self.conv1, self.bn1, self.conv2, self.bn2
        z = x.mean((2, 3))  # Eq. (1), GAP(X), (N, C)
        h = F.linear(z, conv1.weight.flatten(1), conv1.bias)  # PWConv1, (N, C/r)
        h = _batch_norm(bn1, h, self.training).relu_()  # delta(B(.))
        out = F.linear(h, conv2.weight.flatten(1), conv2.bias)  # PWConv2, (N, C)
        return _batch_norm(bn2, out, self.training)  # g(x), (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """g(X), (N, C, 1, 1)."""
        check_torch_input(x, self.channels, "GlobalContext", "X", self)
        check_batch_statistics(x, self.training, "GlobalContext")
        return self.vector(x)[:, :, None, None]


def _weights(
    x: torch.Tensor, local: LocalContext, glob: GlobalContext, maps: dict | None, suffix: str
) -> torch.Tensor:
    r"""Eq. (3): :math:`M(x) = \sigma(L(x) \oplus g(x))`; records L, g, M in ``maps``."""
    if maps is None:  # the fast path: g enters the last convolution's bias
        return local.logits(x, glob.vector(x), gate=True)  # (N, C, H, W)
    L = local.logits(x)  # Eq. (2), (N, C, H, W)
    g = glob.vector(x)[:, :, None, None]  # (N, C, 1, 1)
    M = torch.sigmoid(L + g)  # Eq. (3)
    maps.update({f"L{suffix}": L, f"g{suffix}": g, f"M{suffix}": M})
    return M


def _check_pair(module: nn.Module, x: torch.Tensor, y: torch.Tensor, who: str) -> None:
    check_torch_input(x, module.channels, who, "X")
    check_torch_input(y, module.channels, who, "Y")
    check_same_shape(x, y, who)
    check_same_device(x, y, who)
    check_same_dtype(x, y, who)
    check_matches_module(x, module, who, "X")  # and so Y, of the same device and dtype
    check_batch_statistics(x, module.training, who)


# ---------------------------------------------------------------------------------------
# MS-CAM, AFF, iAFF


class MSCAM(nn.Module):
    r"""The multi-scale channel attention module, Eq. (3): :math:`X' = X \otimes
    \sigma(L(X) \oplus g(X))`.

    Channel attention at two scales: a point-wise one, L(X), that differs from position to
    position, and a global one, g(X), shared by all positions of an image.

    Args:
        channels: C, the channel count of X.
        reduction: r (4 in the paper's CIFAR networks, 16 in its ImageNet ones).
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in the 1x1 convolutions (the official code has them).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.
        recompute: in training, save only the inputs and PWConv1's output and recompute
            the rest of the local context in backward (the module docstring's "Saved for
            backward"); False keeps the whole graph (more memory).

    Shape:
        Input (N, C, H, W), any N, H, W >= 1, any floating dtype and device; training
        needs N >= 2 (the batch norm after global pooling). Output (N, C, H, W), same
        dtype, device and memory format.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        recompute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        options = {
            "hidden_channels": hidden_channels,
            "bias": bias,
            "device": device,
            "dtype": dtype,
        }
        self.local_att = LocalContext(channels, reduction, **options)  # L
        self.global_att = GlobalContext(channels, reduction, **options)  # g
        self.channels = channels
        self.hidden_channels = self.local_att.hidden_channels
        self.recompute = bool(recompute)  # the lean training path (see _lean)

    def reset_parameters(self) -> None:
        """Re-initialise both branches as PyTorch does."""
        self.local_att.reset_parameters()
        self.global_att.reset_parameters()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden_channels={self.hidden_channels}"

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """X * M(X); with ``return_maps`` also ``{"L": L(X), "g": g(X), "M": M(X)}``."""
        check_torch_input(x, self.channels, "MSCAM", "X", self)
        check_batch_statistics(x, self.training, "MSCAM")
        if not return_maps and _lean(self, x):
            return self._lean_forward(x)
        maps: dict[str, torch.Tensor] | None = {} if return_maps else None
        M = _weights(x, self.local_att, self.global_att, maps, "")  # Eq. (3)
        out = x * M  # Eq. (3), (N, C, H, W)
        return (out, maps) if return_maps else out

    def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: saves X, PWConv1's output (C/r channels) and the small global branch;
        the rest of Eq. (3) runs again in backward (:mod:`refimpl.feature_fusion._lean`,
        or :class:`refimpl._recompute.Recompute` where the batch norms are not plain)."""
        local = self.local_att
        last = fast_layout((local, self.global_att), x)
        if last is not None:
            return stage(Stage(local, self.global_att, lerp=False, last=last), x)
        g = self.global_att.vector(x)  # g(X), (N, C), plain autograd (small)
        h = _conv1x1(_flat(x), local.conv1.weight.flatten(1), local.conv1.bias)  # PWConv1

        def run(h: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return x * local.tail(h, g, gate=True).view(x.shape)  # Eq. (3)

        return _recompute(run, (local,), h, g, x)


class AFF(nn.Module):
    r"""Attentional feature fusion, Eq. (4): :math:`Z = M(X + Y) \otimes X + (1 - M(X + Y))
    \otimes Y`.

    A soft selection between X and Y, element by element, by the weights an MS-CAM
    computes from their sum.

    Args:
        channels: C, the channel count of X and Y.
        reduction: r (4 in the paper's CIFAR networks, 16 in its ImageNet ones).
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in the 1x1 convolutions (the official code has them).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.
        recompute: in training, save only the inputs and PWConv1's output and recompute
            the rest of the local context in backward (the module docstring's "Saved for
            backward"); False keeps the whole graph (more memory).
        factor_two: return 2 Z, as the paper-era official code does (default: the paper).

    Shape:
        X (the identity branch) and Y (the residual branch): (N, C, H, W), the same shape
        and dtype; any N, H, W >= 1; training needs N >= 2. Output (N, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        factor_two: bool = False,
        recompute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        options = {
            "hidden_channels": hidden_channels,
            "bias": bias,
            "device": device,
            "dtype": dtype,
        }
        self.local_att = LocalContext(channels, reduction, **options)  # L
        self.global_att = GlobalContext(channels, reduction, **options)  # g
        self.channels = channels
        self.hidden_channels = self.local_att.hidden_channels
        self.recompute = bool(recompute)  # the lean training path (see _lean)
        self.factor_two = bool(factor_two)

    def reset_parameters(self) -> None:
        """Re-initialise both branches as PyTorch does."""
        self.local_att.reset_parameters()
        self.global_att.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"factor_two={self.factor_two}"
        )

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Z of Eq. (4); with ``return_maps`` also ``{"L": ..., "g": ..., "M": M(X + Y)}``."""
        _check_pair(self, x, y, "AFF")
        if not return_maps and _lean(self, x, y):
            last = fast_layout((self.local_att, self.global_att), x, y)
            if last is not None:
                factor = 2.0 if self.factor_two else 1.0
                spec = Stage(self.local_att, self.global_att, True, last, factor)
                return stage(spec, x, y, x + y)  # Eq. (4), weights from X + Y
            g = self.global_att.vector(x + y)  # g(X + Y), (N, C), plain autograd (small)
            return _recompute(self._fuse, (self.local_att,), x, y, g)
        maps: dict[str, torch.Tensor] | None = {} if return_maps else None
        M = _weights(x + y, self.local_att, self.global_att, maps, "")  # Eq. (3) on X + Y
        Z = torch.lerp(y, x, M.to(x.dtype))  # Eq. (4): Y + M (X - Y), (N, C, H, W)
        if self.factor_two:
            Z = Z.mul_(2)  # the official code's 2 * (X M + Y (1 - M))
        return (Z, maps) if return_maps else Z

    def _fuse(self, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Training, lean path: Eq. (4) given g(X + Y); saves X, Y and g only (the local
        context runs again in backward, :class:`refimpl._recompute.Recompute`)."""
        M = self.local_att.logits(x + y, g, gate=True)  # Eq. (3) on X + Y
        Z = torch.lerp(y, x, M.to(x.dtype))  # Eq. (4)
        return Z.mul_(2) if self.factor_two else Z


class IAFF(nn.Module):
    r"""Iterative attentional feature fusion, Eqs. (4) and (5).

    The initial integration is attentional too, Eq. (5):
    :math:`X \uplus Y = M_1(X + Y) \otimes X + (1 - M_1(X + Y)) \otimes Y`, and a second
    MS-CAM computes the final weights from it, Eq. (4):
    :math:`Z = M_2(X \uplus Y) \otimes X + (1 - M_2(X \uplus Y)) \otimes Y`.

    Args:
        channels: C, the channel count of X and Y.
        reduction: r (4 in the paper's CIFAR networks, 16 in its ImageNet ones).
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in the 1x1 convolutions (the official code has them).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.
        recompute: in training, save only the inputs and PWConv1's output and recompute
            the rest of the local context in backward (the module docstring's "Saved for
            backward"); False keeps the whole graph (more memory).
        share_global: the second MS-CAM reuses the first one's global branch, as the
            popular PyTorch code does (its ``global_att2`` is never used); the module then
            has no ``global_att2``. Default: the paper's separate branch.

    Shape:
        X (the identity branch) and Y (the residual branch): (N, C, H, W), the same shape
        and dtype; any N, H, W >= 1; training needs N >= 2. Output (N, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        share_global: bool = False,
        recompute: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        options = {
            "hidden_channels": hidden_channels,
            "bias": bias,
            "device": device,
            "dtype": dtype,
        }
        self.local_att = LocalContext(channels, reduction, **options)  # L of M_1
        self.global_att = GlobalContext(channels, reduction, **options)  # g of M_1
        self.local_att2 = LocalContext(channels, reduction, **options)  # L of M_2
        self.share_global = bool(share_global)
        if not self.share_global:
            self.global_att2 = GlobalContext(channels, reduction, **options)  # g of M_2
        self.channels = channels
        self.hidden_channels = self.local_att.hidden_channels
        self.recompute = bool(recompute)  # the lean training path (see _lean)

    @property
    def global_context2(self) -> GlobalContext:
        """The global branch of the second MS-CAM (the first one's if ``share_global``)."""
        return self.global_att if self.share_global else self.global_att2

    def reset_parameters(self) -> None:
        """Re-initialise every branch as PyTorch does."""
        for branch in (self.local_att, self.global_att, self.local_att2, self.global_context2):
            branch.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"share_global={self.share_global}"
        )

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Z; with ``return_maps`` also M1, M2 and the contexts L1, g1, L2, g2."""
        _check_pair(self, x, y, "IAFF")
        if not return_maps and _lean(self, x, y):
            return self._lean_forward(x, y)
        maps: dict[str, torch.Tensor] | None = {} if return_maps else None
        M1 = _weights(x + y, self.local_att, self.global_att, maps, "1")  # M_1(X + Y)
        XY = torch.lerp(y, x, M1.to(x.dtype))  # Eq. (5), X (+) Y, (N, C, H, W)
        M2 = _weights(XY, self.local_att2, self.global_context2, maps, "2")  # M_2(X (+) Y)
        Z = torch.lerp(y, x, M2.to(x.dtype))  # Eq. (4) with M_2, (N, C, H, W)
        return (Z, maps) if return_maps else Z

    def _lean_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training: saves X, Y, X (+) Y, each stage's PWConv1 output and the small global
        branches; each local context runs again in backward (:mod:`refimpl.feature_fusion._lean`,
        or :class:`refimpl._recompute.Recompute` where the batch norms are not plain)."""
        local1, local2 = self.local_att, self.local_att2
        global1, global2 = self.global_att, self.global_context2
        last = fast_layout((local1, global1, local2, global2), x, y)
        if last is not None:
            s = x + y
            XY = stage(Stage(local1, global1, True, last), x, y, s)  # Eq. (5): X (+) Y
            return stage(Stage(local2, global2, True, last), x, y, s, XY)  # Eq. (4), M_2(XY)

        def run1(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            M1 = local1.logits(x + y, g, gate=True)  # M_1(X + Y)
            return torch.lerp(y, x, M1.to(x.dtype))  # Eq. (5), X (+) Y

        def run2(
            XY: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor
        ) -> torch.Tensor:
            M2 = local2.logits(XY, g, gate=True)  # M_2(X (+) Y)
            return torch.lerp(y, x, M2.to(x.dtype))  # Eq. (4) with M_2

        XY = _recompute(run1, (local1,), x, y, global1.vector(x + y))
        return _recompute(run2, (local2,), XY, x, y, global2.vector(XY))
