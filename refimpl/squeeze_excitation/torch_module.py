r"""Squeeze-and-Excitation as a PyTorch module (Hu et al., CVPR 2018).

Read it beside ``numpy_forward.py``: the same steps, names and order.

Glossary (the paper's symbols, Section 3):
    u   the block's input feature map U, here ``x``          (N, C, H, W)
    z   channel descriptor, Eq. (2): squeeze of u             (N, C)
    s   channel weights, Eq. (3): excitation of z             (N, C)
    W1  ``reduce.weight``, dimensionality reduction            (C/r, C)
    W2  ``expand.weight``, dimensionality increase             (C, C/r)
    x~  the output, Eq. (4): each channel u_c scaled by s_c    (N, C, H, W)

Deviations: the paper's ResNet ablation (Table 10) trains the two fully connected
layers without biases; the released models have them. ``bias=True`` (default) follows
the released models, ``bias=False`` the ablation. The hidden width is exactly
``channels // reduction`` (at least 1): unlike timm's ``SEModule`` it is never rounded
to a multiple of 8, so the parameter counts of the paper's tables come out.

Speed: the layers are ``nn.Linear`` on the (N, C) descriptor, not 1x1 convolutions on
an (N, C, 1, 1) map: the same arithmetic with less per-operation overhead, which is
most of the cost at small spatial sizes (see benchmarks/RESULTS.md). The squeeze reads
the input once and the scale once more; nothing of the input's size is saved for
backward except the input itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import check_choice, hidden_width
from refimpl._torch_checks import check_torch_input

POOLINGS = ("avg", "max")
GATES = ("sigmoid", "tanh", "relu")


class SqueezeExcitation(nn.Module):
    r"""The SE block: :math:`\tilde{x}_c = s_c u_c` with :math:`s = \sigma(W_2 \delta(W_1 z))`.

    Args:
        channels: C, the channel count of the input.
        reduction: r, the reduction ratio; the hidden width is ``max(1, channels // r)``.
        hidden_channels: the hidden width C/r given directly; overrides ``reduction``.
        bias: biases in both fully connected layers (released models: yes; Table 10: no).
        pooling: the squeeze, ``"avg"`` (Eq. (2)) or ``"max"`` (ablation, Table 11).
        gate: :math:`\sigma`, ``"sigmoid"`` (paper), ``"tanh"`` or ``"relu"`` (Table 12).
        device, dtype: where and of which dtype the parameters (and buffers) are created,
            as in ``torch.nn`` layers.

    Shape:
        Input (N, C, H, W), any N, H, W >= 1, any floating dtype and device.
        Output (N, C, H, W), same dtype, device and memory format.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        hidden_channels: int | None = None,
        bias: bool = True,
        pooling: str = "avg",
        gate: str = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        hidden_channels = hidden_width(channels, reduction, hidden_channels, "SqueezeExcitation")
        check_choice(pooling, POOLINGS, "SqueezeExcitation", "pooling")
        check_choice(gate, GATES, "SqueezeExcitation", "gate")
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.pooling = pooling
        self.gate = gate
        self.reduce = nn.Linear(channels, hidden_channels, bias=bias, **fk)  # W1
        self.expand = nn.Linear(hidden_channels, channels, bias=bias, **fk)  # W2

    def reset_parameters(self) -> None:
        """Re-initialise both layers as ``nn.Linear`` does."""
        self.reduce.reset_parameters()
        self.expand.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"bias={self.reduce.bias is not None}, pooling={self.pooling!r}, gate={self.gate!r}"
        )

    def squeeze(self, u: torch.Tensor) -> torch.Tensor:
        r"""Eq. (2): :math:`z_c = \frac{1}{H W} \sum_{i, j} u_c(i, j)` (or the max). (N, C)."""
        if self.pooling == "max":
            return u.amax((2, 3))
        if u.dtype in (torch.float32, torch.float64):
            # The same numbers as u.mean((2, 3)) (a sum, then one division), but the
            # backward of a sum is a broadcast view, where mean's backward divides a
            # full-size tensor: forward+backward 5-32% faster (benchmarks/RESULTS.md).
            # Half precision keeps mean: a float16 sum of 56 x 56 values can overflow.
            return u.sum((2, 3)) / (u.shape[2] * u.shape[3])
        return u.mean((2, 3))

    def excitation(self, z: torch.Tensor) -> torch.Tensor:
        r"""Eq. (3): :math:`s = \sigma(W_2\, \delta(W_1 z))`. (N, C) -> (N, C)."""
        # F.linear on the submodules' parameters: the same maths as calling them, without
        # the per-call module overhead that dominates at small shapes.
        hidden = F.relu(F.linear(z, self.reduce.weight, self.reduce.bias))  # (N, C/r)
        logits = F.linear(hidden, self.expand.weight, self.expand.bias)  # (N, C)
        if self.gate == "sigmoid":
            return torch.sigmoid(logits)
        if self.gate == "tanh":
            return torch.tanh(logits)
        return F.relu(logits)

    def scale(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        r"""Eq. (4): :math:`\tilde{x}_c = s_c u_c`; s broadcast over positions."""
        return u * s[:, :, None, None]  # (N, C, 1, 1) view, no copy

    def forward(
        self, x: torch.Tensor, return_maps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Squeeze, excite, scale; with ``return_maps`` also ``{"z": z, "s": s}``."""
        check_torch_input(x, self.channels, "SqueezeExcitation", "x", self)
        z = self.squeeze(x)  # Eq. (2), (N, C)
        s = self.excitation(z)  # Eq. (3), (N, C)
        out = self.scale(x, s)  # Eq. (4), (N, C, H, W)
        return (out, {"z": z, "s": s}) if return_maps else out
