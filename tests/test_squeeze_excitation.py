"""Squeeze-and-Excitation: what is particular to the paper (its named steps, a literal
worked by hand, its invariants beyond the registered properties, its options and errors).

What every component promises (agreement with the NumPy oracle, the module promises, bad
input, compile, export, autocast, gradcheck, the shared invariants) is tested once for all
by tests/test_contract.py, from the option space declared in the paper's registry.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from refimpl.registry import get, randomize_, state_dict_numpy
from refimpl.squeeze_excitation import SqueezeExcitation, squeeze_excitation
from refimpl.squeeze_excitation.numpy_forward import excitation, scale, squeeze
from tests.strategies import (
    assert_close_report,
    normal,
    options_for,
    seeds,
    shapes_for,
    spread,
    to_torch,
)

SE = get("squeeze_excitation")
options = options_for(SE)  # the option space declared in refimpl/squeeze_excitation/registry.py
shapes = shapes_for(SE)


def build(channels: int, opts: dict, seed: int, device: str = "cpu", dtype=torch.float64):
    """An SE block with random weights from ``seed``, on ``device`` in ``dtype``."""
    module = SqueezeExcitation(channels, **opts)
    return randomize_(module.double(), seed).to(device=device, dtype=dtype)


def numpy_options(opts: dict) -> dict:
    """The constructor options the NumPy forward takes (the rest is in the weights)."""
    return {"pooling": opts["pooling"], "gate": opts["gate"]}


def input_for(shape, seed, opts):
    # Max pooling picks one element per channel: tie-free values keep float32 and float64
    # on the same argmax; the ReLU gate has a kink at 0 that normal data avoids a.s.
    return spread(shape, seed) * 3 if opts["pooling"] == "max" else normal(shape, seed)


# ---------------------------------------------------------------------------------------
# The named steps, and a literal.


@given(shape=shapes, opts=options, seed=seeds)
def test_named_steps_agree(shape, opts, seed):
    """Squeeze, excitation and scale agree one by one, not only composed."""
    module = build(shape[1], opts, seed)
    params = state_dict_numpy(module)
    x = input_for(shape, seed + 1, opts)
    out, maps = module(to_torch(x), return_maps=True)
    z = squeeze(x, opts["pooling"])
    s = excitation(z, params, opts["gate"])
    assert_close_report(maps["z"].numpy(), z, rtol=1e-12, atol=1e-14, what="z, Eq. (2)")
    assert_close_report(maps["s"].detach().numpy(), s, rtol=1e-10, atol=1e-12, what="s, Eq. 3")
    assert_close_report(out.detach().numpy(), scale(x, s), rtol=1e-10, atol=1e-12, what="Eq. 4")
    np_out, np_maps = squeeze_excitation(x, params, return_maps=True, **numpy_options(opts))
    assert set(np_maps) == set(maps) == {"z", "s"}


def test_literal_worked_by_hand():
    """C = 2, hidden 1, every weight chosen so the block can be done on paper."""
    module = SqueezeExcitation(2, hidden_channels=1).double()
    with torch.no_grad():
        module.reduce.weight.copy_(torch.tensor([[1.0, -1.0]]))  # W1 z = z_0 - z_1
        module.reduce.bias.zero_()
        module.expand.weight.copy_(torch.tensor([[2.0], [0.0]]))  # W2 h = (2h, 0)
        module.expand.bias.copy_(torch.tensor([0.0, 3.0]))
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, -2.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    # z = (2, -1); h = relu(3) = 3; logits = (6, 3); s = (sigmoid 6, sigmoid 3)
    s = torch.tensor([1 / (1 + math.exp(-6)), 1 / (1 + math.exp(-3))], dtype=torch.float64)
    expected = x * s[None, :, None, None]
    torch.testing.assert_close(module(x), expected, rtol=1e-15, atol=0)
    np_out = squeeze_excitation(x.numpy(), state_dict_numpy(module))
    np.testing.assert_allclose(np_out, expected.numpy(), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------
# Invariants of the block.


@given(shape=shapes, seed=seeds, bias=st.booleans())
def test_zero_weights_give_gate_one_half(shape, seed, bias):
    module = SqueezeExcitation(shape[1], bias=bias).double()
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    x = to_torch(normal(shape, seed))
    out, maps = module(x, return_maps=True)
    assert bool((maps["s"] == 0.5).all())
    assert torch.equal(out, x * 0.5)


# ---------------------------------------------------------------------------------------
# The module's keys, widths and name.


def test_state_dict_keys_are_the_numpy_params():
    module = SqueezeExcitation(32)
    assert list(module.state_dict()) == [
        "reduce.weight",
        "reduce.bias",
        "expand.weight",
        "expand.bias",
    ]
    assert list(SqueezeExcitation(32, bias=False).state_dict()) == [
        "reduce.weight",
        "expand.weight",
    ]


def test_hidden_channels_given_directly():
    module = SqueezeExcitation(64, reduction=16, hidden_channels=24)
    assert module.reduce.weight.shape == (24, 64)
    assert module.expand.weight.shape == (64, 24)


def test_create_by_name():
    for name in ("se", "squeeze_excitation"):
        module = refimpl.create(name, 64, reduction=8)
        assert isinstance(module, SqueezeExcitation) and module.hidden_channels == 8
    with pytest.raises(KeyError, match="registered"):
        refimpl.create("no_such_attention", 64)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came.


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"channels": 0}, ["channels", "positive"]),
        ({"channels": 8, "reduction": 0}, ["reduction"]),
        ({"channels": 8, "hidden_channels": 0}, ["hidden_channels"]),
        ({"channels": 8.0}, ["channels"]),
        ({"channels": 8, "pooling": "mean"}, ["pooling", "'avg'"]),
        ({"channels": 8, "gate": "softmax"}, ["gate", "'sigmoid'"]),
    ],
)
def test_bad_options_raise(kwargs, words):
    with pytest.raises(ValueError) as info:
        SqueezeExcitation(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_numpy_rejects_bad_options():
    params = state_dict_numpy(SqueezeExcitation(8, 2))
    with pytest.raises(ValueError, match="pooling"):
        squeeze_excitation(np.zeros((1, 8, 2, 2)), params, pooling="mean")
    with pytest.raises(ValueError, match="gate"):
        squeeze_excitation(np.zeros((1, 8, 2, 2)), params, gate="swish")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_squeeze_is_the_mean_in_every_dtype(dtype):
    """The float32/64 squeeze is a sum and a division (cheaper backward): it must give the
    mean to the bit; half precision keeps the mean, since a sum of 56 x 56 values of 30
    overflows float16 (max 65504)."""
    module = SqueezeExcitation(4, 2)
    x = to_torch(normal((2, 4, 9, 7), 0), dtype=dtype)
    assert torch.equal(module.squeeze(x), x.mean((2, 3)))
    big = torch.full((1, 4, 56, 56), 30.0, dtype=dtype)
    assert torch.isfinite(module.squeeze(big)).all()
