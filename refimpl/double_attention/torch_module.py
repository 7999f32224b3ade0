r"""The double attention block of A^2-Nets as a PyTorch module (Chen et al., NeurIPS 2018).

Read it beside ``numpy_forward.py``: the same steps, names and order.

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
not reachable to re-check them while this was written): (3) gathering, (4)
distribution, (5) the block :math:`Z = [\phi(X) \mathrm{softmax}(\theta(X))^\top]
\mathrm{softmax}(\rho(X))`, (6) the other association through an hw x hw matrix.

Defaults: m = n = ``max(1, channels // reduction)`` with ``reduction=4``. The paper fixes
neither (its ImageNet network's widths are not published; see
:mod:`refimpl.double_attention.networks` for the A^2-ResNet-50 we build, which uses
``reduction=2`` in five blocks). All four convolutions have biases by default (``bias``).
``output_conv=False`` and ``residual=False`` give the bare operator Z of Eq. (5).

Deviations, none in the maths; the widely copied code differs from the paper in three
ways that :mod:`refimpl.double_attention.popular` transcribes and the tutorial measures:

- the most copied module (External-Attention-pytorch's ``DoubleAttention``) calls
  ``F.softmax`` without ``dim`` on (N, n, hw) tensors, which picks dim 0: both softmaxes
  run over the *batch*, so an image's output depends on the other images of its batch
  (with one image, every weight is exactly 1); it also has no residual;
- a widely shared blog version takes the softmax of V over positions instead of over
  the n descriptors, so z_i is no longer a convex combination of descriptors;
- the same version averages over positions where the paper sums (its G is ours / hw),
  and forms an (N, n, m, hw) product to do it.

Speed: the matrix products are associated in whichever order costs fewer
multiply-adds at the input's size (:meth:`DoubleAttention.reassociate`), each order
exact in real arithmetic. Because each row of softmax(B) sums to 1,
:math:`G = A\,\mathrm{softmax}(B)^\top = W_\phi\,(X \mathrm{softmax}(B)^\top) + b_\phi
\mathbf{1}^\top`: X can be pooled into c x n first so that A (m x hw) is never formed.
Because each column of softmax(V) sums to 1, :math:`W_e Z + b_e = (W_e G + b_e
\mathbf{1}^\top)\,\mathrm{softmax}(V)`: the output convolution can act on G's n columns
so that Z (m x hw) is never formed either, and the residual is added inside that last
batched product (``baddbmm``). For m = n this re-association is cheaper exactly when
hw > c (large maps, early stages): measured on one CPU thread against a straightforward
eager block (``popular.EagerDoubleAttention``), 0.62x the time forward and forward +
backward at (32, 64, 56, 56), 0.83x / 0.89x at (8, 256, 28, 28), and 2 (N, m, hw)
tensors fewer saved for backward. On small maps with many channels (7 x 7 with 512) the
paper's order is cheaper, the module uses it there, and it is then the same arithmetic
as the straightforward block: the same time within measurement noise (0.99x-1.02x) and
the same saved bytes. In that order the 1x1 convolutions run as ``F.conv2d`` (faster
backward there); in the re-associated order as batched products on the flattened map
(faster there, and they read a channels-last input without a copy). Computing theta and
rho (and phi) as one product with their weights concatenated at each call was measured
and does not pay: no faster, and the concatenated copy is saved for backward (0.75 MiB
at c = 512, more than the activations at (2, 512, 7, 7)). Nothing of size
(N, m, n, hw) or (N, hw, hw) is ever formed; channels-last input gives channels-last
output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import hidden_width
from refimpl._torch_checks import check_torch_input, conv2d

DEFAULT_REDUCTION = 4


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether x is laid out (N, H, W, C) in memory and not also plainly contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _flatten_positions(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, c, H, W) -> (N, c, hw), a view in either memory format (row-major positions)."""
    n, c, h, w = x.shape
    if channels_last:
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c).mT  # strides (hwc, 1, c)
    return x.reshape(n, c, h * w)


