"""refimpl's modules inside timm's and torchvision's networks, and their ResNets in ours.

Every attention module that ``refimpl.create`` can build is a drop-in ``attn_layer`` for
timm (``timm.create_model("resnet50", block_args=dict(attn_layer=CBAM))``, which builds it
as ``attn_layer(channels, device=..., dtype=...)``), also as a ``functools.partial`` with
options, and with ``features_only=True``; and it goes after ``bn2`` of every BasicBlock of
a torchvision ResNet-18. Each network trains a step. torchvision's ResNet-18 and -50
weights load into :func:`refimpl.backbones.resnet` (``layout="torchvision"``) and compute
the same function.

These tests need timm and torchvision, which do not install beside the CPU build of torch
2.13.0 on this project's machines; ``.ci/run`` runs them (``-m interop``) in a second
environment with torch 2.14.1 and fails if any of them is skipped there.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from refimpl.backbones import convert_torchvision_state_dict, resnet
from refimpl.registry import components, create

pytestmark = pytest.mark.interop
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

#: The classes refimpl.create can build, one input, (N, C, H, W) -> (N, C, H, W).
ATTENTION = {c.name: c.module for c in components().values() if c.attention}


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def train_step(model: nn.Module, x: torch.Tensor, classes: int = 10) -> None:
    """One SGD step; every parameter gets a finite gradient and the weights move.

    timm's ResNets are built with ``zero_init_last=False``: by default timm zeroes the last
    batch norm of each residual branch, which zeroes the gradient of everything before it
    (the attention module's parameters included) at the first step.
    """
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    assert logits.shape == (len(x), classes)
    nn.functional.cross_entropy(logits, torch.arange(len(x)) % classes).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None, f"{key} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{key} has a non-finite gradient"
    optimizer.step()
    moved = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert len(moved) > len(before) // 2, "the step changed almost nothing"


def ours_in(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is cls]


def timm_model(arch: str, attn_layer, **kwargs) -> nn.Module:
    return timm.create_model(
        arch,
        pretrained=False,
        block_args={"attn_layer": attn_layer},
        zero_init_last=False,
        **kwargs,
    )


#: timm architecture per class: ResNet-50 (16 bottlenecks, 256 to 2048 channels), except
#: for Residual Attention's module, whose trunk and mask branch are made of residual units
#: of the full width: 48.6M parameters each at 2048 channels, 230M in a ResNet-50. Its
#: test uses ResNet-18 (8 basic blocks, 64 to 512 channels).
ARCH = {name: ("resnet50", 16) for name in ATTENTION} | {"attention_module": ("resnet18", 8)}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_timm_resnet_attn_layer(name: str) -> None:
    cls = ATTENTION[name]
    arch, blocks = ARCH[name]
    torch.manual_seed(0)
    model = timm_model(arch, cls, num_classes=10)
    placed = ours_in(model, cls)
    assert len(placed) == blocks  # one per block
    first = 256 if arch == "resnet50" else 64
    assert placed[0].channels == first  # built for the block's output channels
    train_step(model, images(size=32))


def test_timm_attn_layer_partial_with_options() -> None:
    cbam = ATTENTION["cbam"]
    model = timm_model("resnet50", functools.partial(cbam, reduction=8), num_classes=10)
    placed = ours_in(model, cbam)
    assert len(placed) == 16
    expected = create("cbam", 256, reduction=8)
    assert sum(p.numel() for p in placed[0].parameters()) == sum(
        p.numel() for p in expected.parameters()
    )
    train_step(model, images(size=32))


@pytest.mark.parametrize("name", ["cbam", "bam"])
def test_timm_features_only(name: str) -> None:
    cls = ATTENTION[name]
    model = timm_model("resnet50", cls, features_only=True)
    assert len(ours_in(model, cls)) == 16
    features = model(images(size=32))
    channels = model.feature_info.channels()
    assert [f.shape[1] for f in features] == channels == [64, 256, 512, 1024, 2048]
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2, 1]
    sum(f.mean() for f in features).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key


def test_timm_basic_block_resnet18() -> None:
    cls = ATTENTION["cbam"]
    model = timm_model("resnet18", cls, num_classes=10)
    assert [m.channels for m in ours_in(model, cls)] == [64, 64, 128, 128, 256, 256, 512, 512]
    train_step(model, images(size=32))


def insert_after_bn2(model: nn.Module, name: str) -> int:
    """Put ``refimpl.create(name, planes)`` after ``bn2`` of every torchvision BasicBlock."""
    count = 0
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            planes = block.bn2.num_features
            block.bn2 = nn.Sequential(block.bn2, create(name, planes))
            count += 1
    return count


@pytest.mark.parametrize("name", list(ATTENTION))
def test_torchvision_resnet18_with_attention(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    assert insert_after_bn2(model, name) == 8
    assert len(ours_in(model, ATTENTION[name])) == 8
    train_step(model, images(size=32))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_load_into_ours(depth: int) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():  # non-trivial batch norm statistics, so eval mode is not identity
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = resnet(depth, layout="torchvision").eval()
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict()))  # strict
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = images(size=96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
