r"""Transcriptions of the popular forms of the double attention block, for measurement and
comparison.

Written here so that the benchmark and the tutorial can time and test our module against
the forms people actually run. They are deliberately plain eager re-writings of what that
code computes, bugs kept on purpose (listed below), except where a bug stops the code
from running at all. They are not for use in models: use
:class:`refimpl.double_attention.DoubleAttention`. No official code of the paper exists.

:class:`EagerDoubleAttention`, the paper's block written the straightforward way (three
1x1 convolutions, ``bmm`` for G, ``bmm`` for Z, the output convolution, the addition):
the *correct* reference our speed is measured against. Its state dict has our keys, so
``load_state_dict(ours.state_dict())`` makes the two compute the same function.

:class:`ZooDoubleAttention`, the most-copied form (External-Attention-pytorch's
``model/attention/A2Atttention.py``, ``DoubleAttention(in_channels, c_m, c_n,
reconstruct=True)``, copied into many repositories):

- ``F.softmax(B.view(b, c_n, -1))`` and ``F.softmax(V.view(b, c_n, -1))`` without ``dim``:
  for a 3-dimensional tensor torch picks dim 0 (with a deprecation warning), so *both*
  softmaxes run over the batch. Each image's output then depends on the other images of
  the batch; with a batch of one every weight is exp(0) / 1 = 1, so G = A B'^T with
  B' all ones (a plain sum over positions) and Z = G summed over descriptors. Written
  here with ``dim=0`` explicitly, which is what the original computes;
- no residual connection (``reconstruct`` is the output convolution, on by default).

:class:`BlogDoubleAttention`, the form of a widely shared blog post (a PaddlePaddle
class dropped into a torch file; ``DoubleAtten(in_c)``):

- the softmax of V runs over the positions (``axis=-1`` on (b, c, hw)) instead of over the
  n descriptors, so z_i is not a convex combination of the descriptors and the
  distribution weights of one position no longer sum to 1;
- ``torch.mean`` over the positions where the paper sums: its G is the paper's G / hw;
- the gathering multiplies (b, 1, c, hw) by (b, c, 1, hw) and then reduces: it
  materialises a (b, c, c, hw) tensor (1.6 GB in float32 at (32, 64, 56, 56));
- m = n = c, no output convolution and no residual;
- *fixed here*: it does not run under torch at all (``nn.Conv2D``, ``softmax(...,
  axis=-1)``, ``transpose([0, 2, 1])`` are Paddle spellings); they are written the torch
  way, nothing else is changed.

:func:`variant_forward` computes our module's function with any of those deviations
switched on, one at a time, from our module's own weights, so the tutorial can show what
each one changes on the same input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.double_attention.torch_module import DEFAULT_REDUCTION, DoubleAttention


class EagerDoubleAttention(nn.Module):
    """The paper's block, eager and straightforward: the correct speed reference.

    Args:
        channels: c.
        m: width of A.
        n: number of descriptors.
        bias: biases in the convolutions.
        output_conv: the output convolution m -> c.
        residual: add the input.

    Shape:
        Input (N, c, H, W); output (N, c, H, W) (or (N, m, H, W) without output_conv).
    """

    def __init__(
        self,
        channels: int,
        m: int,
        n: int,
        *,
        bias: bool = True,
        output_conv: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.phi = nn.Conv2d(channels, m, 1, bias=bias)
        self.theta = nn.Conv2d(channels, n, 1, bias=bias)
        self.rho = nn.Conv2d(channels, n, 1, bias=bias)
        self.expand = nn.Conv2d(m, channels, 1, bias=bias) if output_conv else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        A = self.phi(x).flatten(2)  # (N, m, hw)
        B = self.theta(x).flatten(2)  # (N, n, hw)
        V = self.rho(x).flatten(2)  # (N, n, hw)
        G = torch.bmm(A, F.softmax(B, dim=-1).transpose(1, 2))  # (N, m, n)
        Z = torch.bmm(G, F.softmax(V, dim=1)).view(b, -1, h, w)  # (N, m, H, W)
        out = Z if self.expand is None else self.expand(Z)
        return x + out if self.residual else out


class ZooDoubleAttention(nn.Module):
    """External-Attention-pytorch's ``DoubleAttention``: both softmaxes over the batch.

    Args:
        in_channels: c.
        c_m: m.
        c_n: n.
        reconstruct: the output convolution m -> c.

    Shape:
        Input (N, c, H, W); output (N, c, H, W) (or (N, c_m, H, W)); no residual.
    """

    def __init__(self, in_channels: int, c_m: int, c_n: int, reconstruct: bool = True) -> None:
        super().__init__()
        self.in_channels, self.c_m, self.c_n = in_channels, c_m, c_n
        self.reconstruct = reconstruct
        self.convA = nn.Conv2d(in_channels, c_m, 1)
        self.convB = nn.Conv2d(in_channels, c_n, 1)
        self.convV = nn.Conv2d(in_channels, c_n, 1)
        if reconstruct:
            self.conv_reconstruct = nn.Conv2d(c_m, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        A = self.convA(x)
        B = self.convB(x)
        V = self.convV(x)
        tmpA = A.view(b, self.c_m, -1)
        # The original omits dim; for a 3-D tensor torch's implicit choice is dim 0.
        attention_maps = F.softmax(B.view(b, self.c_n, -1), dim=0)
        attention_vectors = F.softmax(V.view(b, self.c_n, -1), dim=0)
        global_descriptors = torch.bmm(tmpA, attention_maps.permute(0, 2, 1))  # (b, m, n)
        tmpZ = global_descriptors.matmul(attention_vectors).view(b, self.c_m, h, w)
        if self.reconstruct:
            tmpZ = self.conv_reconstruct(tmpZ)
        return tmpZ


class BlogDoubleAttention(nn.Module):
    """The blog form: mean over positions, softmax of V over positions, (b, c, c, hw).

    Args:
        in_c: c; also m and n.

    Shape:
        Input (N, c, H, W); output (N, c, H, W); no output convolution, no residual.
    """

    def __init__(self, in_c: int) -> None:
        super().__init__()
        self.in_c = in_c
        self.convA = nn.Conv2d(in_c, in_c, kernel_size=1)
        self.convB = nn.Conv2d(in_c, in_c, kernel_size=1)
        self.convV = nn.Conv2d(in_c, in_c, kernel_size=1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        feature_maps = self.convA(input)
        atten_map = self.convB(input)
        b, _, h, w = feature_maps.shape
        feature_maps = feature_maps.view([b, 1, self.in_c, h * w])
        atten_map = atten_map.view([b, self.in_c, 1, h * w])
        # (b, c, c, hw) product, then the mean over positions: G / hw, transposed
        global_descriptors = torch.mean(feature_maps * F.softmax(atten_map, dim=-1), dim=-1)
        v = self.convV(input)
        atten_vectors = F.softmax(v.view([b, self.in_c, h * w]), dim=-1)  # over positions
        out = torch.bmm(atten_vectors.permute(0, 2, 1), global_descriptors).permute(0, 2, 1)
        return out.reshape(b, -1, h, w)


# ---------------------------------------------------------------------------------------
# Our weights in the popular forms


def load_eager(peer: nn.Module, ours: nn.Module) -> None:
    """Copy our weights into an :class:`EagerDoubleAttention` (the same keys)."""
    peer.load_state_dict(ours.state_dict())


def load_zoo(peer: nn.Module, ours: nn.Module) -> None:
    """Copy our phi, theta, rho, expand into ``convA``, ``convB``, ``convV``,
    ``conv_reconstruct`` of a :class:`ZooDoubleAttention`."""
    with torch.no_grad():
        for theirs, mine in (("convA", "phi"), ("convB", "theta"), ("convV", "rho")):
            getattr(peer, theirs).weight.copy_(getattr(ours, mine).weight)
            getattr(peer, theirs).bias.copy_(getattr(ours, mine).bias)
        if peer.reconstruct:
            peer.conv_reconstruct.weight.copy_(ours.expand.weight)
            peer.conv_reconstruct.bias.copy_(ours.expand.bias)


def load_blog(peer: nn.Module, ours: nn.Module) -> None:
    """Copy our phi, theta, rho (built with m = n = c) into a :class:`BlogDoubleAttention`."""
    with torch.no_grad():
        for theirs, mine in (("convA", "phi"), ("convB", "theta"), ("convV", "rho")):
            getattr(peer, theirs).weight.copy_(getattr(ours, mine).weight)
            getattr(peer, theirs).bias.copy_(getattr(ours, mine).bias)


def variant_forward(
    module: DoubleAttention,
    x: torch.Tensor,
    *,
    softmax_B_over: str = "positions",
    softmax_V_over: str = "descriptors",
    pooling: str = "sum",
) -> torch.Tensor:
    """Our block's function with deviations of the popular code switched on.

    The paper's block is ``softmax_B_over="positions", softmax_V_over="descriptors",
    pooling="sum"`` (then the result equals ``module(x)``). ``"batch"`` for either softmax
    is the zoo form's bug, ``softmax_V_over="positions"`` and ``pooling="mean"`` the blog
    form's. Computed straightforwardly from ``module``'s weights; output convolution and
    residual as the module has them.

    Shape:
        x (N, c, H, W) -> (N, c, H, W) (or (N, m, H, W) without the output convolution).
    """
    axes = {"batch": 0, "descriptors": 1, "positions": 2}
    b, _, h, w = x.shape
    A = module.phi(x).flatten(2)  # (N, m, hw)
    B = module.theta(x).flatten(2)  # (N, n, hw)
    V = module.rho(x).flatten(2)  # (N, n, hw)
    G = torch.bmm(A, F.softmax(B, dim=axes[softmax_B_over]).transpose(1, 2))  # (N, m, n)
    if pooling == "mean":
        G = G / (h * w)
    elif pooling != "sum":
        raise ValueError(f"variant_forward: pooling must be 'sum' or 'mean', got {pooling!r}")
    Z = torch.bmm(G, F.softmax(V, dim=axes[softmax_V_over])).view(b, -1, h, w)
    out = Z if module.expand is None else module.expand(Z)
    return x + out if module.residual else out


# ---------------------------------------------------------------------------------------
# Builders for the benchmark: (channels, hidden) -> module. ``hidden`` is the benchmark's
# SE-style hidden width and is not used: every builder uses m = n = channels // 4, the
# width of DoubleAttention(channels) with its default options (the blog form has m = n = c).


def _width(channels: int) -> int:
    return max(1, channels // DEFAULT_REDUCTION)


def build_eager(channels: int, hidden: int) -> nn.Module:
    """The straightforward eager block, the configuration of ``DoubleAttention(channels)``."""
    return EagerDoubleAttention(channels, _width(channels), _width(channels))


def build_zoo(channels: int, hidden: int) -> nn.Module:
    """External-Attention-pytorch's form with c_m = c_n = channels // 4 (batch softmax)."""
    return ZooDoubleAttention(channels, _width(channels), _width(channels))


def build_blog(channels: int, hidden: int) -> nn.Module:
    """The blog form, m = n = channels: forms an (N, c, c, hw) tensor."""
    return BlogDoubleAttention(channels)
