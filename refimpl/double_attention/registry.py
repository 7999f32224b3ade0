"""The A^2-Nets paper in the registry: its facts, its component, a random example, properties."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from refimpl import numpy_functional as nf
from refimpl.double_attention.numpy_forward import conv1x1, double_attention
from refimpl.double_attention.torch_module import DoubleAttention
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
    close,
    commutes_with_position_permutations,
    map_of,
    output,
    property_,
    returned_maps,
)

#: The constructor options and the values tests and examples draw from: widths m and n
#: by reduction (None) or given directly (m != n and m, n > c included); the output
#: convolution and the residual each on or off (the bare operator included).
OPTION_SPACE = {
    "m": (None, None, None, 1, 2, 3, 5, 9, 16, 27, 40),
    "n": (None, None, None, 1, 2, 3, 5, 9, 16, 27, 40),
    "reduction": (1, 2, 4, 8),
    "bias": (True, False),
    "output_conv": (True, True, True, False),
    "residual": (True, False),
}
#: Maps from 1 x 1 to 17 x 17, on both sides of hw = c where the module switches the
#: order of its products.
SHAPE_SPACE = {"N": (1, 3), "C": (1, 32), "H": (1, 17), "W": (1, 17)}
EXAMPLE_SHAPES = {"N": (1, 3), "C": (1, 48), "H": (1, 9), "W": (1, 9)}


def valid(options: dict, shape: tuple[int, ...], training: bool) -> bool:
    """Defined everywhere (no batch statistics; see ``build_example`` for m)."""
    return True


def build_example(options: dict, shape: tuple[int, ...], seed: int) -> Example:
    """A double attention block with ``options`` for ``shape``, random weights from
    ``seed``. With the residual but no output convolution, Z is added to X, so m is set
    to C whatever was drawn (the one constraint between options and shape)."""
    options = dict(options)
    if options["residual"] and not options["output_conv"]:
        options["m"] = shape[1]
    module = randomize_(DoubleAttention(shape[1], **options).double(), seed).eval()
    numpy_options = {"residual": options["residual"]}
    return Example(module, (random_input(shape, seed + 1),), numpy_options, options)


def make_example(seed: int) -> Example:
    """A double attention block with widths, options and input shape drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    options, shape = draw_case(OPTION_SPACE, EXAMPLE_SHAPES, valid, rng)
    return build_example(options, shape, seed)


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)


def _sums_to_one(key: str, dims: tuple[int, ...]):
    """The returned softmax map ``key`` sums to 1 over ``dims``."""

    def check(module, inputs, options) -> tuple[bool, str]:
        total = map_of(returned_maps(module, inputs)[1], key).sum(dims)
        return close(total, torch.ones_like(total))

    return check


def _within_rows(values: torch.Tensor, columns: torch.Tensor) -> float:
    """How far the columns of ``values`` (N, k, hw) go outside the row-wise range of
    ``columns`` (N, k, n); 0 when every column is inside."""
    low, high = columns.amin(2, keepdim=True), columns.amax(2, keepdim=True)
    return float(torch.maximum(low - values, values - high).clamp_min(0).max())


def _distributed_inside_gathered(module, inputs, options) -> tuple[bool, str]:
    """Eq. (4)-(5): out - X = expand(Z), z_i = G v_i with v_i a distribution, so each z_i is
    a convex combination of G's columns, and (an affine map keeps that) each column of
    out - X one of the columns of W_e G + b_e: inside their row-wise range. Reading W_e
    needs refimpl's module, unless there is no reconstruction convolution."""
    x = inputs[0]
    out, maps = returned_maps(module, inputs)
    G = map_of(maps, "G")  # (N, m, n)
    if isinstance(module, DoubleAttention):
        expand, residual = module.expand, module.residual
    elif not options.get("output_conv", True):
        expand, residual = None, options.get("residual", True)
    else:
        raise SkipProperty("needs refimpl's DoubleAttention (the reconstruction weights)")
    columns = G
    if expand is not None:
        with torch.no_grad():
            weight, bias = expand.weight[:, :, 0, 0], expand.bias
            columns = weight @ G + (0 if bias is None else bias[:, None])
    distributed = (out - x if residual else out).flatten(2)
    excess = _within_rows(distributed, columns)
    scale = max(columns.abs().max().item(), 1.0)
    return excess <= 1e-12 * scale, f"largest excess {excess:.2e}"


