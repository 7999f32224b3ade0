"""Residual Attention Network: NumPy against PyTorch, the paper's invariants, robustness,
and Attention-56/92 against the paper's table."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import refimpl
from refimpl.backbones import count_macs, count_parameters
from refimpl.registry import get, randomize_, state_dict_numpy
from refimpl.residual_attention import (
    AttentionModule,
    MaskHead,
    ResidualUnit,
    SoftMaskBranch,
    attention_module,
    residual_unit,
    soft_mask_branch,
)
from refimpl.residual_attention import numpy_forward as npf
from refimpl.residual_attention import torch_module as tm
from refimpl.residual_attention.networks import (
    ResidualAttentionNetwork,
    attention56,
    attention56_cifar,
    attention92,
    attention92_cifar,
)
from refimpl.residual_attention.registry import (
    DEEP_TOLERANCES,
    PAPER,
    spatial_shift_scale_bound,
)
from tests.strategies import (
    assert_close_report,
    nchw_shapes,
    normal,
    options_for,
    seeds,
    spread,
    to_torch,
)

ACTIVATIONS = tm.ACTIVATIONS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while this file runs, restored after. Its tensors are small,
    where a second thread buys nothing; and on a shared 2-core machine two OpenMP threads
    competing with other processes ran this file 3x slower (190 s against 60 s) and a
    224 x 224 forward and backward 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LEARNINGS = tm.LEARNINGS
RTOL32, ATOL32 = DEEP_TOLERANCES["float32"]


# ---------------------------------------------------------------------------------------
# Local strategies. Training mode needs N >= 2: batch norm then has more than one value
# per channel at every level, even where the mask branch has pooled down to 1x1.


@st.composite
def shapes(draw, *, max_c: int = 16, training: bool = False, min_hw: int = 1, max_hw: int = 17):
    n = draw(st.integers(2 if training else 1, 3))
    return (n, *draw(nchw_shapes(max_c=max_c, min_hw=min_hw, max_hw=max_hw))[1:])


ATTENTION = get("attention_module")


def module_options() -> st.SearchStrategy[dict]:
    """Constructor options of an AttentionModule, drawn from the option space declared in
    refimpl/residual_attention/registry.py, in valid combinations (skips < depth; a forced
    M = 0 with ARL only: under NAL it makes H = 0, and the last units' batch norms then
    normalise constant channels, where training mode is ill-conditioned)."""
    return options_for(ATTENTION).filter(lambda o: ATTENTION.valid(o, (2, 1, 1, 1), True))


NUMPY_OPTIONS = ("activation", "learning", "force_mask", "align_corners")


def numpy_options(opts: dict) -> dict:
    """The options the NumPy forward takes (the structure is read from the weights)."""
    return {k: v for k, v in opts.items() if k in NUMPY_OPTIONS}


def build(cls, *args, seed: int = 0, device: str = "cpu", dtype=torch.float64, **kwargs):
    """A module with random weights and running statistics from ``seed``."""
    module = randomize_(cls(*args, **kwargs).double(), seed)
    return module.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------
# Named maps. Agreement of every component with the oracle, float64 and float32, is the
# contract test's (tests/test_contract.py), from the option spaces in registry.py.


@given(shape=shapes(training=True), opts=module_options(), seed=seeds)
def test_maps_T_M_H_agree(shape, opts, seed):
    """T, M and H agree one by one, and H is Eq. (3) / Eq. (1) of T and M on both sides."""
    module = build(AttentionModule, shape[1], seed=seed, **opts)
    x = normal(shape, seed + 1)
    params = state_dict_numpy(module)
    out, maps = module(to_torch(x), return_maps=True)
    np_out, np_maps = attention_module(x, params, return_maps=True, **numpy_options(opts))
    assert set(maps) == set(np_maps) == {"T", "M", "H"}
    for key in ("T", "M", "H"):
        assert_close_report(
            maps[key].detach().numpy(), np_maps[key], rtol=1e-10, atol=1e-12, what=key
        )
    T, M = np_maps["T"], np_maps["M"]
    H = (1 + M) * T if opts["learning"] == "arl" else M * T
    np.testing.assert_array_equal(np_maps["H"], H)
    # The mask is the mask branch applied to the output of the p first units.
    if opts["force_mask"] is None:
        pre = npf._units(x, params, "pre", False)
        M_branch = soft_mask_branch(
            pre,
            {k[5:]: v for k, v in params.items() if k.startswith("mask.")},
            **{k: opts[k] for k in ("activation", "align_corners")},
        )
        np.testing.assert_array_equal(M_branch, M)


# ---------------------------------------------------------------------------------------
# Literals worked out by hand.


def test_mask_activations_literal():
    """f1, f2, f3 on logits small enough to do on paper, on both sides."""
    s = np.array([[[[0.0, 2.0]], [[3.0, 0.0]], [[4.0, 0.0]]]])  # (1, 3, 1, 2)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = {
        "mixed": [[[sig(0), sig(2)]], [[sig(3), sig(0)]], [[sig(4), sig(0)]]],
        # position 0: (0, 3, 4) / 5; position 1: (2, 0, 0) / 2
        "channel": [[[0.0, 1.0]], [[0.6, 0.0]], [[0.8, 0.0]]],
        # channel 0, (0, 2): mean 1, var 1; channel 1, (3, 0): mean 1.5, var 2.25;
        # channel 2, (4, 0): mean 2, var 4 (population variances)
        "spatial": [
            [[sig(-1 / math.sqrt(1 + 1e-5)), sig(1 / math.sqrt(1 + 1e-5))]],
            [[sig(1.5 / math.sqrt(2.25 + 1e-5)), sig(-1.5 / math.sqrt(2.25 + 1e-5))]],
            [[sig(2 / math.sqrt(4 + 1e-5)), sig(-2 / math.sqrt(4 + 1e-5))]],
        ],
    }
    for activation, values in expected.items():
        want = np.array([values])
        np.testing.assert_allclose(npf.mask_activation(s, activation), want, rtol=1e-14, atol=0)
        got = tm.mask_activation(torch.from_numpy(s), activation).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "learning, v, factor",
    [("arl", 0.5, 1.5), ("nal", 0.5, 0.5), ("arl", 0.0, 1.0), ("nal", 0.0, 0.0)],
)
def test_arl_and_nal_literal(learning, v, factor):
    """p = t = 0 and a constant mask v: H = (1 + v) x or v x, nothing else."""
    module = build(AttentionModule, 3, 0, 0, learning=learning, force_mask=v)
    x = normal((2, 3, 4, 5), 0)
    np.testing.assert_array_equal(module(to_torch(x)).numpy(), factor * x)
    np.testing.assert_array_equal(
        attention_module(x, state_dict_numpy(module), learning=learning, force_mask=v), factor * x
    )


@pytest.mark.parametrize("align_corners", [True, False])
def test_mask_branch_literal_upsamples_to_the_exact_size(align_corners):
    """One channel, 1x5 input, depth 1, identity units, identity-like head.

    Pooling 3x3/2 with padding 1 gives three maxima m = (max(x0, x1), max(x1, x2, x3),
    max(x3, x4)); upsampling 3 -> 5 gives (m0, (m0+m1)/2, m1, (m1+m2)/2, m2) with corners
    aligned, and (m0, .6 m0 + .4 m1, m1, .4 m1 + .6 m2, m2) with pixel centres aligned.
    Each head batch norm (running mean 0, variance 1) scales by k = 1 / sqrt(1 + eps).
    """
    module = SoftMaskBranch(1, depth=1, align_corners=align_corners).double().eval()
    with torch.no_grad():
        for unit in module.down1:
            unit.conv3.weight.zero_()  # F = 0: the unit is the identity
        module.head.conv1.weight.fill_(1.0)
        module.head.conv2.weight.fill_(1.0)
    x = np.array([1.0, 3.0, 2.0, 5.0, 4.0]).reshape(1, 1, 1, 5)
    m0, m1, m2 = 3.0, 5.0, 5.0
    up = (
        [m0, (m0 + m1) / 2, m1, (m1 + m2) / 2, m2]
        if align_corners
        else [m0, 0.6 * m0 + 0.4 * m1, m1, 0.4 * m1 + 0.6 * m2, m2]
    )
    k2 = 1 / (1 + 1e-5)
    want = 1 / (1 + np.exp(-k2 * np.array(up))).reshape(1, 1, 1, 5)
    _, maps = module(to_torch(x), return_maps=True)
    np.testing.assert_allclose(maps["M"].detach().numpy(), want, rtol=1e-14)
    np.testing.assert_allclose(
        soft_mask_branch(x, state_dict_numpy(module), align_corners=align_corners), want, rtol=1e-14
    )


def test_residual_unit_projection_reads_the_activated_input():
    """With F = 0, a projection unit is shortcut(relu(bn1(x))), not shortcut(x)."""
    module = build(ResidualUnit, 3, 5, 2, seed=4)
    with torch.no_grad():
        module.conv3.weight.zero_()
    x = to_torch(normal((2, 3, 7, 6), 5))
    a = torch.relu(module.bn1(x))
    torch.testing.assert_close(module(x), module.shortcut(a), rtol=0, atol=0)
    assert module(x).shape == (2, 5, 4, 3)


# ---------------------------------------------------------------------------------------
# Invariants.


@given(shape=shapes(training=True), opts=module_options(), seed=seeds, training=st.booleans())
def test_mask_zero_gives_the_trunk_exactly(shape, opts, seed, training):
    """M = 0 with ARL: H == T bit for bit, and out == the last p units applied to T."""
    opts = {**opts, "force_mask": 0.0, "learning": "arl"}
    module = build(AttentionModule, shape[1], seed=seed, **opts).train(training)
    x = normal(shape, seed + 1)
    params = state_dict_numpy(module)
    out, maps = module(to_torch(x), return_maps=True)
    assert torch.equal(maps["H"], maps["T"]) and bool((maps["M"] == 0).all())
    module.post.train(training)
    assert torch.equal(out, module.post(maps["T"]))
    np_out, np_maps = attention_module(
        x, params, training=training, return_maps=True, **numpy_options(opts)
    )
    np.testing.assert_array_equal(np_maps["H"], np_maps["T"])
    np.testing.assert_array_equal(np_out, npf._units(np_maps["T"], params, "post", training))


@given(shape=shapes(), opts=module_options(), seed=seeds)
def test_bounds_of_H(shape, opts, seed):
    """Mixed and spatial masks lie in [0, 1]: ARL gives |T| <= |H| <= 2|T|, NAL |H| <= |T|."""
    opts = {
        **opts,
        "force_mask": None,
        "activation": "mixed" if opts["activation"] == "channel" else opts["activation"],
    }
    module = build(AttentionModule, shape[1], seed=seed, **opts)
    _, maps = module(to_torch(normal(shape, seed + 1) * 3), return_maps=True)
    T, M, H = maps["T"], maps["M"], maps["H"]
    assert bool(((M >= 0) & (M <= 1)).all()), f"M in [{M.min()}, {M.max()}]"
    if opts["learning"] == "arl":
        assert bool(((T.abs() <= H.abs()) & (H.abs() <= 2 * T.abs())).all())
    else:
        assert bool((H.abs() <= T.abs()).all())
    assert bool((H * T >= 0).all()), "a sign flipped"


@given(shape=nchw_shapes(max_c=32), seed=seeds, zero_frac=st.floats(0, 0.5))
@example(shape=(1, 1, 1, 1), seed=0, zero_frac=0.5)
def test_channel_mask_has_unit_norm_or_is_zero(shape, seed, zero_frac):
    """f2: ||M_i|| = 1 at every position whose logit vector is not zero, M_i = 0 where it is."""
    s = normal(shape, seed)
    zero = np.random.default_rng(seed).random((shape[0], 1, *shape[2:])) < zero_frac
    s = np.where(zero, 0.0, s)  # whole positions of zero logits, as a dead ReLU makes them
    for M in (
        npf.mask_activation(s, "channel"),
        tm.mask_activation(to_torch(s), "channel").numpy(),
    ):
        norm = np.sqrt((M * M).sum(axis=1))
        np.testing.assert_allclose(norm[~zero[:, 0]], 1.0, rtol=1e-14)
        assert (M[np.broadcast_to(zero, M.shape)] == 0).all()


@given(
    shape=nchw_shapes(max_c=8, min_hw=1),
    seed=seeds,
    a=st.floats(0.25, 8.0),
    b=st.floats(-5.0, 5.0),
)
@example(shape=(1, 2, 1, 1), seed=0, a=3.0, b=1.0)
def test_spatial_mask_ignores_shift_and_scale_of_its_channel(shape, seed, a, b):
    """f3: a s_c + b (a > 0) in one channel leaves every channel's mask as it was, up to
    the epsilon in sqrt(var + eps), whose effect is bounded (see the registry)."""
    s = spread(shape, seed) * 4  # tie-free: no channel is (nearly) constant unless 1x1
    c = seed % shape[1]
    moved = s.copy()
    moved[:, c] = a * s[:, c] + b
    bound = spatial_shift_scale_bound(to_torch(s), a).numpy()
    for f, conv in ((npf.mask_activation, np.asarray), (tm.mask_activation, to_torch)):
        M, M_moved = (np.asarray(f(conv(v), "spatial")) for v in (s, moved))
        err = np.abs(M_moved - M)
        assert (err[:, c] <= bound[:, c]).all(), f"channel {c} moved by {err[:, c].max():.3e}"
        others = [k for k in range(shape[1]) if k != c]
        assert (err[:, others] == 0).all(), "another channel's mask changed"


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "size", [(1, 1), (1, 2), (2, 1), (3, 3), (5, 7), (7, 5), (9, 4), (14, 14), (17, 1), (33, 31)]
)
def test_any_size_gives_output_of_the_input_size(depth, size):
    """From 1x1 up, odd and even, the mask is upsampled back to exactly the input's size."""
    module = build(AttentionModule, 4, depth=depth)
    x = to_torch(normal((1, 4, *size), 0))
    out, maps = module(x, return_maps=True)
    assert out.shape == maps["M"].shape == maps["T"].shape == x.shape
    np_out = attention_module(x.numpy(), state_dict_numpy(module))
    assert_close_report(out.detach().numpy(), np_out, rtol=1e-10, atol=1e-12, what=f"{size}")


