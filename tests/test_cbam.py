"""CBAM: what is particular to the paper: named steps, literals, the maps' invariants, the
custom backward, official weights and transcriptions, the network. What every component
promises (oracle agreement, module promises, bad input, compile, export, gradcheck, saved
bytes, the shared invariants) is tested by tests/test_contract.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import refimpl
import refimpl.registry
from refimpl._params import Params
from refimpl.backbones import count_macs, count_parameters, resnet50
from refimpl.cbam import (
    CBAM,
    ChannelAttention,
    SpatialAttention,
    cbam,
    convert_official_state_dict,
    load_official_state_dict,
    popular,
)
from refimpl.cbam.networks import cbam_resnet50, zero_init_spatial_bn_
from refimpl.cbam.numpy_forward import (
    channel_attention_map,
    channel_descriptors,
    spatial_attention_map,
    spatial_descriptors,
)
from refimpl.cbam.registry import PAPER
from refimpl.cbam.torch_module import ARRANGEMENTS, VARIANTS
from refimpl.registry import get, randomize_, state_dict_numpy
from refimpl.testing import check_invariants
from tests.strategies import (
    assert_close_report,
    nchw_shapes,
    normal,
    options_for,
    seeds,
    shapes_for,
    spread,
    to_torch,
)

CBAM_COMPONENT = get("cbam")
# Every option of the block, from the option space declared in refimpl/cbam/registry.py
# (C from 1 upward, so C < r comes up often; kernels up to 9, sizes from 1 x 1).
cbam_options = options_for(CBAM_COMPONENT)
shapes = shapes_for(CBAM_COMPONENT)

PAPER_DEFAULTS = dict(
    reduction=16,
    pooling=("avg", "max"),
    kernel_size=7,
    spatial_pooling=None,
    arrangement="channel-spatial",
    variant="paper",
    bias=None,
    spatial_bias=False,
    spatial_bn=None,
)


def build(module_cls, channels: int, opts: dict, seed: int, device="cpu", dtype=torch.float64):
    """A module with random weights and running statistics from ``seed``."""
    module = module_cls(channels, **opts)
    return randomize_(module.double(), seed).to(device=device, dtype=dtype)


def numpy_options(opts: dict) -> dict:
    """The CBAM constructor options the NumPy forward takes (the rest is in the weights)."""
    keys = ("pooling", "spatial_pooling", "arrangement", "variant")
    return {k: opts[k] for k in keys if k in opts}


def one_value_per_batch(shape, opts, training) -> bool:
    """Batch norm in training mode is undefined with one value (torch and NumPy raise)."""
    return not CBAM_COMPONENT.valid(opts, shape, training)


# ---------------------------------------------------------------------------------------
# Named steps and literals (agreement of every component with the oracle: the contract
# test, tests/test_contract.py).


@given(shape=shapes, opts=cbam_options, seed=seeds)
def test_named_steps_agree(shape, opts, seed):
    """Descriptors and maps agree one by one, not only composed (channel-spatial order)."""
    opts = {**opts, "arrangement": "channel-spatial"}
    module = build(CBAM, shape[1], opts, seed).eval()
    params = state_dict_numpy(module)
    channel = Params.of(params, "CBAM").sub("channel")
    spatial = Params.of(params, "CBAM").sub("spatial")
    x = normal(shape, seed + 1)
    out, maps = module(to_torch(x), return_maps=True)
    pooling, spatial_pooling = module.channel.pooling, module.spatial.pooling
    descriptors = channel_descriptors(x, pooling)
    for name, z in zip(pooling, descriptors, strict=True):
        z_torch = x.mean(axis=(2, 3)) if name == "avg" else x.max(axis=(2, 3))
        np.testing.assert_array_equal(z, z_torch)
    M_c = channel_attention_map(x, channel, pooling)
    assert_close_report(maps["M_c"].detach().numpy(), M_c, rtol=1e-10, atol=1e-12, what="Eq. 2")
    F_prime = M_c * x
    stacked = spatial_descriptors(F_prime, spatial_pooling)
    assert stacked.shape == (shape[0], len(spatial_pooling), *shape[2:])
    M_s = spatial_attention_map(F_prime, spatial, spatial_pooling)
    assert_close_report(maps["M_s"].detach().numpy(), M_s, rtol=1e-10, atol=1e-12, what="Eq. 3")
    assert_close_report(out.detach().numpy(), M_s * F_prime, rtol=1e-10, atol=1e-12, what="Eq. 1")
    assert maps["M_c"].shape == (shape[0], shape[1], 1, 1)
    assert maps["M_s"].shape == (shape[0], 1, *shape[2:])


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_literal_worked_by_hand():
    """C = 2, hidden 1, a 1x1 spatial kernel: the whole block can be done on paper."""
    module = CBAM(2, hidden_channels=1, kernel_size=1).double()  # paper: no biases
    with torch.no_grad():
        module.channel.reduce.weight.copy_(torch.tensor([[1.0, -1.0]]))  # W0 z = z_0 - z_1
        module.channel.expand.weight.copy_(torch.tensor([[2.0], [0.0]]))  # W1 h = (2h, 0)
        module.spatial.conv.weight.copy_(torch.tensor([[[[1.0]], [[-1.0]]]]))  # avg - max
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, -2.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    # F^c_avg = (2, -1), F^c_max = (3, 0); W0: 3 and 3; MLP: (6, 0) twice; M_c = (s(12), 1/2)
    s12 = sigmoid(12)
    M_c = torch.tensor([s12, 0.5], dtype=torch.float64)
    F_prime = x * M_c[None, :, None, None]  # [[s12, 3 s12], [0, -1]]
    # position 0: avg s12/2, max s12; position 1: avg (3 s12 - 1)/2, max 3 s12
    logits = [s12 / 2 - s12, (3 * s12 - 1) / 2 - 3 * s12]
    M_s = torch.tensor([sigmoid(v) for v in logits], dtype=torch.float64)
    expected = F_prime * M_s[None, None, None, :]
    out, maps = module(x, return_maps=True)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-16)
    torch.testing.assert_close(maps["M_c"].flatten(), M_c, rtol=1e-15, atol=0)
    np_out = cbam(x.numpy(), state_dict_numpy(module), spatial_pooling=("avg", "max"))
    np.testing.assert_allclose(np_out, expected.numpy(), rtol=1e-15, atol=1e-16)


def test_official_order_is_the_paper_with_the_conv_inputs_swapped():
    """[max; mean] with swapped kernels, biases 0 and an identity batch norm = the paper."""
    paper = build(CBAM, 12, {"reduction": 4, "kernel_size": 5}, seed=3).eval()
    official = CBAM(12, 4, kernel_size=5, variant="official").double().eval()
    with torch.no_grad():
        official.channel.reduce.weight.copy_(paper.channel.reduce.weight)
        official.channel.expand.weight.copy_(paper.channel.expand.weight)
        official.channel.reduce.bias.zero_()
        official.channel.expand.bias.zero_()
        official.spatial.conv.weight.copy_(paper.spatial.conv.weight.flip(1))  # swap inputs
        official.spatial.bn.weight.fill_(math.sqrt(1 + 1e-5))  # (l - 0) / sqrt(1 + eps) * w
    x = to_torch(normal((2, 12, 6, 5), 4))
    torch.testing.assert_close(official(x), paper(x), rtol=1e-14, atol=1e-15)
    # and the order matters: unswapped kernels give another function
    with torch.no_grad():
        official.spatial.conv.weight.copy_(paper.spatial.conv.weight)
    assert (official(x) - paper(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# Invariants.


@given(shape=shapes, opts=cbam_options, seed=seeds, training=st.booleans())
def test_maps_in_unit_interval_and_output_shrinks(shape, opts, seed, training):
    assume(not one_value_per_batch(shape, opts, training))
    module = build(CBAM, shape[1], opts, seed).train(training)
    x = to_torch(normal(shape, seed + 1) * 4)
    out, maps = module(x, return_maps=True)
    for name, m in maps.items():
        assert bool(((m > 0) & (m < 1)).all()), f"{name} outside (0, 1): [{m.min()}, {m.max()}]"
    assert bool((out.abs() <= x.abs()).all()), "|CBAM(x)| > |x| somewhere"
    assert bool((out * x >= 0).all()), "a sign flipped"
    # and the output is exactly what the two maps make of x
    torch.testing.assert_close(out, x * maps["M_c"] * maps["M_s"], rtol=1e-14, atol=1e-300)


def permute_positions(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return t.flatten(2)[:, :, perm].reshape(t.shape)


@given(shape=nchw_shapes(min_hw=2, max_c=40), opts=cbam_options, seed=seeds)
def test_channel_map_ignores_the_order_of_positions(shape, opts, seed):
    """M_c(F) pools over positions: any permutation of them leaves it unchanged."""
    opts = {**opts, "arrangement": "channel-spatial"}
    module = build(CBAM, shape[1], opts, seed).eval()
    gate = module.channel
    x = to_torch(normal(shape, seed + 1))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(shape[2] * shape[3]))
    # sums in another order differ in the last bits; max pooling is exact
    torch.testing.assert_close(
        gate.attention_map(permute_positions(x, perm)), gate.attention_map(x), rtol=1e-13, atol=0
    )
    _, maps = module(x, return_maps=True)
    _, maps_perm = module(permute_positions(x, perm), return_maps=True)
    torch.testing.assert_close(maps_perm["M_c"], maps["M_c"], rtol=1e-13, atol=0)
    # the channel gate alone then commutes with the permutation
    torch.testing.assert_close(
        gate(permute_positions(x, perm)), permute_positions(gate(x), perm), rtol=1e-13, atol=0
    )


@given(shape=nchw_shapes(min_c=2, max_c=40), opts=cbam_options, seed=seeds, training=st.booleans())
def test_spatial_map_ignores_the_order_of_channels(shape, opts, seed, training):
    """M_s pools across channels: any permutation of its input's channels leaves it unchanged."""
    assume(not one_value_per_batch(shape, opts, training))
    module = build(CBAM, shape[1], opts, seed).train(training)
    gate = module.spatial
    x = to_torch(normal(shape, seed + 1))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(shape[1]))
    torch.testing.assert_close(
        gate.attention_map(x[:, perm]), gate.attention_map(x), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(gate(x[:, perm]), gate(x)[:, perm], rtol=1e-13, atol=0)
    if opts["arrangement"] == "parallel":  # M_s of F itself
        _, maps = module(x, return_maps=True)
        torch.testing.assert_close(
            module.spatial.attention_map(x[:, perm]), maps["M_s"], rtol=1e-13, atol=0
        )


@given(shape=shapes, opts=cbam_options, seed=seeds, training=st.booleans())
def test_zero_spatial_weights_give_one_half_exactly(shape, opts, seed, training):
    """Zero convolution (and zero bias / batch-norm affine): logits 0, M_s = 0.5 everywhere."""
    assume(not one_value_per_batch(shape, opts, training))
    module = build(CBAM, shape[1], opts, seed).train(training)
    with torch.no_grad():
        module.spatial.conv.weight.zero_()
        if module.spatial.conv.bias is not None:
            module.spatial.conv.bias.zero_()
    zero_init_spatial_bn_(module)  # the official start: batch norm weight and bias 0
    x = to_torch(normal(shape, seed + 1))
    out, maps = module(x, return_maps=True)
    assert bool((maps["M_s"] == 0.5).all()), f"M_s in [{maps['M_s'].min()}, {maps['M_s'].max()}]"
    if module.arrangement != "spatial-channel":
        torch.testing.assert_close(out, x * maps["M_c"] * 0.5, rtol=0, atol=0)


@given(shape=shapes, seed=seeds, variant=st.sampled_from(VARIANTS))
def test_zero_weights_give_gates_one_half(shape, seed, variant):
    module = CBAM(shape[1], variant=variant).double().eval()
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    x = to_torch(normal(shape, seed))
    out, maps = module(x, return_maps=True)
    assert bool((maps["M_c"] == 0.5).all()) and bool((maps["M_s"] == 0.5).all())
    assert torch.equal(out, x * 0.5 * 0.5)


def test_batch_norm_couples_items_in_training_only():
    """With the official batch norm in training mode, an item's output depends on the others."""
    module = build(CBAM, 8, {"reduction": 2, "variant": "official"}, seed=1).train()
    batch = to_torch(normal((3, 8, 5, 5), 2))
    assert (module(batch)[:1] - module(batch[:1])).abs().max() > 1e-6
    module.eval()
    torch.testing.assert_close(module(batch)[:1], module(batch[:1]), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1), (3, 3), (1, 17), (6, 6)])
