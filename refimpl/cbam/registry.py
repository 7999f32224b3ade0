"""The CBAM paper in the registry: its facts, its three components, examples, invariants."""

from __future__ import annotations

import numpy as np
import torch

from refimpl.cbam.numpy_forward import cbam, channel_attention, spatial_attention
from refimpl.cbam.torch_module import ARRANGEMENTS, CBAM, ChannelAttention, SpatialAttention
from refimpl.registry import Component, Example, Invariant, Paper, random_input, randomize_

CHANNEL_POOLINGS = (("avg", "max"), ("avg",), ("max",))
SPATIAL_POOLINGS = (("avg", "max"), ("max", "avg"), ("avg",), ("max",))


def _shape(rng: np.random.Generator, channels: int, bn: bool) -> tuple[int, int, int, int]:
    """(N, C, H, W) with H, W from 1 to 9 (below and above the kernel). With batch norm
    the pooled map must have more than one value per batch for training mode, and a few
    more keep its batch variance away from 0 (where float32 rounding would be amplified)."""
    while True:
        shape = (
            int(rng.integers(1, 4)),
            channels,
            int(rng.integers(1, 10)),
            int(rng.integers(1, 10)),
        )
        if not bn or shape[0] * shape[2] * shape[3] >= 6:
            return shape


def make_channel_example(seed: int) -> Example:
    """A channel gate with options, widths and input shape drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 49))
    options = {"pooling": CHANNEL_POOLINGS[int(rng.integers(len(CHANNEL_POOLINGS)))]}
    module = ChannelAttention(
        channels,
        reduction=int(rng.choice([1, 2, 4, 8, 16])),
        variant=str(rng.choice(["paper", "official"])),
        **options,
    )
    randomize_(module.double(), seed).eval()
    return Example(module, (random_input(_shape(rng, channels, False), seed + 1),), options)


def make_spatial_example(seed: int) -> Example:
    """A spatial gate with options, kernel and input shape drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 49))
    options = {"pooling": SPATIAL_POOLINGS[int(rng.integers(len(SPATIAL_POOLINGS)))]}
    bn = bool(rng.integers(2))
    module = SpatialAttention(
        channels,
        kernel_size=int(rng.choice([1, 3, 5, 7])),
        bias=bool(rng.integers(2)),
        bn=bn,
        **options,
    )
    randomize_(module.double(), seed).eval()
    return Example(module, (random_input(_shape(rng, channels, bn), seed + 1),), options)