def test_mask_branch_level_sizes_halve_rounding_up():
    """The bottom-up levels of a 57x30 input: 29x15, 15x8, 8x4 (ceil halving), and back."""
    module = build(SoftMaskBranch, 2, depth=3)
    sizes = []
    for i in (1, 2, 3):
        getattr(module, f"down{i}").register_forward_hook(
            lambda m, a, out: sizes.append(tuple(out.shape[2:]))
        )
    module(to_torch(normal((1, 2, 57, 30), 0)))
    assert sizes == [(29, 15), (15, 8), (8, 4)]


def test_stacked_naive_masks_shrink_and_residual_masks_do_not():
    """The paper's argument for ARL (Sec. 3.1): a mask in (0, 1) multiplies features down
    module after module under NAL; under ARL, 1 + M >= 1 never shrinks them."""
    x = to_torch(normal((1, 8, 9, 9), 0))
    for learning in LEARNINGS:
        h, norms = x, [x.norm().item()]
        for k in range(6):  # p = t = 0: each module is H = M * x or (1 + M) * x alone
            h = build(AttentionModule, 8, 0, 0, learning=learning, seed=k)(h)
            norms.append(h.norm().item())
        steps = np.diff(norms)
        assert (steps < 0).all() if learning == "nal" else (steps > 0).all(), norms


