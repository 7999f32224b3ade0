"""The SE paper in the registry: its facts, its one component, a random example, invariants."""

from __future__ import annotations

import numpy as np
import torch

from refimpl.registry import Component, Example, Invariant, Paper, random_input, randomize_
from refimpl.squeeze_excitation.numpy_forward import squeeze_excitation
from refimpl.squeeze_excitation.torch_module import GATES, POOLINGS, SqueezeExcitation


def make_example(seed: int) -> Example:
    """An SE block with options, widths and input shape all drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 49))
    options = {"pooling": str(rng.choice(POOLINGS)), "gate": str(rng.choice(GATES))}
    module = SqueezeExcitation(
        channels,
        reduction=int(rng.choice([1, 2, 4, 8, 16])),
        bias=bool(rng.integers(2)),
        **options,
    )
    randomize_(module.double(), seed).eval()
    shape = (int(rng.integers(1, 4)), channels, int(rng.integers(1, 10)), int(rng.integers(1, 10)))
    return Example(module, (random_input(shape, seed + 1),), options)


def invariants(example: Example, out: torch.Tensor) -> list[Invariant]:
    """The SE block's properties, checked on one example."""
    module, (x,) = example.module, example.inputs
    _, maps = module(x, return_maps=True)
    s = maps["s"]
    found = []
    if module.gate == "sigmoid":
        inside = bool(((s > 0) & (s < 1)).all())
        found.append(Invariant("gate s in (0, 1)", inside, f"s in [{s.min():.3g}, {s.max():.3g}]"))
        shrink = bool((out.abs() <= x.abs()).all() and (out * x >= 0).all())
        found.append(Invariant("abs(out) <= abs(x), same sign", shrink, ""))
    # out is s_c * x_c: where x is nonzero, out / x gives back s at every position.
    ratio = torch.where(x != 0, out / x, s[:, :, None, None])
    err = (ratio - s[:, :, None, None]).abs().max().item()
    found.append(Invariant("out / x = s_c at every position", err <= 1e-12, f"max err {err:.2e}"))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[2] * x.shape[3]))
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    out_perm = out.flatten(2)[:, :, perm].reshape(x.shape)
    err = (module(x_perm) - out_perm).abs().max().item()
    found.append(Invariant("commutes with position permutations", err <= 1e-12, f"{err:.2e}"))
    err = max((module(x[i : i + 1]) - out[i : i + 1]).abs().max().item() for i in range(len(x)))
    found.append(Invariant("batch items independent", err <= 1e-12, f"{err:.2e}"))
    return found


PAPER = Paper(
    slug="squeeze_excitation",
    title="Squeeze-and-Excitation Networks",
    authors="Jie Hu, Li Shen, Samuel Albanie, Gang Sun, Enhua Wu",
    venue="CVPR",
    year=2018,
    arxiv="1709.01507",
    tutorial="tutorials/02_squeeze_excitation.ipynb",
    components=(
        Component(
            name="squeeze_excitation",
            paper="squeeze_excitation",
            module=SqueezeExcitation,
            numpy_forward=squeeze_excitation,
            make_example=make_example,
            invariants=invariants,
            aliases=("se",),
        ),
    ),
)