def _logit_shift_invariant(module, inputs, options) -> tuple[bool, str]:
    """Softmaxes do not see a constant added to their logits: the gathering softmax runs
    over positions (so a bias per descriptor of B is a constant), the distribution softmax
    over descriptors (so one bias for every descriptor of V is). Shifting refimpl's
    theta and rho biases thus changes nothing."""
    if not isinstance(module, DoubleAttention):
        raise SkipProperty("needs refimpl's DoubleAttention (shifts its theta and rho biases)")
    if module.theta.bias is None:
        raise SkipProperty("the 1x1 convolutions have no biases (bias=False)")
    shifted = copy.deepcopy(module)
    with torch.no_grad():
        shifted.theta.bias += torch.linspace(-3.0, 5.0, module.n, dtype=shifted.theta.bias.dtype)
        shifted.rho.bias += 7.0  # one constant for every descriptor
    return close(output(shifted, inputs), output(module, inputs), rtol=1e-10)


PROPERTIES = (
    commutes_with_position_permutations(
        "commutes with position permutations (global gathering, point-wise distribution)"
    ),
    property_(
        "each gathering map sums to 1 over positions",
        _sums_to_one("softmax_B", (2, 3)),
        needs=("maps",),
    ),
    property_(
        "each distribution vector sums to 1 over descriptors",
        _sums_to_one("softmax_V", (1,)),
        needs=("maps",),
    ),
    property_(
        "z_i inside G's row-wise [min, max] (after the reconstruction)",
        _distributed_inside_gathered,
        needs=("maps",),
    ),
    property_("softmax logits shifted: no change", _logit_shift_invariant),
)

_AXES = {"batch": 0, "descriptors": 1, "positions": 2}


def variant_forward(
    softmax_B_over: str = "positions", softmax_V_over: str = "descriptors", pooling: str = "sum"
) -> Callable[..., np.ndarray]:
    """A NumPy forward of the block with the popular code's deviations switched on: the
    axis of each softmax (``"batch"``, ``"descriptors"``, ``"positions"``) and a mean
    instead of a sum over positions in the gathering. The defaults are the paper's."""

    def forward(
        x: np.ndarray, params: Mapping[str, Any], *, residual: bool = True, training: bool = False
    ) -> np.ndarray:
        X = np.asarray(x)
        N, c, H, W = X.shape
        X_flat = X.reshape(N, c, H * W)  # (N, c, hw)
        A = conv1x1(X_flat, params, "phi")  # (N, m, hw)
        B = conv1x1(X_flat, params, "theta")  # (N, n, hw)
        V = conv1x1(X_flat, params, "rho")  # (N, n, hw)
        G = A @ nf.softmax(B, dim=_AXES[softmax_B_over]).transpose(0, 2, 1)  # (N, m, n)
        if pooling == "mean":
            G = G / (H * W)
        Z = G @ nf.softmax(V, dim=_AXES[softmax_V_over])  # (N, m, hw)
        out = conv1x1(Z, params, "expand") if "expand.weight" in params else Z
        if residual:
            out = X_flat + out
        return out.reshape(N, out.shape[1], H, W)

    return forward


_ZOO = "External-Attention-pytorch's DoubleAttention (the most copied attention zoo)"
VARIANTS = (
    Variant(
        "no_residual",
        "no residual connection: returns the projected Z without adding X",
        _ZOO,
        {"residual": False},
    ),
    Variant(
        "bare_operator",
        "neither the reconstruction convolution nor the residual: returns Z (m channels)",
        "blog and zoo versions without reconstruct",
        {"output_conv": False, "residual": False},
    ),
    Variant(
        "softmax_over_batch",
        "both softmaxes without dim= on 3-D tensors, i.e. over the batch axis; no residual",
        _ZOO,
        {"residual": False},
        numpy_forward=variant_forward("batch", "batch"),
        batch_coupled=True,
    ),
    Variant(
        "softmax_B_over_descriptors",
        "the gathering softmax over the n descriptors instead of over positions; no residual",
        f"a later revision of {_ZOO}",
        {"residual": False},
        numpy_forward=variant_forward("descriptors", "descriptors"),
    ),
    Variant(
        "blog_mean_positions",
        "gathering by a mean (not a sum) over positions, distribution softmax over positions "
        "(not descriptors); no reconstruction, no residual",
        "a widely read blog transcription (m = n = c)",
        {"output_conv": False, "residual": False},
        numpy_forward=variant_forward("positions", "positions", "mean"),
    ),
)


PAPER = Paper(
    slug="double_attention",
    title="A^2-Nets: Double Attention Networks",
    authors="Yunpeng Chen, Yannis Kalantidis, Jianshu Li, Shuicheng Yan, Jiashi Feng",
    venue="NeurIPS",
    year=2018,
    arxiv="1810.11579",
    tutorial="tutorials/04_double_attention.ipynb",
    components=(
        Component(
            name="double_attention",
            properties=PROPERTIES,
            variants=VARIANTS,
            paper="double_attention",
            module=DoubleAttention,
            numpy_forward=double_attention,
            make_example=make_example,
            option_space=OPTION_SPACE,
            build_example=build_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            aliases=("a2", "double_attention_block"),
        ),
    ),
)