# ---------------------------------------------------------------------------------------
# Autograd.


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_mask_activation(activation):
    s = to_torch(spread((2, 3, 3, 4), 1) * 3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: tm.mask_activation(s, activation), (s,), eps=1e-6, atol=1e-8
    )


# ---------------------------------------------------------------------------------------
# What a PyTorch module promises.


def test_meta_device():
    """Runs on the meta device (how the networks' MACs are counted): no data-dependent ops."""
    module = AttentionModule(8, depth=3).to("meta")
    assert module(torch.empty(2, 8, 13, 9, device="meta")).shape == (2, 8, 13, 9)


def test_state_dict_keys_are_the_numpy_params():
    module = AttentionModule(8, 1, 1, 1, depth=2)

    def owner(key: str) -> str:  # the unit a key belongs to, or its layer outside units
        parts = key.split(".")[:-1]
        units = [i for i, part in enumerate(parts) if part.startswith("unit")]
        return ".".join(parts[: units[0] + 1] if units else parts)

    assert sorted({owner(k) for k in module.state_dict()}) == [
        "mask.down1.unit1",
        "mask.down2.unit1",
        "mask.down2.unit2",
        "mask.head.bn1",
        "mask.head.bn2",
        "mask.head.conv1",
        "mask.head.conv2",
        "mask.skip1.bn1",
        "mask.skip1.bn2",
        "mask.skip1.bn3",
        "mask.skip1.conv1",
        "mask.skip1.conv2",
        "mask.skip1.conv3",
        "mask.up1.unit1",
        "post.unit1",
        "pre.unit1",
        "trunk.unit1",
    ]
    unit = ResidualUnit(8, 16, 2)
    assert [k for k in unit.state_dict() if "bn" not in k] == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "shortcut.weight",
    ]
    assert "shortcut.weight" not in ResidualUnit(8).state_dict()


