r"""ResNets of 18 to 152 layers, into which SE, CBAM, A^2-Nets and AFF insert their modules.

A bottleneck block (He et al., CVPR 2016) computes, on its residual branch,

    residual = BN3(conv3(relu(BN2(conv2(relu(BN1(conv1(x))))))))

with ``conv1`` a 1x1 convolution C -> w, ``conv2`` a 3x3 convolution w -> w and
``conv3`` a 1x1 convolution w -> 4w, and adds it to the identity branch (``x``, or a
1x1 convolution and BN, ``downsample``, where the shape changes):

    out = relu(identity + residual)

ResNet-50 stacks [3, 4, 6, 3] such blocks in four stages of widths w = 64, 128, 256,
512 after a 7x7 stride-2 stem convolution and a 3x3 stride-2 max pool, and ends with
global average pooling and a fully connected classifier.

A basic block (ResNet-18 and -34) has two 3x3 convolutions, C -> w -> w, and outputs w
channels (expansion 1 instead of 4):

    residual = BN2(conv2(relu(BN1(conv1(x)))))

:func:`resnet` builds each depth of the ResNet paper's Table 1:

| depth | block | blocks per stage | parameters (1000 classes) |
|---|---|---|---|
| 18 | basic | 2, 2, 2, 2 | 11,689,512 |
| 34 | basic | 3, 4, 6, 3 | 21,797,672 |
| 50 | bottleneck | 3, 4, 6, 3 | 25,557,032 |
| 101 | bottleneck | 3, 4, 23, 3 | 44,549,160 |
| 152 | bottleneck | 3, 8, 36, 3 | 60,192,808 |

(torchvision's counts, to the parameter; the same in both layouts.)

Two hooks place the papers' modules, in either kind of block:

- ``attention`` (SE, CBAM, BAM-style, A^2): a module of the block's output channel
  count (4w, or w in a basic block) on the residual branch, after its last batch norm
  (``bn3``, or ``bn2`` in a basic block) and before the addition:
  ``residual = attention(BN3(...))``. It must map (N, C, H, W) to the same shape.
- ``fusion`` (AFF, iAFF): replaces the addition itself in the blocks of the chosen
  stages: ``out = relu(fusion(identity, residual))``. The fusion module is called with
  the identity branch as its first argument (AFF's X) and the residual branch as its
  second (AFF's Y), both of the block's output shape, and must return a tensor of that
  shape. The ReLU after the addition stays where it was, after the fusion.

Layouts (``layout=``) of the bottleneck networks, both 25.557M parameters for ResNet-50:

- ``"v1"`` (default), the original ResNet and the Caffe models: in the first block of
  stages 2-4 the stride 2 is on ``conv1``, the first 1x1 convolution. 3.858 GMAC at
  224 x 224; the layout of the SE and CBAM papers' tables, and of the official
  SE-ResNet-50.
- ``"torchvision"`` (a.k.a. ResNet v1.5): the stride 2 is on ``conv2``, the 3x3
  convolution, so the 3x3 sees every position of the input instead of every other one
  and ``conv1`` runs at the full input resolution (3 x 77M more MACs). 4.089 GMAC; the
  layout of torchvision's weights and of the official CBAM and AFF code.

A basic block has one strided convolution, its first 3x3, in both layouts: ResNet-18
and -34 are the same network in either (1.814 and 3.664 GMAC at 224 x 224).

Names follow torchvision's ResNet, so its ``state_dict`` loads after one rename
(``downsample.0`` / ``downsample.1`` -> ``downsample.conv`` / ``downsample.bn``), see
:func:`convert_torchvision_state_dict`; torchvision's weights are trained in the
``"torchvision"`` layout and only give their accuracy there.

"FLOPs" in the papers' tables means multiply-accumulates of the convolutions and fully
connected layers; :func:`count_macs` counts exactly those (through
:class:`torch.utils.flop_counter.FlopCounterMode`, on the meta device, so nothing is
computed). :func:`count_parameters` counts weights, biases and batch-norm affine
parameters, as the papers do (running statistics are buffers, not counted).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from refimpl._checks import check_choice, check_positive_int
from refimpl._torch_checks import call_conv, check_torch_input

LAYOUTS = ("v1", "torchvision")
BLOCKS = ("basic", "bottleneck")
EXPANSION = 4  # a bottleneck's output has 4w channels (a basic block's, w)

#: depth -> (block, blocks per stage), Table 1 of the ResNet paper.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

#: A module given by name (through :func:`refimpl.registry.create`), or a factory
#: ``channels -> module``, or nothing.
ModuleSpec = str | Callable[[int], nn.Module] | None


def _reset_conv(conv: nn.Conv2d) -> None:
    # He et al. (2015) initialisation, fan-out mode, as ResNet's authors and torchvision.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _reset_bn(bn: nn.BatchNorm2d) -> None:
    bn.reset_running_stats()
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


def _attention_factory(
    spec: ModuleSpec, options: Mapping[str, Any] | None, who: str
) -> Callable[[int], nn.Module] | None:
    """``attention=`` as a factory ``channels -> module`` (or None)."""
    options = dict(options or {})
    if spec is None:
        if options:
            raise ValueError(f"{who}: attention_options given without attention: {options}")
        return None
    if isinstance(spec, str):
        from refimpl.registry import create  # late: the registry imports paper packages

        return functools.partial(create, spec, **options)
    if callable(spec):
        return functools.partial(spec, **options) if options else spec
    raise TypeError(f"{who}: attention must be a name, a callable or None, got {spec!r}")


def _fusion_factory(
    spec: ModuleSpec, options: Mapping[str, Any] | None, who: str
) -> Callable[[int], nn.Module] | None:
    """``fusion=`` as a factory ``channels -> module`` (or None).

    A name is looked up in the registry and must be a component of two inputs (AFF, iAFF).
    """
    options = dict(options or {})
    if spec is None:
        if options:
            raise ValueError(f"{who}: fusion_options given without fusion: {options}")
        return None
    if isinstance(spec, str):
        from refimpl.registry import get

        comp = get(spec)
        if comp.n_inputs != 2:
            raise ValueError(f"{who}: {comp.name!r} takes one input, it is not a fusion module")
        return functools.partial(comp.module, **options)
    if callable(spec):
        return functools.partial(spec, **options) if options else spec
    raise TypeError(f"{who}: fusion must be a name, a callable or None, got {spec!r}")


def _build(
    factory: Callable[..., nn.Module] | None, channels: int, fk: Mapping[str, Any]
) -> nn.Module | None:
    """``factory(channels)``, passing ``device=`` and ``dtype=`` where they are given.

    A factory that does not take them (a plain ``channels -> module`` callable) builds the
    module with PyTorch's defaults, then moves it (every refimpl module takes them).
    """
    if factory is None:
        return None
    given = {k: v for k, v in fk.items() if v is not None}
    if not given:
        return factory(channels)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: try the keywords
        params = {"device": None, "dtype": None}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_all or all(k in params for k in given):
        return factory(channels, **given)
    return factory(channels).to(**given)


class Downsample(nn.Module):
    """The projection shortcut: a 1x1 convolution and batch norm (option B of ResNet).

    Args:
        in_channels: channels of the block's input.
        out_channels: channels of the block's output, 4w.
        stride: the block's stride.
        device, dtype: where and of which dtype parameters and buffers are created.

    Shape:
        Input (N, in_channels, H, W); output (N, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, **fk)
        self.bn = nn.BatchNorm2d(out_channels, **fk)

    def reset_parameters(self) -> None:
        """Kaiming-normal convolution, batch norm weight 1 and bias 0."""
        _reset_conv(self.conv)
        _reset_bn(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(call_conv(self.conv, x))  # see Bottleneck.forward


class _Block(nn.Module):
    """What :class:`Bottleneck` and :class:`BasicBlock` share: the checks of their
    arguments, the hooks around the residual branch (attention, projection shortcut,
    fusion), their reset, and the end of the block."""

    def _check(self, who: str, in_channels: int, width: int, stride: int, layout: str) -> None:
        check_positive_int(in_channels, who, "in_channels")
        check_positive_int(width, who, "width")
        check_positive_int(stride, who, "stride")
        check_choice(layout, LAYOUTS, who, "layout")
        self.in_channels, self.width, self.stride, self.layout = in_channels, width, stride, layout

    def _add_hooks(
        self,
        who: str,
        out_channels: int,
        attention: ModuleSpec,
        attention_options: Mapping[str, Any] | None,
        fusion: ModuleSpec,
        fusion_options: Mapping[str, Any] | None,
        fk: Mapping[str, Any],
    ) -> None:
        """``relu``, ``attention``, ``downsample`` and ``fusion``, in that order (the order
        of the state dict)."""
        self.relu = nn.ReLU()  # not in place: a fusion may return its input X unchanged
        make_attention = _attention_factory(attention, attention_options, who)
        make_fusion = _fusion_factory(fusion, fusion_options, who)
        self.attention = _build(make_attention, out_channels, fk)
        self.downsample = None
        if self.stride != 1 or self.in_channels != out_channels:
            self.downsample = Downsample(self.in_channels, out_channels, self.stride, **fk)
        self.fusion = _build(make_fusion, out_channels, fk)

    def _reset_hooks(self) -> None:
        """The shortcut's, attention's and fusion's own ``reset_parameters``."""
        for module in (self.downsample, self.attention, self.fusion):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _join(self, identity: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``relu(identity + attention(residual))``, or the fusion instead of the sum."""
        if self.attention is not None:
            residual = self.attention(residual)
        if self.fusion is None:
            return self.relu(identity + residual)
        return self.relu(self.fusion(identity, residual))  # X = identity, Y = residual


class Bottleneck(_Block):
    r"""A bottleneck block: 1x1 (C -> w), 3x3 (w -> w), 1x1 (w -> 4w), with the two hooks.

    ``out = relu(identity + attention(residual))``, or with ``fusion``
    ``out = relu(fusion(identity, attention(residual)))``; see the module docstring.

    Args:
        in_channels: C, channels of the input.
        width: w, channels of the two inner convolutions; the output has 4w.
        stride: 1, or 2 in the first block of stages 2-4.
        layout: ``"v1"`` (stride on ``conv1``) or ``"torchvision"`` (stride on ``conv2``).
        attention: a module of 4w channels placed after ``bn3``, given by registry name
            (:func:`refimpl.registry.create`) or as a factory ``channels -> module``.
        attention_options: keyword arguments for building ``attention``.
        fusion: a module that replaces the addition, called as ``fusion(identity,
            residual)``; a registry name of a two-input component or a factory
            ``channels -> module``.
        fusion_options: keyword arguments for building ``fusion``.
        device, dtype: where and of which dtype parameters and buffers are created, as
            in ``torch.nn`` layers; passed on to the attention and fusion factories.

    Shape:
        Input (N, C, H, W); output (N, 4w, H', W') with H' = ceil(H / stride) (same for W).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        layout: str = "v1",
        attention: ModuleSpec = None,
        attention_options: Mapping[str, Any] | None = None,
        fusion: ModuleSpec = None,
        fusion_options: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self._check("Bottleneck", in_channels, width, stride, layout)
        out_channels = EXPANSION * width
        stride1, stride2 = (stride, 1) if layout == "v1" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(width, **fk)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride2, padding=1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(width, **fk)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False, **fk)
        self.bn3 = nn.BatchNorm2d(out_channels, **fk)
        self._add_hooks(
            "Bottleneck", out_channels, attention, attention_options, fusion, fusion_options, fk
        )
        self.reset_parameters()

    expansion = EXPANSION

    @property
    def out_channels(self) -> int:
        """4w, the channel count of the output."""
        return EXPANSION * self.width

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, batch norm weight 1 and bias 0.

        The attention and fusion modules are reset by their own ``reset_parameters``.
        """
        for conv in (self.conv1, self.conv2, self.conv3):
            _reset_conv(conv)
        for bn in (self.bn1, self.bn2, self.bn3):
            _reset_bn(bn)
        self._reset_hooks()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, width={self.width}, "
            f"out_channels={self.out_channels}, stride={self.stride}, layout={self.layout!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, 4w, H', W')
        # call_conv: conv(.), in float32 on thin bfloat16 CPU maps (a torch bug, see there)
        residual = self.relu(self.bn1(call_conv(self.conv1, x)))
        residual = self.relu(self.bn2(call_conv(self.conv2, residual)))
        residual = self.bn3(call_conv(self.conv3, residual))  # (N, 4w, H', W')
        return self._join(identity, residual)


class BasicBlock(_Block):
    r"""A basic block: two 3x3 convolutions (C -> w -> w), with the two hooks.

    ``out = relu(identity + attention(residual))``, or with ``fusion``
    ``out = relu(fusion(identity, attention(residual)))``, the attention placed after
    ``bn2``, the last batch norm of the residual branch; see the module docstring.

    Args:
        in_channels: C, channels of the input.
        width: w, channels of both convolutions and of the output.
        stride: 1, or 2 in the first block of stages 2-4 (on ``conv1``).
        layout: accepted for symmetry with :class:`Bottleneck`; both layouts put the
            stride on ``conv1``, the block's only strided convolution.
        attention: a module of w channels placed after ``bn2``, given by registry name
            (:func:`refimpl.registry.create`) or as a factory ``channels -> module``.
        attention_options: keyword arguments for building ``attention``.
        fusion: a module that replaces the addition, called as ``fusion(identity,
            residual)``; a registry name of a two-input component or a factory
            ``channels -> module``.
        fusion_options: keyword arguments for building ``fusion``.
        device, dtype: where and of which dtype parameters and buffers are created, as
            in ``torch.nn`` layers; passed on to the attention and fusion factories.

    Shape:
        Input (N, C, H, W); output (N, w, H', W') with H' = ceil(H / stride) (same for W).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        *,
        layout: str = "v1",
        attention: ModuleSpec = None,
        attention_options: Mapping[str, Any] | None = None,
        fusion: ModuleSpec = None,
        fusion_options: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self._check("BasicBlock", in_channels, width, stride, layout)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(width, **fk)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False, **fk)
        self.bn2 = nn.BatchNorm2d(width, **fk)
        self._add_hooks(
            "BasicBlock", width, attention, attention_options, fusion, fusion_options, fk
        )
        self.reset_parameters()

    @property
    def out_channels(self) -> int:
        """w, the channel count of the output."""
        return self.width

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, batch norm weight 1 and bias 0.

        The attention and fusion modules are reset by their own ``reset_parameters``.
        """
        for conv in (self.conv1, self.conv2):
            _reset_conv(conv)
        for bn in (self.bn1, self.bn2):
            _reset_bn(bn)
        self._reset_hooks()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, width={self.width}, "
            f"out_channels={self.out_channels}, stride={self.stride}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, w, H', W')
        residual = self.relu(self.bn1(call_conv(self.conv1, x)))  # see Bottleneck.forward
        residual = self.bn2(call_conv(self.conv2, residual))  # (N, w, H', W')
        return self._join(identity, residual)


class ResNet(nn.Module):
    r"""A ResNet (ResNet-50 by default) with attention and fusion hooks; see :func:`resnet`.

    Args:
        layers: blocks per stage; (3, 4, 6, 3) is ResNet-50, (3, 4, 23, 3) ResNet-101
            (with ``block="basic"``, (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34).
        num_classes: outputs of the classifier ``fc``.
        layout: ``"v1"`` (default: stride on the first 1x1 convolution, the SE and CBAM
            papers' tables, 3.858 GMAC) or ``"torchvision"`` (stride on the 3x3, 4.09
            GMAC); the same parameters either way; no difference for basic blocks.
        in_channels: channels of the input image.
        widths: w of each stage; the stage outputs 4w channels (w with basic blocks).
        block: ``"bottleneck"`` (:class:`Bottleneck`, ResNet-50 and deeper) or
            ``"basic"`` (:class:`BasicBlock`, ResNet-18 and -34).
        attention: a module inserted in every block after its last batch norm (``bn3``,
            ``bn2`` in a basic block), before the addition, built for the block's output
            channels: a registry name
            (``"se"``, built by :func:`refimpl.registry.create`) or a factory
            ``channels -> module``.
        attention_options: keyword arguments for building ``attention``
            (``{"reduction": 8}``).
        fusion: a module replacing the residual addition in the blocks of
            ``fusion_stages``, called as ``fusion(identity, residual)`` (X = identity
            branch, Y = residual branch) and followed by the usual ReLU: a factory
            ``channels -> module`` or the registry name of a two-input component.
        fusion_options: keyword arguments for building ``fusion``.
        fusion_stages: the stages, numbered from 1, whose blocks use ``fusion``; AFF
            uses the last two, (3, 4).
        device, dtype: where and of which dtype parameters and buffers are created, as
            in ``torch.nn`` layers (``device="meta"`` allocates nothing;
            ``torch.nn.utils.skip_init(ResNet, ...)`` works).

    Shape:
        Input (N, in_channels, H, W), any N, H, W >= 1, any floating dtype and device;
        output (N, num_classes). Batch norm in training mode needs more than one value
        per channel (N * H' * W' > 1 at the last stage).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        *,
        layout: str = "v1",
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        attention: ModuleSpec = None,
        attention_options: Mapping[str, Any] | None = None,
        fusion: ModuleSpec = None,
        fusion_options: Mapping[str, Any] | None = None,
        fusion_stages: Iterable[int] = (3, 4),
        block: str = "bottleneck",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        layers, widths, fusion_stages = tuple(layers), tuple(widths), tuple(fusion_stages)
        check_choice(layout, LAYOUTS, "ResNet", "layout")
        check_choice(block, BLOCKS, "ResNet", "block")
        check_positive_int(num_classes, "ResNet", "num_classes")
        check_positive_int(in_channels, "ResNet", "in_channels")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(
                f"ResNet: layers and widths must have 4 entries, one per stage, got "
                f"layers={layers} and widths={widths}"
            )
        for n in (*layers, *widths):
            check_positive_int(n, "ResNet", "layers and widths")
        if not set(fusion_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"ResNet: fusion_stages are numbered 1 to 4, got {fusion_stages}")
        # Validate the specs once here; each block builds its own modules from them.
        _attention_factory(attention, attention_options, "ResNet")
        _fusion_factory(fusion, fusion_options, "ResNet")
        self.layers, self.widths, self.layout, self.block = layers, widths, layout, block
        self.in_channels, self.num_classes = in_channels, num_classes
        Block = BasicBlock if block == "basic" else Bottleneck  # noqa: N806
        #: Output channels of each stage: 4w (bottleneck) or w (basic).
        self.stage_channels = tuple(Block.expansion * w for w in widths)
        self.fusion_stages = fusion_stages if fusion is not None else ()

        stem = widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False, **fk)
        self.bn1 = nn.BatchNorm2d(stem, **fk)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = stem
        for stage, (blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            stage_blocks = []
            for i in range(blocks):
                unit = Block(
                    channels,
                    width,
                    stride=2 if (i == 0 and stage > 1) else 1,
                    layout=layout,
                    attention=attention,
                    attention_options=attention_options,
                    fusion=fusion if stage in self.fusion_stages else None,
                    fusion_options=fusion_options if stage in self.fusion_stages else None,
                    **fk,
                )
                stage_blocks.append(unit)
                channels = unit.out_channels
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes, **fk)
        self.num_features = channels
        self.reset_parameters()

    def blocks(self) -> list[Bottleneck | BasicBlock]:
        """Every block, stage by stage."""
        return [b for stage in range(1, 5) for b in getattr(self, f"layer{stage}")]

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, batch norm weight 1 and bias 0, ``fc`` as nn.Linear.

        Attention and fusion modules are reset by their own ``reset_parameters``.
        """
        _reset_conv(self.conv1)
        _reset_bn(self.bn1)
        for block in self.blocks():
            block.reset_parameters()
        self.fc.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, block={self.block!r}, num_classes={self.num_classes}, "
            f"layout={self.layout!r}, widths={self.widths}, fusion_stages={self.fusion_stages}"
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features before the classifier, (N, stage_channels[-1])."""
        check_torch_input(x, self.in_channels, "ResNet", "x", self)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 2048, H/32, W/32)
        return self.avgpool(x).flatten(1)  # (N, 2048); 512 with basic blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))  # (N, num_classes)


