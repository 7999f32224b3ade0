"""The registry of papers and their components.

Every paper package (``refimpl/<slug>/``) declares one :class:`Paper` and its
:class:`Component` s in its ``registry.py``; this module collects them in the order of
``PAPER_PACKAGES``. The command line (``python -m refimpl list`` and ``check``), the
benchmark and the tests iterate over the registry, so a new paper is covered by all of
them as soon as it is registered here.
"""

from __future__ import annotations

import importlib
import inspect
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


#: Input shapes tests draw from by default: small (N <= 3, C <= 32, H, W <= 17), odd, even
#: and 1 all included.
DEFAULT_SHAPE_SPACE: dict[str, tuple[int, int]] = {
    "N": (1, 3),
    "C": (1, 32),
    "H": (1, 17),
    "W": (1, 17),
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
        module_options: the constructor options ``module`` was built with (besides the
            channel count): what ``refimpl.testing.check_invariants`` is told the module
            implements (``python -m refimpl check`` passes them).
    """

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    module_options: Mapping[str, Any] = field(default_factory=dict)


class SkipProperty(Exception):
    """Raised by a property's check when the module cannot provide what it needs; the
    message is the reason, shown in the report (a property is never skipped silently)."""


@dataclass(frozen=True)
class Property:
    """An implementation-independent property of a component, checkable on ANY module
    with the component's call signature (``m(x)``, or ``m(x, y)`` for fusion).

    Attributes:
        name: what it states, as a reader would say it ("AFF(X, X) = X").
        check: ``(module, inputs, options) -> (ok, detail)``; ``inputs`` is a tuple of float64
            tensors; ``options`` the refimpl constructor options the module implements; the
            module is float64 and in the mode ``needs`` asks for (eval unless "train" is
            in ``needs``). It may raise :class:`SkipProperty` with a reason.
        needs: what the module must offer: ``"maps"`` (``forward(..., return_maps=True)``
            returning ``(out, maps)``), ``"mask_hook"`` (a ``force_mask`` attribute, as
            refimpl's ``AttentionModule``), ``"train"`` (checked in training mode).
        batch: whether it is the batch-independence property (a batch-coupled variant is
            expected to fail it, and the report names it).
    """

    name: str
    check: Callable[[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]], tuple[bool, str]]
    needs: tuple[str, ...] = ()
    batch: bool = False


@dataclass(frozen=True)
class Variant:
    """A known form of a component that differs from refimpl's default (the paper): an
    entry of the paper's catalogue, searched by ``refimpl.testing.compare`` when a module
    disagrees with the oracle, and shown in the tutorials.

    Attributes:
        name: a short identifier (``"spatial_max_avg"``).
        description: one line saying what differs ("spatial pooling stacked [max, avg]").
        where: where it occurs ("the official CBAM code"; "timm's SEModule").
        options: constructor options of refimpl's module that reproduce it (the oracle's
            key set and NumPy options follow from the module built with them), or a
            callable ``channels -> options`` where they depend on the width.
        numpy_forward: a NumPy forward that replaces the component's, with its signature,
            for a variant that refimpl's module does not offer (a softmax over the batch).
        batch_coupled: the variant mixes the items of a batch.
    """

    name: str
    description: str
    where: str
    options: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] = field(default_factory=dict)
    numpy_forward: Callable[..., Any] | None = None
    batch_coupled: bool = False

    def options_for(self, channels: int) -> dict[str, Any]:
        """The constructor options of this variant at ``channels`` channels."""
        opts = self.options(channels) if callable(self.options) else self.options
        return dict(opts)


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
        attention: whether :func:`create` can build it from a channel count.
        aliases: other names :func:`create` accepts (``"se"``).
        n_inputs: 1, or 2 for the fusion modules that take (X, Y).
        tolerances: ``{"float64": (rtol, atol), "float32": (rtol, atol)}`` for PyTorch
            against the NumPy float64 oracle: ``|torch - numpy| <= atol + rtol |numpy|``.
            Deep components may loosen float32, saying why where they register.
        oracle_options: ``module -> options``: the keyword options of the NumPy forward
            that a built module implies (what its state dict cannot tell). Default
            (None): :func:`oracle_options`, each keyword option of the NumPy forward read
            from the module's attribute of the same name (or a submodule's).
        option_space: the component's constructor options and the values tests draw
            from, declared once: ``{name: (value, ...)}`` (used by ``make_example`` and by
            the Hypothesis strategies).
        properties: the paper's implementation-independent properties, run by
            ``refimpl.testing.check_invariants`` on any module (and by ``python -m
            refimpl check`` on the examples).
        variants: the catalogue of known variants (popular and official forms).
        build_example: ``(options, shape, seed) -> Example``: the module built with
            ``options`` (drawn from ``option_space``) for ``shape[1]`` channels, random
            weights from ``seed``, inputs of ``shape``. ``make_example`` and the
            Hypothesis strategies (tests/strategies.py) both build through it.
        shape_space: inclusive ranges ``{"N": (lo, hi), "C": ..., "H": ..., "W": ...}``
            that tests draw input shapes from.
        valid: ``(options, shape, training) -> bool``: whether the component is defined
            there (batch norm in training needs more than one value per channel, ...);
            the one place such constraints between options and shapes are written.
        saved_bytes_bound: ``shape -> bound``: at most this many times the input's bytes
            saved for backward (parameters excluded) in training mode, for an input of
            ``shape``; ``None`` where nothing is promised.
    """

    name: str
    paper: str
    module: type[nn.Module]
    numpy_forward: Callable[..., Any]
    make_example: Callable[[int], Example]
    attention: bool = True
    aliases: tuple[str, ...] = ()
    n_inputs: int = 1
    tolerances: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: dict(DEFAULT_TOLERANCES)
    )
    oracle_options: Callable[[nn.Module], dict[str, Any]] | None = None
    option_space: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    properties: tuple[Property, ...] = ()
    variants: tuple[Variant, ...] = ()
    build_example: Callable[[Mapping[str, Any], tuple[int, ...], int], Example] | None = None
    shape_space: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: dict(DEFAULT_SHAPE_SPACE)
    )
    valid: Callable[[Mapping[str, Any], tuple[int, ...], bool], bool] = (
        lambda options, shape, training: True
    )
    saved_bytes_bound: Callable[[tuple[int, ...]], float] | None = None


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


