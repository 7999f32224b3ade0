"""refimpl.data: the cluttered-digits task of the tutorials."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import data
from refimpl.data import cluttered_digits, load_cluttered_digits, split


@st.composite
def tasks(draw):
    """Random digits (N, h, w) on a grid of distinct values, and options that fit."""
    n = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    size = draw(st.integers(max(h, w), 12))
    fragment_size = draw(st.integers(1, min(h, w)))
    fragments = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    # Values k/16 as in scikit-learn's digits; zero is background.
    digits = np.random.default_rng(seed).integers(0, 17, (n, h, w)) / 16
    return digits, {"size": size, "fragments": fragments, "fragment_size": fragment_size}, seed


@given(tasks())
def test_shapes_ranges_and_the_digit_in_place(task) -> None:
    digits, options, seed = task
    canvas, own = cluttered_digits(digits, seed=seed, **options)
    n, h, w = digits.shape
    size = options["size"]
    assert canvas.shape == (n, 1, size, size) and canvas.dtype == np.float32
    assert own.shape == (n, size, size) and own.dtype == np.float32
    assert canvas.min() >= 0 and canvas.max() <= 1
    # Ink on ink keeps the larger value: the canvas is at least the digit everywhere.
    assert np.all(canvas[:, 0] >= own)
    # own is the digit, whole, at one place, and zero elsewhere.
    for i in range(n):
        placed = [
            (r, c)
            for r in range(size - h + 1)
            for c in range(size - w + 1)
            if np.array_equal(own[i, r : r + h, c : c + w], digits[i].astype(np.float32))
            and own[i].sum() == np.float32(digits[i].sum())
        ]
        assert placed, f"digit {i} is not found whole in own"
    # Every pixel of a canvas is background or a value some digit has.
    values = set(np.unique(digits.astype(np.float32)).tolist()) | {0.0}
    assert set(np.unique(canvas).tolist()) <= values


@given(tasks())
def test_same_seed_same_canvases_and_no_fragments_no_clutter(task) -> None:
    digits, options, seed = task
    first = cluttered_digits(digits, seed=seed, **options)
    again = cluttered_digits(digits, seed=seed, **options)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    clean, own = cluttered_digits(digits, seed=seed, **{**options, "fragments": 0})
    np.testing.assert_array_equal(clean[:, 0], own)


def test_every_position_is_used() -> None:
    # A digit of 8x8 on a 10x10 canvas has 3 x 3 places, the last row and column included.
    digits = np.ones((400, 8, 8))
    _, own = cluttered_digits(digits, size=10, fragments=0, seed=0)
    corners = {(int(np.argmax(o.any(1))), int(np.argmax(o.any(0)))) for o in own}
    assert corners == {(r, c) for r in range(3) for c in range(3)}
    # Fragments too: 1x1 fragments land on every pixel of a 3x3 canvas (seen where the
    # canvas has ink that the digit's own 1x1 stroke does not explain).
    canvas, own = cluttered_digits(np.ones((300, 1, 1)), size=3, fragment_size=1, seed=1)
    assert ((canvas[:, 0] > own).any(axis=0)).all()


def test_clutter_is_cut_from_other_digits() -> None:
    # Two digits, one all 0.5 and one all 1.0: a canvas of the first holds 1.0 only where
    # a fragment of the second landed, and fragments are fragment_size squares.
    digits = np.stack([np.full((4, 4), 0.5), np.full((4, 4), 1.0)])
    canvas, own = cluttered_digits(digits, size=12, fragments=2, fragment_size=2, seed=3)
    extra = canvas[:, 0] > own
    assert extra.any()
    assert extra.sum(axis=(1, 2)).max() <= 2 * 2 * 2


@pytest.mark.parametrize(
    ("digits", "options", "match"),
    [
        (np.zeros((2, 8)), {}, r"shape \(N, h, w\)"),
        (np.zeros((0, 8, 8)), {}, r"shape \(N, h, w\)"),
        (np.zeros((2, 8, 8)), {"size": 7}, "do not fit a canvas of size 7"),
        (np.zeros((2, 8, 8)), {"fragment_size": 9}, "fragment_size 9 is larger"),
        (np.zeros((2, 8, 8)), {"fragments": -1}, "fragments must be an integer >= 0"),
        (np.zeros((2, 8, 8)), {"size": 0}, "size must be a positive integer"),
    ],
)
def test_bad_arguments_say_what_is_wrong(digits, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        cluttered_digits(digits, **options)


def test_load_cluttered_digits() -> None:
    pytest.importorskip("sklearn")
    task = load_cluttered_digits(size=16, fragments=2, seed=5)
    assert task.canvas.shape == (1797, 1, 16, 16)
    assert task.labels.shape == (1797,) and set(task.labels.tolist()) == set(range(10))
    assert task.own.shape == (1797, 16, 16)
    assert np.isclose(task.canvas.max(), 1.0) and np.all(task.canvas[:, 0] >= task.own)


@given(st.integers(2, 300), st.data())
def test_split_is_a_partition(n, draw) -> None:
    n_train = draw.draw(st.integers(1, n - 1))
    seed = draw.draw(st.integers(0, 2**32 - 1))
    train, test = split(n, n_train, seed=seed)
    assert len(train) == n_train and len(test) == n - n_train
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    np.testing.assert_array_equal(split(n, n_train, seed=seed)[0], train)


@pytest.mark.parametrize(("n", "n_train"), [(10, 0), (10, 10), (1, 1)])
def test_split_rejects_an_empty_side(n, n_train) -> None:
    with pytest.raises(ValueError, match="n_train must be between 1"):
        split(n, n_train)


def test_module_imports_neither_torch_nor_sklearn_at_the_top() -> None:
    tree = ast.parse(Path(data.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m.split(".")[0] in ("torch", "sklearn")}, names
