r"""Transcriptions of the popular and official forms of MS-CAM, AFF and iAFF.

Written here for measurement and comparison (the benchmark's peers, the tutorial's
paper-versus-popular numbers, the converter's tests); not for use in models: use
:class:`~refimpl.feature_fusion.MSCAM`, :class:`~refimpl.feature_fusion.AFF` and
:class:`~refimpl.feature_fusion.IAFF`. They follow the widely copied PyTorch code (open-aff's
``aff_pytorch/aff_net/fusion.py``, reproduced in seeds/003) operation by operation and
layer by layer, so their ``state_dict`` has the official keys (``local_att.0.weight``,
``global_att.1.weight``, ...; see :mod:`refimpl.feature_fusion.convert`): every branch is
an ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d``, in-place ``ReLU``, ``Conv2d``,
``BatchNorm2d`` (the global one behind an ``AdaptiveAvgPool2d(1)``), evaluated eagerly
module by module, and the fusion is written out as ``x * w + residual * (1 - w)``.

Their behaviour is kept on purpose, bugs included:

- :class:`PopularIAFF` computes the second stage's global context with the first stage's
  branch ``global_att``; its ``global_att2`` is created, counted in the parameters and
  never used (the paper and the official MXNet code use it).
- :class:`PopularAFF` with ``factor_two=True`` returns ``2 * x * w + 2 * residual * (1 - w)``
  as the paper-era official code (MXNet ``ASKCFuse``, open-aff's PyTorch ``AFF``); the
  seeds/003 copy has no factor (``factor_two=False``, the default here).
- The hidden width is ``int(channels // r)``, 0 (a crash) for C < r; give ``hidden`` to
  choose it directly.
- The first argument is called ``x`` and the second ``residual``, but the official
  networks pass the residual branch first: ``fuse_mode(out, identity)``.
"""

from __future__ import annotations

import torch
from torch import nn

from refimpl.feature_fusion.convert import to_official_state_dict


def _local_att(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(channels),
    )


def _global_att(channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), *_local_att(channels, hidden))


def _hidden(channels: int, r: int, hidden: int | None) -> int:
    return int(channels // r) if hidden is None else hidden


class PopularMSCAM(nn.Module):
    """The popular ``MS_CAM``: ``x * sigmoid(local_att(x) + global_att(x))``.

    Args:
        channels: C.
        r: reduction ratio (4 as in the popular code).
        hidden: the hidden width given directly (overrides ``r``).
    """

    def __init__(self, channels: int = 64, r: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        hidden = _hidden(channels, r, hidden)
        self.local_att = _local_att(channels, hidden)
        self.global_att = _global_att(channels, hidden)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = self.local_att(x)
        xg = self.global_att(x)
        xlg = xl + xg
        wei = self.sigmoid(xlg)
        return x * wei


class PopularAFF(nn.Module):
    """The popular ``AFF``: ``x * w + residual * (1 - w)`` with ``w`` from ``x + residual``.

    Args:
        channels: C.
        r: reduction ratio (4 as in the popular code).
        hidden: the hidden width given directly (overrides ``r``).
        factor_two: the official code's ``2 * x * w + 2 * residual * (1 - w)``.
    """

    def __init__(
        self, channels: int = 64, r: int = 4, hidden: int | None = None, factor_two: bool = False
    ) -> None:
        super().__init__()
        hidden = _hidden(channels, r, hidden)
        self.local_att = _local_att(channels, hidden)
        self.global_att = _global_att(channels, hidden)
        self.sigmoid = nn.Sigmoid()
        self.factor_two = factor_two

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xa = x + residual
        xl = self.local_att(xa)
        xg = self.global_att(xa)
        xlg = xl + xg
        wei = self.sigmoid(xlg)
        if self.factor_two:
            return 2 * x * wei + 2 * residual * (1 - wei)
        return x * wei + residual * (1 - wei)


class PopularIAFF(nn.Module):
    """The popular ``iAFF``, whose second stage reuses ``global_att`` (``global_att2`` unused).

    Args:
        channels: C.
        r: reduction ratio (4 as in the popular code).
        hidden: the hidden width given directly (overrides ``r``).
    """

    def __init__(self, channels: int = 64, r: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        hidden = _hidden(channels, r, hidden)
        self.local_att = _local_att(channels, hidden)
        self.global_att = _global_att(channels, hidden)
        self.local_att2 = _local_att(channels, hidden)
        self.global_att2 = _global_att(channels, hidden)  # created, never used
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xa = x + residual
        xl = self.local_att(xa)
        xg = self.global_att(xa)
        xlg = xl + xg
        wei = self.sigmoid(xlg)
        xi = x * wei + residual * (1 - wei)

        xl2 = self.local_att2(xi)
        xg2 = self.global_att(xi)  # the first stage's branch, as in the popular code
        xlg2 = xl2 + xg2
        wei2 = self.sigmoid(xlg2)
        return x * wei2 + residual * (1 - wei2)


# ---------------------------------------------------------------------------------------
# Builders and loaders for the benchmark (refimpl.bench.peers)


def build_popular_mscam(channels: int, hidden: int) -> nn.Module:
    """:class:`PopularMSCAM` of ``channels`` with the hidden width ``hidden``."""
    return PopularMSCAM(channels, hidden=hidden)


def build_popular_aff(channels: int, hidden: int) -> nn.Module:
    """:class:`PopularAFF` (seeds/003, no factor 2) with the hidden width ``hidden``."""
    return PopularAFF(channels, hidden=hidden)


def build_popular_iaff(channels: int, hidden: int) -> nn.Module:
    """:class:`PopularIAFF` (shared global branch) with the hidden width ``hidden``."""
    return PopularIAFF(channels, hidden=hidden)


def load_from_ours(popular: nn.Module, ours: nn.Module) -> None:
    """Copy our module's weights and statistics into its popular transcription, in place.

    For :class:`PopularIAFF` from ``IAFF(share_global=True)``, the unused ``global_att2``
    keeps its own weights (they do not enter the output).
    """
    state = to_official_state_dict(ours.state_dict())
    missing, unexpected = popular.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("global_att2.") for k in missing):
        raise KeyError(f"weights do not match: missing {missing}, unexpected {unexpected}")