@pytest.mark.parametrize("kernel_size", [3, 7, 9, 15])
def test_sizes_below_the_kernel(size, kernel_size):
    """Padding k // 2 keeps the size however small the map is, and NumPy agrees."""
    module = build(CBAM, 6, {"reduction": 2, "kernel_size": kernel_size}, seed=2).eval()
    x = normal((2, 6, *size), 3)
    out = module(to_torch(x)).detach().numpy()
    assert out.shape == x.shape
    expected = cbam(x, state_dict_numpy(module))
    assert_close_report(out, expected, rtol=1e-10, atol=1e-12, what=f"{size}, k={kernel_size}")


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_arrangements_are_different_functions(arrangement):
    """The three arrangements agree only where they must: the maps' ranges and shapes."""
    x = to_torch(normal((2, 16, 6, 6), 1))
    outs = {}
    for a in ARRANGEMENTS:
        module = build(CBAM, 16, {"reduction": 4, "arrangement": a}, seed=5).eval()
        outs[a] = module(x)
    others = [a for a in ARRANGEMENTS if a != arrangement]
    for other in others:
        assert (outs[arrangement] - outs[other]).abs().max() > 1e-4, (arrangement, other)


# ---------------------------------------------------------------------------------------
# Autograd.


def plain_cbam(module: CBAM, x: torch.Tensor) -> torch.Tensor:
    """CBAM in plain autograd ops (mean, amax, products), for the gradients' reference.

    The module itself uses the max with indices, sums for means, and a product that
    recomputes F' in backward; off ties, all of it must give these gradients."""
    ch, sp = module.channel, module.spatial
    pools = {
        "avg": lambda t, d: t.mean(d, keepdim=True),
        "max": lambda t, d: t.amax(d, keepdim=True),
    }

    def M_c(t):
        logits = 0
        for p in ch.pooling:
            z = pools[p](t, (2, 3)).flatten(1)
            logits = logits + ch.expand(torch.relu(ch.reduce(z)))
        return torch.sigmoid(logits)[:, :, None, None]

    def M_s(t):
        s = sp.conv(torch.cat([pools[p](t, 1) for p in sp.pooling], 1))
        return torch.sigmoid(s if sp.bn is None else sp.bn(s))

    if module.arrangement == "channel-spatial":
        f = x * M_c(x)
        return f * M_s(f)
    if module.arrangement == "spatial-channel":
        f = x * M_s(x)
        return f * M_c(f)
    return x * M_c(x) * M_s(x)


