"""The SE paper in the registry: its facts, its one component, a random example, properties."""

from __future__ import annotations

import numpy as np

from refimpl.registry import (
    Component,
    Example,
    Paper,
    Variant,
    draw_case,
    random_input,
    randomize_,
)
from refimpl.squeeze_excitation.numpy_forward import squeeze_excitation
from refimpl.squeeze_excitation.torch_module import GATES, POOLINGS, SqueezeExcitation
from refimpl.testing.properties import (
    commutes_with_position_permutations,
    gate_factorises,
    map_in_range,
    maps_explain_output,
    scales_input,
)

#: The constructor options and the values tests and examples draw from. r up to 16 with
#: C from 1 upward: C < r (hidden width 1) comes up often, and r = 16 is exercised for real.
OPTION_SPACE = {
    "reduction": (1, 2, 4, 8, 16),
    "bias": (True, False),
    "pooling": POOLINGS,
    "gate": GATES,
}
SHAPE_SPACE = {"N": (1, 3), "C": (1, 40), "H": (1, 17), "W": (1, 17)}


def build_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """An SE block with ``options`` for ``shape``, random weights from ``seed``."""
    module = SqueezeExcitation(shape[1], **options)
    randomize_(module.double(), seed).eval()
    numpy_options = {"pooling": options["pooling"], "gate": options["gate"]}
    return Example(module, (random_input(shape, seed + 1),), numpy_options, dict(options))


def make_example(seed: int) -> Example:
    """An SE block with options, widths and input shape all drawn from ``seed``."""
    options, shape = draw_case(OPTION_SPACE, SHAPE_SPACE, valid, np.random.default_rng(seed))
    return build_example(options, shape, seed)


def valid(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """Defined everywhere: no batch statistics."""
    return True


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)


def _timm_width(channels: int) -> dict[str, int]:
    """timm's SEModule: hidden width C / 16 rounded to a multiple of 8, at least 8
    (``make_divisible(C / 16, 8, round_limit=0)``)."""
    return {"hidden_channels": max(8, int(channels / 16 + 4) // 8 * 8)}


def _not_sigmoid(options: dict) -> str | None:
    gate = options.get("gate", "sigmoid")
    return None if gate == "sigmoid" else f"the gate is {gate!r}, not a sigmoid"


PROPERTIES = (
    scales_input(0.0, 1.0, "gate in (0, 1): |out| <= |x|, same sign", when=_not_sigmoid),
    map_in_range("s", 0.0, 1.0, "gate s in (0, 1)", open_interval=True, when=_not_sigmoid),
    gate_factorises("channel", "out / x is one factor per channel (the same at every position)"),
    commutes_with_position_permutations(),
    maps_explain_output(
        "out = x * s, the returned gate", lambda i, m, o: i[0] * m["s"][:, :, None, None]
    ),
)

VARIANTS = (
    Variant(
        "width_multiple_of_8",
        "hidden width C/16 rounded to a multiple of 8 (at least 8)",
        "timm's SEModule (rd_divisor=8)",
        _timm_width,
    ),
    Variant(
        "no_bias",
        "fully connected layers without biases",
        "the SE paper's Eq. (3) and its ablations; many re-implementations",
        {"bias": False},
    ),
    Variant(
        "max_squeeze",
        "global max pooling instead of the average as squeeze",
        "the SE paper's squeeze ablation (Table 11)",
        {"pooling": "max"},
    ),
)


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
            aliases=("se",),
            properties=PROPERTIES,
            variants=VARIANTS,
            option_space=OPTION_SPACE,
            build_example=build_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            # The input, and descriptors of 1/HW of it (z, the hidden layer, s): nothing
            # else of the input's size is saved (torch_module.py's docstring).
            saved_bytes_bound=lambda shape: 1 + 6 / (shape[2] * shape[3]),
        ),
    ),
)