def test_structure_counts():
    """depth poolings, r units per level and 2r at the bottom, skips, p and t units."""
    module = AttentionModule(8, 2, 3, 2, depth=3, skips=1)
    mask = module.mask
    assert [len(getattr(mask, f"down{i}")) for i in (1, 2, 3)] == [2, 2, 4]
    assert [len(getattr(mask, f"up{i}")) for i in (1, 2)] == [2, 2]
    assert hasattr(mask, "skip1") and not hasattr(mask, "skip2")
    assert len(module.pre) == len(module.post) == 2 and len(module.trunk) == 3
    assert SoftMaskBranch(8, depth=3).skips == 2 and SoftMaskBranch(8, depth=1).skips == 0
    assert ResidualUnit(64, 256).hidden_channels == 64 and ResidualUnit(3).hidden_channels == 1


def test_registry_and_create_by_name():
    names = [c.name for c in PAPER.components]
    assert names == ["residual_unit", "mask_head", "soft_mask_branch", "attention_module"]
    for name in ("attention_module", "residual_attention"):
        module = refimpl.create(name, 64, depth=3, activation="spatial")
        assert isinstance(module, AttentionModule) and module.mask.depth == 3
    with pytest.raises(ValueError, match="not a drop-in"):
        refimpl.create("soft_mask_branch", 64)


