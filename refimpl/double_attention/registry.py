"""The A^2-Nets paper in the registry: its facts, its component, a random example, invariants."""

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
    Invariant,
    Paper,
    Variant,
    draw_case,
    random_input,
    randomize_,
)
from refimpl.testing.properties import commutes_with_position_permutations

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
    return Example(module, (random_input(shape, seed + 1),), {"residual": options["residual"]})


def make_example(seed: int) -> Example:
    """A double attention block with widths, options and input shape drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    options, shape = draw_case(OPTION_SPACE, EXAMPLE_SHAPES, valid, rng)
    return build_example(options, shape, seed)


def _within_rows(values: torch.Tensor, columns: torch.Tensor) -> float:
    """How far the columns of ``values`` (N, k, hw) go outside the row-wise range of
    ``columns`` (N, k, n); 0 when every column is inside."""
    low, high = columns.amin(2, keepdim=True), columns.amax(2, keepdim=True)
    return float(torch.maximum(low - values, values - high).clamp_min(0).max())


def invariants(example: Example, out: torch.Tensor) -> list[Invariant]:
    """The block's properties, checked on one example."""
    module, (x,) = example.module, example.inputs
    _, maps = module(x, return_maps=True)
    b_sum = maps["softmax_B"].sum((2, 3))
    v_sum = maps["softmax_V"].sum(1)
    found = [
        Invariant(
            "each gathering map sums to 1 over positions",
            bool(torch.allclose(b_sum, torch.ones_like(b_sum), rtol=0, atol=1e-12)),
            f"max abs(sum - 1) {(b_sum - 1).abs().max():.2e}",
        ),
        Invariant(
            "each distribution vector sums to 1 over descriptors",
            bool(torch.allclose(v_sum, torch.ones_like(v_sum), rtol=0, atol=1e-12)),
            f"max abs(sum - 1) {(v_sum - 1).abs().max():.2e}",
        ),
    ]
    # out - X = expand(Z) with z_i = G v_i a convex combination of G's columns, so it is
    # a convex combination of the columns of W_e G + b_e: inside their row-wise range.
    G = maps["G"]
    columns = G
    if module.expand is not None:
        weight, bias = module.expand.weight[:, :, 0, 0], module.expand.bias
        columns = weight @ G + (0 if bias is None else bias[:, None])
    distributed = (out - x if module.residual else out).flatten(2)
    excess = _within_rows(distributed, columns)
    found.append(Invariant("z_i inside G's row-wise [min, max]", excess <= 1e-12, f"{excess:.2e}"))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(x.shape[2] * x.shape[3]))
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    out_perm = out.flatten(2)[:, :, perm].reshape(out.shape)
    err = (module(x_perm) - out_perm).abs().max().item()
    found.append(Invariant("equivariant to position permutations", err <= 1e-12, f"{err:.2e}"))
    err = max((module(x[i : i + 1]) - out[i : i + 1]).abs().max().item() for i in range(len(x)))
    found.append(Invariant("batch items independent", err <= 1e-12, f"{err:.2e}"))
    if module.theta.bias is not None:
        shifted = copy.deepcopy(module)
        with torch.no_grad():
            shifted.theta.bias += torch.linspace(-3.0, 5.0, module.n, dtype=x.dtype)
            shifted.rho.bias += 7.0  # one constant for every descriptor
        err = (shifted(x) - out).abs().max().item()
        found.append(Invariant("softmax logits shifted: no change", err <= 1e-10, f"{err:.2e}"))
    return found


# ---------------------------------------------------------------------------------------
# Properties and catalogue (refimpl.testing)

PROPERTIES = (
    commutes_with_position_permutations(
        "commutes with position permutations (global gathering, point-wise distribution)"
    ),
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
            invariants=invariants,
            option_space=OPTION_SPACE,
            build_example=build_example,
            shape_space=SHAPE_SPACE,
            valid=valid,
            aliases=("a2", "double_attention_block"),
        ),
    ),
)