def resnet(depth: int, num_classes: int = 1000, *, layout: str = "v1", **kwargs: Any) -> ResNet:
    """ResNet-18, -34, -50, -101 or -152 (Table 1 of the ResNet paper), with the hooks.

    Args:
        depth: 18 or 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        num_classes: outputs of the classifier.
        layout: ``"v1"`` or ``"torchvision"`` (see the module docstring; the same
            network for 18 and 34).
        **kwargs: further arguments of :class:`ResNet` (``attention``, ``fusion``,
            ``widths``, ``device``, ...); not ``layers`` or ``block``, which ``depth`` sets.

    Example:
        ``resnet(18, attention="cbam")`` is CBAM-ResNet-18 (11.78M parameters, CBAM's
        Table 4); ``resnet(101, attention="se")`` is SE-ResNet-101 (49.3M).
    """
    if depth not in DEPTHS:
        raise ValueError(f"resnet: depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    for name in ("layers", "block"):
        if name in kwargs:
            raise TypeError(f"resnet: {name} is set by depth; build ResNet(...) for another")
    block, layers = DEPTHS[depth]
    return ResNet(layers, num_classes, layout=layout, block=block, **kwargs)


def resnet50(num_classes: int = 1000, *, layout: str = "v1", **kwargs: Any) -> ResNet:
    """ResNet-50, ``resnet(50, ...)``: :class:`ResNet` with (3, 4, 6, 3) bottlenecks."""
    return resnet(50, num_classes, layout=layout, **kwargs)


def convert_torchvision_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the keys of a torchvision ResNet ``state_dict`` to this module's names.

    The only difference is the projection shortcut: torchvision's ``downsample`` is an
    ``nn.Sequential`` (``downsample.0`` the convolution, ``downsample.1`` the batch
    norm), ours has named submodules ``downsample.conv`` and ``downsample.bn``. Every
    other key is kept. Load the result into a model built with ``layout="torchvision"``,
    the layout torchvision's weights were trained in (the ``"v1"`` layout accepts the
    same shapes but computes a different function).

    Args:
        state_dict: a torchvision ResNet's ``state_dict()``.

    Returns:
        A new dict with the same values, in the same order.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".downsample.0.", ".downsample.conv.")
        key = key.replace(".downsample.1.", ".downsample.bn.")
        out[key] = value
    return out


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters of ``model``, as the papers count them.

    Conv and linear weights, biases where present, batch norm weight and bias; running
    statistics are buffers and not counted. A parameter shared by two modules counts once.

    Args:
        model: any module, on any device (the meta device included).
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(
    model: nn.Module, input_shape: Sequence[int] | Sequence[Sequence[int]] = (1, 3, 224, 224)
) -> int:
    """Multiply-accumulates of one forward pass, what the papers' tables call "FLOPs".

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = its FLOPs / 2),
    which counts matrix products and convolutions (conv, linear, matmul, bmm, attention)
    and not element-wise operations, normalisation, pooling or activations. The forward
    pass runs on the meta device, on shadow copies of the parameters and buffers: nothing
    is computed or allocated, ``model`` is not modified, and a full ResNet-50 takes a
    fraction of a second. The model runs in eval mode for the count (batch norm after a
    global pooling cannot run in training mode at batch size 1).

    Args:
        model: the network, on any device.
        input_shape: the shape of its input, (N, C, H, W); for a module of several inputs
            (a fusion module) a sequence of shapes. The count is for the whole batch.

    Returns:
        The number of multiply-accumulates.
    """
    shapes = [input_shape] if isinstance(input_shape[0], int) else list(input_shape)
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    meta = torch.device("meta")
    inputs = [torch.empty(tuple(s), dtype=dtype, device=meta) for s in shapes]
    shadow = {
        name: torch.empty_like(t, device=meta)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, shadow, tuple(inputs))
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2