def test_reset_parameters_and_repr():
    module = AttentionModule(16, 1, 2, 1, depth=2, activation="channel", learning="nal")
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    module.reset_parameters()
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.abs().sum() > 0 for c in convs)
    text = repr(module)
    for part in (
        "channels=16",
        "p=1",
        "t=2",
        "depth=2",
        "skips=1",
        "'channel'",
        "'nal'",
        "force_mask=None",
    ):
        assert part in text
    assert "projection=True" in repr(ResidualUnit(4, 8))


def test_force_mask_can_be_set_and_unset():
    module = build(AttentionModule, 4, seed=2)
    x = to_torch(normal((2, 4, 6, 6), 3))
    before = module(x)
    module.force_mask = 0.0
    _, maps = module(x, return_maps=True)
    assert torch.equal(maps["H"], maps["T"])
    module.force_mask = None
    assert torch.equal(module(x), before)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came.


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (AttentionModule, {"channels": 0}, ["channels", "positive"]),
        (AttentionModule, {"channels": 8, "p": -1}, ["p", ">= 0"]),
        (AttentionModule, {"channels": 8, "t": 1.5}, ["t"]),
        (AttentionModule, {"channels": 8, "r": 0}, ["r", "positive"]),
        (AttentionModule, {"channels": 8, "depth": 0}, ["depth"]),
        (AttentionModule, {"channels": 8, "depth": 2, "skips": 2}, ["skips", "at most"]),
        (AttentionModule, {"channels": 8, "activation": "softmax"}, ["activation", "'mixed'"]),
        (AttentionModule, {"channels": 8, "learning": "resid"}, ["learning", "'arl'"]),
        (AttentionModule, {"channels": 8, "force_mask": math.nan}, ["force_mask", "finite"]),
        (AttentionModule, {"channels": 8, "force_mask": "zero"}, ["force_mask"]),
        (ResidualUnit, {"channels": 8, "stride": 0}, ["stride"]),
        (ResidualUnit, {"channels": 8, "out_channels": 0}, ["out_channels"]),
        (MaskHead, {"channels": 8, "activation": "tanh"}, ["activation"]),
        (SoftMaskBranch, {"channels": 8, "skips": -1}, ["skips"]),
    ],
)
def test_bad_options_raise(cls, kwargs, words):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_numpy_rejects_bad_options():
    params = state_dict_numpy(AttentionModule(4))
    x = np.zeros((1, 4, 3, 3))
    with pytest.raises(ValueError, match="activation"):
        attention_module(x, params, activation="softmax")
    with pytest.raises(ValueError, match="learning"):
        attention_module(x, params, learning="residual")
    unit = state_dict_numpy(ResidualUnit(4))
    with pytest.raises(KeyError, match="projection"):
        residual_unit(np.zeros((1, 4, 3, 3)), unit, stride=2)


