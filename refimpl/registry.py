"""The registry of papers and their components.

Every paper package (``refimpl/<slug>/``) declares one :class:`Paper` and its
:class:`Component` s in its ``registry.py``; this module collects them in the order of
``PAPER_PACKAGES``. The command line (``python -m refimpl list`` and ``check``), the
benchmark and the tests iterate over the registry, so a new paper is covered by all of
them as soon as it is registered here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

#: Paper packages, in the order of the tutorials. Add a slug here to register a paper.
PAPER_PACKAGES: tuple[str, ...] = (
    "residual_attention",
    "squeeze_excitation",
    "cbam",
    "bam",
    "double_attention",
    "feature_fusion",
)

#: PyTorch against the NumPy float64 oracle, (rtol, atol). float64: both sides compute the
#: same sums in another order, a few ulps of O(1) values. float32: 2^-24 relative rounding
#: accumulated over reductions of a few thousand terms at most.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-6),
}


@dataclass(frozen=True)
class Example:
    """A small random instance of a component, the same for the same seed.

    Attributes:
        module: the PyTorch module, float64, CPU, eval mode, with random weights and
            (where it has batch norm) random running statistics.
        inputs: the positional inputs of ``module`` (one tensor, or X and Y for fusion).
        options: keyword options of the NumPy forward that are not in the state dict,
            named as the module's constructor arguments (``training`` excluded).
    """

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Invariant:
    """The outcome of one property check on an example: a name, a verdict, a number."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Component:
    """One building block of a paper, with its two implementations.

    Attributes:
        name: registry key, the snake_case of the class (``"squeeze_excitation"``).
        paper: slug of the paper package it belongs to.
        module: the PyTorch class; if ``attention`` is true, ``module(channels, **options)``
            builds a drop-in (N, C, H, W) -> (N, C, H, W) module.
        numpy_forward: the NumPy function, ``f(*inputs, params, training=..., **options)``.
        make_example: ``seed -> Example``; varied options and shapes per seed.
        invariants: ``(example, output) -> [Invariant]``, the paper's properties checked
            on one forward pass by ``python -m refimpl check``.
        attention: whether :func:`create` can build it from a channel count.
        aliases: other names :func:`create` accepts (``"se"``).
        n_inputs: 1, or 2 for the fusion modules that take (X, Y).
        tolerances: ``{"float64": (rtol, atol), "float32": (rtol, atol)}`` for PyTorch
            against the NumPy float64 oracle: ``|torch - numpy| <= atol + rtol |numpy|``.
            Deep components may loosen float32, saying why where they register.
    """

    name: str
    paper: str
    module: type[nn.Module]
    numpy_forward: Callable[..., Any]
    make_example: Callable[[int], Example]
    invariants: Callable[[Example, torch.Tensor], list[Invariant]] = lambda ex, out: []
    attention: bool = True
    aliases: tuple[str, ...] = ()
    n_inputs: int = 1
    tolerances: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_TOLERANCES)
    )


@dataclass(frozen=True)
class Paper:
    """A paper: bibliographic facts, its tutorial, its components."""

    slug: str
    title: str
    authors: str
    venue: str
    year: int
    arxiv: str
    tutorial: str
    components: tuple[Component, ...]


def papers() -> dict[str, Paper]:
    """All registered papers, by slug, in tutorial order."""
    out = {}
    for slug in PAPER_PACKAGES:
        paper = importlib.import_module(f"refimpl.{slug}.registry").PAPER
        out[paper.slug] = paper
    return out


def components() -> dict[str, Component]:
    """All registered components, by name, in tutorial order."""
    return {c.name: c for p in papers().values() for c in p.components}


def get(name: str) -> Component:
    """The component called ``name`` (or one of its aliases)."""
    comps = components()
    for c in comps.values():
        if name == c.name or name in c.aliases:
            return c
    known = sorted([*comps, *(a for c in comps.values() for a in c.aliases)])
    raise KeyError(f"unknown component {name!r}; registered: {', '.join(known)}")


def create(name: str, channels: int, **options: Any) -> nn.Module:
    """Build an attention module by name, like timm's ``create_attn``.

    ``create("se", 256)`` is ``SqueezeExcitation(256)``; options go to the constructor.
    A network can take any of refimpl's attention modules as a string this way.

    Raises:
        KeyError: no component of that name.
        ValueError: the component is not a drop-in attention module (e.g. a fusion
            module taking two inputs).
    """
    comp = get(name)
    if not comp.attention:
        raise ValueError(
            f"{comp.name!r} is not a drop-in attention module of one input; build "
            f"{comp.module.__name__} directly"
        )
    return comp.module(channels, **options)


# ---------------------------------------------------------------------------------------
# Helpers for the examples of every paper


def randomize_(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Fill every parameter and batch-norm running statistic of ``module`` from ``seed``.

    Weights ~ N(0, scale^2 / fan_in) so activations stay O(1) at any width; biases and
    batch-norm affine ~ N(0, scale^2) (BN weight around 1); running means ~ N(0, 0.25)
    and running variances ~ U(0.5, 2), so eval-mode batch norm is never the identity.
    Deterministic across platforms (a CPU ``torch.Generator``), in place; returns module.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            r = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale / fan_in**0.5
            if p.dim() == 1 and name.endswith("weight"):  # a norm's affine scale
                r = 1.0 + r
            p.copy_(r)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g, dtype=torch.float64))
    return module


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float64 CPU tensor of standard normal entries from ``seed`` (NumPy's generator)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def state_dict_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as float64 NumPy arrays: the ``params`` of a NumPy forward."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        out[k] = v.numpy() if not v.is_floating_point() else v.to(torch.float64).numpy()
    return out
