"""BAM: what is particular to the paper: named steps, literals, the maps' invariants, the
official form, its weights and bugs, the network. What every component promises (oracle
agreement, module promises, bad input, compile, export, gradcheck, the shared invariants)
is tested by tests/test_contract.py."""

from __future__ import annotations

import copy
import inspect
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import refimpl
import refimpl.registry
from refimpl._params import Params
from refimpl.backbones import count_macs, count_parameters
from refimpl.bam import (
    BAM,
    BAMResNet,
    ChannelGate,
    SpatialGate,
    attention_map,
    bam,
    bam_resnet50,
    channel_gate,
    convert_official_state_dict,
    load_official_state_dict,
    spatial_gate,
    torch_module,
)
from refimpl.bam.convert import OFFICIAL_OPTIONS
from refimpl.bam.popular import OfficialBAM, ZooBAM, build_official_bam, load_official_bam
from refimpl.bam.registry import PAPER
from refimpl.bam.torch_module import COMBINES, NATIVE_F0_BELOW
from refimpl.registry import get, randomize_, state_dict_numpy
from refimpl.testing import check_invariants
from tests.strategies import (
    assert_close_report,
    nchw_shapes,
    normal,
    options_for,
    seeds,
    shapes_for,
    to_torch,
)

BAM_COMPONENT = get("bam")
# Options from the option space declared in refimpl/bam/registry.py: C from 1 upward, so
# C < r comes up often; dilations up to 5 exceed most drawn sizes (taps beyond the border).
options = options_for(BAM_COMPONENT)
shapes = shapes_for(BAM_COMPONENT)
PAPER_OPTS = {"reduction": 4, "dilation": 4, "norm": "output", "combine": "sum"}


def build(channels: int, opts: dict, seed: int, device: str = "cpu", dtype=torch.float64):
    """A BAM with random weights and running statistics from ``seed``."""
    module = BAM(channels, **opts)
    return randomize_(module.double(), seed).to(device=device, dtype=dtype)


def numpy_options(opts: dict) -> dict:
    """The constructor options the NumPy forward takes (the widths are in the weights)."""
    return {k: opts[k] for k in ("dilation", "norm", "combine")}


def for_mode(shape: tuple[int, ...], training: bool) -> tuple[int, ...]:
    """Training mode needs N >= 2 (the batch norm after the global pooling)."""
    shape = (max(shape[0], 2), *shape[1:]) if training else shape
    assert BAM_COMPONENT.valid({}, shape, training)  # the registry's constraint agrees
    return shape


# ---------------------------------------------------------------------------------------
# Named steps and literals (agreement with the oracle: tests/test_contract.py).


@given(shape=shapes, opts=options, seed=seeds, training=st.booleans())
def test_named_steps_agree(shape, opts, seed, training):
    """The two branches and the attention map agree one by one, not only composed."""
    shape = for_mode(shape, training)
    module = build(shape[1], opts, seed).train(training)
    params = state_dict_numpy(module)
    x = normal(shape, seed + 1)
    out, maps = module(to_torch(x), return_maps=True)
    channel_params = Params.of(params, "BAM").sub("channel_gate")
    spatial_params = Params.of(params, "BAM").sub("spatial_gate")
    norm, d = opts["norm"], opts["dilation"]
    M_c = channel_gate(x, channel_params, norm=norm, training=training)
    M_s = spatial_gate(x, spatial_params, dilation=d, norm=norm, training=training)
    M = attention_map(M_c, M_s, opts["combine"])
    for name, ours, ref in (("M_c, Eq. 3", "M_c", M_c), ("M_s, Eq. 4", "M_s", M_s)):
        assert_close_report(maps[ours].detach().numpy(), ref, rtol=1e-10, atol=1e-12, what=name)
    assert_close_report(maps["M"].detach().numpy(), M, rtol=1e-10, atol=1e-12, what="M, Eq. 2")
    assert_close_report(out.detach().numpy(), x + x * M, rtol=1e-10, atol=1e-12, what="Eq. 1")
    _, np_maps = bam(x, params, training=training, return_maps=True, **numpy_options(opts))
    assert set(np_maps) == set(maps) == {"M_c", "M_s", "M"}
    assert maps["M_c"].shape == shape[:2] and maps["M_s"].shape == (shape[0], *shape[2:])


