"""The AFF paper in the registry: its facts, its five components, random examples, properties."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from refimpl.feature_fusion.convert import convert_official_state_dict
from refimpl.feature_fusion.numpy_forward import aff, global_context, iaff, local_context, mscam
from refimpl.feature_fusion.torch_module import AFF, IAFF, MSCAM, GlobalContext, LocalContext
from refimpl.registry import (
    Component,
    Example,
    Paper,
    SkipProperty,
    Variant,
    draw_case,
    random_input,
    randomize_,
)
from refimpl.testing.properties import (
    between_inputs,
    close,
    commutes_with_position_permutations,
    map_in_range,
    map_of,
    output,
    permute_positions,
    property_,
    returned_maps,
    scales_input,
)

#: Example modules with a global branch train a batch norm after global pooling, which
#: needs N >= 2 images; the examples draw N from 3 and 4, where batch statistics are
#: better conditioned (see TOLERANCES). N = 2 and N = 1 are covered by the tests.
_MIN_BATCH = {LocalContext: 1, GlobalContext: 3, MSCAM: 3, AFF: 3, IAFF: 3}

#: float64 as everywhere. float32 is looser than the default (1e-5, 1e-6) because of
#: training mode: each batch norm normalises a 1x1 convolution's output, bias included,
#: with statistics of few values (N images after the global pooling), so float32 rounding
#: of the pre-normalisation values (~6e-8 of the bias and of the input's magnitude) is
#: divided by a batch standard deviation that can be 10-100 times smaller than them.
#: PyTorch's own Conv2d + BatchNorm2d layers differ from the float64 oracle by the same
#: amounts; tests/test_feature_fusion.py measures this amplification per example
#: (``training_slack``). Over 150 seeds the worst float32 difference is 0.2 of this
#: tolerance in training mode and 0.01 in eval mode (0.6 of the default tolerance in eval
#: mode, 15 times it in training mode).
TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-4)}


#: The constructor options of each component and the values tests and examples draw from.
#: C from 1 upward with r up to 16, so C < r (hidden width 1) comes up often.
CONTEXT_SPACE = {"reduction": (1, 2, 4, 16), "bias": (True, False)}
#: MS-CAM, AFF and iAFF: the lean training path (recompute in backward) and the plain one.
MSCAM_SPACE = {**CONTEXT_SPACE, "recompute": (True, False)}
AFF_SPACE = {**MSCAM_SPACE, "factor_two": (False, True)}
IAFF_SPACE = {**MSCAM_SPACE, "share_global": (False, True)}
SHAPE_SPACE = {"N": (1, 3), "C": (1, 32), "H": (1, 17), "W": (1, 17)}
EXAMPLE_SHAPES = {"N": (1, 4), "C": (1, 40), "H": (1, 9), "W": (1, 9)}
#: The options each NumPy forward takes (the widths are in the weights).
_NUMPY_OPTIONS = ("factor_two", "share_global")


def valid(options: dict, shape: tuple[int, ...], training: bool, *, global_branch: bool) -> bool:
    """Training mode's batch norms need more than one value per channel: N >= 2 images
    after a global pooling, N H W >= 2 positions in the local branch."""
    n, _, h, w = shape
    return not training or (n >= 2 if global_branch else n * h * w >= 2)


def _valid_for(cls: type[torch.nn.Module]):
    global_branch = cls is not LocalContext

    def valid_for(options: dict, shape: tuple[int, ...], training: bool) -> bool:
        return valid(options, shape, training, global_branch=global_branch)

    valid_for.__doc__ = valid.__doc__
    return valid_for


def _build(cls: type[torch.nn.Module], n_inputs: int):
    """The example builder of ``cls``: ``(options, shape, seed) -> Example``; the inputs
    are well-spread batches (see ``_well_spread_batch``)."""

    def build(options: dict, shape: tuple[int, ...], seed: int) -> Example:
        module = randomize_(cls(shape[1], **options).double(), seed).eval()
        inputs = tuple(_well_spread_batch(shape, seed + 1 + i) for i in range(n_inputs))
        numpy_options = {k: v for k, v in options.items() if k in _NUMPY_OPTIONS}
        return Example(module, inputs, numpy_options, dict(options))

    build.__name__ = build.__qualname__ = f"build_{cls.__name__}_example"
    build.__doc__ = f"A {cls.__name__} with ``options`` for ``shape``, weights from ``seed``."
    return build


def _seeded(cls: type[torch.nn.Module], space: dict, build, seed: int) -> Example:
    """Options from ``space`` and a shape from ``seed``, N >= _MIN_BATCH."""
    rng = np.random.default_rng(seed)
    low = _MIN_BATCH[cls]

    def conditioned(options: dict, shape: tuple[int, ...], training: bool) -> bool:
        return shape[0] >= low and _valid_for(cls)(options, shape, training)

    options, shape = draw_case(space, EXAMPLE_SHAPES, conditioned, rng)
    return build(options, shape, seed)


def _well_spread_batch(shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    """Standard normal entries plus an offset per image and channel, ~ N(0, 1).

    In training mode the batch norm after global pooling normalises N values per channel
    (2 or 3 here). If the images' means were all close, their standard deviation could
    approach sqrt(eps) = 3e-3, where batch norm multiplies float32 rounding errors by
    ~100; with a per-image offset of order 1 the means differ by order 1.
    """
    offsets = random_input((shape[0], shape[1], 1, 1), seed + 1000)
    return random_input(shape, seed) + offsets


build_local_example = _build(LocalContext, 1)
build_global_example = _build(GlobalContext, 1)
build_mscam_example = _build(MSCAM, 1)
build_aff_example = _build(AFF, 2)
build_iaff_example = _build(IAFF, 2)


def make_local_example(seed: int) -> Example:
    """A :class:`LocalContext` drawn from ``seed``."""
    return _seeded(LocalContext, CONTEXT_SPACE, build_local_example, seed)


def make_global_example(seed: int) -> Example:
    """A :class:`GlobalContext` drawn from ``seed``."""
    return _seeded(GlobalContext, CONTEXT_SPACE, build_global_example, seed)


def make_mscam_example(seed: int) -> Example:
    """An :class:`MSCAM` drawn from ``seed``."""
    return _seeded(MSCAM, CONTEXT_SPACE, build_mscam_example, seed)


def make_aff_example(seed: int) -> Example:
    """An :class:`AFF` drawn from ``seed``, with or without the official factor 2."""
    return _seeded(AFF, AFF_SPACE, build_aff_example, seed)


def make_iaff_example(seed: int) -> Example:
    """An :class:`IAFF` drawn from ``seed``, with the paper's or the popular global branch."""
    return _seeded(IAFF, IAFF_SPACE, build_iaff_example, seed)


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)