# ---------------------------------------------------------------------------------------
# The networks against the paper's table (meta device: no memory, no arithmetic).


def on_meta(builder, *args, **kwargs):
    """A network built on the meta device: shapes only, built in a fraction of a second."""
    with torch.device("meta"):
        return builder(*args, **kwargs)


def test_attention56_parameters_and_macs():
    net = on_meta(attention56)
    params, macs = count_parameters(net), count_macs(net)
    assert params == 31_810_728  # networks.py's table
    assert abs(params / 31.9e6 - 1) < 0.005  # published 31.9M
    assert macs == 6_270_836_736 and 6.2e9 <= macs <= 6.3e9  # published 6.2 GFLOPs (MACs)


def test_attention92_parameters_and_macs():
    """The official definition counts 2.27% above the paper's 51.3M (reported, not bent)."""
    net = on_meta(attention92)
    params, macs = count_parameters(net), count_macs(net)
    assert params == 52_466_344
    assert 0.02 < params / 51.3e6 - 1 < 0.025
    assert macs == 10_533_789_696 and abs(macs / 10.4e9 - 1) < 0.02


def test_cifar_variants_parameters():
    assert count_parameters(on_meta(attention56_cifar)) == 1_148_858
    net = on_meta(attention92_cifar)
    assert count_parameters(net) == 1_959_738 and abs(count_parameters(net) / 1.9e6 - 1) < 0.05
    assert count_macs(net, (1, 3, 32, 32)) == 211_913_216