@given(
    shape=nchw_shapes(max_c=16, max_hw=9),
    opts=cbam_options,
    seed=seeds,
    channels_last=st.booleans(),
)
@example(  # C = 1: M_c and M_s both have one channel; the backward must not mix them up
    shape=(2, 1, 3, 4),
    opts={**PAPER_DEFAULTS, "arrangement": "spatial-channel"},
    seed=0,
    channels_last=False,
)
def test_gradients_equal_plain_autograd(shape, opts, seed, channels_last):
    """Our backward (indices, sums, recomputed F') against autograd on the plain formula."""
    assume(not one_value_per_batch(shape, opts, True))
    module = build(CBAM, shape[1], opts, seed).train()
    x = to_torch(spread(shape, seed + 1) * 3)  # tie-free: max pooling's gradient is unique
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = to_torch(normal(shape, seed + 2))
    grads = []
    for f in (module, functools.partial(plain_cbam, module)):
        xg = x.detach().clone().requires_grad_()
        module.zero_grad()
        torch.autograd.backward(f(xg), g)
        grads.append([xg.grad.clone(), *(p.grad.clone() for p in module.parameters())])
    for ours, plain in zip(*grads, strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_gradgradcheck(arrangement):
    """Second derivatives too: the custom backward is made of differentiable operations."""
    module = build(CBAM, 4, {"reduction": 2, "kernel_size": 3, "arrangement": arrangement}, seed=5)
    x = to_torch(spread((1, 4, 3, 3), 6) * 3).requires_grad_()
    assert torch.autograd.gradgradcheck(module, (x,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# What a PyTorch module promises.


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_no_grad_path_equals_grad_path(arrangement):
    module = build(CBAM, 8, {"reduction": 2, "arrangement": arrangement}, seed=0).eval()
    x = to_torch(normal((2, 8, 5, 6), 1))
    with_grad, maps = module(x, return_maps=True)
    assert with_grad.requires_grad
    with torch.no_grad():
        without, maps_ng = module(x, return_maps=True)
    # The paths differ by rounding only: mean without gradients, a scaled sum with them.
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-14, atol=1e-15)
    for k in maps:
        torch.testing.assert_close(maps_ng[k], maps[k].detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_stays_finite_and_close(device, dtype, variant):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a CUDA feature; bfloat16 covers the CPU")
    opts = {"reduction": 4, "variant": variant}
    module = build(CBAM, 32, opts, seed=0, device=device, dtype=torch.float32).eval()
    x = to_torch(normal((2, 32, 9, 9), 1) * 3, device, torch.float32)
    with torch.autocast(device_type=device, dtype=dtype):
        out = module(x)
        huge = module(x * 1e4)
    assert torch.isfinite(out).all() and torch.isfinite(huge).all()
    # out = x * M_c * M_s. The MLP and the convolution run in bfloat16 (8 bits of
    # mantissa): logits of order 10 carry errors of ~0.04, and a sigmoid moves by at most
    # a quarter of that; two gates: |out - out_fp32| <= ~2% of |x| (measured 0.5%).
    err = (out.float() - module(x)).abs()
    assert bool((err <= 2e-2 * x.abs() + 1e-6).all()), f"max err / |x| {(err / x.abs()).max()}"
    # and a training step under autocast: the custom backward gets mixed dtypes
    module.train()
    x.requires_grad_()
    with torch.autocast(device_type=device, dtype=dtype):
        loss = module(x).square().mean()
    loss.backward()
    grads = [x.grad, *(p.grad for p in module.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_state_dict_keys_are_the_numpy_params():
    assert list(CBAM(32).state_dict()) == [
        "channel.reduce.weight",
        "channel.expand.weight",
        "spatial.conv.weight",
    ]
    assert list(CBAM(32, variant="official").state_dict()) == [
        "channel.reduce.weight",
        "channel.reduce.bias",
        "channel.expand.weight",
        "channel.expand.bias",
        "spatial.conv.weight",
        "spatial.bn.weight",
        "spatial.bn.bias",
        "spatial.bn.running_mean",
        "spatial.bn.running_var",
        "spatial.bn.num_batches_tracked",
    ]
    assert list(SpatialAttention(8, bias=True).state_dict()) == ["conv.weight", "conv.bias"]
    assert SpatialAttention(8, pooling="max").conv.weight.shape == (1, 1, 7, 7)


def test_variant_presets_and_overrides():
    paper, official = CBAM(32), CBAM(32, variant="official")
    assert paper.channel.reduce.bias is None and official.channel.reduce.bias is not None
    assert paper.spatial.pooling == ("avg", "max") and official.spatial.pooling == ("max", "avg")
    assert paper.spatial.bn is None and official.spatial.bn is not None
    assert official.spatial.bn.momentum == 0.01 and official.spatial.bn.eps == 1e-5
    mixed = CBAM(32, variant="official", bias=False, spatial_pooling="avg+max", spatial_bn=False)
    assert mixed.channel.reduce.bias is None and mixed.spatial.pooling == ("avg", "max")
    assert mixed.spatial.bn is None
    assert CBAM(32, pooling="max").channel.pooling == ("max",)


def test_reset_parameters_and_repr():
    module = CBAM(16, 4, variant="official", kernel_size=3, arrangement="parallel")
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    module.reset_parameters()
    assert module.channel.reduce.weight.abs().sum() > 0
    assert module.spatial.conv.weight.abs().sum() > 0
    assert torch.equal(module.spatial.bn.weight, torch.ones(1))
    text = repr(module)
    for part in ("arrangement='parallel'", "variant='official'", "hidden_channels=4",
                 "kernel_size=3", "('max', 'avg')", "bn=True", "bias=True"):  # fmt: skip
        assert part in text, part


def test_registry_components_and_create_by_name(monkeypatch):
    if "cbam" not in refimpl.registry.PAPER_PACKAGES:  # until the lead registers the paper
        monkeypatch.setattr(
            refimpl.registry, "PAPER_PACKAGES", (*refimpl.registry.PAPER_PACKAGES, "cbam")
        )
    assert [c.name for c in PAPER.components] == ["channel_attention", "spatial_attention", "cbam"]
    module = refimpl.create("cbam", 64, reduction=8, variant="official")
    assert isinstance(module, CBAM) and module.hidden_channels == 8
    assert isinstance(refimpl.create("channel_attention", 64), ChannelAttention)
    assert isinstance(refimpl.create("spatial_attention", 64, kernel_size=3), SpatialAttention)
    with torch.device("meta"):
        net = resnet50(attention="cbam", attention_options={"variant": "official"})
    assert isinstance(net.layer1[0].attention, CBAM)


@pytest.mark.parametrize("seed", range(6))
def test_registry_examples_pass_their_invariants(seed):
    for comp in PAPER.components:
        example = comp.make_example(seed)
        report = check_invariants(
            example.module, comp.name, options=example.module_options, seed=seed, examples=3
        )
        report.assert_ok()
        assert any(r.status == "passed" and "M_" in r.name for r in report.rows), str(report)
        with torch.no_grad():
            out = example.module(*example.inputs)
        params = state_dict_numpy(example.module)
        expected = comp.numpy_forward(
            *[x.numpy() for x in example.inputs], params, **example.options
        )
        assert_close_report(out.numpy(), expected, rtol=1e-10, atol=1e-12, what=comp.name)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came.


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"channels": 0}, ["channels", "positive"]),
        ({"channels": 8, "reduction": 0}, ["reduction"]),
        ({"channels": 8, "hidden_channels": 0}, ["hidden_channels"]),
        ({"channels": 8.0}, ["channels"]),
        ({"channels": 8, "kernel_size": 4}, ["kernel_size", "odd", "4"]),
        ({"channels": 8, "kernel_size": 0}, ["kernel_size", "positive"]),
        ({"channels": 8, "pooling": "mean"}, ["pooling", "'avg'"]),
        ({"channels": 8, "pooling": ()}, ["pooling", "at least one"]),
        ({"channels": 8, "pooling": ("avg", "avg")}, ["pooling", "distinct"]),
        ({"channels": 8, "pooling": 3}, ["pooling", "sequence"]),
        ({"channels": 8, "spatial_pooling": "avg+lse"}, ["spatial_pooling", "'max'"]),
        ({"channels": 8, "arrangement": "sequential"}, ["arrangement", "'parallel'"]),
        ({"channels": 8, "variant": "timm"}, ["variant", "'official'"]),
    ],
)
def test_bad_options_raise(kwargs, words):
    with pytest.raises(ValueError) as info:
        CBAM(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_numpy_rejects_bad_options():
    params = state_dict_numpy(CBAM(8, 2))
    x = np.zeros((1, 8, 2, 2))
    for kwargs, word in [
        ({"pooling": "mean"}, "pooling"),
        ({"arrangement": "both"}, "arrangement"),
        ({"variant": "timm"}, "variant"),
        ({"spatial_pooling": ("avg",)}, "conv.weight"),  # 1 map for a 2-map kernel
    ]:
        with pytest.raises(ValueError, match=word):
            cbam(x, params, **kwargs)


# ---------------------------------------------------------------------------------------
# Official weights and the transcriptions of other code.


def official_state_dict(channels: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """A state dict laid out as the authors' CBAM saves it, with random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    return {
        "ChannelGate.mlp.1.weight": r(hidden, channels, scale=channels**-0.5),
        "ChannelGate.mlp.1.bias": r(hidden),
        "ChannelGate.mlp.3.weight": r(channels, hidden, scale=hidden**-0.5),
        "ChannelGate.mlp.3.bias": r(channels),
        "SpatialGate.spatial.conv.weight": r(1, 2, 7, 7, scale=0.1),
        "SpatialGate.spatial.bn.weight": 1 + r(1),
        "SpatialGate.spatial.bn.bias": r(1),
        "SpatialGate.spatial.bn.running_mean": r(1),
        "SpatialGate.spatial.bn.running_var": 0.5 + r(1).abs(),
        "SpatialGate.spatial.bn.num_batches_tracked": torch.tensor(1000),
    }


def official_formula(x: torch.Tensor, sd: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
    """The official CBAM written out from its source, independently of refimpl's modules."""
    n, c, h, w = x.shape

    def mlp(v):  # Flatten, Linear, ReLU, Linear
        v = v.reshape(n, c) @ sd["ChannelGate.mlp.1.weight"].T + sd["ChannelGate.mlp.1.bias"]
        return v.clamp_min(0) @ sd["ChannelGate.mlp.3.weight"].T + sd["ChannelGate.mlp.3.bias"]

    att = mlp(F.avg_pool2d(x, (h, w), stride=(h, w))) + mlp(F.max_pool2d(x, (h, w), stride=(h, w)))
    x = x * torch.sigmoid(att)[:, :, None, None]
    pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)  # [max; mean]
    s = F.conv2d(pooled, sd["SpatialGate.spatial.conv.weight"], padding=3)
    if training:
        mean, var = s.mean(), s.var(unbiased=False)
    else:
        mean, var = (
            sd["SpatialGate.spatial.bn.running_mean"],
            sd["SpatialGate.spatial.bn.running_var"],
        )
    s = (s - mean) / torch.sqrt(var + 1e-5) * sd["SpatialGate.spatial.bn.weight"]
    s = s + sd["SpatialGate.spatial.bn.bias"]
    return x * torch.sigmoid(s)


@pytest.mark.parametrize("prefix", ["", "module.", "module.layer3.4.cbam."])
@pytest.mark.parametrize("training", [False, True])
def test_official_state_dict_loads_and_matches_the_official_formula(prefix, training):
    sd = official_state_dict(48, 3, seed=11)
    converted = convert_official_state_dict({prefix + k: v for k, v in sd.items()})
    expected_prefix = "layer3.4.attention." if "layer" in prefix else ""
    converted = {k.removeprefix(expected_prefix): v for k, v in converted.items()}
    module = CBAM(48, 16, variant="official").double().train(training)
    module.load_state_dict(converted, strict=True)
    x = to_torch(normal((3, 48, 9, 8), 12))
    torch.testing.assert_close(module(x), official_formula(x, sd, training), rtol=1e-12, atol=1e-14)
    if "layer" not in prefix:  # a module's checkpoint: the loader gives the same module
        loaded = CBAM(48, 16, variant="official").double().train(training)
        load_official_state_dict(
            loaded, {"epoch": 90, "state_dict": {prefix + k: v for k, v in sd.items()}}
        )
        torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)
    # and the NumPy side reads the converted weights as they are
    np_out = cbam(x.numpy(), state_dict_numpy(module), variant="official", training=training)
    assert_close_report(np_out, official_formula(x, sd, training).numpy(), rtol=1e-10, atol=1e-12)


def test_converter_accepts_a_checkpoint_and_rejects_foreign_gate_keys():
    sd = official_state_dict(32, 2, seed=1)
    from_checkpoint = convert_official_state_dict({"epoch": 90, "state_dict": sd})
    assert from_checkpoint.keys() == convert_official_state_dict(sd).keys()
    with pytest.raises(ValueError, match="ChannelGate.mlp.5.weight"):
        convert_official_state_dict({"ChannelGate.mlp.5.weight": torch.zeros(1)})


def test_official_network_state_dict_loads():
    """Every key of an official CBAM-ResNet-50 (torchvision layout) finds its place."""
    with torch.device("meta"):
        ours = cbam_resnet50(layout="torchvision", variant="official")
    ours_keys = set(ours.state_dict())

    def to_official(key: str) -> str:  # the official names, written out independently
        key = key.replace(".attention.channel.reduce.", ".cbam.ChannelGate.mlp.1.")
        key = key.replace(".attention.channel.expand.", ".cbam.ChannelGate.mlp.3.")
        key = key.replace(".attention.spatial.", ".cbam.SpatialGate.spatial.")
        key = key.replace(".downsample.conv.", ".downsample.0.").replace(
            ".downsample.bn.", ".downsample.1."
        )
        return "module." + key

    official = {to_official(k): k for k in ours_keys}  # official name -> our name
    assert "module.layer1.0.cbam.ChannelGate.mlp.1.weight" in official
    assert "module.layer4.2.cbam.SpatialGate.spatial.bn.running_var" in official
    converted = convert_official_state_dict(official)  # values: the name each must get
    assert set(converted) == ours_keys
    assert all(key == value for key, value in converted.items())
    # The paper's form has the same keys; the loader refuses it, naming a spatial gate.
    with torch.device("meta"):
        paper_order = cbam_resnet50(
            layout="torchvision",
            variant="official",
            cbam_options={"spatial_pooling": ("avg", "max")},
        )
    assert set(paper_order.state_dict()) == ours_keys
    with pytest.raises(ValueError, match=r"layer1\.0\.attention\.spatial stacks \('avg', 'max'\)"):
        load_official_state_dict(paper_order, {})


@pytest.mark.parametrize("training", [False, True])
def test_transcriptions_compute_what_ours_does(training):
    """popular.py's peers, with our weights copied in, give our outputs."""
    x = to_torch(normal((2, 64, 9, 7), 3))
    pairs = [
        (popular.build_popular_cbam, popular.load_popular_cbam, popular.POPULAR_OURS_OPTIONS),
        (popular.build_official_cbam, popular.load_official_cbam, popular.OFFICIAL_OURS_OPTIONS),
    ]
    try:
        popular.build_timm_cbam(64, 4)
        pairs.append((popular.build_timm_cbam, popular.load_timm_cbam, popular.TIMM_OURS_OPTIONS))
    except ImportError:
        pass
    for build_peer, load, options in pairs:
        ours = randomize_(CBAM(64, **options).double(), 0).train(training)
        peer = build_peer(64, ours.hidden_channels).double().train(training)
        load(peer, ours)
        torch.testing.assert_close(peer(x), ours(x), rtol=1e-12, atol=1e-14)
    # the official transcription's state dict converts into ours
    official = popular.OfficialCBAM(64).double()
    ours = CBAM(64, variant="official").double()
    ours.load_state_dict(convert_official_state_dict(official.state_dict()))
    torch.testing.assert_close(
        ours.train(training)(x), official.train(training)(x), rtol=1e-12, atol=1e-14
    )


def test_popular_transcription_keeps_its_kernel_restriction():
    with pytest.raises(AssertionError):
        popular.PopularCBAM(64, kernel_size=5)
    CBAM(64, kernel_size=5)(torch.randn(1, 64, 3, 3))  # ours: any odd kernel


# ---------------------------------------------------------------------------------------
# CBAM-ResNet-50 against the paper's Table 4 (v1 layout, 224 x 224, 1000 classes).


def assert_rel(measured: float, published: float, rtol: float, what: str) -> None:
    rel = measured / published - 1
    assert abs(rel) <= rtol, f"{what}: measured {measured:.6g}, published {published}, {rel:+.3%}"


def test_cbam_resnet50_parameters_and_macs():
    with torch.device("meta"):
        official = cbam_resnet50()
        paper = cbam_resnet50(variant="paper")
        no_bn = cbam_resnet50(cbam_options={"spatial_bn": False})
    # Published: 28.09M and 3.864 GMAC (ResNet-50: 25.56M, 3.858 GMAC). Within 0.5%: the
    # table prints four significant digits; see refimpl/cbam/networks.py.
    assert_rel(count_parameters(official), 28.09e6, 0.005, "CBAM-ResNet-50 parameters")
    assert_rel(count_macs(official), 3.864e9, 0.005, "CBAM-ResNet-50 MACs")
    assert count_parameters(official) == 28_089_624  # exact to the published digits
    assert round(count_macs(official) / 1e6) == 3864
    # the published 28.09M needs the MLP biases; the spatial batch norm is 2 x 16
    assert count_parameters(official) - count_parameters(no_bn) == 32
    assert count_parameters(official) - count_parameters(paper) == 16_080  # biases + BN
    assert count_macs(paper) == count_macs(official)


def test_cbam_resnet50_layouts_and_placement():
    with torch.device("meta"):
        v1, tv = cbam_resnet50(), cbam_resnet50(layout="torchvision")
        base, base_tv = resnet50(), resnet50(layout="torchvision")
    assert count_parameters(tv) == count_parameters(v1)
    # CBAM's own MACs do not depend on where the stride sits
    assert count_macs(tv) - count_macs(v1) == count_macs(base_tv) - count_macs(base)
    blocks = v1.blocks()
    assert len(blocks) == 16 and all(isinstance(b.attention, CBAM) for b in blocks)
    assert [b.attention.channels for b in blocks] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    with pytest.raises(TypeError, match="CBAM"):
        cbam_resnet50(attention="se")


def test_small_cbam_resnet_trains():
    net = cbam_resnet50(10, widths=(4, 4, 8, 8), cbam_options={"pooling": "avg+max"}).double()
    zero_init_spatial_bn_(net)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