@given(shape=shapes, opts=options, seed=seeds)
def test_gate_modules_agree_with_their_numpy_twins(shape, opts, seed):
    """ChannelGate and SpatialGate used on their own, with their own state dicts."""
    hidden = max(1, shape[1] // opts["reduction"])
    cg = ChannelGate(shape[1], hidden_channels=hidden, norm=opts["norm"])
    sg = SpatialGate(shape[1], hidden_channels=hidden, dilation=opts["dilation"], norm=opts["norm"])
    cg, sg = randomize_(cg.double(), seed).eval(), randomize_(sg.double(), seed + 1).eval()
    x = normal(shape, seed + 2)
    expected_c = channel_gate(x, state_dict_numpy(cg), norm=opts["norm"])
    expected_s = spatial_gate(x, state_dict_numpy(sg), dilation=opts["dilation"], norm=opts["norm"])
    assert_close_report(cg(to_torch(x)).detach().numpy(), expected_c, rtol=1e-10, atol=1e-12)
    assert_close_report(sg(to_torch(x)).detach().numpy(), expected_s, rtol=1e-10, atol=1e-12)


def _identity_bn(bn: torch.nn.Module) -> None:
    """Make an eval-mode batch norm the identity up to rounding: mean 0, scale sqrt(1 + eps)."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.fill_(math.sqrt(1.0 + bn.eps))
    bn.bias.zero_()


@pytest.mark.parametrize("combine", COMBINES)
def test_literal_worked_by_hand(combine):
    """C = 2, hidden width 1, H x W = 1 x 2, d = 4: every number can be done on paper.

    At 1 x 2 with dilation 4, every tap of the 3x3 convolutions but the centre falls on
    the zero padding, so the dilated convolutions act as 1x1 ones with their centre weight;
    their other taps are set to large values to show they read only zeros.
    """
    module = BAM(2, hidden_channels=1, dilation=4, combine=combine).double().eval()
    cg, sg = module.channel_gate, module.spatial_gate
    with torch.no_grad():
        cg.fc0.weight.copy_(torch.tensor([[1.0, -1.0]]))  # W0 F_c = F_c0 - F_c1
        cg.fc0.bias.zero_()
        cg.fc1.weight.copy_(torch.tensor([[2.0], [0.0]]))  # W1 h + b1 = (2h, 3)
        cg.fc1.bias.copy_(torch.tensor([0.0, 3.0]))
        sg.conv0.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))  # f0: channel 0
        sg.conv0.bias.zero_()
        for conv, centre, bias in ((sg.conv1, 1.0, 0.0), (sg.conv2, 2.0, -1.0)):
            conv.weight.fill_(100.0)  # off-centre taps: read only padding
            conv.weight[0, 0, 1, 1] = centre
            conv.bias.fill_(bias)
        sg.conv3.weight.fill_(-1.0)  # f3: -h
        sg.conv3.bias.zero_()
        _identity_bn(cg.bn)
        _identity_bn(sg.bn)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, -2.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    # Channel branch: F_c = (2, -1); h = relu(2 + 1) = 3; M_c = (6, 3).
    # Spatial branch: f0 = (1, 3) -> relu -> f1 = (1, 3) -> relu -> f2 = 2 h - 1 = (1, 5)
    # -> relu -> f3 = (-1, -5): M_s = (-1, -5).
    M_c, M_s = torch.tensor([6.0, 3.0]), torch.tensor([-1.0, -5.0])
    logits = M_c[:, None] + M_s[None] if combine == "sum" else M_c[:, None] * M_s[None]
    # sum: [[5, 1], [2, -2]]; product: [[-6, -30], [-3, -15]]
    M = 1 / (1 + torch.exp(-logits.double()))  # (C, W)
    expected = x * (1 + M[None, :, None, :])
    out, maps = module(x, return_maps=True)
    torch.testing.assert_close(maps["M_c"][0], M_c.double(), rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(maps["M_s"][0, 0], M_s.double(), rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    np_out = bam(x.numpy(), state_dict_numpy(module), combine=combine)
    np.testing.assert_allclose(np_out, expected.numpy(), rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Invariants of the module.


@given(shape=shapes, opts=options, seed=seeds, scale=st.sampled_from([1.0, 4.0]))
def test_map_in_unit_interval_and_output_between_x_and_2x(shape, opts, seed, scale):
    module = build(shape[1], opts, seed).eval()
    x = to_torch(normal(shape, seed + 1, scale))
    out, maps = module(x, return_maps=True)
    M = maps["M"]
    assert bool(((M > 0) & (M < 1)).all()), f"M outside (0, 1): [{M.min()}, {M.max()}]"
    s = torch.sign(x)
    assert bool(((out - x) * s >= 0).all()), "|out| < |x| somewhere, or a sign flipped"
    assert bool(((2 * x - out) * s >= 0).all()), "|out| > 2 |x| somewhere"


@given(shape=shapes, opts=options, seed=seeds)
def test_size_is_preserved_at_every_size(shape, opts, seed):
    """Odd, non-square, 1x1 and smaller than the dilated kernel (2d + 1) alike."""
    module = build(shape[1], opts, seed).eval()
    x = to_torch(normal(shape, seed + 1))
    out, maps = module(x, return_maps=True)
    assert out.shape == x.shape and maps["M"].shape == x.shape
    assert maps["M_s"].shape == (shape[0], shape[2], shape[3])


@given(
    shape=nchw_shapes(max_n=1, min_hw=3, max_hw=17, max_c=12),
    opts=options,
    seed=seeds,
    where=st.tuples(st.integers(0, 16), st.integers(0, 16)),
)
def test_spatial_map_reaches_only_dilated_offsets(shape, opts, seed, where):
    """M_s(i, j) depends on x only at offsets (a d, b d), a, b in {-2, ..., 2}.

    Two 3x3 convolutions with dilation d reach exactly these 25 offsets; a padding or
    dilation bug (the zoo's padding 1, say) would shift or shrink the map and break it.
    """
    module = build(shape[1], opts, seed).eval()
    d = opts["dilation"]
    x = to_torch(normal(shape, seed + 1))
    i0, j0 = where[0] % shape[2], where[1] % shape[3]
    bumped = x.clone()
    bumped[:, :, i0, j0] += 5.0
    changed = (module.spatial_gate(bumped) - module.spatial_gate(x))[0].abs() > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    for di, dj in zip((rows - i0).tolist(), (cols - j0).tolist(), strict=True):
        assert di % d == 0 and dj % d == 0 and abs(di) <= 2 * d and abs(dj) <= 2 * d, (
            f"M_s moved at offset ({di}, {dj}) with dilation {d}"
        )


@given(shape=nchw_shapes(min_hw=2, max_c=40), opts=options, seed=seeds)
def test_channel_map_ignores_position_order(shape, opts, seed):
    """M_c sees only the global average: permuting positions leaves it unchanged."""
    module = build(shape[1], opts, seed).eval()
    x = to_torch(normal(shape, seed + 1))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(shape[2] * shape[3]))
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    _, maps = module(x, return_maps=True)
    _, maps_perm = module(x_perm, return_maps=True)
    # A mean over positions in another order differs in the last bits.
    torch.testing.assert_close(maps_perm["M_c"], maps["M_c"], rtol=1e-12, atol=1e-14)


@given(shape=shapes, opts=options, seed=seeds)
@example(  # sigmoid's vectorised and scalar paths once differed in the last bit here
    shape=(1, 2, 3, 3), opts={**PAPER_OPTS, "reduction": 2, "dilation": 1}, seed=203
)
def test_zero_final_conv_leaves_the_channel_gate(shape, opts, seed):
    """f3 = 0 (and a neutral final BN): M_s = 0 exactly.

    Sum: M = sigmoid(M_c), an SE-like gate, the same at every position. Product:
    M = sigmoid(0) = 1/2 everywhere and F' = 1.5 F exactly, whatever M_c is.
    """
    module = build(shape[1], opts, seed).eval()
    sg = module.spatial_gate
    with torch.no_grad():
        sg.conv3.weight.zero_()
        sg.conv3.bias.zero_()
        if sg.bn is not None:
            sg.bn.running_mean.zero_()
            sg.bn.bias.zero_()
    x = to_torch(normal(shape, seed + 1))
    out, maps = module(x, return_maps=True)
    assert bool((maps["M_s"] == 0).all())
    if opts["combine"] == "product":
        assert torch.equal(maps["M"], torch.full_like(x, 0.5))
        assert torch.equal(out, x + x * 0.5)
    else:
        expected = torch.sigmoid(maps["M_c"])[:, :, None, None].expand_as(x)
        # Not bitwise: sigmoid's vectorised and scalar code paths may differ in the last bit.
        torch.testing.assert_close(maps["M"], expected, rtol=1e-15, atol=0)


@given(shape=shapes, opts=options, seed=seeds)
def test_zero_output_layer_leaves_the_spatial_gate(shape, opts, seed):
    """W1 = 0, b1 = 0 (and a neutral BN): M_c = 0; sum gives M = sigmoid(M_s), the same
    for every channel; product gives M = 1/2."""
    module = build(shape[1], opts, seed).eval()
    cg = module.channel_gate
    with torch.no_grad():
        cg.fc1.weight.zero_()
        cg.fc1.bias.zero_()
        if cg.bn is not None:
            cg.bn.running_mean.zero_()
            cg.bn.bias.zero_()
    x = to_torch(normal(shape, seed + 1))
    _, maps = module(x, return_maps=True)
    assert bool((maps["M_c"] == 0).all())
    if opts["combine"] == "product":
        assert torch.equal(maps["M"], torch.full_like(x, 0.5))
    else:
        expected = torch.sigmoid(maps["M_s"])[:, None].expand_as(x)
        torch.testing.assert_close(maps["M"], expected, rtol=1e-15, atol=0)


def test_training_mode_couples_the_batch():
    """In training mode batch norm uses batch statistics: items are not independent
    (the reason the eval-mode property above is stated for eval)."""
    module = build(8, PAPER_OPTS, seed=0).train()
    batch = to_torch(normal((3, 8, 5, 5), 1))
    other = batch.clone()
    other[2] += 1.0
    assert not torch.allclose(module(batch)[0], module(other)[0])


def test_training_with_one_item_raises_a_clear_error():
    module = build(8, PAPER_OPTS, seed=0).train()
    x = to_torch(normal((1, 8, 4, 4), 1))
    for who, fn in (
        ("BAM", lambda: module(x)),
        ("ChannelGate", lambda: module.channel_gate(x)),
        ("bam", lambda: bam(x.numpy(), state_dict_numpy(module), training=True)),
    ):
        with pytest.raises(ValueError) as info:
            fn()
        for word in (who, "training", "N >= 2", "N = 1", "eval mode"):
            assert word in str(info.value)
    with pytest.raises(ValueError, match=r"SpatialGate.*N \* H \* W = 1"):
        module.spatial_gate(to_torch(normal((1, 8, 1, 1), 1)))
    module.eval()(x)  # eval mode is fine with one item


# ---------------------------------------------------------------------------------------
# Autograd.


# ---------------------------------------------------------------------------------------
# What a PyTorch module promises.


def test_no_grad_and_grad_paths_agree():
    """Under no_grad the output is one addcmul, with autograd a multiply and an add."""
    module = build(16, PAPER_OPTS, seed=0).eval()
    x = to_torch(normal((2, 16, 7, 5), 1))
    with torch.no_grad():
        fused = module(x)
    torch.testing.assert_close(module(x), fused, rtol=1e-15, atol=1e-15)


@given(shape=shapes, opts=options, seed=seeds, training=st.booleans())
def test_both_routes_of_the_1x1_convolutions_agree(shape, opts, seed, training):
    """f0 and f3 run as F.conv2d where torch's own loop is faster, else as one batched
    product (torch_module._native_faster): the same output and gradients either way."""
    module = build(shape[1], opts, seed).train(training and shape[0] >= 2)
    x = to_torch(normal(shape, seed)).requires_grad_()
    grad = to_torch(normal(shape, seed + 1))
    results = []
    for native in (True, False):
        m = copy.deepcopy(module)
        with mock.patch.object(torch_module, "_native_faster", lambda x, conv, n=native: n):
            out = m(x)
        (dx,) = torch.autograd.grad(out, x, grad)
        results.append((out, dx, m.state_dict()))
    (out1, dx1, state1), (out2, dx2, state2) = results
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx2, rtol=1e-10, atol=1e-10)
    for key in state1:  # running statistics
        torch.testing.assert_close(state1[key], state2[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 15, 16])
@pytest.mark.parametrize("size", [(7, 7), (1, 1), (28, 28)])
def test_native_route_is_where_torch_runs_its_own_loop(threads, dtype, n, size):
    """_torch_loop mirrors torch's choice of backend for a 1x1 convolution (its "slow"
    loop, not oneDNN), held against torch's own selector where this torch has it; the
    route taken (_native_faster) is that loop for float32 only, for f0 on small maps only."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:  # the mirror then stands alone (the route is only about speed)
        pytest.skip("this torch has no torch._C._select_conv_backend to compare with")
    module = BAM(64, reduction=16, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for conv, channels in ((module.spatial_gate.conv3, 4), (module.spatial_gate.conv0, 64)):
            x = torch.zeros(n, channels, *size, dtype=dtype)
            args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1, None)  # stride ... groups
            loop = select(x, conv.weight, conv.bias, *args).name == "Slow2d"
            assert torch_module._torch_loop(x) == loop
            small = conv.out_channels == 1 or n * size[0] * size[1] < NATIVE_F0_BELOW
            expected = loop and small and dtype == torch.float32
            assert torch_module._native_faster(x, conv) == expected, (conv, loop)
    finally:
        torch.set_num_threads(before)


def test_state_dict_keys_are_the_numpy_params():
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    wb = ["weight", "bias"]

    def keys(prefix, layers):
        return [f"{prefix}.{layer}.{p}" for layer, params in layers for p in params]

    paper = keys("channel_gate", [("fc0", wb), ("fc1", wb), ("bn", bn)]) + keys(
        "spatial_gate", [("conv0", wb), ("conv1", wb), ("conv2", wb), ("conv3", wb), ("bn", bn)]
    )
    official = keys("channel_gate", [("fc0", wb), ("bn0", bn), ("fc1", wb)]) + keys(
        "spatial_gate",
        [("conv0", wb), ("bn0", bn), ("conv1", wb), ("bn1", bn), ("conv2", wb), ("bn2", bn)]
        + [("conv3", wb)],
    )
    assert list(BAM(32).state_dict()) == paper
    assert list(BAM(32, norm="hidden", combine="product").state_dict()) == official


def test_hidden_channels_given_directly_and_dilation_stored():
    module = BAM(64, reduction=16, hidden_channels=24, dilation=3)
    assert module.channel_gate.fc1.weight.shape == (64, 24)
    assert module.spatial_gate.conv3.weight.shape == (1, 24, 1, 1)
    conv1 = module.spatial_gate.conv1
    assert conv1.dilation == (3, 3) and conv1.padding == (3, 3)


def test_reset_parameters_and_repr():
    module = BAM(32, 4, dilation=2, norm="hidden", combine="product")
    randomize_(module, 0)
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    module.reset_parameters()
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(bool((bn.running_var == 1).all() and (bn.weight == 1).all()) for bn in bns)
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert all(p.abs().sum() > 0 for p in weights)
    text = repr(module)
    for part in ("channels=32", "hidden_channels=8", "dilation=2", "'hidden'", "'product'"):
        assert part in text


def test_registry_component(monkeypatch):
    """create() by name, the registry's contract and ``check`` on this paper's component."""
    if "bam" not in refimpl.registry.PAPER_PACKAGES:  # until the lead registers the paper
        monkeypatch.setattr(
            refimpl.registry, "PAPER_PACKAGES", (*refimpl.registry.PAPER_PACKAGES, "bam")
        )
    module = refimpl.create("bam", 64, reduction=8, combine="product")
    assert isinstance(module, BAM) and module.hidden_channels == 8
    (comp,) = PAPER.components
    assert comp.name == comp.numpy_forward.__name__ == "bam"
    from refimpl.check import run_checks

    rows = run_checks(["bam"], ["cpu"], examples=3)
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    for seed in range(3):
        ex = comp.make_example(seed)
        check_invariants(ex.module, "bam", options=ex.module_options, examples=3).assert_ok()


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came.


BAD_OPTIONS = [
    ({"channels": 0}, ["channels", "positive"]),
    ({"channels": 8, "reduction": 0}, ["reduction"]),
    ({"channels": 8, "hidden_channels": 0}, ["hidden_channels"]),
    ({"channels": 8.0}, ["channels"]),
    ({"channels": 8, "norm": "end"}, ["norm", "'output'"]),
    ({"channels": 8, "dilation": 0}, ["dilation"]),
    ({"channels": 8, "combine": "max"}, ["combine", "'sum'"]),
]


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (cls, kwargs, words)
        for cls in (BAM, ChannelGate, SpatialGate)
        for kwargs, words in BAD_OPTIONS
        if set(kwargs) <= set(inspect.signature(cls).parameters)
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_options_raise(cls, kwargs, words):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for word in (cls.__name__, *words):
        assert word in str(info.value)


def test_numpy_rejects_bad_options():
    params = state_dict_numpy(BAM(8, 2))
    x = np.zeros((1, 8, 2, 2))
    with pytest.raises(ValueError, match="norm"):
        bam(x, params, norm="end")
    with pytest.raises(ValueError, match="combine"):
        bam(x, params, combine="max")
    with pytest.raises(ValueError, match="dilation"):
        bam(x, params, dilation=0)


# ---------------------------------------------------------------------------------------
# The official code: its formula, its weights, its bugs.


def official_formula(x: torch.Tensor, sd: dict, training: bool) -> torch.Tensor:
    """The official BAM's forward, written out from its key names with torch.nn.functional.

    Independent of refimpl: pool by a kernel of size H, Linear, BN, ReLU, Linear; 1x1 conv,
    BN, ReLU, two (3x3 conv with dilation 4 and padding 4, BN, ReLU), 1x1 conv; then
    x * (1 + sigmoid(channel * spatial)).
    """

    def bn(h, name):
        return F.batch_norm(
            h,
            sd[f"{name}.running_mean"].clone(),
            sd[f"{name}.running_var"].clone(),
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=training,
        )

    c, s = "channel_att.gate_c.gate_c_", "spatial_att.gate_s.gate_s_"
    pooled = F.avg_pool2d(x, x.shape[2], stride=x.shape[2]).flatten(1)
    hidden = F.relu(bn(F.linear(pooled, sd[c + "fc_0.weight"], sd[c + "fc_0.bias"]), c + "bn_1"))
    channel = F.linear(hidden, sd[c + "fc_final.weight"], sd[c + "fc_final.bias"])
    h = F.conv2d(x, sd[s + "conv_reduce0.weight"], sd[s + "conv_reduce0.bias"])
    h = F.relu(bn(h, s + "bn_reduce0"))
    for i in range(2):
        w, b = sd[f"{s}conv_di_{i}.weight"], sd[f"{s}conv_di_{i}.bias"]
        h = F.relu(bn(F.conv2d(h, w, b, padding=4, dilation=4), f"{s}bn_di_{i}"))
    spatial = F.conv2d(h, sd[s + "conv_final.weight"], sd[s + "conv_final.bias"])
    return x * (1 + torch.sigmoid(channel[:, :, None, None] * spatial))


def official_state_dict(channels: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 weights under the official key names, built without refimpl's modules."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, base=0.0):
        return base + 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)

    def bn(prefix, n):
        return {
            f"{prefix}.weight": rand(n, base=1.0),
            f"{prefix}.bias": rand(n),
            f"{prefix}.running_mean": rand(n),
            f"{prefix}.running_var": 0.5 + torch.rand(n, generator=g, dtype=torch.float64),
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }

    c, s = "channel_att.gate_c.gate_c_", "spatial_att.gate_s.gate_s_"
    sd = {c + "fc_0.weight": rand(hidden, channels) / channels**0.5, c + "fc_0.bias": rand(hidden)}
    sd |= bn(c + "bn_1", hidden)
    sd |= {c + "fc_final.weight": rand(channels, hidden) / hidden**0.5}
    sd |= {c + "fc_final.bias": rand(channels)}
    sd |= {s + "conv_reduce0.weight": rand(hidden, channels, 1, 1) / channels**0.5}
    sd |= {s + "conv_reduce0.bias": rand(hidden)} | bn(s + "bn_reduce0", hidden)
    for i in range(2):
        sd[f"{s}conv_di_{i}.weight"] = rand(hidden, hidden, 3, 3) / (9 * hidden) ** 0.5
        sd[f"{s}conv_di_{i}.bias"] = rand(hidden)
        sd |= bn(f"{s}bn_di_{i}", hidden)
    sd |= {s + "conv_final.weight": rand(1, hidden, 1, 1), s + "conv_final.bias": rand(1)}
    return sd


@given(
    channels=st.sampled_from([16, 32, 48]),
    size=st.integers(1, 12),
    n=st.integers(2, 3),
    seed=seeds,
    training=st.booleans(),
)
def test_converted_official_weights_compute_the_official_formula(channels, size, n, seed, training):
    sd = official_state_dict(channels, channels // 16, seed)
    module = BAM(channels, **OFFICIAL_OPTIONS).double().train(training)
    module.load_state_dict(convert_official_state_dict(sd))
    x = to_torch(normal((n, channels, size, size), seed + 1))  # square: the official pooling
    expected = official_formula(x, sd, training)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-12)
    # And the transcription in refimpl.bam.popular loads the same dict unchanged.
    peer = OfficialBAM(channels).double().train(training)
    peer.load_state_dict(sd)
    torch.testing.assert_close(peer(x), expected, rtol=1e-10, atol=1e-12)


def test_converter_on_a_whole_official_network():
    """``module.`` prefix, bam1..bam3 and the ResNet's downsample.0/1 are all handled."""
    kwargs = {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16), "num_classes": 5}
    source = BAMResNet(layout="torchvision", **kwargs, **OFFICIAL_OPTIONS).double()
    randomize_(source, 0).eval()
    renames = {
        "channel_gate.fc0.": "channel_att.gate_c.gate_c_fc_0.",
        "channel_gate.bn0.": "channel_att.gate_c.gate_c_bn_1.",
        "channel_gate.fc1.": "channel_att.gate_c.gate_c_fc_final.",
        "spatial_gate.conv0.": "spatial_att.gate_s.gate_s_conv_reduce0.",
        "spatial_gate.bn0.": "spatial_att.gate_s.gate_s_bn_reduce0.",
        "spatial_gate.conv1.": "spatial_att.gate_s.gate_s_conv_di_0.",
        "spatial_gate.bn1.": "spatial_att.gate_s.gate_s_bn_di_0.",
        "spatial_gate.conv2.": "spatial_att.gate_s.gate_s_conv_di_1.",
        "spatial_gate.bn2.": "spatial_att.gate_s.gate_s_bn_di_1.",
        "spatial_gate.conv3.": "spatial_att.gate_s.gate_s_conv_final.",
        "downsample.conv.": "downsample.0.",
        "downsample.bn.": "downsample.1.",
    }
    official = {}
    for key, value in source.state_dict().items():
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        official["module." + key] = value
    assert "module.bam2.spatial_att.gate_s.gate_s_conv_di_1.weight" in official
    target = BAMResNet(layout="torchvision", **kwargs, **OFFICIAL_OPTIONS).double().eval()
    target.load_state_dict(convert_official_state_dict(official))  # strict: every key matches
    x = to_torch(normal((2, 3, 32, 32), 1))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # The loader takes the whole training checkpoint and gives the same network...
    checkpoint = {"epoch": 90, "arch": "resnet", "state_dict": official, "best_prec1": 0.0}
    fresh = BAMResNet(layout="torchvision", **kwargs, **OFFICIAL_OPTIONS).double().eval()
    loaded = load_official_state_dict(fresh, checkpoint)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    # ...and refuses the paper's sum, into which the renamed keys load just as strictly.
    summed = BAMResNet(layout="torchvision", **kwargs, norm="hidden").double()
    summed.load_state_dict(convert_official_state_dict(official))
    with pytest.raises(ValueError, match=r"bam1 has combine='sum'"):
        load_official_state_dict(summed, checkpoint)