def _product(
    a: torch.Tensor, b: torch.Tensor, add: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """Batched ``a @ b`` (+ ``add``), (N, p, r); ``transposed`` computes it as
    ``(b^T a^T)^T`` so that the result is (N, r, p) in memory (position-major)."""
    if transposed:
        out_t = torch.bmm(b.mT, a.mT) if add is None else torch.baddbmm(add.mT, b.mT, a.mT)
        return out_t.mT
    return torch.bmm(a, b) if add is None else torch.baddbmm(add, a, b)


def _conv1x1(conv: nn.Conv2d, X: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on the flattened map: W X + b, (N, c, hw) -> (N, k, hw)."""
    # X.shape[0], not len(X): len() is a Python int, which fixes N in an exported graph.
    weight = conv.weight[:, :, 0, 0].expand(X.shape[0], -1, -1)  # (N, k, c), a view
    if conv.bias is None:
        return torch.bmm(weight, X)
    return torch.baddbmm(conv.bias[:, None], weight, X)


class DoubleAttention(nn.Module):
    r"""The double attention block: :math:`X + W_e\,[\phi(X) \mathrm{softmax}(\theta(X))^\top]
    \mathrm{softmax}(\rho(X))`.

    Args:
        channels: c, the channel count of the input.
        m: width of A = phi(X), the channels of each global descriptor; default
            ``max(1, channels // reduction)``.
        n: number of global descriptors, the rows of B = theta(X) and V = rho(X);
            default ``max(1, channels // reduction)``.
        reduction: c / m and c / n when ``m`` or ``n`` is not given.
        bias: biases in the 1x1 convolutions (phi, theta, rho, expand).
        output_conv: the 1x1 convolution ``expand`` from m back to c channels.
        residual: add X to the result. Without ``output_conv`` this needs m == c.
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, c, H, W), any N, H, W >= 1, any floating dtype and device.
        Output (N, c, H, W) (or (N, m, H, W) without ``output_conv``), same dtype, device
        and memory format.
    """

    def __init__(
        self,
        channels: int,
        m: int | None = None,
        n: int | None = None,
        *,
        reduction: int = DEFAULT_REDUCTION,
        bias: bool = True,
        output_conv: bool = True,
        residual: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        who = "DoubleAttention"
        m = hidden_width(channels, reduction, m, who, "m")
        n = hidden_width(channels, reduction, n, who, "n")
        if residual and not output_conv and m != channels:
            raise ValueError(
                f"{who}: residual=True without output_conv adds Z (m channels) to X "
                f"({channels} channels), so it needs m == channels, got m={m}"
            )
        self.channels, self.m, self.n = channels, m, n
        self.residual = residual
        self.phi = nn.Conv2d(channels, m, 1, bias=bias, **fk)  # A = phi(X)
        self.theta = nn.Conv2d(channels, n, 1, bias=bias, **fk)  # B = theta(X)
        self.rho = nn.Conv2d(channels, n, 1, bias=bias, **fk)  # V = rho(X)
        self.expand = nn.Conv2d(m, channels, 1, bias=bias, **fk) if output_conv else None

    def reset_parameters(self) -> None:
        """Re-initialise every convolution as ``nn.Conv2d`` does."""
        for conv in (self.phi, self.theta, self.rho, self.expand):
            if conv is not None:
                conv.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, m={self.m}, n={self.n}, "
            f"bias={self.phi.bias is not None}, output_conv={self.expand is not None}, "
            f"residual={self.residual}"
        )

    def reassociate(self, hw: int) -> bool:
        r"""Whether the re-associated products are cheaper than the paper's order at hw.

        Gathering: :math:`W_\phi (X \bar{B}^\top)` costs n c hw + m c n multiply-adds,
        :math:`(W_\phi X) \bar{B}^\top` costs m c hw + m n hw. Distribution with the
        output convolution: :math:`(W_e G) \bar{V}` costs c m n + c n hw,
        :math:`W_e (G \bar{V})` costs m n hw + c m hw. For m = n both come down to
        hw > c: the re-association pays on large maps (early stages) and the paper's
        order on small ones (a 7 x 7 map with 512 channels). One decision for both steps.
        """
        c, m, n = self.channels, self.m, self.n
        paper, ours = m * c * hw + m * n * hw, n * c * hw + m * c * n  # gathering
        if self.expand is not None:  # distribution, with the output convolution
            paper, ours = paper + m * n * hw + c * m * hw, ours + c * m * n + c * n * hw
        return ours < paper

    def feature_gathering(
        self, X: torch.Tensor, B_bar: torch.Tensor, A: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""Eq. (3): :math:`G = A\,\mathrm{softmax}(B)^\top`, A = phi(X).

        Without ``A`` computed as :math:`W_\phi (X \mathrm{softmax}(B)^\top) + b_\phi`
        (the rows of softmax(B) sum to 1), so A is never formed.

        Shape: X (N, c, hw), softmax(B) (N, n, hw), A (N, m, hw) -> G (N, m, n).
        """
        if A is not None:
            return torch.bmm(A, B_bar.mT)  # (N, m, n)
        pooled_t = torch.bmm(B_bar, X.mT)  # (X softmax(B)^T)^T, (N, n, c)
        return F.linear(pooled_t, self.phi.weight[:, :, 0, 0], self.phi.bias).mT  # (N, m, n)

    def feature_distribution(
        self,
        G: torch.Tensor,
        V_bar: torch.Tensor,
        X: torch.Tensor | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        r"""Eq. (4): :math:`Z = G\,\mathrm{softmax}(V)`, i.e. :math:`z_i = G v_i` (+ X if given).

        ``X``, when given, is added inside the same batched product. ``channels_last``
        writes the result position-major, (N, hw, m) in memory, like such an input.

        Shape: G (N, m, n), softmax(V) (N, n, hw), X (N, m, hw) -> (N, m, hw).
        """
        return _product(G, V_bar, X, channels_last)

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gather, distribute, project, add; with ``return_maps`` also
        ``{"softmax_B": (N, n, H, W), "softmax_V": (N, n, H, W), "G": (N, m, n)}``."""
        check_torch_input(x, self.channels, "DoubleAttention", "x", self)
        N, _, H, W = x.shape
        channels_last = _is_channels_last(x)
        X = _flatten_positions(x, channels_last)  # (N, c, hw), a view
        order = self._reassociated if self.reassociate(H * W) else self._paper_order
        out, B_bar, V_bar, G = order(x, X, channels_last)  # out in x's memory format
        if not return_maps:
            return out
        maps = {"softmax_B": B_bar.unflatten(2, (H, W)), "softmax_V": V_bar.unflatten(2, (H, W))}
        return out, {**maps, "G": G}

    def _paper_order(self, x: torch.Tensor, X: torch.Tensor, channels_last: bool) -> tuple:
        """Eqs. (3)-(5) as written: A, G = A softmax(B)^T, Z = G softmax(V), expand, + X."""
        size = x.shape[2:]
        A, B, V = (
            _flatten_positions(conv2d(x, conv.weight, conv.bias), channels_last)
            for conv in (self.phi, self.theta, self.rho)
        )  # (N, m, hw), (N, n, hw), (N, n, hw)
        B_bar = B.softmax(2)  # Eq. (3): each map over the hw positions
        V_bar = V.softmax(1)  # Eq. (4): each vector over the n descriptors
        G = self.feature_gathering(X, B_bar, A)  # Eq. (3), (N, m, n)
        if self.expand is None:  # the bare operator Z (+ X when m == c)
            out = self.feature_distribution(G, V_bar, X if self.residual else None, channels_last)
            return out.unflatten(2, size), B_bar, V_bar, G
        Z = self.feature_distribution(G, V_bar, None, channels_last).unflatten(2, size)  # Eq. (5)
        out = conv2d(Z, self.expand.weight, self.expand.bias)  # (N, c, H, W)
        return (x + out if self.residual else out), B_bar, V_bar, G

    def _reassociated(self, x: torch.Tensor, X: torch.Tensor, channels_last: bool) -> tuple:
        """The same function with phi and ``expand`` moved onto the small matrices."""
        B_bar = _conv1x1(self.theta, X).softmax(2)  # Eq. (3): each map over the positions
        V_bar = _conv1x1(self.rho, X).softmax(1)  # Eq. (4): each vector over the descriptors
        G = self.feature_gathering(X, B_bar)  # Eq. (3) without A, (N, m, n)
        H = G  # W_e G + b_e: the output convolution applied to G's n columns, (N, c, n)
        if self.expand is not None:
            H = F.linear(G.mT, self.expand.weight[:, :, 0, 0], self.expand.bias).mT
        # Eq. (4) with H for G: H softmax(V) = W_e Z + b_e (columns of softmax(V) sum to 1)
        out = self.feature_distribution(H, V_bar, X if self.residual else None, channels_last)
        return out.unflatten(2, x.shape[2:]), B_bar, V_bar, G
