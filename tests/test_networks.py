"""The networks against the papers' tables, and the backbone's hooks.

Parameter counts and MACs are measured on the meta device: the models are built
without memory and the forward pass under ``FlopCounterMode`` computes nothing, so the
full-size checks take well under a second each. One real forward and backward pass at
224 x 224 checks that the full network trains.

Published numbers (PAPERS.md): ResNet-50 25.56M and 3.858 GMAC in the "v1" layout
(CBAM's Table), about 4.09 GMAC in the torchvision layout; SE-ResNet-50 28.1M and 3.87
GMAC (SE paper; the CBAM paper gives 28.09M and 3.860); the SE reduction-ratio table.
Tolerances are relative, 0.5%: the papers print three significant digits, so rounding
alone is up to 0.2% (0.05 in 26.9M); see refimpl/squeeze_excitation/networks.py for
where the remaining difference comes from.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from refimpl.backbones import (
    DEPTHS,
    BasicBlock,
    Bottleneck,
    Downsample,
    ResNet,
    convert_torchvision_state_dict,
    count_macs,
    count_parameters,
    resnet,
    resnet50,
)
from refimpl.registry import randomize_
from refimpl.squeeze_excitation import SqueezeExcitation
from refimpl.squeeze_excitation.networks import se_resnet50

STAGES = (3, 4, 6, 3)  # ResNet-50
WIDTHS = (64, 128, 256, 512)


def on_meta(build, *args, **kwargs) -> nn.Module:
    """Build a network on the meta device: no memory, no initialisation work."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def small_resnet(**kwargs) -> ResNet:
    """A narrow, shallow ResNet for the hook tests: runs in milliseconds on 32 x 32."""
    return ResNet((2, 1, 1, 1), num_classes=5, widths=(4, 4, 8, 8), **kwargs)


def image(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)


def assert_rel(measured: float, published: float, rtol: float, what: str) -> None:
    rel = measured / published - 1
    assert abs(rel) <= rtol, f"{what}: measured {measured:.6g}, published {published}, {rel:+.3%}"


# ---------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("layout", ["v1", "torchvision"])
def test_resnet50_parameters(layout: str) -> None:
    n = count_parameters(on_meta(resnet50, layout=layout))
    assert n == 25_557_032  # the same in both layouts: only a stride moves
    assert round(n / 1e6, 2) == 25.56  # CBAM's Table 4
    assert_rel(n, 25.6e6, 0.005, "ResNet-50 (SE paper: 25.6M)")


def test_se_resnet50_parameters() -> None:
    n = count_parameters(on_meta(se_resnet50))
    assert_rel(n, 28.1e6, 0.005, "SE-ResNet-50")
    assert round(n / 1e6, 2) == 28.09  # CBAM's Table 4 (ResNet50 + SE), to all digits


@pytest.mark.parametrize(
    ("r", "published"), [(2, 45.7e6), (4, 35.7e6), (8, 30.7e6), (16, 28.1e6), (32, 26.9e6)]
)
def test_se_reduction_ratio_table(r: int, published: float) -> None:
    n = count_parameters(on_meta(se_resnet50, reduction=r))
    assert_rel(n, published, 0.005, f"SE-ResNet-50, r = {r}")