def oracle_options(component: Component, module: nn.Module) -> dict[str, Any]:
    """The keyword options of ``component.numpy_forward`` that ``module`` (an instance of
    ``component.module``) implies: ``component.oracle_options(module)`` if the component
    declares it, else each keyword-only option of the NumPy forward (but ``training`` and
    ``return_maps``) from the attribute of that name of the module, or of the first
    submodule that has it."""
    if component.oracle_options is not None:
        return dict(component.oracle_options(module))
    out = {}
    for name, p in inspect.signature(component.numpy_forward).parameters.items():
        if p.kind is not p.KEYWORD_ONLY or name in ("training", "return_maps"):
            continue
        for m in module.modules():
            if hasattr(m, name):
                out[name] = getattr(m, name)
                break
    return out


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
    """The component called ``name`` (or one of its aliases), case-insensitively.

    ``"CBAM"``, ``"cbam"`` and ``"SE"`` all work; names and aliases are lowercase.
    """
    comps = components()
    key = name.lower() if isinstance(name, str) else name
    for c in comps.values():
        if key == c.name or key in c.aliases:
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


def draw_options(space: Mapping[str, tuple[Any, ...]], rng: np.random.Generator) -> dict[str, Any]:
    """One value of each option of ``space``, drawn uniformly with ``rng`` (the same
    declaration the Hypothesis strategies sample from)."""
    return {name: values[int(rng.integers(len(values)))] for name, values in space.items()}


def draw_case(
    option_space: Mapping[str, tuple[Any, ...]],
    shape_space: Mapping[str, tuple[int, int]],
    valid: Callable[[Mapping[str, Any], tuple[int, ...], bool], bool],
    rng: np.random.Generator,
    training: bool = True,
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Options and an (N, C, H, W) shape drawn with ``rng`` until ``valid`` accepts them
    (in training mode by default: ``python -m refimpl check`` runs examples both ways)."""
    for _ in range(1000):
        options = draw_options(option_space, rng)
        shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in shape_space.values())
        if valid(options, shape, training):
            return options, shape
    raise RuntimeError("no valid options and shape in 1000 draws: the constraint is too tight")


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
