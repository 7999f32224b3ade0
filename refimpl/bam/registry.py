"""The BAM paper in the registry: its facts, its component, a random example, properties."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from refimpl.bam.numpy_forward import attention_map, bam, channel_gate, spatial_gate
from refimpl.bam.torch_module import BAM, COMBINES, NORMS
from refimpl.registry import (
    Component,
    Example,
    Paper,
    Variant,
    draw_case,
    random_input,
    randomize_,
)
from refimpl.testing.properties import (
    close,
    map_in_range,
    map_of,
    map_unchanged_by_permuting,
    maps_explain_output,
    property_,
    returned_maps,
    scales_input,
)

#: The constructor options and the values tests and examples draw from. C from 1 upward
#: with r up to 16, so C < r (hidden width 1) comes up often; dilations up to 5 exceed most
#: drawn sizes, so taps beyond the border are the rule.
OPTION_SPACE = {
    "reduction": (1, 2, 4, 8, 16),
    "dilation": (1, 2, 3, 4, 5),
    "norm": NORMS,
    "combine": COMBINES,
}
SHAPE_SPACE = {"N": (1, 3), "C": (1, 40), "H": (1, 17), "W": (1, 17)}
#: Examples: N >= 2, since ``python -m refimpl check`` also runs every example in training
#: mode; sizes up to 11.
EXAMPLE_SHAPES = {"N": (2, 3), "C": (1, 48), "H": (1, 11), "W": (1, 11)}


def valid(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """Training mode needs N >= 2: the batch norm after the global pooling."""
    return not training or shape[0] >= 2


def build_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """A BAM with ``options`` for ``shape``, random weights from ``seed``."""
    module = randomize_(BAM(shape[1], **options).double(), seed).eval()
    keys = ("dilation", "norm", "combine")
    numpy_options = {k: options[k] for k in keys}
    return Example(module, (random_input(shape, seed + 1),), numpy_options, dict(options))


def make_example(seed: int) -> Example:
    """A BAM with options, widths and input shape all drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    options, shape = draw_case(OPTION_SPACE, EXAMPLE_SHAPES, valid, rng)
    return build_example(options, shape, seed)


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)


def _combined(module, inputs, options) -> tuple[bool, str]:
    """Eq. (1)-(4): M = sigmoid(M_c + M_s), or sigmoid(M_c * M_s) with combine="product"."""
    maps = returned_maps(module, inputs)[1]
    M_c, M_s, M = (map_of(maps, k) for k in ("M_c", "M_s", "M"))
    M_c4, M_s4 = M_c.reshape(*M_c.shape[:2], 1, 1), M_s.reshape(M_s.shape[0], 1, *M_s.shape[-2:])
    logits = M_c4 * M_s4 if options.get("combine", "sum") == "product" else M_c4 + M_s4
    return close(torch.sigmoid(logits).expand_as(M), M)


PROPERTIES = (
    scales_input(1.0, 2.0, "out = x (1 + M) with M in (0, 1): |x| <= |out| <= 2|x|, same sign"),
    maps_explain_output("out = x (1 + M), the returned M", lambda i, m, o: i[0] * (1 + m["M"])),
    map_in_range("M", 0.0, 1.0, "M in [0, 1]"),
    property_("M = sigmoid(M_c + M_s) (M_c * M_s with combine='product')", _combined, ("maps",)),
    map_unchanged_by_permuting("M_c", "positions", "M_c unchanged by permuting positions"),
)

_OFFICIAL = "the official BAM code (github.com/Jongchan/attention-module)"


def official_pooling_bam(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    dilation: int = 4,
    norm: str = "hidden",
    combine: str = "product",
    training: bool = False,
) -> np.ndarray:
    """BAM as the official code runs it: the channel branch pools with
    ``avg_pool2d(x, H, stride=H)``, which for H <= W < 2H averages only the left H x H
    block, and fails for every other shape (here: ValueError, "not defined")."""
    F = np.asarray(x)
    H, W = F.shape[2], F.shape[3]
    if not H <= W < 2 * H:
        raise ValueError(f"the official pooling is not defined at H={H}, W={W}")
    channel = {
        k.removeprefix("channel_gate."): v
        for k, v in params.items()
        if k.startswith("channel_gate.")
    }
    spatial = {
        k.removeprefix("spatial_gate."): v
        for k, v in params.items()
        if k.startswith("spatial_gate.")
    }
    M_c = channel_gate(F[:, :, :, :H], channel, norm=norm, training=training)  # left block
    M_s = spatial_gate(F, spatial, dilation=dilation, norm=norm, training=training)
    return F + F * attention_map(M_c, M_s, combine)


VARIANTS = (
    Variant(
        "product",
        "branches combined by a product, sigmoid(M_c * M_s), not the paper's sum",
        _OFFICIAL,
        {"combine": "product"},
    ),
    Variant(
        "bn_hidden",
        "batch norm after each hidden layer, none at the end of a branch",
        _OFFICIAL,
        {"norm": "hidden"},
    ),
    Variant(
        "official",
        "product combination and batch norm on the hidden layers (square inputs)",
        _OFFICIAL,
        {"combine": "product", "norm": "hidden"},
    ),
    Variant(
        "official_square_pooling",
        "the official form whose channel pooling avg_pool2d(x, H) averages only the left "
        "H x H block when H < W < 2H (and fails on other non-square inputs)",
        _OFFICIAL,
        {"combine": "product", "norm": "hidden"},
        numpy_forward=official_pooling_bam,
    ),
)


PAPER = Paper(
    slug="bam",
    title="BAM: Bottleneck Attention Module",
    authors="Jongchan Park, Sanghyun Woo, Joon-Young Lee, In So Kweon",
    venue="BMVC",
    year=2018,
    arxiv="1807.06514",
    tutorial="tutorials/03b_bam.ipynb",
    components=(
        Component(
            name="bam",
            properties=PROPERTIES,
            variants=VARIANTS,
            paper="bam",
            module=BAM,
            numpy_forward=bam,
            make_example=make_example,
            option_space=OPTION_SPACE,
            build_example=build_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            # float32 is looser than the default (1e-5, 1e-6) for training mode's sake: the
            # channel branch's batch norm normalises N = 2 or 3 pooled values per channel,
            # and where two items' values nearly coincide its output moves up to
            # 1 / sqrt(eps) ~ 316 times its input's float32 rounding (measured: up to 0.9
            # of the default tolerance over 60 seeds). Eval mode stays within 1% of the
            # default; a real error is O(1).
            tolerances={"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-5)},
        ),
    ),
)