def test_network_stage_sizes_and_classes():
    net = on_meta(attention92, num_classes=7)
    sizes = {}
    for name in ("stem", "stage1", "stage2", "stage3", "stage4"):
        getattr(net, name).register_forward_hook(
            lambda m, a, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    assert net(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 7)
    assert sizes == {
        "stem": (64, 56, 56),
        "stage1": (256, 56, 56),
        "stage2": (512, 28, 28),
        "stage3": (1024, 14, 14),
        "stage4": (2048, 7, 7),
    }
    assert [
        net.stage1.module1.mask.depth,
        net.stage2.module1.mask.depth,
        net.stage3.module3.mask.depth,
    ] == [3, 2, 1]
    assert [len(net.stage1) - 1, len(net.stage2) - 1, len(net.stage3) - 1] == [1, 2, 3]


@pytest.mark.slow
def test_attention56_forward_backward_224():
    net = attention56(num_classes=10).train()
    x = torch.from_numpy(normal((1, 3, 224, 224), 0)).float()
    out = net(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cifar_forward_backward_32():
    net = attention56_cifar(num_classes=10).train()
    x = torch.from_numpy(normal((2, 3, 32, 32), 0)).float()
    out = net(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_network_bad_options():
    with pytest.raises(ValueError, match="3 modules_per_stage"):
        ResidualAttentionNetwork((1, 1))
    with pytest.raises(ValueError, match="stem"):
        ResidualAttentionNetwork(stem="tiny")
    with pytest.raises(ValueError, match="3 channels"):
        on_meta(attention56)(torch.empty(1, 1, 32, 32, device="meta"))


def test_network_passes_module_options():
    net = on_meta(attention56, activation="spatial", learning="nal")
    modules = [m for m in net.modules() if isinstance(m, AttentionModule)]
    assert len(modules) == 3 and all(
        m.learning == "nal" and m.mask.activation == "spatial" for m in modules
    )
    copy.deepcopy(net)  # plain modules: deep-copyable


# =======================================================================================
# The mask branch's pooling option: "paper" (3x3/2, padding 1) and "caffe" (3x3/2, no
# padding, ceil rounding: the official prototxt). Added with the strict oracle (issue 9).


@given(
    depth=st.integers(1, 3),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    channels=st.integers(1, 6),
    seed=seeds,
)
@example(depth=3, extra=(0, 0), channels=2, seed=0)  # the smallest size Caffe pools at
@example(depth=2, extra=(1, 3), channels=3, seed=1)  # odd sizes: ceil rounding shows
def test_caffe_pooling_agrees_with_numpy(depth, extra, channels, seed):
    size = (2**depth + extra[0], 2**depth + extra[1])
    module = randomize_(
        AttentionModule(channels, 1, 1, 1, depth=depth, pooling="caffe").double(), seed
    ).eval()
    x = normal((2, channels, *size), seed + 1)
    expected = attention_module(x, state_dict_numpy(module), pooling="caffe")
    got = module(to_torch(x)).detach().numpy()
    assert_close_report(got, expected, rtol=1e-10, atol=1e-12, what="caffe pooling, float64")


def test_caffe_pooling_windows_literal():
    """Caffe's windows start at 0, 2, 4, ...; ours one pixel earlier, in the padding. On a
    ramp 0 .. 6 (7 pixels): Caffe pools [0:3], [2:5], [4:7] -> 2, 4, 6 (ceil((7-3)/2)+1 = 3
    outputs); ours [-1:2], [1:4], [3:6], [5:8] -> 1, 3, 5, 6."""
    ramp = np.arange(7.0).reshape(1, 1, 1, 7) * np.ones((1, 1, 3, 1))
    from refimpl import numpy_functional as nf
    from refimpl.residual_attention._pooling import MAX_POOL

    assert nf.max_pool2d(ramp, **MAX_POOL["caffe"])[0, 0, 0].tolist() == [2, 4, 6]
    assert nf.max_pool2d(ramp, **MAX_POOL["paper"])[0, 0, 0].tolist() == [1, 3, 5, 6]
    for name in ("caffe", "paper"):
        torch_out = torch.nn.functional.max_pool2d(to_torch(ramp), **MAX_POOL[name])
        assert (
            torch_out[0, 0, 0].tolist() == nf.max_pool2d(ramp, **MAX_POOL[name])[0, 0, 0].tolist()
        )


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_caffe_pooling_minimum_size_is_tight(depth):
    """2^depth pixels work; 2^depth - 1 raise a clear ValueError on both sides, and there
    the raw pooling chain would really reach an empty map (the bound is not too strict)."""
    module = AttentionModule(2, 0, 0, 1, depth=depth, pooling="caffe").double().eval()
    params = state_dict_numpy(module)
    smallest = 2**depth
    for h, w in ((smallest, smallest), (smallest, 3 * smallest + 1)):
        x = normal((1, 2, h, w), 0)
        assert_close_report(
            module(to_torch(x)).detach().numpy(),
            attention_module(x, params, pooling="caffe"),
            rtol=1e-10,
            atol=1e-12,
            what=f"{h}x{w}",
        )
    for h, w in ((smallest - 1, smallest), (smallest, smallest - 1)):
        x = normal((1, 2, h, w), 0)
        with pytest.raises(ValueError, match=rf"H, W >= 2\^{depth} = {smallest}"):
            module(to_torch(x))
        with pytest.raises(ValueError, match=rf"H, W >= 2\^{depth} = {smallest}"):
            attention_module(x, params, pooling="caffe")
        with pytest.raises(ValueError, match=rf"H, W >= 2\^{depth}"):
            soft_mask_branch(
                x, {k[5:]: v for k, v in params.items() if k[:5] == "mask."}, pooling="caffe"
            )
        h_raw = torch.zeros(1, 1, h, w)
        with pytest.raises(RuntimeError):
            for _ in range(depth):
                h_raw = torch.nn.functional.max_pool2d(h_raw, 3, 2, 0, ceil_mode=True)
    # the forced mask skips the branch: any size
    module.force_mask = 0.0
    module(to_torch(normal((1, 2, 1, 1), 0)))


def test_pooling_option_reaches_every_mask_branch_and_the_stem():
    assert SoftMaskBranch(4).pooling == "paper" and AttentionModule(4).mask.pooling == "paper"
    for build in (attention56, attention92):
        net = on_meta(build, pooling="caffe")
        branches = [m for m in net.modules() if isinstance(m, SoftMaskBranch)]
        assert branches and all(m.pooling == "caffe" for m in branches)
        assert (net.stem.pool.padding, net.stem.pool.ceil_mode) == (0, True)
        assert "pooling='caffe'" in repr(branches[0])
    for bad in ("max", None):
        with pytest.raises(ValueError, match="pooling"):
            SoftMaskBranch(4, pooling=bad)
        with pytest.raises(ValueError, match="pooling"):
            attention_module(
                np.zeros((1, 4, 4, 4)), state_dict_numpy(AttentionModule(4)), pooling=bad
            )