@pytest.mark.parametrize("r", [4, 16])
def test_se_parameters_by_hand(r: int) -> None:
    """Section 6 of the SE paper: the blocks add 2/r * sum_s N_s C_s^2 weights."""
    base = count_parameters(on_meta(resnet50))
    weights = sum(2 * n * (4 * w) ** 2 // r for n, w in zip(STAGES, WIDTHS, strict=True))
    biases = sum(n * (4 * w + 4 * w // r) for n, w in zip(STAGES, WIDTHS, strict=True))
    assert count_parameters(on_meta(se_resnet50, reduction=r, bias=False)) == base + weights
    assert count_parameters(on_meta(se_resnet50, reduction=r)) == base + weights + biases


def test_count_parameters() -> None:
    lin = nn.Linear(3, 4)
    assert count_parameters(lin) == 16
    tied = nn.Sequential(lin, nn.ReLU(), lin)  # a shared module counts once
    assert count_parameters(tied) == 16
    lin.bias.requires_grad_(False)
    assert count_parameters(lin, trainable_only=True) == 12
    assert count_parameters(nn.BatchNorm2d(5)) == 10  # running statistics are buffers


# ---------------------------------------------------------------------------------------
# Multiply-accumulates


def test_resnet50_macs_v1() -> None:
    macs = count_macs(on_meta(resnet50))
    assert round(macs / 1e9, 3) == 3.858  # CBAM's Table 4, to all digits
    assert_rel(macs, 3.858e9, 0.005, "ResNet-50 v1 MACs")


def test_resnet50_macs_torchvision() -> None:
    macs = count_macs(on_meta(resnet50, layout="torchvision"))
    assert_rel(macs, 4.09e9, 0.005, "ResNet-50 torchvision-layout MACs")
    # The only difference: with the stride moved to the 3x3, conv1 of the first block
    # of stages 2-4 (2w -> w channels) runs at the stage's input resolution, 4x the positions.
    extra = sum(2 * w * w * (s * s - (s // 2) ** 2) for w, s in [(128, 56), (256, 28), (512, 14)])
    assert macs - count_macs(on_meta(resnet50)) == extra


def test_se_resnet50_macs() -> None:
    model = on_meta(se_resnet50)
    macs = count_macs(model)
    assert_rel(macs, 3.87e9, 0.005, "SE-ResNet-50 MACs (SE paper)")
    assert round(macs / 1e9, 3) == 3.860  # CBAM's Table 4, to all digits
    # The SE paper also counts the squeeze (an add per element) and the scale (a
    # multiply per element), which FlopCounterMode leaves out; with them, 3.87 exactly.
    sizes = (56, 28, 14, 7)
    elementwise = sum(2 * n * 4 * w * s * s for n, w, s in zip(STAGES, WIDTHS, sizes, strict=True))
    assert round((macs + elementwise) / 1e9, 2) == 3.87


def test_count_macs_by_hand_and_leaves_model_alone() -> None:
    conv = nn.Conv2d(3, 8, 3)
    assert count_macs(conv, (2, 3, 10, 10)) == 2 * 8 * 27 * 8 * 8
    assert count_macs(nn.Linear(5, 7), (4, 5)) == 4 * 35

    class MatMul(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x @ y

    assert count_macs(MatMul(), [(2, 3), (3, 4)]) == 24  # several inputs

    model = small_resnet().double()
    model.train()
    model.layer2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (1, 3, 32, 32)) > 0
    assert model.training and not model.layer2.training and model.layer3.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nor running stats
    assert all(v.device.type == "cpu" for v in after.values())


# ---------------------------------------------------------------------------------------
# One real pass at full size


def test_se_resnet50_forward_backward_224() -> None:
    torch.manual_seed(0)
    model = se_resnet50()
    x = torch.randn(2, 3, 224, 224)
    logits = model(x)
    assert logits.shape == (2, 1000)
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


# ---------------------------------------------------------------------------------------
# Structure and names


@pytest.mark.parametrize(("layout", "strided"), [("v1", "conv1"), ("torchvision", "conv2")])
def test_layouts_put_the_stride_where_they_say(layout: str, strided: str) -> None:
    model = on_meta(resnet50, layout=layout)
    for stage in (2, 3, 4):
        first = getattr(model, f"layer{stage}")[0]
        for name in ("conv1", "conv2", "conv3"):
            expected = (2, 2) if name == strided else (1, 1)
            assert getattr(first, name).stride == expected, (stage, name)
        assert first.downsample.conv.stride == (2, 2)
    assert model.layer1[0].stride == 1 and model.layer1[0].downsample is not None


def test_named_submodules() -> None:
    model = on_meta(resnet50)
    keys = list(model.state_dict())
    assert "layer1.0.downsample.conv.weight" in keys and "layer1.0.downsample.bn.bias" in keys
    assert keys[0] == "conv1.weight" and keys[-2:] == ["fc.weight", "fc.bias"]
    for key in keys:  # inside a block every name is a word, never a Sequential index
        parts = key.split(".")
        assert not any(p.isdigit() for p in parts[2:]), key
    assert [len(getattr(model, f"layer{s}")) for s in range(1, 5)] == list(STAGES)
    assert all(isinstance(b, Bottleneck) for b in model.blocks())
    assert isinstance(model.layer2[0].downsample, Downsample)


def torchvision_resnet50_keys() -> list[str]:
    """The key names of torchvision's ResNet-50 state dict, written out from its layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for stage, blocks in enumerate(STAGES, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}."
            for j in (1, 2, 3):
                keys += [f"{p}conv{j}.weight", *(f"{p}bn{j}.{s}" for s in bn)]
            if i == 0:
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{s}" for s in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def test_convert_torchvision_state_dict() -> None:
    model = resnet50(layout="torchvision")
    ours = model.state_dict()
    g = torch.Generator().manual_seed(0)
    tv = {}
    for k in torchvision_resnet50_keys():  # random values of the right shape and dtype
        like = ours[convert_torchvision_state_dict({k: None}).popitem()[0]]
        tv[k] = torch.randint(0, 9, like.shape, generator=g).to(like.dtype)
    assert tv["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    converted = convert_torchvision_state_dict(tv)
    assert list(converted) == list(ours)  # same keys, same order
    model.load_state_dict(converted)  # strict
    assert torch.equal(
        model.layer3[0].downsample.bn.running_var, tv["layer3.0.downsample.1.running_var"]
    )
    assert torch.equal(model.layer4[2].conv2.weight, tv["layer4.2.conv2.weight"])


# ---------------------------------------------------------------------------------------
# Hook 1: attention after bn3, before the addition


def record_block(block: Bottleneck, seen: dict) -> list:
    """Forward hooks that store the block's input, bn3's output, the attention's input and
    output, the identity branch and the block's output in ``seen``."""

    def save(key):
        return lambda module, args, out: seen.__setitem__(key, (args, out))

    handles = [
        block.register_forward_hook(save("block")),
        block.bn3.register_forward_hook(save("bn3")),
    ]
    if block.attention is not None:
        handles.append(block.attention.register_forward_hook(save("attention")))
    if block.downsample is not None:
        handles.append(block.downsample.register_forward_hook(save("downsample")))
    return handles


def check_attention_placement(model: ResNet, x: torch.Tensor) -> None:
    records = [{} for _ in model.blocks()]
    for block, seen in zip(model.blocks(), records, strict=True):
        record_block(block, seen)
    model(x)
    for block, seen in zip(model.blocks(), records, strict=True):
        (att_in,), att_out = seen["attention"]
        assert att_in is seen["bn3"][1]  # the attention reads bn3's output ...
        assert att_in.shape[1] == block.out_channels
        identity = seen["downsample"][1] if block.downsample is not None else seen["block"][0][0]
        # ... and its output is what gets added to the identity branch.
        assert torch.equal(seen["block"][1], torch.relu(identity + att_out))


def test_attention_by_name_in_every_block() -> None:
    model = on_meta(resnet50, attention="se", attention_options={"reduction": 8})
    for block in model.blocks():
        assert isinstance(block.attention, SqueezeExcitation)
        assert block.attention.channels == block.out_channels
        assert block.attention.hidden_channels == block.out_channels // 8
    small = randomize_(small_resnet(attention="se", attention_options={"reduction": 4}).double(), 1)
    check_attention_placement(small.eval(), image())


class Halve(nn.Module):
    """A stub attention: out = x / 2, and a log of the channel counts it was built for."""

    built: list[int] = []

    def __init__(self, channels: int) -> None:
        super().__init__()
        Halve.built.append(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


def test_attention_by_callable_after_bn3() -> None:
    Halve.built = []
    model = randomize_(small_resnet(attention=Halve).double(), 2).eval()
    assert Halve.built == [16, 16, 16, 32, 32]  # 4w of every block, in order
    check_attention_placement(model, image())
    plain = small_resnet().double().eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(image()), model(image()))  # it does change something


# ---------------------------------------------------------------------------------------
# Hook 2: fusion replaces the addition in the chosen stages


class Add(nn.Module):
    """A stub fusion that is the plain residual addition; logs its two inputs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
        self.calls.append((X, Y))
        return X + Y


class TakeX(Add):
    """A stub fusion that keeps the identity branch X and drops the residual Y."""

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return X


@pytest.mark.parametrize("stages", [(3, 4), (1,), (1, 2, 3, 4)])
def test_fusion_add_is_the_plain_network(stages: tuple[int, ...]) -> None:
    plain = randomize_(small_resnet().double(), 3).eval()
    fused = small_resnet(fusion=Add, fusion_stages=stages).double().eval()
    fused.load_state_dict(plain.state_dict())  # a stub fusion has no weights
    x = image()
    assert torch.equal(fused(x), plain(x))
    for stage in range(1, 5):
        for block in getattr(fused, f"layer{stage}"):
            if stage in stages:
                assert isinstance(block.fusion, Add) and block.fusion.channels == block.out_channels
                assert len(block.fusion.calls) == 1
            else:
                assert block.fusion is None


def test_fusion_receives_identity_then_residual() -> None:
    model = randomize_(small_resnet(fusion=Add).double(), 4).eval()
    blocks = [model.layer3[0], model.layer4[0]]
    records = [{} for _ in blocks]
    for block, seen in zip(blocks, records, strict=True):
        record_block(block, seen)
    model(image())
    for block, seen in zip(blocks, records, strict=True):
        X, Y = block.fusion.calls[0]  # noqa: N806
        assert X is seen["downsample"][1]  # the identity branch
        assert Y is seen["bn3"][1]  # the residual branch, after bn3 (no attention here)


def test_fusion_returning_x_ignores_the_residual_branch() -> None:
    model = randomize_(small_resnet(fusion=TakeX, fusion_stages=(3, 4)).double(), 5).train()
    x = image()
    out = model(x)
    seen = {}
    record_block(model.layer3[0], seen)
    model(x)
    assert torch.equal(seen["block"][1], torch.relu(seen["downsample"][1]))
    out.sum().backward()
    for stage in range(1, 5):
        for block in getattr(model, f"layer{stage}"):
            for conv in (block.conv1, block.conv2, block.conv3):
                assert (conv.weight.grad is None) == (stage in (3, 4)), (stage, conv)


def test_fusion_by_name_must_take_two_inputs() -> None:
    with pytest.raises(ValueError, match="not a fusion module"):
        small_resnet(fusion="se")


# ---------------------------------------------------------------------------------------
# Inputs, options, devices, memory formats


@pytest.mark.parametrize(
    ("shape", "dtype", "error"),
    [
        ((2, 4, 32, 32), torch.float32, ValueError),  # channels
        ((3, 32, 32), torch.float32, ValueError),  # no batch dimension
        ((0, 3, 32, 32), torch.float32, ValueError),  # empty
        ((2, 3, 32, 32), torch.int64, TypeError),
    ],
)
def test_bad_input(shape: tuple[int, ...], dtype: torch.dtype, error: type) -> None:
    with pytest.raises(error, match="ResNet"):
        small_resnet()(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "v2"},
        {"fusion": Add, "fusion_stages": (0,)},
        {"fusion": Add, "fusion_stages": (5,)},
        {"attention_options": {"reduction": 4}},  # options without a module
        {"layers": (3, 4, 6)},
        {"num_classes": 0},
    ],
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ResNet(**{"layers": (1, 1, 1, 1), "widths": (4, 4, 4, 4), **kwargs})


def test_se_resnet50_refuses_another_attention() -> None:
    with pytest.raises(TypeError):
        se_resnet50(attention="se")


@pytest.mark.parametrize("layout", ["v1", "torchvision"])
def test_channels_last_dtype_and_small_inputs(layout: str, device: str) -> None:
    model = randomize_(small_resnet(layout=layout, attention="se").double(), 6).eval().to(device)
    x = image().to(device)
    out = model(x)
    assert out.dtype == torch.float64 and out.device.type == device
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-12, atol=1e-12)
    for size in (1, 7):  # odd and 1x1 inputs: every stride rounds up
        assert model(image(1, size).to(device)).shape == (1, 5)
    assert model.float()(x.float()).dtype == torch.float32


def test_does_not_change_input() -> None:
    # A fusion returning X returns the block's own input where there is no downsample:
    # the ReLU after it must not work in place.
    block = Bottleneck(16, 4, fusion=TakeX).double()
    x = image(2, 8).repeat(1, 6, 1, 1)[:, :16]
    before = x.clone()
    assert torch.equal(block(x), x.relu())
    assert torch.equal(x, before)
    model = randomize_(small_resnet(fusion=TakeX, fusion_stages=(1,)).double(), 7).eval()
    x = image()
    before = x.clone()
    model(x)
    assert torch.equal(x, before)


def test_reset_parameters() -> None:
    model = randomize_(small_resnet(attention="se").double(), 8)
    model.reset_parameters()
    for block in model.blocks():
        for bn in (block.bn1, block.bn2, block.bn3):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    conv = resnet50().layer3[0].conv2  # 256 -> 256, 3x3: std sqrt(2 / fan_out)
    assert_rel(conv.weight.std().item(), math.sqrt(2 / (256 * 9)), 0.02, "kaiming std")


def test_compiles_fullgraph() -> None:
    model = small_resnet(attention="se", fusion=TakeX).eval()
    x = image().float()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_autocast_bfloat16() -> None:
    model = randomize_(small_resnet(attention="se"), 9).eval()
    x = image().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    # bfloat16 keeps 8 bits of mantissa (relative step 0.4%); measured drift of the
    # logits through 17 convolutions is 0.3% of their largest magnitude.
    ref = model(x)
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


# ---------------------------------------------------------------------------------------
# More depths: ResNet-18, -34 (basic blocks), -101, -152 (bottlenecks)

#: torchvision's resnet18/34/50/101/152 with 1000 classes, counted to the parameter: the
#: official definitions, so these must be exact.
TORCHVISION_PARAMETERS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}

#: CBAM's Table 4 (ImageNet-1K): (depth, attention) -> (parameters in M, GFLOPs), as
#: printed, i.e. rounded to 2 and 3 decimals. "GFLOPs" are multiply-accumulates in the
#: "v1" layout (ResNet-50's 3.858). SE with r = 16 and biases; CBAM in the official
#: form (MLP biases, spatial BN), the form whose 28.09M the table gives for ResNet-50.
CBAM_TABLE_4 = {
    (18, None): (11.69, 1.814),
    (18, "se"): (11.78, 1.814),
    (18, "cbam"): (11.78, 1.815),
    (34, None): (21.80, 3.664),
    (34, "se"): (21.96, 3.664),
    (34, "cbam"): (21.96, 3.665),
    (50, None): (25.56, 3.858),
    (50, "se"): (28.09, 3.860),
    (50, "cbam"): (28.09, 3.864),
    (101, None): (44.55, 7.570),
    (101, "se"): (49.33, 7.575),
    (101, "cbam"): (49.33, 7.581),
}

#: The SE paper's ResNet-101 and -152 with and without SE blocks, in M (one decimal).
SE_PAPER = {(101, None): 44.5, (101, "se"): 49.3, (152, None): 60.2, (152, "se"): 66.8}

ATTENTION_OPTIONS = {None: None, "se": {"reduction": 16}, "cbam": {"variant": "official"}}


def on_meta_resnet(depth: int, attention: str | None = None, **kwargs) -> ResNet:
    return on_meta(
        resnet, depth, attention=attention, attention_options=ATTENTION_OPTIONS[attention], **kwargs
    )


@pytest.mark.parametrize("layout", ["v1", "torchvision"])
@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMETERS))
def test_resnet_depths_parameters_exact(depth: int, layout: str) -> None:
    model = on_meta(resnet, depth, layout=layout)
    assert count_parameters(model) == TORCHVISION_PARAMETERS[depth]
    block, layers = DEPTHS[depth]
    assert model.layers == layers and model.block == block
    kind = BasicBlock if block == "basic" else Bottleneck
    assert all(type(b) is kind for b in model.blocks())
    assert model.fc.in_features == model.stage_channels[-1] == (512 if block == "basic" else 2048)


@pytest.mark.parametrize(("depth", "attention"), sorted(CBAM_TABLE_4, key=str))
def test_cbam_table_4(depth: int, attention: str | None) -> None:
    params, gmacs = CBAM_TABLE_4[depth, attention]
    model = on_meta_resnet(depth, attention)
    assert round(count_parameters(model) / 1e6, 2) == params, "parameters, to all digits"
    assert round(count_macs(model) / 1e9, 3) == gmacs, "GMAC (v1 layout), to all digits"


@pytest.mark.parametrize(("depth", "attention"), sorted(SE_PAPER, key=str))
def test_se_paper_deeper_networks(depth: int, attention: str | None) -> None:
    n = count_parameters(on_meta_resnet(depth, attention))
    assert round(n / 1e6, 1) == SE_PAPER[depth, attention]


@pytest.mark.parametrize("depth", [18, 34, 101, 152])
def test_se_parameters_by_hand_any_depth(depth: int) -> None:
    """SE adds 2 C^2 / r weights and C + C / r biases per block, C the block's output."""
    base = on_meta(resnet, depth)
    extra = sum(
        2 * b.out_channels**2 // 16 + b.out_channels + b.out_channels // 16 for b in base.blocks()
    )
    assert count_parameters(on_meta_resnet(depth, "se")) == count_parameters(base) + extra


def test_resnet50_is_resnet_50() -> None:
    a, b = on_meta(resnet50, layout="torchvision"), on_meta(resnet, 50, layout="torchvision")
    assert repr(a) == repr(b)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((20,), {}, ValueError),
        (("50",), {}, ValueError),
        ((18,), {"layers": (1, 1, 1, 1)}, TypeError),
        ((18,), {"block": "bottleneck"}, TypeError),
    ],
)
def test_resnet_bad_arguments(args: tuple, kwargs: dict, error: type) -> None:
    with pytest.raises(error, match="resnet"):
        resnet(*args, **kwargs)


def test_resnet_bad_block() -> None:
    with pytest.raises(ValueError, match="block"):
        ResNet((1, 1, 1, 1), block="wide")


def torchvision_resnet18_keys() -> list[str]:
    """The key names of torchvision's ResNet-18 state dict, written out from its layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for stage in range(1, 5):
        for i in range(2):
            p = f"layer{stage}.{i}."
            for j in (1, 2):
                keys += [f"{p}conv{j}.weight", *(f"{p}bn{j}.{s}" for s in bn)]
            if i == 0 and stage > 1:
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{s}" for s in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def test_resnet18_takes_torchvision_keys() -> None:
    ours = on_meta(resnet, 18).state_dict()
    converted = convert_torchvision_state_dict(dict.fromkeys(torchvision_resnet18_keys()))
    assert list(converted) == list(ours)


def small_basic_resnet(**kwargs) -> ResNet:
    """ResNet-18's blocks, narrow and shallow, for the hook tests."""
    return ResNet((2, 1, 1, 1), num_classes=5, widths=(4, 4, 8, 8), block="basic", **kwargs)


def test_basic_block_attention_after_bn2() -> None:
    Halve.built = []
    model = randomize_(small_basic_resnet(attention=Halve).double(), 10).eval()
    assert Halve.built == [4, 4, 4, 8, 8]  # w of every block: a basic block does not expand
    blocks = model.blocks()
    records = [{} for _ in blocks]

    def save(seen, key):
        return lambda module, args, out: seen.__setitem__(key, (args, out))

    for block, seen in zip(blocks, records, strict=True):
        block.register_forward_hook(save(seen, "block"))
        block.bn2.register_forward_hook(save(seen, "bn2"))
        block.attention.register_forward_hook(save(seen, "attention"))
        if block.downsample is not None:
            block.downsample.register_forward_hook(save(seen, "downsample"))
    model(image())
    for block, seen in zip(blocks, records, strict=True):
        (att_in,), att_out = seen["attention"]
        assert att_in is seen["bn2"][1]  # the attention reads bn2's output ...
        identity = seen["downsample"][1] if block.downsample is not None else seen["block"][0][0]
        # ... and its output is what gets added to the identity branch.
        assert torch.equal(seen["block"][1], torch.relu(identity + att_out))


@pytest.mark.parametrize("stages", [(3, 4), (1, 2, 3, 4)])
def test_basic_block_fusion_add_is_the_plain_network(stages: tuple[int, ...]) -> None:
    plain = randomize_(small_basic_resnet().double(), 11).eval()
    fused = small_basic_resnet(fusion=Add, fusion_stages=stages).double().eval()
    fused.load_state_dict(plain.state_dict())
    x = image()
    assert torch.equal(fused(x), plain(x))
    for stage in range(1, 5):
        for block in getattr(fused, f"layer{stage}"):
            assert (block.fusion is not None) == (stage in stages)
    taken = small_basic_resnet(fusion=TakeX, fusion_stages=(4,)).double().eval()
    taken.load_state_dict(plain.state_dict())
    assert not torch.equal(taken(x), plain(x))  # the fusion's result is what goes on


@pytest.mark.parametrize("name", ["se", "cbam", "bam", "double_attention"])
def test_basic_resnet_with_each_attention_trains(name: str) -> None:
    model = randomize_(small_basic_resnet(attention=name, attention_options={"reduction": 2}), 12)
    x = image().float()
    model.train()(x).logsumexp(1).sum().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
    assert all(b.attention.channels == b.out_channels for b in model.blocks())


def test_basic_resnet_device_dtype_and_meta(device: str) -> None:
    model = small_basic_resnet(attention="se", device=device, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {device}
    out = model.eval()(image().to(device))
    assert out.shape == (2, 5) and out.dtype == torch.float64
    with torch.device("meta"):
        assert count_parameters(resnet(18, attention="cbam")) > 0  # builds without memory