def _factor(options: dict) -> float:
    return 2.0 if options.get("factor_two") else 1.0


def _fuses_equal_inputs(module, inputs, options) -> tuple[bool, str]:
    x = inputs[0]
    return close(output(module, (x, x)), _factor(options) * x)


def _symmetric_sum(module, inputs, options) -> tuple[bool, str]:
    x, y = inputs
    total = output(module, (x, y)) + output(module, (y, x))
    return close(total, _factor(options) * (x + y))


def _ignores_positions(module, inputs, options) -> tuple[bool, str]:
    x = inputs[0]
    if x.shape[2] * x.shape[3] < 2:
        raise SkipProperty("needs more than one position")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[2] * x.shape[3]))
    return close(output(module, (permute_positions(x, perm),)), output(module, (x,)))


def _only_the_mean(module, inputs, options) -> tuple[bool, str]:
    x = inputs[0]
    flat = x.mean((2, 3), keepdim=True).expand_as(x).contiguous()
    return close(output(module, (flat,)), output(module, (x,)))


LOCAL_PROPERTIES = (
    commutes_with_position_permutations("point-wise: commutes with position permutations"),
)
GLOBAL_PROPERTIES = (
    property_("g(X) = g(spatial mean of X at every position)", _only_the_mean),
    property_("unchanged by permuting positions", _ignores_positions),
)


def _global_context_everywhere(module, inputs, options) -> tuple[bool, str]:
    """Eq. (3): M = sigmoid(L(X) + g(X)), g broadcast over positions: logit(M) - L is g at
    every position. logit is steep near 0 and 1, so its rounding is ~1e-16 / (M (1 - M))."""
    maps = returned_maps(module, inputs)[1]
    M, L, g = (map_of(maps, k) for k in ("M", "L", "g"))
    M = M.clamp(1e-300, 1 - 2**-53)  # logit finite where M rounded to 0 or 1
    slack = (1e-12 / (M * (1 - M))).flatten(2)
    spread = ((torch.logit(M) - L).flatten(2) - g.flatten(2)).abs()  # (N, C, HW)
    ok = bool((spread <= slack + 1e-10 * (1 + L.abs().flatten(2))).all())
    return ok, f"max |logit(M) - L - g| {spread.max().item():.2e}"


MSCAM_PROPERTIES = (
    scales_input(0.0, 1.0, "X' = X * M, M in (0, 1): |X'| <= |X|, same sign"),
    commutes_with_position_permutations(),
    map_in_range("M", 0.0, 1.0, "M in [0, 1]"),
    property_("logit(M) - L = g at every position", _global_context_everywhere, ("maps",)),
)
AFF_PROPERTIES = (
    property_("AFF(X, X) = X (2X with factor_two)", _fuses_equal_inputs),
    between_inputs(),
    property_("AFF(X, Y) + AFF(Y, X) = X + Y (M depends on X + Y only)", _symmetric_sum),
    commutes_with_position_permutations(),
)


def _swap_with_complement(module, inputs, options) -> tuple[bool, str]:
    """iAFF'(Y, X) = iAFF(X, Y) where iAFF' has M -> 1 - M (the last MS-CAM's logits
    negated by the official-weights converter with ``swap_xy=True``): X and Y enter
    Eq. (4) symmetrically but for which one M weights. Needs refimpl's IAFF (its keys)."""
    if not isinstance(module, IAFF):
        raise SkipProperty("needs refimpl's IAFF (its state dict goes through the converter)")
    x, y = inputs
    swapped = copy.deepcopy(module)
    swapped.load_state_dict(convert_official_state_dict(module.state_dict(), swap_xy=True))
    return close(output(swapped, (y, x)), output(module, (x, y)))