def test_converter_rejects_layers_it_cannot_place():
    sd = {"channel_att.gate_c.gate_c_fc_1.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="num_layers"):
        convert_official_state_dict(sd)


def test_official_transcription_matches_ours_and_keeps_its_bugs():
    ours = build(32, {"reduction": 16, "dilation": 4, **OFFICIAL_OPTIONS}, seed=0).eval()
    peer = build_official_bam(32, 2).double().eval()
    load_official_bam(peer, ours)
    x = to_torch(normal((2, 32, 9, 9), 1))
    torch.testing.assert_close(peer(x), ours(x), rtol=1e-12, atol=1e-14)
    wide = to_torch(normal((2, 32, 4, 8), 1))  # W = 2H: two pooled columns per channel
    with pytest.raises(RuntimeError):
        peer(wide)
    assert ours(wide).shape == wide.shape
    zoo_legacy = ZooBAM(32, legacy_padding=True).double().eval()
    assert zoo_legacy(to_torch(normal((2, 32, 7, 7), 1))).shape == (2, 32, 7, 7)
    with pytest.raises(RuntimeError):  # (9 - 6) x (9 - 6) does not broadcast to 9 x 9
        zoo_legacy(to_torch(normal((2, 32, 9, 9), 1)))
    assert ZooBAM(32).double().eval()(x).shape == x.shape


# ---------------------------------------------------------------------------------------
# BAM-ResNet-50.


@pytest.fixture(scope="module")
def meta_networks():
    with torch.device("meta"):
        return {
            "paper": bam_resnet50(),
            "official": bam_resnet50(layout="torchvision", **OFFICIAL_OPTIONS),
        }


def test_bam_resnet50_parameters_match_the_published_count(meta_networks):
    # Published: about 25.9M. The paper form has its BNs at the branch ends, the official
    # form after the hidden layers: 2 694 parameters apart (see refimpl/bam/networks.py).
    paper, official = (count_parameters(meta_networks[k]) for k in ("paper", "official"))
    assert paper == 25_917_793
    assert official == 25_915_099  # the count imgclsmob reproduces for the official weights
    for count in (paper, official):
        assert abs(count - 25.9e6) / 25.9e6 < 0.005


def test_bam_resnet50_macs(meta_networks):
    # ResNet-50 v1 3.858 GMAC plus the three BAMs' 82M (the spatial branches).
    assert round(count_macs(meta_networks["paper"]) / 1e9, 3) == 3.940
    assert round(count_macs(meta_networks["official"]) / 1e9, 3) == 4.171


def test_bam_sits_after_stages_1_2_3_and_not_in_the_blocks(meta_networks):
    net = meta_networks["paper"]
    assert [getattr(net, f"bam{s}") is not None for s in range(1, 5)] == [True, True, True, False]
    assert [net.bam1.channels, net.bam2.channels, net.bam3.channels] == [256, 512, 1024]
    assert all(block.attention is None for block in net.blocks())
    assert sum(isinstance(m, BAM) for m in net.modules()) == 3


def test_bam_resnet_forward_runs_bams_on_stage_outputs():
    net = BAMResNet((1, 1, 1, 1), 7, widths=(4, 8, 8, 16)).eval()
    seen = {}
    for stage in (1, 2, 3):
        bam_module = getattr(net, f"bam{stage}")
        bam_module.register_forward_hook(
            lambda m, args, out, stage=stage: seen.__setitem__(stage, tuple(args[0].shape))
        )
    out = net(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 7)
    assert seen == {1: (2, 16, 16, 16), 2: (2, 32, 8, 8), 3: (2, 32, 4, 4)}


def test_bam_resnet_rejects_in_block_attention():
    with pytest.raises(TypeError, match="between"):
        bam_resnet50(attention="se")
    with pytest.raises(ValueError, match="bam_stages"):
        BAMResNet(bam_stages=(0,))
