"""The CBAM paper in the registry: its facts, its three components, examples, properties."""

from __future__ import annotations

import numpy as np

from refimpl.cbam.numpy_forward import cbam, channel_attention, spatial_attention
from refimpl.cbam.torch_module import (
    ARRANGEMENTS,
    CBAM,
    VARIANTS,
    ChannelAttention,
    SpatialAttention,
)
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
    commutes_with_channel_permutations,
    commutes_with_position_permutations,
    gate_factorises,
    map_in_range,
    map_unchanged_by_permuting,
    maps_explain_output,
    scales_input,
)

CHANNEL_POOLINGS = (("avg", "max"), ("avg",), ("max",), ("max", "avg"))
SPATIAL_POOLINGS = (("avg", "max"), ("max", "avg"), ("avg",), ("max",))

#: The constructor options of each component and the values tests and examples draw from.
#: C from 1 upward with r up to 16, so C < r (hidden width 1) comes up often; kernels up to
#: 9 > 1 + 2 * 3, larger than many drawn sizes; None where the variant presets decide.
CHANNEL_SPACE = {
    "reduction": (1, 2, 4, 8, 16),
    "pooling": CHANNEL_POOLINGS,
    "variant": VARIANTS,
    "bias": (None, False, True),
}
SPATIAL_SPACE = {
    "kernel_size": (1, 3, 5, 7, 9),
    "pooling": (None, *SPATIAL_POOLINGS),
    "variant": VARIANTS,
    "bias": (False, True),
    "bn": (None, False, True),
}
CBAM_SPACE = {
    "reduction": (1, 2, 4, 8, 16),
    "pooling": CHANNEL_POOLINGS,
    "kernel_size": (1, 3, 5, 7, 9),
    "spatial_pooling": (None, *SPATIAL_POOLINGS),
    "arrangement": ARRANGEMENTS,
    "variant": VARIANTS,
    "bias": (None, False, True),
    "spatial_bias": (False, True),
    "spatial_bn": (None, False, True),
}
SHAPE_SPACE = {"N": (1, 3), "C": (1, 40), "H": (1, 17), "W": (1, 17)}
#: Examples for ``python -m refimpl check`` (fixed tolerances): sizes below and above the
#: kernel, and, with batch norm, at least 6 pooled values per batch (see ``_conditioned``).
EXAMPLE_SHAPES = {"N": (1, 3), "C": (1, 48), "H": (1, 9), "W": (1, 9)}


def has_bn(options: dict) -> bool:
    """Whether the spatial gate has its batch norm (the official variant's default)."""
    bn = options.get("spatial_bn", options.get("bn"))
    return options.get("variant", "paper") == "official" if bn is None else bn