IAFF_PROPERTIES = (
    property_("iAFF(X, X) = X", _fuses_equal_inputs),
    between_inputs(),
    commutes_with_position_permutations(),
    property_("iAFF'(Y, X) = iAFF(X, Y) with M -> 1 - M", _swap_with_complement),
)

_OPEN_AFF = "the official open-aff code"


def _swapped(forward: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def swapped(X: np.ndarray, Y: np.ndarray, params: Mapping[str, Any], **options: Any):
        return forward(Y, X, params, **options)

    return swapped


AFF_VARIANTS = (
    Variant(
        "factor_two",
        "returns 2 (X M + Y (1 - M)), twice Eq. (4)",
        f"the paper-era {_OPEN_AFF} (MXNet ASKCFuse, PyTorch AFF)",
        {"factor_two": True},
    ),
    Variant(
        "inputs_swapped",
        "X and Y swapped: M weights the second input (the residual branch)",
        f"networks built on {_OPEN_AFF}, which call fuse(residual, identity)",
        numpy_forward=_swapped(aff),
    ),
    Variant(
        "factor_two_inputs_swapped",
        "twice Eq. (4) with X and Y swapped",
        f"the official AFF-ResNet blocks of {_OPEN_AFF}",
        {"factor_two": True},
        numpy_forward=_swapped(aff),
    ),
)
IAFF_VARIANTS = (
    Variant(
        "shared_global",
        "the second MS-CAM reuses the first one's global branch (global_att2 never used)",
        f"{_OPEN_AFF}'s PyTorch iAFF and its copies",
        {"share_global": True},
    ),
    Variant(
        "inputs_swapped",
        "X and Y swapped: M weights the second input (the residual branch)",
        f"networks built on {_OPEN_AFF}, which call fuse(residual, identity)",
        numpy_forward=_swapped(iaff),
    ),
    Variant(
        "shared_global_inputs_swapped",
        "shared global branch, and X and Y swapped",
        f"the official iAFF-ResNet blocks of {_OPEN_AFF} (PyTorch)",
        {"share_global": True},
        numpy_forward=_swapped(iaff),
    ),
)


PAPER = Paper(
    slug="feature_fusion",
    title="Attentional Feature Fusion",
    authors="Yimian Dai, Fabian Gieseke, Stefan Oehmcke, Yiquan Wu, Kobus Barnard",
    venue="WACV",
    year=2021,
    arxiv="2009.14082",
    tutorial="tutorials/05_attentional_feature_fusion.ipynb",
    components=(
        Component(
            name="local_context",
            properties=LOCAL_PROPERTIES,
            paper="feature_fusion",
            module=LocalContext,
            numpy_forward=local_context,
            make_example=make_local_example,
            option_space=CONTEXT_SPACE,
            build_example=build_local_example,
            shape_space=SHAPE_SPACE,
            valid=_valid_for(LocalContext),
            attention=False,
            tolerances=TOLERANCES,
        ),
        Component(
            name="global_context",
            properties=GLOBAL_PROPERTIES,
            paper="feature_fusion",
            module=GlobalContext,
            numpy_forward=global_context,
            make_example=make_global_example,
            option_space=CONTEXT_SPACE,
            build_example=build_global_example,
            shape_space=SHAPE_SPACE,
            valid=_valid_for(GlobalContext),
            attention=False,
            tolerances=TOLERANCES,
        ),
        Component(
            name="mscam",
            properties=MSCAM_PROPERTIES,
            paper="feature_fusion",
            module=MSCAM,
            numpy_forward=mscam,
            make_example=make_mscam_example,
            option_space=MSCAM_SPACE,
            build_example=build_mscam_example,
            shape_space=SHAPE_SPACE,
            valid=_valid_for(MSCAM),
            aliases=("ms_cam",),
            tolerances=TOLERANCES,
        ),
        Component(
            name="aff",
            properties=AFF_PROPERTIES,
            variants=AFF_VARIANTS,
            paper="feature_fusion",
            module=AFF,
            numpy_forward=aff,
            make_example=make_aff_example,
            option_space=AFF_SPACE,
            build_example=build_aff_example,
            shape_space=SHAPE_SPACE,
            valid=_valid_for(AFF),
            attention=False,
            n_inputs=2,
            tolerances=TOLERANCES,
        ),
        Component(
            name="iaff",
            properties=IAFF_PROPERTIES,
            variants=IAFF_VARIANTS,
            paper="feature_fusion",
            module=IAFF,
            numpy_forward=iaff,
            make_example=make_iaff_example,
            option_space=IAFF_SPACE,
            build_example=build_iaff_example,
            shape_space=SHAPE_SPACE,
            valid=_valid_for(IAFF),
            attention=False,
            n_inputs=2,
            tolerances=TOLERANCES,
        ),
    ),
)
