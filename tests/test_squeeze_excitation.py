"""Squeeze-and-Excitation: NumPy against PyTorch, the paper's invariants, robustness."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import refimpl
from refimpl.registry import randomize_, state_dict_numpy
from refimpl.squeeze_excitation import SqueezeExcitation, squeeze_excitation
from refimpl.squeeze_excitation.numpy_forward import excitation, scale, squeeze
from refimpl.squeeze_excitation.torch_module import GATES, POOLINGS
from tests.strategies import assert_close_report, nchw_shapes, normal, seeds, spread, to_torch

# Options of the block, drawn together with the shape. C from 1 upward, so C < r (hidden
# width 1) comes up often; widths go past 16 so that r = 16 is exercised for real.
options = st.fixed_dictionaries(
    {
        "reduction": st.sampled_from([1, 2, 4, 16]),
        "bias": st.booleans(),
        "pooling": st.sampled_from(POOLINGS),
        "gate": st.sampled_from(GATES),
    }
)
shapes = nchw_shapes(max_c=40)


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
# Agreement: NumPy float64 is the oracle.


@given(shape=shapes, opts=options, seed=seeds, training=st.booleans())
@example(
    shape=(1, 1, 1, 1),
    opts=dict(reduction=16, bias=True, pooling="avg", gate="sigmoid"),
    seed=0,
    training=False,
)
def test_agrees_with_numpy_float64(device, shape, opts, seed, training):
    module = build(shape[1], opts, seed, device).train(training)
    x = input_for(shape, seed + 1, opts)
    expected = squeeze_excitation(
        x, state_dict_numpy(module), training=training, **numpy_options(opts)
    )
    actual = module(to_torch(x, device)).detach().cpu().numpy()
    # float64 on both sides; the only differences are summation order in the mean and the
    # matrix products (a few ulps of values of order 1).
    assert_close_report(actual, expected, rtol=1e-10, atol=1e-12, what="float64")


@given(shape=shapes, opts=options, seed=seeds)
def test_agrees_with_numpy_float32(device, shape, opts, seed):
    module = build(shape[1], opts, seed, device, torch.float32)
    x = input_for(shape, seed + 1, opts)
    expected = squeeze_excitation(x, state_dict_numpy(module), **numpy_options(opts))
    actual = module(to_torch(x, device, torch.float32)).detach().cpu().double().numpy()
    # float32 has 2^-24 ~ 6e-8 relative rounding; the mean over up to 17x17 positions
    # and products over up to 40 channels accumulate a few hundred ulps at most.
    assert_close_report(actual, expected, rtol=1e-5, atol=1e-6, what="float32")


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


@given(shape=shapes, opts=options, seed=seeds)
def test_sigmoid_gate_shrinks_and_keeps_sign(shape, opts, seed):
    opts = {**opts, "gate": "sigmoid"}
    module = build(shape[1], opts, seed)
    x = to_torch(input_for(shape, seed + 1, opts) * 4)
    out, maps = module(x, return_maps=True)
    s = maps["s"]
    assert bool(((s > 0) & (s < 1)).all()), f"gate outside (0, 1): [{s.min()}, {s.max()}]"
    assert bool((out.abs() <= x.abs()).all()), "|out| > |x| somewhere"
    assert bool((out * x >= 0).all()), "a sign flipped"


@given(shape=nchw_shapes(min_hw=2, max_c=40), opts=options, seed=seeds)
def test_ratio_constant_over_positions(shape, opts, seed):
    """out / x is the same number s_nc at every position of channel c of item n."""
    module = build(shape[1], opts, seed)
    x = to_torch(input_for(shape, seed + 1, opts) + 5.0)  # away from 0: division is safe
    ratio = (module(x) / x).flatten(2)  # (N, C, HW)
    spread_ = (ratio.amax(-1) - ratio.amin(-1)).max().item()
    assert spread_ <= 1e-12, f"out / x varies over positions by {spread_:.3e}"


@given(shape=nchw_shapes(min_hw=2, max_c=40), opts=options, seed=seeds)
def test_commutes_with_position_permutations(shape, opts, seed):
    module = build(shape[1], opts, seed)
    x = to_torch(input_for(shape, seed + 1, opts))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(shape[2] * shape[3]))

    def permute(t):
        return t.flatten(2)[:, :, perm].reshape(t.shape)

    # Sums over positions in a different order differ in the last bits.
    torch.testing.assert_close(module(permute(x)), permute(module(x)), rtol=1e-12, atol=1e-14)


@given(shape=nchw_shapes(max_n=1, max_c=40), opts=options, seed=seeds, n=st.integers(2, 3))
def test_batch_items_are_independent(shape, opts, seed, n):
    """Each item's output is what it gets alone, whatever the others in the batch are."""
    module = build(shape[1], opts, seed)
    batch = to_torch(normal((n, *shape[1:]), seed + 1))
    together = module(batch)
    # Not bitwise: BLAS may block a matrix product differently for another batch size.
    # A batch-coupling bug changes outputs by O(1), far beyond this tolerance.
    for i in range(n):
        alone = module(batch[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-13, atol=1e-15)


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
# Autograd.


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("gate", GATES)
def test_gradcheck(device, pooling, gate):
    opts = {"reduction": 2, "bias": True, "pooling": pooling, "gate": gate}
    module = build(6, opts, seed=3, device=device)
    x = to_torch(spread((2, 6, 3, 4), 4) * 3, device).requires_grad_()
    params = tuple(module.parameters())

    def f(x, *weights):
        state = dict(zip([n for n, _ in module.named_parameters()], weights, strict=True))
        return torch.func.functional_call(module, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------
# What a PyTorch module promises.


def test_input_not_modified(device):
    module = build(8, {"reduction": 2}, seed=0, device=device).train()
    x = to_torch(normal((2, 8, 5, 5), 1), device).requires_grad_()
    before = x.detach().clone()
    module(x).sum().backward()
    assert torch.equal(x.detach(), before)


def test_channels_last(device):
    module = build(16, {"reduction": 4}, seed=0, device=device)
    x = to_torch(normal((2, 16, 7, 5), 1), device)
    out_cl = module(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, module(x), rtol=1e-12, atol=1e-14)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


def test_float32_output_dtype_and_device(device):
    module = SqueezeExcitation(8, reduction=2).to(device)
    out = module(torch.ones(1, 8, 3, 3, device=device))
    assert out.dtype == torch.float32 and out.device.type == device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_finite_and_close(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a CUDA feature; bfloat16 covers the CPU")
    module = build(32, {"reduction": 4}, seed=0, device=device, dtype=torch.float32)
    x = to_torch(normal((2, 32, 9, 9), 1) * 100, device, torch.float32)
    with torch.autocast(device_type=device, dtype=dtype):
        out = module(x)
    assert torch.isfinite(out).all()
    # The gate passes through bfloat16 (8 bits of mantissa): relative error ~ 2^-8.
    torch.testing.assert_close(out.float(), module(x), rtol=2e-2, atol=1e-2)


def test_compile_fullgraph_eager_backend_all_options():
    """Graph capture with no break, for every option (cheap: no code generation)."""
    for pooling in POOLINGS:
        for gate in GATES:
            module = build(8, {"reduction": 2, "pooling": pooling, "gate": gate}, seed=1)
            x = to_torch(normal((2, 8, 5, 3), 2))
            compiled = torch.compile(module, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    module = build(16, {"reduction": 4}, seed=1, dtype=torch.float32)
    x = to_torch(normal((2, 16, 7, 7), 2), dtype=torch.float32)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)


def test_export():
    module = build(8, {"reduction": 2}, seed=1)
    x = to_torch(normal((2, 8, 5, 3), 2))
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x), module(x), rtol=0, atol=0)


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


@given(channels=st.integers(1, 300), reduction=st.integers(1, 64))
def test_hidden_width_is_floor_of_c_over_r_at_least_one(channels, reduction):
    module = SqueezeExcitation(channels, reduction)
    assert module.hidden_channels == max(1, channels // reduction)
    assert module.reduce.weight.shape == (module.hidden_channels, channels)


def test_hidden_channels_given_directly():
    module = SqueezeExcitation(64, reduction=16, hidden_channels=24)
    assert module.reduce.weight.shape == (24, 64)
    assert module.expand.weight.shape == (64, 24)


def test_reset_parameters_and_repr():
    module = SqueezeExcitation(16, 4, pooling="max", gate="tanh", bias=False)
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    module.reset_parameters()
    assert all(p.abs().sum() > 0 for p in module.parameters())
    text = repr(module)
    for part in ("channels=16", "hidden_channels=4", "bias=False", "'max'", "'tanh'"):
        assert part in text


def test_create_by_name():
    for name in ("se", "squeeze_excitation"):
        module = refimpl.create(name, 64, reduction=8)
        assert isinstance(module, SqueezeExcitation) and module.hidden_channels == 8
    with pytest.raises(KeyError, match="registered"):
        refimpl.create("no_such_attention", 64)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came.


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.zeros(8, 5, 5), ValueError, ["(N, C, H, W)", "3 dimensions"]),
        (torch.zeros(1, 8, 5, 5, 1), ValueError, ["(N, C, H, W)", "5 dimensions"]),
        (torch.zeros(1, 7, 5, 5), ValueError, ["8 channels", "7 channels"]),
        (torch.zeros(0, 8, 5, 5), ValueError, ["non-empty"]),
        (torch.zeros(1, 8, 5, 5, dtype=torch.int64), TypeError, ["floating point", "int64"]),
        (torch.zeros(1, 8, 5, 5, dtype=torch.complex64), TypeError, ["complex64"]),
        (np.zeros((1, 8, 5, 5)), TypeError, ["torch.Tensor", "ndarray"]),
    ],
)
def test_bad_input_raises_clear_errors(x, error, words):
    module = SqueezeExcitation(8, 2)
    with pytest.raises(error) as info:
        module(x)
    for word in words:
        assert word in str(info.value)
    if isinstance(x, torch.Tensor):  # the NumPy side says the same
        with pytest.raises(error) as np_info:
            squeeze_excitation(x.numpy(), state_dict_numpy(module))
        for word in words:
            assert word in str(np_info.value)


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


def test_deepcopy_and_train_mode_do_not_change_the_output():
    module = build(8, {"reduction": 2}, seed=5)
    x = to_torch(normal((3, 8, 4, 4), 6))
    clone = copy.deepcopy(module).train()
    torch.testing.assert_close(clone(x), module.eval()(x), rtol=0, atol=0)


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
