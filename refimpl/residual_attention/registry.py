"""The Residual Attention paper in the registry: its components, random examples, properties.

Every example has a batch of at least 2, so that batch norm in training mode has more than
one value per channel at every level of the mask branch, even where it pools down to 1x1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from refimpl import numpy_functional as nf
from refimpl._params import Params
from refimpl.registry import (
    Component,
    Example,
    Paper,
    SkipProperty,
    Variant,
    draw_options,
    random_input,
    randomize_,
)
from refimpl.residual_attention._pooling import MAX_POOL, POOLINGS, min_size
from refimpl.residual_attention.numpy_forward import (
    _group_spec,
    _mask_spec,
    _mask_structure,
    _module_structure,
    _residual_unit,
    _units,
    _upsample,
    attention_module,
    mask_head,
    residual_unit,
    soft_mask_branch,
)
from refimpl.residual_attention.torch_module import (
    ACTIVATIONS,
    LEARNINGS,
    SPATIAL_EPS,
    AttentionModule,
    MaskHead,
    ResidualUnit,
    SoftMaskBranch,
    mask_activation,
)
from refimpl.testing.properties import (
    close,
    commutes_with_position_permutations,
    map_of,
    output,
    property_,
    returned_maps,
)

# float32 against the float64 oracle, for the mask branch and the attention module. One
# unit is three convolutions and three batch norms deep; a module chains up to 2p + t +
# 2 depth + 2 units (about 15). Rounding (6e-8) is amplified wherever the function is
# ill-conditioned, and a deep random network always has a few such places: a batch norm in
# training mode whose channel is nearly constant over its values (x - mean cancels), f3 on
# a channel whose logits barely vary (it divides by their std), f2 at a position whose
# logit vector is short. The examples keep off the worst of it (see _seeded and
# keep_channel_logits_off_zero_); measured then, the smallest rtol (with atol = rtol / 10)
# that passes, worst over 300 seeds: 4.6e-5 (mask branch), 2.0e-4 (module, f3 in training
# mode; 7e-5 otherwise), 1.1e-5 in eval mode. rtol 5e-4 leaves a margin of 2.5; a wrong
# formula (an axis, an epsilon, a skipped unit) moves outputs by 1e-2 or more. The tests
# add each example's own measured sensitivity to float32 rounding to this tolerance.
# The residual unit and the mask head keep the default float32 tolerance (worst: 4.6e-6
# and 2.9e-6 relative).
DEEP_TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (5e-4, 5e-5)}


#: The constructor options of each component and the values tests and examples draw from.
UNIT_SPACE = {"out_channels": (None, None, 1, 8, 16, 32), "stride": (1, 2)}
HEAD_SPACE = {"activation": ACTIVATIONS}
BRANCH_SPACE = {
    "r": (1, 2),
    "depth": (1, 2, 3),
    "skips": (0, 1, 2),  # < depth, see valid
    "activation": ACTIVATIONS,
    "align_corners": (True, False),
    "pooling": POOLINGS,
}
#: None (the learned mask) in half the draws or more. A forced M = 0 under NAL makes
#: H = 0, and the last units' batch norms then normalise constant channels, where
#: training mode is ill-conditioned (excluded by valid).
MODULE_SPACE = {
    "p": (0, 1, 2),
    "t": (0, 1, 2),
    "r": (1, 2),
    "depth": (1, 2, 3),
    "skips": (0, 1, 2),
    "activation": ACTIVATIONS,
    "learning": LEARNINGS,
    "force_mask": (None, None, None, 0.0, 0.5, 1.0),
    "align_corners": (True, False),
    "pooling": POOLINGS,
    "checkpoint_mask": (False, True),  # recompute the mask branch in backward
    "checkpoint_trunk": (False, True),  # and the trunk
}
UNIT_SHAPES = {"N": (1, 3), "C": (1, 32), "H": (1, 17), "W": (1, 17)}
SHAPE_SPACE = {"N": (1, 3), "C": (1, 16), "H": (1, 17), "W": (1, 17)}

#: The options each NumPy forward takes (the structure is read from the weights).
_NUMPY_OPTIONS = ("stride", "activation", "learning", "force_mask", "align_corners", "pooling")


def valid(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """Training needs N >= 2: batch norm then has more than one value per channel at
    every level, even where the mask branch has pooled down to 1x1. Skips < depth; a
    forced M = 0 with the ARL only (above); Caffe pooling (3x3/2, no padding) needs
    H, W >= 2^depth (``_pooling.min_size``: a 1-pixel map has no Caffe window)."""
    if training and shape[0] < 2:
        return False
    if options.get("skips", 0) >= options.get("depth", 1):
        return False
    if "pooling" in options and min(shape[2:]) < min_size(options["pooling"], options["depth"]):
        return False
    return not (options.get("force_mask") == 0.0 and options.get("learning") == "nal")


def _seeded(space: dict, build, seed: int) -> Example:
    """Options from ``space``, then a shape from ``seed`` for ``python -m refimpl check``'s
    fixed tolerances: N in 2-3; H, W from 1 to 17, or, for a mask branch of ``depth``
    poolings, from 2^(depth+1) + 1 up, so that its deepest level keeps at least 3x3
    positions: batch norm in training mode then normalises 18 or more values per channel
    at every level. With 2 to 8 values a channel is often nearly constant, and float32's
    cancellation in x - mean grows beyond any fixed tolerance (the contract test covers
    1x1 levels, with a tolerance that measures the example's conditioning). f2 heads get
    their logits kept off zero (``keep_channel_logits_off_zero_``)."""
    rng = np.random.default_rng(seed)
    shapes = UNIT_SHAPES if "stride" in space else SHAPE_SPACE
    while True:
        options = draw_options(space, rng)
        low = 2 ** (options["depth"] + 1) + 1 if "depth" in options else 1
        hw = rng.integers(low, max(18, low + 8), size=2)
        c = int(rng.integers(shapes["C"][0], shapes["C"][1] + 1))
        shape = (int(rng.integers(2, 4)), c, int(hw[0]), int(hw[1]))
        if valid(options, shape, True):
            example = build(options, shape, seed)
            if options.get("activation") == "channel":
                keep_channel_logits_off_zero_(example.module)
            return example


def keep_channel_logits_off_zero_(module: torch.nn.Module, shift: float = 4.0) -> None:
    """Shift the mask head's last batch-norm bias by ``shift``, in place.

    f2 divides each position's logit vector s_i by its norm: undefined at s_i = 0 and
    conditioned as 1 / ||s_i|| near it, so float32 rounding of s (~1e-6) grows without
    bound at positions where random weights happen to make ||s_i|| small (0.01 in 1 of 50
    random examples). With every input to the last convolution shifted up by 4, s_i is
    dominated by 4 W2 1 and stays well away from 0: an example off the kink, like the
    tie-free inputs elsewhere, instead of a tolerance wide enough for any conditioning.
    """
    for m in module.modules():
        if isinstance(m, MaskHead) and m.activation == "channel":
            with torch.no_grad():
                m.bn2.bias += shift


def _build(cls: type):
    """The example builder of ``cls``: ``(options, shape, seed) -> Example``."""

    def build(options: dict, shape: tuple[int, ...], seed: int) -> Example:
        module = randomize_(cls(shape[1], **options).double(), seed).eval()
        numpy_options = {k: v for k, v in options.items() if k in _NUMPY_OPTIONS}
        return Example(module, (random_input(shape, seed + 1),), numpy_options, dict(options))

    build.__name__ = build.__qualname__ = f"build_{cls.__name__}_example"
    build.__doc__ = f"A {cls.__name__} with ``options`` for ``shape``, weights from ``seed``."
    return build


build_residual_unit_example = _build(ResidualUnit)
build_mask_head_example = _build(MaskHead)
build_soft_mask_branch_example = _build(SoftMaskBranch)
build_attention_module_example = _build(AttentionModule)


def example_residual_unit(seed: int) -> Example:
    """A unit, identity or projection shortcut, stride 1 or 2, from ``seed``."""
    return _seeded(UNIT_SPACE, build_residual_unit_example, seed)


def example_mask_head(seed: int) -> Example:
    """A mask head with a random activation, from ``seed``."""
    return _seeded(HEAD_SPACE, build_mask_head_example, seed)


def example_soft_mask_branch(seed: int) -> Example:
    """A mask branch of depth 1-3, any number of skips, r 1-2, from ``seed``."""
    return _seeded(BRANCH_SPACE, build_soft_mask_branch_example, seed)


def example_attention_module(seed: int) -> Example:
    """An attention module with p, t, r, depth, skips and every option drawn from ``seed``."""
    return _seeded(MODULE_SPACE, build_attention_module_example, seed)


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)


def spatial_shift_scale_bound(s: torch.Tensor, a: float) -> torch.Tensor:
    """How far f3's mask may move when a channel's logits s become a s + b (a > 0).

    Without the epsilon, not at all. With it, z = (s - mean) / sqrt(var + eps) becomes
    z sqrt(var + eps) / sqrt(var + eps / a^2): a relative change of at most
    eps |1 - 1/a^2| / (2 var), and the sigmoid's slope is at most 1/4. Per channel,
    (N, C, 1, 1), plus 1e-12 for rounding; infinite for a constant channel (whose mask is
    1/2 either way).
    """
    var, mean = torch.var_mean(s, dim=(2, 3), correction=0, keepdim=True)
    z = (s - mean) * torch.rsqrt(var + SPATIAL_EPS)
    relative = SPATIAL_EPS * abs(1 - 1 / a**2) / (2 * var)
    bound = z.abs().amax(dim=(2, 3), keepdim=True) * relative / 4 + 1e-12
    return torch.where(var > 0, bound, torch.inf)


_PAPER = {"paper": "residual_attention"}
_DEEP = {"paper": "residual_attention", "tolerances": DEEP_TOLERANCES}


def _mask_guarantee(M: torch.Tensor, activation: str) -> tuple[bool, str]:
    """What each mask activation guarantees of M: f1 (mixed) in (0, 1); f2 (channel) a
    unit vector over the channels at every position; f3 (spatial) in (0, 1)."""
    if activation == "channel":
        norms = M.pow(2).sum(1).sqrt()  # 0 where every logit is 0 (f2 is undefined there)
        return close(torch.where(norms > 1e-6, norms, 1.0), torch.ones_like(norms))
    ok = bool(((M >= 0) & (M <= 1)).all())
    return ok, f"M in [{M.min().item():.3g}, {M.max().item():.3g}]"


def _mask_range(module, inputs, options) -> tuple[bool, str]:
    """The mask activation's guarantee on the output M (mask head, mask branch)."""
    return _mask_guarantee(output(module, inputs), options.get("activation", "mixed"))


def _shift_scale_check(M: torch.Tensor, s: torch.Tensor) -> tuple[bool, str]:
    moved = mask_activation(2.0 * s + 3.0, "spatial")
    ratio = ((moved - M).abs() / spatial_shift_scale_bound(s, 2.0)).max().item()
    return ratio <= 1.0, f"largest change / its bound: {ratio:.2e}"


def _not_spatial(options: dict) -> None:
    if options.get("activation", "mixed") != "spatial":
        raise SkipProperty("holds for the spatial activation f3 only")


def _spatial_shift_scale(module, inputs, options) -> tuple[bool, str]:
    """f3 standardises each channel's logits s over positions: 2 s + 3 gives the same mask
    (up to f3's epsilon, see ``spatial_shift_scale_bound``). M is the output, s a map."""
    _not_spatial(options)
    M, maps = returned_maps(module, inputs)
    return _shift_scale_check(M, map_of(maps, "s"))


def _module_spatial_shift_scale(module, inputs, options) -> tuple[bool, str]:
    """As ``_spatial_shift_scale``, on the attention module's own mask (its logits s come
    from refimpl's mask branch on the pre-processed input)."""
    _not_spatial(options)
    if options.get("force_mask") is not None:
        raise SkipProperty("the mask is forced to a constant (force_mask)")
    if not isinstance(module, AttentionModule):
        raise SkipProperty("needs refimpl's AttentionModule (its mask branch's logits s)")
    with torch.no_grad():
        M, maps = module.mask(module.pre(inputs[0]), return_maps=True)
    return _shift_scale_check(M, maps["s"])


def _same_shape(module, inputs, options) -> tuple[bool, str]:
    got, want = tuple(output(module, inputs).shape), tuple(inputs[0].shape)
    return got == want, f"{got}" if got == want else f"got {got}, expected {want}"


def _unit_shape(module, inputs, options) -> tuple[bool, str]:
    """A unit of stride s maps (N, C, H, W) to (N, C_out, ceil(H/s), ceil(W/s))."""
    n, c, h, w = inputs[0].shape
    stride, c_out = options.get("stride", 1), options.get("out_channels") or c
    want = (n, c_out, -(-h // stride), -(-w // stride))
    got = tuple(output(module, inputs).shape)
    return got == want, f"{got}" if got == want else f"got {got}, expected {want}"


def _unit_identity(module, inputs, options) -> tuple[bool, str]:
    """With the identity shortcut, a zero last convolution (F = 0) gives x + 0 = x,
    exactly. Needs refimpl's ResidualUnit (its conv3)."""
    if not isinstance(module, ResidualUnit):
        raise SkipProperty("needs refimpl's ResidualUnit (zeroes its conv3)")
    if module.shortcut is not None:
        raise SkipProperty("a projection shortcut (stride or width changes)")
    zeroed = copy.deepcopy(module)
    torch.nn.init.zeros_(zeroed.conv3.weight)
    x = inputs[0]
    return bool(torch.equal(output(zeroed, inputs), x)), "exactly x"


def _forced_zero_identity(module, inputs, options) -> tuple[bool, str]:
    """Eq. (3) with M = 0 (ARL): H = (1 + 0) T = T and out = post(T), bit for bit. Needs
    refimpl's AttentionModule (sets its force_mask and learning, calls its post)."""
    if not isinstance(module, AttentionModule):
        raise SkipProperty("needs refimpl's AttentionModule (force_mask, learning, post)")
    forced = copy.deepcopy(module)
    forced.force_mask, forced.learning = 0.0, "arl"
    with torch.no_grad():
        out0, maps0 = forced(inputs[0], return_maps=True)
        identity = torch.equal(maps0["H"], maps0["T"]) and torch.equal(
            out0, forced.post(maps0["T"])
        )
    return identity, "H == T, out == post(T)" if identity else "differ"


def _module_mask(module, inputs, options) -> tuple[bool, str]:
    """The mask M that the module returns has its activation's guarantee."""
    if options.get("force_mask") is not None:
        raise SkipProperty("the mask is forced to a constant (force_mask)")
    M = map_of(returned_maps(module, inputs)[1], "M")
    return _mask_guarantee(M, options.get("activation", "mixed"))


def _trunk_bounds(learning: str):
    """ARL: H = (1 + M) T with M in [0, 1], so |T| <= |H| <= 2 |T|; NAL: H = M T, so
    |H| <= |T| (f1 and f3 masks, or a forced M in [0, 1])."""

    def check(module, inputs, options) -> tuple[bool, str]:
        if options.get("learning", "arl") != learning:
            raise SkipProperty(f"holds for {learning.upper()} only")
        forced = options.get("force_mask")
        if forced is None and options.get("activation", "mixed") == "channel":
            raise SkipProperty("the channel activation f2 is not in [0, 1]")
        if forced is not None and not 0 <= forced <= 1:
            raise SkipProperty(f"force_mask={forced} is outside [0, 1]")
        maps = returned_maps(module, inputs)[1]
        T, H = (map_of(maps, k).abs() for k in ("T", "H"))
        slack = 1e-12 * T
        if learning == "arl":
            ok = bool(((T <= H + slack) & (H <= 2 * T + slack)).all())
        else:
            ok = bool((H <= T + slack).all())
        return ok, ""

    return check


def _mask_branch_ignored(module, inputs, options) -> tuple[bool, str]:
    """With M forced to 0 (ARL), H = T: the mask branch's weights no longer matter."""
    if options.get("learning", "arl") != "arl":
        raise SkipProperty("holds for attention residual learning (ARL) only")
    mask = [p for name, p in module.named_parameters() if "mask" in name]
    if not mask:
        raise SkipProperty("no parameter has 'mask' in its name: cannot find the mask branch")
    saved = module.force_mask
    try:
        module.force_mask = 0.0
        before = output(module, inputs)
        with torch.no_grad():
            kept = [p.clone() for p in mask]
            for p in mask:
                p.add_(1.0)
        after = output(module, inputs)
        with torch.no_grad():
            for p, k in zip(mask, kept, strict=True):
                p.copy_(k)
    finally:
        module.force_mask = saved
    return close(after, before, rtol=0.0)


_MASK_RANGE = "M in (0, 1) (f1, f3) or unit channel vectors (f2)"
_SHIFT_SCALE = "spatial mask (f3): unchanged by 2 s + 3 per channel, up to its epsilon"

UNIT_PROPERTIES = (
    property_("output (N, C_out, ceil(H/s), ceil(W/s))", _unit_shape),
    property_("F = 0 gives the identity (identity shortcut)", _unit_identity),
)
MASK_PROPERTIES = (
    property_(_MASK_RANGE, _mask_range),
    commutes_with_position_permutations("point-wise (eval): commutes with position permutations"),
    property_(_SHIFT_SCALE, _spatial_shift_scale, needs=("maps",)),
)
BRANCH_PROPERTIES = (
    property_("mask of the input's shape", _same_shape),
    property_(_MASK_RANGE, _mask_range),
    property_(_SHIFT_SCALE, _spatial_shift_scale, needs=("maps",)),
)
MODULE_PROPERTIES = (
    property_("output of the input's shape", _same_shape),
    property_(
        "M = 0 gives H = T exactly (the mask branch's weights do not matter)",
        _mask_branch_ignored,
        needs=("mask_hook",),
    ),
    property_("M = 0 (ARL): H == T and out == post(T), exactly", _forced_zero_identity),
    property_(f"the returned {_MASK_RANGE}", _module_mask, needs=("maps",)),
    property_(_SHIFT_SCALE, _module_spatial_shift_scale),
    property_("ARL, M in [0, 1]: |T| <= |H| <= 2 |T|", _trunk_bounds("arl"), needs=("maps",)),
    property_("NAL, M in [0, 1]: |H| <= |T|", _trunk_bounds("nal"), needs=("maps",)),
)


def _fixed_factor(forward: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``forward`` where upsampling by a fixed factor 2 lands on the bottom-up sizes (every
    level's size even before its pooling); not defined elsewhere (such code fails there)."""

    def fixed(x: np.ndarray, params: Mapping[str, Any], **options: Any) -> np.ndarray:
        p = Params.of(params, "fixed-factor upsampling")
        depth = _mask_structure(p.sub("mask") if p.has_any(("mask.head.conv1.weight",)) else p)[
            "depth"
        ]
        for size in np.shape(x)[2:]:
            for _ in range(depth):
                if size % 2:
                    raise ValueError(f"upsampling by 2 does not return to size {size}")
                size //= 2
        return forward(x, params, **options)

    return fixed


_ALIGN = Variant(
    "align_corners_false",
    "bilinear upsampling with align_corners=False (F.interpolate's default)",
    "ports that call F.interpolate(..., mode='bilinear') without align_corners",
    {"align_corners": False},
)
_CAFFE = Variant(
    "caffe_pooling",
    "mask-branch max pooling 3x3, stride 2, no padding, ceil rounding",
    "the official Caffe prototxt (fwang91/residual-attention-network)",
    {"pooling": "caffe"},
)


def skip_adds_feature_module(
    x: np.ndarray,
    params: Mapping[str, Any],
    *,
    activation: str = "mixed",
    learning: str = "arl",
    align_corners: bool = True,
    pooling: str = "paper",
    training: bool = False,
    **_: Any,
) -> np.ndarray:
    """The attention module of PyTorch ports that, on the way up, add the bottom-up feature
    AND its skip unit's output to the upsampled map (the prototxt adds the skip unit's
    output only, which holds the feature already through its identity shortcut)."""
    p = Params.of(params, "attention_module (skip adds feature)")
    structure, mask = _module_structure(p), _mask_structure(p.sub("mask"))
    c, units = structure["channels"], structure["p"]
    spec = _group_spec(p, "pre", units, c).include("", _group_spec(p, "trunk", structure["t"], c))
    spec.include("", _group_spec(p, "post", units, c))
    p.check(spec.include("mask.", _mask_spec(p.sub("mask"), mask)))  # strict, as the oracle
    m = p.sub("mask")
    x = _units(np.asarray(x), p, "pre", training, structure["p"])
    T = _units(x, p, "trunk", training, structure["t"])
    features, h = [], x
    for i in range(1, mask["depth"] + 1):
        h = nf.max_pool2d(h, **MAX_POOL[pooling])
        h = _units(h, m, f"down{i}", training, 2 * mask["r"] if i == mask["depth"] else mask["r"])
        features.append(h)
    for i in range(mask["depth"] - 1, 0, -1):
        h = _upsample(h, features[i - 1], align_corners)
        if i <= mask["skips"]:  # the feature itself, then its skip unit's output
            h = (
                h
                + features[i - 1]
                + _residual_unit(features[i - 1], m.sub(f"skip{i}"), 1, training)
            )
        h = _units(h, m, f"up{i}", training, mask["r"])
    M = mask_head(
        _upsample(h, x, align_corners), m.sub("head"), activation=activation, training=training
    )
    H = (1 + M) * T if learning == "arl" else M * T
    return _units(H, p, "post", training, structure["p"])


_ACTIVATIONS = (
    Variant(
        "channel_activation",
        "mask activation f2: each position's channel vector divided by its L2 norm",
        "the paper's attention-type study (Table 2)",
        {"activation": "channel"},
    ),
    Variant(
        "spatial_activation",
        "mask activation f3: sigmoid of each channel map standardised over positions",
        "the paper's attention-type study (Table 2)",
        {"activation": "spatial"},
    ),
)
MASK_VARIANTS = _ACTIVATIONS
_FIXED = "Keras and PyTorch ports that upsample with UpSampling2D / scale_factor=2"
BRANCH_VARIANTS = (
    _ALIGN,
    _CAFFE,
    *_ACTIVATIONS,
    Variant(
        "fixed_factor_upsampling",
        "bilinear upsampling by a fixed factor 2: right only where every size halves evenly",
        _FIXED,
        numpy_forward=_fixed_factor(soft_mask_branch),
    ),
)
MODULE_VARIANTS = (
    Variant(
        "fixed_factor_upsampling",
        "bilinear upsampling by a fixed factor 2: right only where every size halves evenly",
        _FIXED,
        numpy_forward=_fixed_factor(attention_module),
    ),
    *_ACTIVATIONS,
    Variant(
        "skip_adds_feature",
        "on the way up the bottom-up feature is added as well as its skip unit's output",
        "PyTorch ports with upsampling sizes fixed for one input size",
        numpy_forward=skip_adds_feature_module,
    ),
    Variant(
        "naive_attention",
        "naive attention learning H = M * T instead of H = (1 + M) * T",
        "the paper's NAL ablation; zoo modules that multiply by the mask",
        {"learning": "nal"},
    ),
    _ALIGN,
    _CAFFE,
)


PAPER = Paper(
    slug="residual_attention",
    title="Residual Attention Network for Image Classification",
    authors=(
        "Fei Wang, Mengqing Jiang, Chen Qian, Shuo Yang, Cheng Li, Honggang Zhang, "
        "Xiaogang Wang, Xiaoou Tang"
    ),
    venue="CVPR",
    year=2017,
    arxiv="1704.06904",
    tutorial="tutorials/01_residual_attention.ipynb",
    components=(
        Component(
            name="residual_unit",
            module=ResidualUnit,
            numpy_forward=residual_unit,
            make_example=example_residual_unit,
            properties=UNIT_PROPERTIES,
            option_space=UNIT_SPACE,
            build_example=build_residual_unit_example,
            shape_space=UNIT_SHAPES,
            valid=valid,
            attention=False,
            **_PAPER,
        ),
        Component(
            name="mask_head",
            properties=MASK_PROPERTIES,
            variants=MASK_VARIANTS,
            module=MaskHead,
            numpy_forward=mask_head,
            make_example=example_mask_head,
            option_space=HEAD_SPACE,
            build_example=build_mask_head_example,
            shape_space=UNIT_SHAPES,
            valid=valid,
            attention=False,
            **_PAPER,
        ),
        Component(
            name="soft_mask_branch",
            properties=BRANCH_PROPERTIES,
            variants=BRANCH_VARIANTS,
            module=SoftMaskBranch,
            numpy_forward=soft_mask_branch,
            make_example=example_soft_mask_branch,
            option_space=BRANCH_SPACE,
            build_example=build_soft_mask_branch_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            attention=False,
            **_DEEP,
        ),
        Component(
            name="attention_module",
            properties=MODULE_PROPERTIES,
            variants=MODULE_VARIANTS,
            module=AttentionModule,
            numpy_forward=attention_module,
            make_example=example_attention_module,
            option_space=MODULE_SPACE,
            build_example=build_attention_module_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            aliases=("residual_attention",),
            **_DEEP,
        ),
    ),
)
