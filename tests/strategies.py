"""Hypothesis strategies shared by all tests.

Hypothesis draws shapes, options and a seed; bulk arrays come from
``np.random.default_rng(seed)``. Torch's global RNG never chooses anything inside a
``@given`` test (Hypothesis does not control it, so replayed examples would flake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import assume
from hypothesis import strategies as st

from refimpl._checks import hidden_width  # noqa: F401  (re-exported: one home for the rule)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def sizes(min_value: int = 1, max_value: int = 17) -> st.SearchStrategy[int]:
    """A spatial size: small, odd and even, 1 included by default."""
    return st.integers(min_value=min_value, max_value=max_value)


@st.composite
def nchw_shapes(
    draw: st.DrawFn,
    *,
    max_n: int = 3,
    min_c: int = 1,
    max_c: int = 32,
    min_hw: int = 1,
    max_hw: int = 17,
    channels: int | None = None,
) -> tuple[int, int, int, int]:
    """An (N, C, H, W) shape; non-square and odd sizes come up as often as any."""
    n = draw(st.integers(1, max_n))
    c = channels if channels is not None else draw(st.integers(min_c, max_c))
    h = draw(sizes(min_hw, max_hw))
    w = draw(sizes(min_hw, max_hw))
    return (n, c, h, w)


def normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    """Standard normal float64 entries from ``seed``. Ties have probability zero, so max
    pooling and ReLU are smooth at every drawn point."""
    return scale * np.random.default_rng(seed).standard_normal(shape)


def spread(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Float64 entries whose values are pairwise at least ~1e-3 apart, in random order.

    For ops with kinks at ties (max pooling, argmax, ReLU at 0): the entries are a
    shuffled grid of distinct values in [-1, 1] plus jitter, so no two are within
    float32 rounding of each other and none is within 1e-4 of 0.
    """
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    grid = np.linspace(-1.0, 1.0, 2 * n + 1)[1::2]  # n distinct midpoints, none at 0
    step = 2.0 / (2 * n + 1)
    values = grid + rng.uniform(-0.25, 0.25, n) * step
    return rng.permutation(values).reshape(shape)


def to_torch(a: np.ndarray, device: str = "cpu", dtype: torch.dtype = torch.float64):
    """A NumPy array as a tensor on ``device`` in ``dtype``."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def assert_close_report(
    actual: np.ndarray, expected: np.ndarray, *, rtol: float, atol: float, what: str = ""
) -> None:
    """Assert ``|actual - expected| <= atol + rtol |expected|`` elementwise; on failure
    say the largest difference, where it is, and both values there."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    if not (excess <= 0).all() or not np.isfinite(actual).all():
        diff = np.abs(actual - expected)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.size} elements differ beyond "
            f"atol={atol:g} + rtol={rtol:g}*|expected|; largest excess at index {worst}: "
            f"actual {actual[worst]!r}, expected {expected[worst]!r} "
            f"(max |diff| {diff.max():.3e})"
        )


# ---------------------------------------------------------------------------------------
# Registry-driven strategies: each paper declares its option space once
# (``Component.option_space`` in ``refimpl/<paper>/registry.py``); its ``make_example``
# and these strategies both draw from it, and build through ``Component.build_example``.


def options_for(component: Any) -> st.SearchStrategy[dict[str, Any]]:
    """The component's constructor options, each sampled from its declared values."""
    return st.fixed_dictionaries(
        {name: st.sampled_from(values) for name, values in component.option_space.items()}
    )


def shapes_for(component: Any, **bounds: tuple[int, int]) -> st.SearchStrategy[tuple[int, ...]]:
    """An (N, C, H, W) shape from the component's ``shape_space``; ``bounds`` overrides a
    dimension's range, e.g. ``H=(2, 17)``."""
    space = {**component.shape_space, **bounds}
    return st.tuples(*(st.integers(lo, hi) for lo, hi in space.values()))


@dataclass(frozen=True)
class Case:
    """Options, a shape, a seed and a mode where the component is defined."""

    options: dict[str, Any]
    shape: tuple[int, ...]
    seed: int
    training: bool

    def example(self, component: Any) -> Any:
        """The component's :class:`refimpl.registry.Example` for this case."""
        return component.build_example(self.options, self.shape, self.seed)


@st.composite
def cases(
    draw: st.DrawFn, component: Any, training: bool | None = None, **bounds: tuple[int, int]
) -> Case:
    """A :class:`Case` of ``component``; ``training`` drawn unless given; options and
    shape rejected where ``component.valid`` says the component is not defined."""
    mode = draw(st.booleans()) if training is None else training
    options = draw(options_for(component))
    shape = draw(shapes_for(component, **bounds))
    assume(component.valid(options, shape, mode))
    return Case(options, shape, draw(seeds), mode)


def covering_options(
    component: Any, shape: tuple[int, ...], training: bool = False
) -> list[dict[str, Any]]:
    """A few option dicts in which every declared value of every option occurs at least
    once, each valid for ``shape`` (in ``training`` mode): for fixed-example tests
    (compile, export, gradcheck), which cannot afford the whole product."""
    space = component.option_space
    longest = max((len(v) for v in space.values()), default=1)
    out: list[dict[str, Any]] = []
    for i in range(longest):
        for j in range(64):  # shift the other options until the combination is valid
            opts = {
                name: values[(i + j * (k + 1)) % len(values)] if j else values[i % len(values)]
                for k, (name, values) in enumerate(space.items())
            }
            if j:  # keep option i's turn: the longest option's value i stays
                for name, values in space.items():
                    if len(values) == longest:
                        opts[name] = values[i]
                        break
            if component.valid(opts, shape, training) and opts not in out:
                out.append(opts)
                break
    return out