def valid(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """Batch norm in training mode needs more than one value (torch and NumPy raise)."""
    return not (training and has_bn(options) and shape[0] * shape[2] * shape[3] == 1)


def _conditioned(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """``valid``, and with batch norm a few more values, keeping its batch variance away
    from 0 (where float32 rounding would be amplified beyond the fixed tolerance)."""
    return valid(options, shape, training) and (
        not has_bn(options) or shape[0] * shape[2] * shape[3] >= 6
    )


def build_channel_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """A channel gate with ``options`` for ``shape``, random weights from ``seed``."""
    module = randomize_(ChannelAttention(shape[1], **options).double(), seed).eval()
    inputs = (random_input(shape, seed + 1),)
    return Example(module, inputs, {"pooling": options["pooling"]}, dict(options))


def build_spatial_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """A spatial gate with ``options`` for ``shape``, random weights from ``seed``."""
    module = randomize_(SpatialAttention(shape[1], **options).double(), seed).eval()
    numpy_options = {"pooling": options["pooling"], "variant": options["variant"]}
    return Example(module, (random_input(shape, seed + 1),), numpy_options, dict(options))


def build_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """A CBAM with ``options`` for ``shape``, random weights from ``seed``."""
    module = randomize_(CBAM(shape[1], **options).double(), seed).eval()
    keys = ("pooling", "spatial_pooling", "arrangement", "variant")
    numpy_options = {k: options[k] for k in keys}
    return Example(module, (random_input(shape, seed + 1),), numpy_options, dict(options))


def saved_bytes_bound(shape: tuple[int, ...]) -> float:
    """What CBAM may save for backward, in units of its input (N, C, H, W): the input and
    one intermediate of its size (F', or x * M_s); besides, only maps of 1/C of it (the
    max over channels, the stacked pooled maps, M_s, the batch norm's input) and
    descriptors of 1/HW of it (pooled over positions, the MLP's)."""
    _, c, h, w = shape
    return 2 + 6 / c + 6 / (h * w)


def _seeded(space: dict, build, seed: int) -> Example:
    rng = np.random.default_rng(seed)
    options, shape = draw_case(space, EXAMPLE_SHAPES, _conditioned, rng)
    return build(options, shape, seed)


def make_channel_example(seed: int) -> Example:
    """A channel gate with options, widths and input shape drawn from ``seed``."""
    return _seeded(CHANNEL_SPACE, build_channel_example, seed)


def make_spatial_example(seed: int) -> Example:
    """A spatial gate with options, kernel and input shape drawn from ``seed``."""
    return _seeded(SPATIAL_SPACE, build_spatial_example, seed)


def make_example(seed: int) -> Example:
    """A CBAM with every option, widths and input shape drawn from ``seed``."""
    return _seeded(CBAM_SPACE, build_example, seed)


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)

_GATE = "gate in (0, 1): |out| <= |x|, same sign"

_M_C_INSIDE = map_in_range("M_c", 0.0, 1.0, "M_c in (0, 1)", open_interval=True)
_M_S_INSIDE = map_in_range("M_s", 0.0, 1.0, "M_s in (0, 1)", open_interval=True)
_M_C_POOLS = "M_c unchanged by permuting positions"


def _channel_gate_sees_x(options: dict) -> str | None:
    """M_c is computed from x itself (so it pools x over positions) unless the spatial gate
    comes first."""
    if options.get("arrangement", "channel-spatial") == "spatial-channel":
        return "M_c is computed from x * M_s (spatial-channel arrangement)"
    return None


CHANNEL_PROPERTIES = (
    scales_input(0.0, 1.0, _GATE),
    gate_factorises("channel", "out / x is one factor per channel (M_c)"),
    commutes_with_position_permutations(),
    _M_C_INSIDE,
    maps_explain_output("out = x * M_c, the returned map", lambda i, m, o: i[0] * m["M_c"]),
    map_unchanged_by_permuting("M_c", "positions", _M_C_POOLS),
)
SPATIAL_PROPERTIES = (
    scales_input(0.0, 1.0, _GATE),
    gate_factorises("position", "out / x is one factor per position (M_s)"),
    commutes_with_channel_permutations(),
    _M_S_INSIDE,
    maps_explain_output("out = x * M_s, the returned map", lambda i, m, o: i[0] * m["M_s"]),
    map_unchanged_by_permuting("M_s", "channels", "M_s unchanged by permuting channels"),
)
PROPERTIES = (
    scales_input(0.0, 1.0, "both gates in (0, 1): |out| <= |x|, same sign"),
    gate_factorises("both", "out / x = M_c * M_s, a channel factor times a position factor"),
    maps_explain_output(
        "out = x * M_c * M_s, the returned maps", lambda i, m, o: i[0] * m["M_c"] * m["M_s"]
    ),
    _M_C_INSIDE,
    _M_S_INSIDE,
    map_unchanged_by_permuting("M_c", "positions", _M_C_POOLS, when=_channel_gate_sees_x),
)

_OFFICIAL = "the official CBAM code (github.com/Jongchan/attention-module)"
_MLP_BIAS = Variant(
    "mlp_bias", "the shared MLP with biases", f"{_OFFICIAL}; most zoo versions", {"bias": True}
)
_AVG_ONLY = Variant(
    "channel_avg_only",
    "channel gate from average pooling only",
    "the paper's Table 1 ablation",
    {"pooling": ("avg",)},
)
_MAX_ONLY = Variant(
    "channel_max_only",
    "channel gate from max pooling only",
    "the paper's Table 1 ablation",
    {"pooling": ("max",)},
)
CHANNEL_VARIANTS = (_MLP_BIAS, _AVG_ONLY, _MAX_ONLY)
_CONV_BIAS = "popular re-implementations (nn.Conv2d's default bias=True)"


def _spatial_variants(prefix: str) -> tuple[Variant, ...]:
    """The spatial gate's variants; its options are named ``pooling``, ``bn``, ``bias`` on
    :class:`SpatialAttention` and ``spatial_pooling``, ... on :class:`CBAM` (``prefix``)."""
    return (
        Variant(
            "spatial_max_avg",
            "spatial pooling stacked [max, avg] (the convolution's two inputs swapped)",
            f"{_OFFICIAL} (ChannelPool)",
            {f"{prefix}pooling": ("max", "avg")},
        ),
        Variant(
            "spatial_bn",
            "a batch norm after the spatial convolution",
            "timm's CbamModule; the official code",
            {f"{prefix}bn": True},
        ),
        Variant(
            "spatial_bias",
            "the spatial convolution with a bias",
            _CONV_BIAS,
            {f"{prefix}bias": True},
        ),
    )


SPATIAL_VARIANTS = (
    Variant(
        "official",
        "pooled maps stacked [max, mean], batch norm after the bias-free convolution",
        _OFFICIAL,
        {"variant": "official"},
    ),
    *_spatial_variants(""),
)
VARIANTS = (
    Variant(
        "official",
        "MLP biases, spatial pooling stacked [max, mean], batch norm after the spatial conv",
        _OFFICIAL,
        {"variant": "official"},
    ),
    *_spatial_variants("spatial_"),
    _MLP_BIAS,
    _AVG_ONLY,
    _MAX_ONLY,
    Variant(
        "spatial_then_channel",
        "the spatial gate first, then the channel gate",
        "the paper's Table 3 ablation",
        {"arrangement": "spatial-channel"},
    ),
    Variant(
        "parallel",
        "both gates computed from the input, applied as a product",
        "the paper's Table 3 ablation",
        {"arrangement": "parallel"},
    ),
)


def cbam_oracle_options(module: CBAM) -> dict:
    """The NumPy options of a built :class:`CBAM` (both gates' poolings, as resolved)."""
    return {
        "pooling": module.channel.pooling,
        "spatial_pooling": module.spatial.pooling,
        "arrangement": module.arrangement,
        "variant": module.variant,
    }


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
            properties=CHANNEL_PROPERTIES,
            variants=CHANNEL_VARIANTS,
            paper="cbam",
            module=ChannelAttention,
            numpy_forward=channel_attention,
            make_example=make_channel_example,
            option_space=CHANNEL_SPACE,
            build_example=build_channel_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
        ),
        Component(
            name="spatial_attention",
            properties=SPATIAL_PROPERTIES,
            variants=SPATIAL_VARIANTS,
            paper="cbam",
            module=SpatialAttention,
            numpy_forward=spatial_attention,
            make_example=make_spatial_example,
            option_space=SPATIAL_SPACE,
            build_example=build_spatial_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
        ),
        Component(
            name="cbam",
            properties=PROPERTIES,
            variants=VARIANTS,
            oracle_options=cbam_oracle_options,
            paper="cbam",
            module=CBAM,
            numpy_forward=cbam,
            make_example=make_example,
            option_space=CBAM_SPACE,
            build_example=build_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            saved_bytes_bound=saved_bytes_bound,
        ),
    ),
)
