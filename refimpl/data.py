"""Small image tasks built from data that ships with scikit-learn, for the tutorials.

The tutorials train attention networks on a CPU in seconds, so they need a task that is
small, needs no download, and in which *where* something is matters: a digit hidden among
clutter. :func:`cluttered_digits` places each of scikit-learn's 8x8 digits at a random
position of an empty canvas, among fragments cut from other digits, and also returns the
digit's own strokes alone, so that an attention map can be measured against them.

Glossary:
    digits: (N, h, w) images with values in [0, 1] (scikit-learn's digits divided by 16).
    canvas: (N, 1, size, size), the inputs of the task, float32, values in [0, 1].
    own: (N, size, size), the digit alone on an empty canvas (its strokes, no clutter).

This module never imports torch (nor scikit-learn, except inside
:func:`load_cluttered_digits`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refimpl._checks import check_positive_int

WHO = "refimpl.data"


class ClutteredDigits(NamedTuple):
    """The cluttered-digits task: inputs, labels, and where the digit's strokes are.

    Attributes:
        canvas: (N, 1, size, size) float32 inputs in [0, 1].
        labels: (N,) int64 digit classes 0-9.
        own: (N, size, size) float32, the digit alone (zero where it has no stroke).
    """

    canvas: np.ndarray
    labels: np.ndarray
    own: np.ndarray


def cluttered_digits(
    digits: np.ndarray,
    *,
    size: int = 24,
    fragments: int = 3,
    fragment_size: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each digit at a random position of an empty canvas, among fragments of other digits.

    For image i, ``fragments`` square patches of side ``fragment_size`` are cut at random
    places from randomly chosen digits and pasted at random places of the canvas; then
    digit i is pasted at a random place. Overlaps keep the larger value (ink on ink). Every
    position that fits is equally likely, for the digit and for each fragment. The same
    ``seed`` gives the same canvases.

    Args:
        digits: (N, h, w) images, values in [0, 1], with h, w <= size.
        size: side of the square canvas.
        fragments: number of clutter fragments per canvas (0 for none).
        fragment_size: side of a fragment, at most min(h, w).
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``(canvas, own)``: canvas (N, 1, size, size) float32, and own (N, size, size)
        float32, the digit alone at its place.

    Raises:
        ValueError: digits is not a non-empty 3-D array, or a size does not fit.
    """
    digits = np.asarray(digits, dtype=np.float32)
    if digits.ndim != 3 or 0 in digits.shape:
        raise ValueError(
            f"{WHO}.cluttered_digits expects digits of shape (N, h, w), got shape "
            f"{tuple(digits.shape)}"
        )
    check_positive_int(size, WHO, "size")
    check_positive_int(fragment_size, WHO, "fragment_size")
    if isinstance(fragments, bool) or not isinstance(fragments, int | np.integer) or fragments < 0:
        raise ValueError(f"{WHO}: fragments must be an integer >= 0, got {fragments!r}")
    n, h, w = digits.shape
    if max(h, w) > size:
        raise ValueError(f"{WHO}: digits of {h}x{w} do not fit a canvas of size {size}")
    if fragments and fragment_size > min(h, w):
        raise ValueError(
            f"{WHO}: fragment_size {fragment_size} is larger than the digits ({h}x{w})"
        )
    rng = np.random.default_rng(seed)
    s = fragment_size
    canvas = np.zeros((n, 1, size, size), np.float32)
    own = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(fragments):
            j = rng.integers(n)  # the digit a fragment is cut from
            a, b = rng.integers(0, [h - s + 1, w - s + 1])  # where it is cut
            r, c = rng.integers(0, size - s + 1, 2)  # where it is pasted
            patch = canvas[i, 0, r : r + s, c : c + s]
            np.maximum(patch, digits[j, a : a + s, b : b + s], out=patch)
        r, c = rng.integers(0, [size - h + 1, size - w + 1])
        place = canvas[i, 0, r : r + h, c : c + w]
        np.maximum(place, digits[i], out=place)
        own[i, r : r + h, c : c + w] = digits[i]
    return canvas, own


def load_cluttered_digits(
    *, size: int = 24, fragments: int = 3, fragment_size: int = 3, seed: int = 0
) -> ClutteredDigits:
    """scikit-learn's 1797 8x8 digits (scaled to [0, 1]) as a cluttered-digits task.

    Needs scikit-learn (the ``tutorials`` extra); nothing is downloaded, the digits ship
    with it. Arguments as in :func:`cluttered_digits`.
    """
    from sklearn.datasets import load_digits  # late: only the tutorials need it

    data, labels = load_digits(return_X_y=True)
    digits = data.reshape(-1, 8, 8).astype(np.float32) / 16
    canvas, own = cluttered_digits(
        digits, size=size, fragments=fragments, fragment_size=fragment_size, seed=seed
    )
    return ClutteredDigits(canvas, labels.astype(np.int64), own)


def split(n: int, n_train: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random split of ``range(n)`` into ``n_train`` training and ``n - n_train`` test
    indices, disjoint, each sorted; the same seed gives the same split."""
    check_positive_int(n, WHO, "n")
    if isinstance(n_train, bool) or not isinstance(n_train, int | np.integer):
        raise ValueError(f"{WHO}: n_train must be an integer, got {n_train!r}")
    if not 0 < n_train < n:
        raise ValueError(f"{WHO}: n_train must be between 1 and n - 1 = {n - 1}, got {n_train}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:])
