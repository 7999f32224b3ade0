r"""Residual Attention Network as PyTorch modules (Wang et al., CVPR 2017).

Read it beside ``numpy_forward.py``: the same steps, names and order.

Glossary (the paper's symbols, Section 3):
    x        the attention module's input                              (N, C, H, W)
    T        trunk branch output T(x): t residual units                (N, C, H, W)
    M        soft mask branch output M(x), the mask                     (N, C, H, W)
    H        the module's attention-aware output before the last units:
             Eq. (3) (attention residual learning, ARL)  H = (1 + M) * T
             Eq. (1) (naive attention learning, NAL)     H = M * T
    p, t, r  residual units before the split, in the trunk, and between two
             poolings of the mask branch (the paper uses p = 1, t = 2, r = 1)
    f1 f2 f3 the mask activations of Sec. 3.3 on the mask logits s: mixed
             f1 = sigmoid(s); channel f2 = s / ||s_i||; spatial
             f3 = sigmoid((s - mean_c) / std_c)

Equation numbers are our reading of arXiv 1704.06904v1, Sec. 3.1: (1) is H = M * T, (2) the
mask's gradient, (3) is H = (1 + M) * F (not re-checked against the PDF while writing
this; the search tool reached summaries only). The activations are cited by name.

Details checked against the official model definitions (github.com/fwang91/
residual-attention-network, ``Attention-56/92-deploy.prototxt``):

* The residual unit is the pre-activation bottleneck, no convolution biases; a unit that
  changes width or strides projects the *activated* input with a strided 1x1 convolution
  (``branch2`` reads ``.../bn`` after its in-place ReLU), and strides its 3x3 convolution.
* The mask branch starts from the output of the first p units (``trunk/res1``), as the
  trunk does; each pooling is followed by r units (2r at the deepest level); on the way
  up, the upsampled result plus the skip unit's output (``skip/res{i}``, a residual unit
  on the bottom-up feature ``down_sample/res{i}_1``) goes through r units
  (``up_sample/res{i}_1``); the head is BN-ReLU-1x1, BN-ReLU-1x1 (``linear_1``,
  ``linear_2``, no biases) and the activation; the fusion is ``trunk * mask + trunk``.
* The upsampling is Caffe's ``Interp`` layer (DeepLab/PSPNet) to the size of a reference
  blob: bilinear with corners aligned, ``align_corners=True`` here (an option).

Deviations, each an option or documented:

* Pooling (``pooling``): the prototxt pools 3x3/2 with no padding and Caffe's ceil
  rounding (``pooling="caffe"``); by default we pool 3x3/2 with padding 1 (floor
  rounding), as PyTorch ports and torchvision's ResNet stem do (``pooling="paper"``).
  Both give the same sizes at every even size (56 -> 28 -> 14 -> 7); the windows sit one
  pixel apart (in Attention-56 the mask branches' pooling alone moves the logits by about
  0.1% relative at 224 x 224; see ``networks.py``). Ours is defined down to 1x1 inputs;
  Caffe's has no output on a 1-pixel map, so a branch of depth D with
  ``pooling="caffe"`` needs H, W >= 2^D (a clear ValueError below that; see
  ``_pooling.py``).
* Mask activation: the repository's newest prototxts (and the paper) end each mask in a
  sigmoid, f1; an older revision of ``model/Attention-*-deploy.prototxt`` used TanH.
  We follow the paper; f2 and f3 are the paper's Sec. 3.3 variants.
* ``force_mask`` is ours: a hook that replaces M by a constant and skips the mask branch,
  to check the identity H = T at M = 0 (and to ablate the mask).
* Popular code (see ``popular.py`` and the tutorial) upsamples by a fixed factor 2, which
  breaks or misaligns on odd sizes, and often adds the bottom-up feature *and* the skip
  unit's output; we upsample to the exact size and add the skip unit's output only, as
  the prototxt does.

Speed: the modules are convolution-bound; the element-wise work is kept to the minimum
(ReLUs in place on fresh batch-norm outputs, the residual and skip additions in place on
fresh outputs, f1's sigmoid in place on the fresh logits, ``(1 + M) * T`` as one
``addcmul``); the input is never modified. On the CPU the mask branch and the attention
module compute in channels_last whatever the input's layout (see
``_channels_last_on_cpu``; with gradients on, only on maps of 14 x 14 and more) and return
the input's layout.

Memory (issue 13; bytes saved for backward in training per byte of x, parameters
excluded, p=1, t=2, r=1, depth 2): 13.9 at 8x256x28x28 (14.9 at 2x512x7x7; was 21.25 and
22.9). Each residual unit saves its input and its two quarter-width hidden maps (1.5, not
3.0): its three BN-ReLU-conv steps are one :class:`_PreActivated` Function that rebuilds
the activated inputs in backward (plain layers only; anything else, a SyncBatchNorm or a
hooked layer, is called as a module). The ports of ``popular.py``, on the plain autograd
graph, save 22.3 (fixed-size, the same function) and 19.0 (the seeds' one-level
fixed-factor form). ``checkpoint_mask=True`` recomputes the mask branch and H in backward:
7.0 (-50%: the input, the four full-size residual units, T and H hold the rest); with
``checkpoint_trunk=True`` as well everything between the first and the last p units is
recomputed: 4.0 (-71%). Both go through :class:`refimpl._recompute.Recompute` (batch norms
called as modules, running statistics updated once per step, gradients equal to plain
autograd's). Time (one thread, ``benchmarks/attention_module_vs_port.py``): a training
step 1.02-1.09 times as fast as the fixed-size port's at 8x256x28x28 and 1.3-1.4 times at
32x64x56x56 (batch statistics in passes on CPU, :mod:`refimpl._batch_norm`), 0.93-0.95 of
its speed at 2x512x7x7, where the units' backward recomputation is not paid back.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._batch_norm import (
    batch_norm_backward,
    batch_norm_train,
    by_hand,
    plain_batch_norm,
    plain_module,
    relu_batch_norm,
)
from refimpl._checks import check_choice, check_positive_int
from refimpl._recompute import recompute, rerun_and_grad
from refimpl._torch_checks import call_conv, capturing_graph, check_torch_input
from refimpl.residual_attention._pooling import (
    MAX_POOL,
    check_pooling,
    check_pooling_size,
)

ACTIVATIONS = ("mixed", "channel", "spatial")
LEARNINGS = ("arl", "nal")
#: f2's floor on the L2 norm, as ``torch.nn.functional.normalize``.
CHANNEL_EPS = 1e-12
#: f3's epsilon added to the variance, as ``torch.nn.InstanceNorm2d``.
SPATIAL_EPS = 1e-5

MapsOr = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]


def _check_count(value: object, who: str, name: str, minimum: int) -> None:
    """Check that a count (p, t, skips) is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_force_mask(value: object, who: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{who}: force_mask must be None or a finite number, got {value!r}")


def _channels_last_on_cpu(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` in channels_last if it is an NCHW tensor on the CPU; and whether it was moved.

    On the CPU, PyTorch's NCHW max pooling is about 7x slower than its channels_last
    kernel, NCHW bilinear upsampling converts to channels_last and back inside every call,
    and oneDNN's convolutions are at least as fast in channels_last. One copy in and one
    out make the attention module 1.3x (8x256x28x28) to 1.6x (32x64x56x56) faster forward,
    1.0x to 1.3x forward and backward, and leave 2x512x7x7 even (one thread, interleaved
    medians). Other devices keep the input's format. With gradients (or an input that
    requires them) and maps under
    14 x 14 the input's layout is kept: there the two copies (and their gradients' copies
    in backward) cost more than the kernels gain (issue 13, 2x512x7x7 forward+backward:
    0.95 against 1.01 times the fixed-size port's speed, one thread).
    """
    if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last):
        return x, False
    # x.requires_grad too: a checkpointed branch runs without gradients in forward and
    # with them in backward, and must take the same layout both times.
    if (torch.is_grad_enabled() or x.requires_grad) and x.shape[-2] * x.shape[-1] < 14 * 14:
        return x, False
    return x.contiguous(memory_format=torch.channels_last), True


def _bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BN then ReLU, the ReLU in place on batch norm's fresh output (never on x)."""
    return torch.relu_(bn(x))


# ---------------------------------------------------------------------------------------
# The pre-activation residual unit


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """A (C,) vector as (C, 1, 1), to broadcast over (N, C, H, W) (a view: cheaper than
    indexing with None)."""
    return v.view(-1, 1, 1)


class _PreActivated(torch.autograd.Function):
    """A chain of a residual unit's steps ``conv(relu(bn(.)))``, saving each step's input
    (and two C-vectors) only.

    Autograd would also keep each activated relu(bn(.)) for the convolution's weight
    gradient: per unit, one more tensor of the input's size and two of a quarter of it
    (issue 13: the attention module saved 21.3 bytes per byte of x, each residual unit
    3.0; with this 1.5). Backward rebuilds them from the inputs and the batch statistics
    (one ``addcmul`` and an in-place ReLU each) and then runs the kernels autograd runs for
    the layers (``convolution_backward``, ``threshold_backward``,
    ``native_batch_norm_backward``); the batch norms run in forward as the layers run
    (:mod:`refimpl._batch_norm`). One Function for the whole chain: the Python cost of a
    Function is paid once per unit, not per step (at 2x512x7x7 it is what this costs).
    Only for plain layers, float32/float64, no autocast (:meth:`ResidualUnit._lean`);
    double backward reruns the layers with a graph.
    """

    @staticmethod
    def forward(ctx, steps, x, *params):  # noqa: ANN001, ANN205
        kept = []
        f = x
        for j, (bn, conv) in enumerate(steps):
            gamma, beta, weight = params[3 * j : 3 * j + 3]
            a, mean, invstd = batch_norm_train(bn, f, gamma, beta)
            kept += [f, mean, invstd]
            a = a.relu_()
            f = F.conv2d(a, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.steps, ctx.params = steps, params
        # autocast is off on this path (ResidualUnit._lean); rerun_and_grad reads these
        ctx.device_type, ctx.autocast, ctx.autocast_dtype = x.device.type, False, None
        ctx.save_for_backward(*kept)
        return f

    @staticmethod
    def backward(ctx, df):  # noqa: ANN001, ANN205
        kept = ctx.saved_tensors
        steps, params = ctx.steps, ctx.params
        if torch.is_grad_enabled():  # double backward: differentiate the layers' graph

            def run(x: torch.Tensor) -> torch.Tensor:
                for bn, conv in steps:
                    x = call_conv(conv, _bn_relu(bn, x))
                return x

            modules = tuple(m for step in steps for m in step)
            grads = rerun_and_grad(ctx, run, modules, (kept[0],), params, 1, df)
            return (None, *grads)
        grads: list[torch.Tensor] = []
        for j in reversed(range(len(steps))):
            bn, conv = steps[j]
            x, mean, invstd = kept[3 * j : 3 * j + 3]
            gamma, beta, weight = params[3 * j : 3 * j + 3]
            a = relu_batch_norm(x, gamma, beta, mean, invstd, _per_channel)
            da, dweight, _ = torch.ops.aten.convolution_backward(
                df, a, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0],
                conv.groups, [True, True, False],
            )  # fmt: skip
            torch.ops.aten.threshold_backward.grad_input(da, a, 0, grad_input=da)  # in place
            df, dgamma, dbeta = batch_norm_backward(da, x, gamma, mean, invstd, bn.eps)
            grads[:0] = [dgamma, dbeta, dweight]
        return (None, df, *grads)


def _pre_activated(
    steps: tuple[tuple[nn.BatchNorm2d, nn.Conv2d], ...], x: torch.Tensor, lean: bool
) -> torch.Tensor:
    """conv(relu(bn(.))) for each (bn, conv) of ``steps`` in turn: by one
    :class:`_PreActivated` if ``lean``, else the layers called as modules."""
    if lean:
        params = [t for bn, conv in steps for t in (bn.weight, bn.bias, conv.weight)]
        return _PreActivated.apply(steps, x, *params)
    for bn, conv in steps:
        # call_conv: conv(.), in float32 on thin bfloat16 CPU maps (a torch bug, see there)
        x = call_conv(conv, _bn_relu(bn, x))
    return x


class ResidualUnit(nn.Module):
    r"""Pre-activation bottleneck unit: :math:`y = s(x) + \mathcal{F}(x)`.

    :math:`\mathcal{F}`: BN-ReLU-conv1x1 (``conv1``), BN-ReLU-conv3x3 (``conv2``, stride
    ``stride``), BN-ReLU-conv1x1 (``conv3``), no biases. The shortcut s is the identity,
    or, when the width or the stride changes, a strided 1x1 convolution (``shortcut``) of
    the activated input relu(bn1(x)), as the official model definition does.

    Args:
        channels: C_in, input channels.
        out_channels: C_out (default: C_in).
        stride: stride of the 3x3 convolution and the projection shortcut.
        hidden_channels: the bottleneck width; default ``max(1, out_channels // 4)``.
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C_in, H, W); output (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        hidden_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        out_channels = channels if out_channels is None else out_channels
        hidden_channels = max(1, out_channels // 4) if hidden_channels is None else hidden_channels
        for name, value in (
            ("channels", channels),
            ("out_channels", out_channels),
            ("stride", stride),
            ("hidden_channels", hidden_channels),
        ):
            check_positive_int(value, "ResidualUnit", name)
        self.channels, self.out_channels, self.stride = channels, out_channels, stride
        self.hidden_channels = hidden_channels
        self.bn1 = nn.BatchNorm2d(channels, **fk)
        self.conv1 = nn.Conv2d(channels, hidden_channels, 1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(hidden_channels, **fk)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 3, stride, 1, bias=False, **fk)
        self.bn3 = nn.BatchNorm2d(hidden_channels, **fk)
        self.conv3 = nn.Conv2d(hidden_channels, out_channels, 1, bias=False, **fk)
        projection = stride != 1 or out_channels != channels
        self.shortcut = (
            nn.Conv2d(channels, out_channels, 1, stride, bias=False, **fk) if projection else None
        )

    def reset_parameters(self) -> None:
        """Re-initialise every convolution and batch norm as PyTorch's defaults do."""
        for m in self.children():
            m.reset_parameters()
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.reset_running_stats()

    def _lean(self, x: torch.Tensor) -> bool:
        """Whether the unit's steps run as :class:`_PreActivated` on ``x``: training with
        gradients, plain layers (no hooks, exactly ``nn.BatchNorm2d`` and ``nn.Conv2d``),
        float32/float64 outside autocast, not traced or compiled."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        if not by_hand(x):
            return False
        if capturing_graph():
            return False
        for bn, conv in ((self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)):
            if not (plain_batch_norm(bn) and plain_module(conv)) or type(conv) is not nn.Conv2d:
                return False
            if conv.bias is not None or conv.padding_mode != "zeros":
                return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, stride={self.stride}, "
            f"hidden_channels={self.hidden_channels}, projection={self.shortcut is not None}"
        )

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> MapsOr:
        """s(x) + F(x); with ``return_maps`` also ``{"F": F(x)}``."""
        check_torch_input(x, self.channels, "ResidualUnit", "x", self)
        lean = self._lean(x)  # training: each step's activated input rebuilt in backward
        steps = ((self.bn2, self.conv2), (self.bn3, self.conv3))  # 3x3 strided, then 1x1
        if self.shortcut is None:
            f = _pre_activated(((self.bn1, self.conv1), *steps), x, lean)  # (N, C_out, H, W)
            s = x  # identity
        else:  # the projection needs the activated input itself
            a = _bn_relu(self.bn1, x)  # pre-activation, (N, C_in, H, W)
            f = _pre_activated(steps, call_conv(self.conv1, a), lean)  # (N, C_out, H', W')
            s = call_conv(self.shortcut, a)  # (N, C_out, H', W')
        if return_maps:
            return f + s, {"F": f}
        return f.add_(s)  # in place on conv3's fresh output


def _units(count: int, channels: int, **fk: object) -> nn.Sequential:
    """``count`` residual units of width ``channels``, named ``unit1``, ``unit2``, ...

    ``fk``: the factory keywords ``device`` and ``dtype``.
    """
    return nn.Sequential(
        OrderedDict((f"unit{j}", ResidualUnit(channels, **fk)) for j in range(1, count + 1))
    )


# ---------------------------------------------------------------------------------------
# The mask activations f1, f2, f3 (Sec. 3.3) and the mask head


def mask_activation(s: torch.Tensor, activation: str = "mixed") -> torch.Tensor:
    r"""The mask M from the logits s, by the paper's f1, f2 or f3 (Sec. 3.3).

    * ``"mixed"``, f1: :math:`\sigma(s_{i,c})`.
    * ``"channel"``, f2: :math:`s_{i,c} / \max(\lVert s_i \rVert_2, 10^{-12})`.
    * ``"spatial"``, f3: :math:`\sigma((s_{i,c} - \mathrm{mean}_c) /
      \sqrt{\mathrm{var}_c + 10^{-5}})`, population variance over the positions.

    Shape: s (N, C, H, W) -> M (N, C, H, W).
    """
    if activation == "mixed":
        return torch.sigmoid(s)  # f1
    if activation == "channel":
        return F.normalize(s, p=2.0, dim=1, eps=CHANNEL_EPS)  # f2
    var, mean = torch.var_mean(s, dim=(2, 3), correction=0, keepdim=True)  # (N, C, 1, 1)
    return torch.sigmoid((s - mean) * torch.rsqrt(var + SPATIAL_EPS))  # f3


class MaskHead(nn.Module):
    r"""The end of the mask branch: BN-ReLU-conv1x1, BN-ReLU-conv1x1, then f1, f2 or f3.

    Args:
        channels: C.
        activation: ``"mixed"`` (f1, the paper's networks), ``"channel"`` (f2),
            ``"spatial"`` (f3).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), the upsampled mask features; output M, (N, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        *,
        activation: str = "mixed",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        check_positive_int(channels, "MaskHead", "channels")
        check_choice(activation, ACTIVATIONS, "MaskHead", "activation")
        self.channels, self.activation = channels, activation
        self.bn1 = nn.BatchNorm2d(channels, **fk)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(channels, **fk)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False, **fk)

    def reset_parameters(self) -> None:
        """Re-initialise the convolutions and batch norms as PyTorch's defaults do."""
        for m in self.children():
            m.reset_parameters()
        self.bn1.reset_running_stats()
        self.bn2.reset_running_stats()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, activation={self.activation!r}"

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> MapsOr:
        """M = f(conv2(relu(bn2(conv1(relu(bn1(x))))))); maps ``{"s": logits, "M": M}``."""
        check_torch_input(x, self.channels, "MaskHead", "x", self)
        s = call_conv(self.conv1, _bn_relu(self.bn1, x))  # (N, C, H, W)
        s = call_conv(self.conv2, _bn_relu(self.bn2, s))  # the logits, (N, C, H, W)
        if self.activation == "mixed" and not return_maps:
            return torch.sigmoid_(s)  # f1 in place on the fresh logits: one tensor fewer
        M = mask_activation(s, self.activation)  # f1 / f2 / f3
        return (M, {"s": s, "M": M}) if return_maps else M


# ---------------------------------------------------------------------------------------
# The soft mask branch


class SoftMaskBranch(nn.Module):
    r"""The soft mask branch M(x) (Sec. 3.2, Fig. 3): bottom-up, top-down, head.

    Bottom-up, level i = 1 .. depth: max pooling 3x3/2, padding 1 (see ``pooling``), then
    the units ``down{i}`` (r of them; 2r at the deepest level). Top-down, level i = depth-1 .. 1:
    bilinear upsampling to *exactly* the size of level i's bottom-up feature, plus the
    skip connection ``skip{i}`` (a residual unit on that feature) where there is one,
    then the units ``up{i}``. A last upsampling back to the input's size and the head
    (:class:`MaskHead`) make the mask.

    Args:
        channels: C.
        r: residual units between two poolings (2r at the deepest level).
        depth: number of max poolings (and of upsamplings). Attention-56/92 use 3, 2, 1
            at 56x56, 28x28, 14x14.
        skips: number of skip connections, at levels 1 .. skips (the highest
            resolutions); default ``depth - 1``, every level but the deepest, as the paper.
        activation: f1 ``"mixed"``, f2 ``"channel"`` or f3 ``"spatial"``.
        align_corners: bilinear upsampling with corners aligned (True, the official Caffe
            ``Interp`` layer) or pixel centres aligned (False).
        pooling: ``"paper"`` (3x3/2, padding 1, floor rounding; PyTorch ports) or
            ``"caffe"`` (3x3/2, no padding, ceil rounding; the official prototxt).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any H, W >= 1 (``pooling="caffe"``: H, W >= 2^depth); output
        M, (N, C, H, W).

    Deviations:
        The official prototxt's pooling is ``pooling="caffe"``; the default follows the
        PyTorch ports (padding 1). Same sizes at even sizes, windows one pixel apart.
    """

    def __init__(
        self,
        channels: int,
        r: int = 1,
        *,
        depth: int = 2,
        skips: int | None = None,
        activation: str = "mixed",
        align_corners: bool = True,
        pooling: str = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = "SoftMaskBranch"
        check_pooling(pooling, who)
        self.pooling = pooling
        check_positive_int(channels, who, "channels")
        check_positive_int(r, who, "r")
        check_positive_int(depth, who, "depth")
        skips = depth - 1 if skips is None else skips
        _check_count(skips, who, "skips", 0)
        if skips > depth - 1:
            raise ValueError(f"{who}: skips must be at most depth - 1 = {depth - 1}, got {skips}")
        check_choice(activation, ACTIVATIONS, who, "activation")
        self.channels, self.r, self.depth, self.skips = channels, r, depth, skips
        self.align_corners = bool(align_corners)
        for i in range(1, depth + 1):  # bottom-up units; the deepest level has 2r
            self.add_module(f"down{i}", _units(2 * r if i == depth else r, channels, **fk))
        for i in range(1, skips + 1):  # skip connections, highest resolutions first
            self.add_module(f"skip{i}", ResidualUnit(channels, **fk))
        for i in range(1, depth):  # top-down units
            self.add_module(f"up{i}", _units(r, channels, **fk))
        self.head = MaskHead(channels, activation=activation, **fk)

    @property
    def activation(self) -> str:
        return self.head.activation

    def reset_parameters(self) -> None:
        """Re-initialise every unit and the head."""
        for m in self.modules():
            if isinstance(m, ResidualUnit | MaskHead):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, r={self.r}, depth={self.depth}, skips={self.skips}, "
            f"activation={self.activation!r}, align_corners={self.align_corners}, "
            f"pooling={self.pooling!r}"
        )

    def _upsample(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Bilinear interpolation of h to exactly the spatial size of ``like``."""
        return F.interpolate(
            h, size=like.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> MapsOr:
        """The mask M; with ``return_maps`` also ``{"s": logits, "M": M}``."""
        check_torch_input(x, self.channels, "SoftMaskBranch", "x", self)
        check_pooling_size(x.shape[-2:], self.depth, self.pooling, "SoftMaskBranch")
        x, restore = _channels_last_on_cpu(x)
        # Bottom-up: features[i - 1] is level i's result, each about half the last's size.
        features = []
        h = x
        for i in range(1, self.depth + 1):
            h = F.max_pool2d(h, **MAX_POOL[self.pooling])  # (N, C, ceil(H/2), ...) "paper"
            h = getattr(self, f"down{i}")(h)
            features.append(h)
        # Top-down: back up one level at a time, adding each level's skip connection.
        for i in range(self.depth - 1, 0, -1):
            h = self._upsample(h, features[i - 1])  # to level i's exact size
            if i <= self.skips:
                h = h.add_(getattr(self, f"skip{i}")(features[i - 1]))  # in place: h is fresh
            h = getattr(self, f"up{i}")(h)
        h = self._upsample(h, x)  # (N, C, H, W)
        M = self.head(h, return_maps=return_maps)
        if restore:  # back to the input's NCHW layout (the maps stay channels_last)
            return (M[0].contiguous(), M[1]) if return_maps else M.contiguous()
        return M


# ---------------------------------------------------------------------------------------
# The attention module


class AttentionModule(nn.Module):
    r"""The attention module (Fig. 2): H = (1 + M) * T between p units before and after.

    ``x -> p units -> {trunk: t units -> T; mask branch -> M} -> H -> p units``, with
    H = (1 + M) * T (attention residual learning, Eq. (3)) or M * T (naive attention
    learning, Eq. (1), the paper's ablation).

    Args:
        channels: C, in and out.
        p: residual units before the split into trunk and mask, and again after H.
        t: residual units of the trunk branch.
        r: residual units between two poolings of the mask branch.
        depth: max poolings in the mask branch (3, 2, 1 at 56, 28, 14 pixels in
            Attention-56/92).
        skips: skip connections in the mask branch; default ``depth - 1``.
        activation: the mask activation, f1 ``"mixed"`` (paper's networks), f2
            ``"channel"`` or f3 ``"spatial"``.
        learning: ``"arl"`` (H = (1 + M) * T) or ``"nal"`` (H = M * T).
        force_mask: None, or a constant that replaces M (the mask branch is then not
            run): ``force_mask=0.0`` with ARL gives H = T exactly. An attribute, so it can
            be set and unset on a built module.
        align_corners: the mask branch's bilinear upsampling (True: official Caffe).
        pooling: the mask branch's max pooling, ``"paper"`` (3x3/2, padding 1) or
            ``"caffe"`` (3x3/2, no padding, ceil rounding: the official prototxt; needs
            H, W >= 2^depth). See :class:`SoftMaskBranch`.
        checkpoint_mask: activation checkpointing of the mask branch and of H: with
            gradients on, they save only their input (and T) for backward and run again
            in backward (:class:`refimpl._recompute.Recompute`: the batch norms are called
            as modules both times, their running statistics updated once per step).
        checkpoint_trunk: the same for the trunk branch (with ``checkpoint_mask``, all
            between the first and the last p units is recomputed).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any N, H, W >= 1 (in training mode batch norm needs more than
        one value per channel at every level; ``pooling="caffe"``: H, W >= 2^depth);
        output (N, C, H, W), same dtype, device and memory format.
    """

    def __init__(
        self,
        channels: int,
        p: int = 1,
        t: int = 2,
        r: int = 1,
        *,
        depth: int = 2,
        skips: int | None = None,
        activation: str = "mixed",
        learning: str = "arl",
        force_mask: float | None = None,
        align_corners: bool = True,
        pooling: str = "paper",
        checkpoint_mask: bool = False,
        checkpoint_trunk: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = "AttentionModule"
        self.checkpoint_mask = bool(checkpoint_mask)
        self.checkpoint_trunk = bool(checkpoint_trunk)
        check_positive_int(channels, who, "channels")
        _check_count(p, who, "p", 0)
        _check_count(t, who, "t", 0)
        check_choice(learning, LEARNINGS, who, "learning")
        _check_force_mask(force_mask, who)
        self.channels, self.p, self.t, self.learning = channels, p, t, learning
        self.force_mask = force_mask
        self.pre = _units(p, channels, **fk)
        self.trunk = _units(t, channels, **fk)
        self.mask = SoftMaskBranch(
            channels,
            r,
            depth=depth,
            skips=skips,
            activation=activation,
            align_corners=align_corners,
            pooling=pooling,
            **fk,
        )
        self.post = _units(p, channels, **fk)

    def reset_parameters(self) -> None:
        """Re-initialise every unit, the mask branch included."""
        for m in self.modules():
            if isinstance(m, ResidualUnit | MaskHead):
                m.reset_parameters()

    def extra_repr(self) -> str:
        mask = self.mask
        return (
            f"channels={self.channels}, p={self.p}, t={self.t}, r={mask.r}, depth={mask.depth}, "
            f"skips={mask.skips}, activation={mask.activation!r}, learning={self.learning!r}, "
            f"force_mask={self.force_mask}, align_corners={mask.align_corners}, "
            f"pooling={mask.pooling!r}"
        )

    def combine(self, T: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Eq. (3): H = (1 + M) * T, as T + T * M in one op; or Eq. (1): H = M * T."""
        return torch.addcmul(T, T, M) if self.learning == "arl" else T * M

    def forward(self, x: torch.Tensor, return_maps: bool = False) -> MapsOr:
        """The module's output; with ``return_maps`` also ``{"T": T, "M": M, "H": H}``."""
        check_torch_input(x, self.channels, "AttentionModule", "x", self)
        _check_force_mask(self.force_mask, "AttentionModule")
        if self.force_mask is None:
            check_pooling_size(x.shape[-2:], self.mask.depth, self.mask.pooling, "AttentionModule")
        x, restore = _channels_last_on_cpu(x)
        x = self.pre(x)  # p units, shared by both branches
        if self.force_mask is None and not return_maps and self._checkpointing(x):
            return self._checkpointed(x, restore)
        T = self.trunk(x)  # trunk branch, t units
        if self.force_mask is None:
            M = self.mask(x)  # soft mask branch
            H = self.combine(T, M)  # Eq. (3) / Eq. (1)
        else:  # the hook: a constant mask; the mask branch does not run
            v = float(self.force_mask)
            H = T * (1.0 + v) if self.learning == "arl" else T * v  # exactly T at v = 0, ARL
            M = None
        out = self.post(H)  # p units
        if restore:
            out = out.contiguous()  # back to the input's NCHW layout (maps stay channels_last)
        if not return_maps:
            return out
        M = torch.full_like(T, float(self.force_mask)) if M is None else M
        return out, {"T": T, "M": M, "H": H}

    def _checkpointing(self, x: torch.Tensor) -> bool:
        """Whether to recompute in backward: asked for, gradients on, something to
        differentiate, not traced (``torch.compile``/``torch.export`` plan their own)."""
        if not (self.checkpoint_mask or self.checkpoint_trunk) or not torch.is_grad_enabled():
            return False
        if capturing_graph():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _checkpointed(self, x: torch.Tensor, restore: bool) -> torch.Tensor:
        """The forward with the checkpointed branches run again in backward."""
        if self.checkpoint_trunk and self.checkpoint_mask:  # saves x only

            def run(x: torch.Tensor) -> torch.Tensor:
                return self.combine(self.trunk(x), self.mask(x))  # Eq. (3) / Eq. (1)

            H = recompute(run, (self.trunk, self.mask), x)
        elif self.checkpoint_mask:  # saves x and T

            def run(x: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
                return self.combine(T, self.mask(x))  # Eq. (3) / Eq. (1)

            H = recompute(run, (self.mask,), x, self.trunk(x))
        else:  # the trunk alone: saves x (no units: T is x)
            T = recompute(self.trunk, (self.trunk,), x) if self.t else x
            H = self.combine(T, self.mask(x))
        out = self.post(H)  # p units
        return out.contiguous() if restore else out