def make_example(seed: int) -> Example:
    """A CBAM with every option, widths and input shape drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 49))
    variant = str(rng.choice(["paper", "official"]))
    options = {
        "pooling": CHANNEL_POOLINGS[int(rng.integers(len(CHANNEL_POOLINGS)))],
        "spatial_pooling": SPATIAL_POOLINGS[int(rng.integers(len(SPATIAL_POOLINGS)))],
        "arrangement": str(rng.choice(ARRANGEMENTS)),
        "variant": variant,
    }
    module = CBAM(
        channels,
        reduction=int(rng.choice([1, 2, 4, 8, 16])),
        kernel_size=int(rng.choice([3, 5, 7])),
        spatial_bias=bool(rng.integers(2)),
        **options,
    )
    randomize_(module.double(), seed).eval()
    bn = module.spatial.bn is not None
    return Example(module, (random_input(_shape(rng, channels, bn), seed + 1),), options)


# ---------------------------------------------------------------------------------------
# Invariants


def _inside_unit(name: str, m: torch.Tensor) -> Invariant:
    ok = bool(((m > 0) & (m < 1)).all())
    return Invariant(f"{name} in (0, 1)", ok, f"{name} in [{m.min():.3g}, {m.max():.3g}]")


def _shrinks(x: torch.Tensor, out: torch.Tensor) -> Invariant:
    ok = bool((out.abs() <= x.abs()).all() and (out * x >= 0).all())
    return Invariant("abs(out) <= abs(x), same sign", ok, "")


def _permute_positions(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return t.flatten(2)[:, :, perm].reshape(t.shape)


def _batch_independent(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> Invariant:
    err = max((module(x[i : i + 1]) - out[i : i + 1]).abs().max().item() for i in range(len(x)))
    return Invariant("batch items independent (eval)", err <= 1e-12, f"{err:.2e}")


def _product(x: torch.Tensor, out: torch.Tensor, maps: dict[str, torch.Tensor]) -> Invariant:
    expected = x
    for m in maps.values():
        expected = expected * m
    err = (out - expected).abs().max().item()
    return Invariant("out = x * maps", err <= 1e-12, f"max err {err:.2e}")


def channel_invariants(example: Example, out: torch.Tensor) -> list[Invariant]:
    """M_c in (0, 1); unchanged by permuting positions, so the output commutes with it."""
    module, (x,) = example.module, example.inputs
    _, maps = module(x, return_maps=True)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[2] * x.shape[3]))
    _, maps_perm = module(_permute_positions(x, perm), return_maps=True)
    err = (maps_perm["M_c"] - maps["M_c"]).abs().max().item()
    return [
        _inside_unit("M_c", maps["M_c"]),
        _shrinks(x, out),
        _product(x, out, maps),
        Invariant("M_c unchanged by permuting positions", err <= 1e-12, f"{err:.2e}"),
        _batch_independent(module, x, out),
    ]


def spatial_invariants(example: Example, out: torch.Tensor) -> list[Invariant]:
    """M_s in (0, 1); unchanged by permuting the channels of the input."""
    module, (x,) = example.module, example.inputs
    _, maps = module(x, return_maps=True)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[1]))
    _, maps_perm = module(x[:, perm], return_maps=True)
    err = (maps_perm["M_s"] - maps["M_s"]).abs().max().item()
    return [
        _inside_unit("M_s", maps["M_s"]),
        _shrinks(x, out),
        _product(x, out, maps),
        Invariant("M_s unchanged by permuting channels", err <= 1e-12, f"{err:.2e}"),
        _batch_independent(module, x, out),
    ]


def invariants(example: Example, out: torch.Tensor) -> list[Invariant]:
    """Both maps in (0, 1), the output their product with x, shrinking; M_c of F does not
    see the order of positions (channel-spatial and parallel arrangements)."""
    module, (x,) = example.module, example.inputs
    _, maps = module(x, return_maps=True)
    found = [
        _inside_unit("M_c", maps["M_c"]),
        _inside_unit("M_s", maps["M_s"]),
        _shrinks(x, out),
        _product(x, out, maps),
        _batch_independent(module, x, out),
    ]
    if module.arrangement != "spatial-channel":
        perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[2] * x.shape[3]))
        _, maps_perm = module(_permute_positions(x, perm), return_maps=True)
        err = (maps_perm["M_c"] - maps["M_c"]).abs().max().item()
        found.append(Invariant("M_c unchanged by permuting positions", err <= 1e-12, f"{err:.2e}"))
    return found


PAPER = Paper(
    slug="cbam",
    title="CBAM: Convolutional Block Attention Module",
    authors="Sanghyun Woo, Jongchan Park, Joon-Young Lee, In So Kweon",
    venue="ECCV",
    year=2018,
    arxiv="1807.06521",
    tutorial="tutorials/03_cbam.ipynb",
    components=(
        Component(
            name="channel_attention",
            paper="cbam",
            module=ChannelAttention,
            numpy_forward=channel_attention,
            make_example=make_channel_example,
            invariants=channel_invariants,
        ),
        Component(
            name="spatial_attention",
            paper="cbam",
            module=SpatialAttention,
            numpy_forward=spatial_attention,
            make_example=make_spatial_example,
            invariants=spatial_invariants,
        ),
        Component(
            name="cbam",
            paper="cbam",
            module=CBAM,
            numpy_forward=cbam,
            make_example=make_example,
            invariants=invariants,
        ),
    ),
)
