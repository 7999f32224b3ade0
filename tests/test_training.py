"""Training with refimpl's modules: what a practitioner relies on beyond the maths.

Every registered component and every network, driven by the registry:

- factory conventions: ``device=`` and ``dtype=`` keyword arguments like ``torch.nn``
  layers, ``torch.nn.utils.skip_init``, meta-device construction, case-insensitive names;
"""

from __future__ import annotations

import copy
import importlib
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import refimpl
from refimpl import backbones
from refimpl.bam.networks import BAMResNet, bam_resnet50
from refimpl.cbam.networks import cbam_resnet50
from refimpl.double_attention.networks import A2ResNet, a2_resnet50
from refimpl.feature_fusion.networks import aff_resnet50, iaff_resnet50
from refimpl.registry import PAPER_PACKAGES, components
from refimpl.residual_attention.networks import ResidualAttentionNetwork, attention56
from refimpl.squeeze_excitation.networks import se_resnet50

COMPONENTS = list(components().values())

#: Every network of the papers, as its builder; ``NETWORK_INPUT`` is the smallest input
#: each accepts in training mode (the last stage 1 x 1, two images for the batch norms).
NETWORKS = {
    "se_resnet50": se_resnet50,
    "cbam_resnet50": cbam_resnet50,
    "bam_resnet50": bam_resnet50,
    "a2_resnet50": a2_resnet50,
    "aff_resnet50": aff_resnet50,
    "iaff_resnet50": iaff_resnet50,
    "attention56": attention56,
}
#: Narrow widths that keep every module of each network (for the tests that run them).
NARROW = {name: {"widths": (8, 8, 16, 16)} for name in NETWORKS}
NARROW["se_resnet50"]["reduction"] = 4
NARROW["cbam_resnet50"]["reduction"] = 4
NARROW["aff_resnet50"]["reduction"] = 4
NARROW["iaff_resnet50"]["reduction"] = 4
NARROW["bam_resnet50"]["reduction"] = 4
NARROW["attention56"] = {"widths": (16, 16, 32, 32), "stem_channels": 8}
NETWORK_CLASSES = (backbones.ResNet, BAMResNet, A2ResNet, ResidualAttentionNetwork)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tests run many small operations, where a second thread
    only adds synchronisation (and on a shared, busy machine costs 10-100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _module_classes() -> list[type[nn.Module]]:
    """Every public ``nn.Module`` class of every paper's ``torch_module`` and the backbone."""
    out: list[type[nn.Module]] = [backbones.Downsample, backbones.Bottleneck]
    for slug in PAPER_PACKAGES:
        mod = importlib.import_module(f"refimpl.{slug}.torch_module")
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, nn.Module)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
            ):
                out.append(obj)
    return out


MODULE_CLASSES = _module_classes()


def _build(cls: type[nn.Module], **fk) -> nn.Module:
    """An instance of ``cls`` of 16 channels (the backbone's blocks: 16 -> 4 * 4)."""
    if cls is backbones.Downsample:
        return cls(16, 32, 2, **fk)
    if cls is backbones.Bottleneck:
        return cls(16, 4, 2, attention="cbam", **fk)
    return cls(16, **fk)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


# ---------------------------------------------------------------------------------------
# Factory conventions: device= and dtype=, skip_init, meta, names


def test_every_component_class_is_covered():
    classes = set(MODULE_CLASSES)
    assert {c.module for c in COMPONENTS} <= classes
    assert len(classes) >= len(COMPONENTS) + 4  # BAM's gates, Downsample, Bottleneck


@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=lambda c: c.__name__)
def test_module_takes_device_and_dtype_like_torch_nn(cls):
    params = inspect.signature(cls).parameters
    for name in ("device", "dtype"):
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    meta = _build(cls, device="meta")
    assert _tensors(meta), cls.__name__
    for name, t in _tensors(meta):
        assert t.device.type == "meta", f"{cls.__name__}.{name} on {t.device}"
    double = _build(cls, dtype=torch.float64)
    for name, t in _tensors(double):
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{cls.__name__}.{name} is {t.dtype}"
    # skip_init: built on the meta device, then given uninitialised memory on the CPU.
    skipped = _skip_init(cls)
    reference = _build(cls)
    assert [(k, v.shape) for k, v in skipped.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    assert all(t.device.type == "cpu" for _, t in _tensors(skipped))


def _skip_init(cls: type[nn.Module]) -> nn.Module:
    if cls is backbones.Downsample:
        return torch.nn.utils.skip_init(cls, 16, 32, 2)
    if cls is backbones.Bottleneck:
        return torch.nn.utils.skip_init(cls, 16, 4, 2, attention="cbam")
    return torch.nn.utils.skip_init(cls, 16)


@pytest.mark.parametrize("name", NETWORKS)
def test_network_builds_on_the_meta_device_and_in_any_dtype(name):
    meta = NETWORKS[name](device="meta")
    assert all(t.device.type == "meta" for _, t in _tensors(meta)), name
    counts = backbones.count_parameters(meta)
    assert counts > 20_000_000, counts  # the full network, built without allocating
    small = NETWORKS[name](num_classes=3, dtype=torch.float64, device="meta")
    floating = [(k, t) for k, t in _tensors(small) if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for _, t in floating), name


@pytest.mark.parametrize("cls", NETWORK_CLASSES, ids=lambda c: c.__name__)
def test_network_classes_work_with_skip_init(cls):
    params = inspect.signature(cls).parameters
    assert "device" in params and "dtype" in params
    net = torch.nn.utils.skip_init(cls, num_classes=3)
    assert all(t.device.type == "cpu" for _, t in _tensors(net))
    assert net.fc.out_features == 3


def test_a_factory_without_device_and_dtype_still_builds_on_the_device():
    """A user's ``channels -> module`` factory that takes no device= is built, then moved."""
    net = backbones.ResNet(
        (1, 1, 1, 1),
        3,
        widths=(4, 4, 4, 4),
        attention=lambda c: nn.Conv2d(c, c, 1),
        dtype=torch.float64,
    )
    assert net.layer1[0].attention.weight.dtype == torch.float64


def test_names_are_case_insensitive():
    assert type(refimpl.create("CBAM", 16)) is type(refimpl.create("cbam", 16))
    assert refimpl.get("SE").name == "squeeze_excitation"
    assert refimpl.get("Squeeze_Excitation").name == "squeeze_excitation"
    net = backbones.ResNet((1, 1, 1, 1), 3, widths=(4, 4, 4, 4), attention="SE")
    assert type(net.layer1[0].attention).__name__ == "SqueezeExcitation"
    with pytest.raises(KeyError, match="unknown component 'nope'"):
        refimpl.get("nope")


def test_create_passes_device_and_dtype():
    m = refimpl.create("cbam", 16, device="meta", dtype=torch.float64)
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for _, t in _tensors(m))


# ---------------------------------------------------------------------------------------
# SyncBatchNorm: every batch norm is called as a module in training


def _training_inputs(comp, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The component's example in training mode, with a batch of at least two."""
    ex = comp.make_example(seed)
    inputs = tuple(torch.cat([x, 0.5 * x + 0.25]) if len(x) < 2 else x for x in ex.inputs)
    if getattr(ex.module, "force_mask", None) is not None:
        ex.module.force_mask = None  # the mask-ablation hook skips the mask branch
    return ex.module.train(), inputs


def _count_calls(model: nn.Module) -> tuple[dict[str, int], list]:
    """Forward hooks on every SyncBatchNorm of ``model``: calls per layer name."""
    calls = {name: 0 for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}

    def hook(name):
        def record(module, args, output):
            calls[name] += 1

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.SyncBatchNorm)
    ]
    return calls, handles


def _assert_every_sync_bn_runs(model: nn.Module, inputs, who: str) -> torch.Tensor:
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    calls, handles = _count_calls(synced)
    assert len(calls) == n_bn, who
    try:
        out = synced(*inputs)
    finally:
        for h in handles:
            h.remove()
    skipped = sorted(name for name, n in calls.items() if n == 0)
    assert not skipped, f"{who}: {len(skipped)} of {len(calls)} SyncBatchNorm never ran: {skipped}"
    return out


@pytest.mark.parametrize("comp", COMPONENTS, ids=lambda c: c.name)
def test_sync_batch_norm_takes_effect_in_every_component(comp):
    """After conversion every batch norm runs as a module, and (one process, where
    SyncBatchNorm is plain batch norm) the function is unchanged."""
    for seed in (0, 1) if comp.paper != "residual_attention" else (0,):  # the deep ones once
        module, inputs = _training_inputs(comp, seed)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        reference = copy.deepcopy(module)(*inputs)
        out = _assert_every_sync_bn_runs(module, inputs, f"{comp.name} seed {seed}")
        if has_bn:
            torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NETWORKS)
def test_sync_batch_norm_takes_effect_in_every_network(name):
    torch.manual_seed(0)
    net = NETWORKS[name](num_classes=3, **NARROW[name]).train()
    x = torch.randn(2, 3, 32, 32)
    _assert_every_sync_bn_runs(net, (x,), name)


# ---------------------------------------------------------------------------------------
# Half precision with large activations: no overflow, close to float64

#: Relative L2 error (output, input gradient) against float64 on the same (rounded)
#: input. Unit roundoff: float16 2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3. Measured over
#: every component (seed 0, values 0-80 on 48 x 48): float16 and its autocast at most
#: 6.2e-3 (output) and 5.2e-2 (gradient; the largest where ReLU kinks of the residual
#: units and mask head flip), bfloat16 and its autocast at most 4.4e-2 and 2.0e-1 (mask
#: head). Before the fix, channel attention (with gradients) and BAM gave NaN or Inf.
HALF_TOLERANCES = {"float16": (2e-2, 1e-1), "bfloat16": (1e-1, 3e-1)}
HALF_MODES = [
    ("float16", False),
    ("float16", True),
    ("bfloat16", False),
    ("bfloat16", True),
]


def _large_inputs(comp, seed: int, n: int, draw: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of ``comp`` of 48 x 48 positions, values in [0, 80], channel means 20-60:
    a float16 sum over the positions (92 160 at mean 40) overflows, a mean does not."""
    rng = np.random.default_rng([seed, draw])
    out = []
    for x in comp.make_example(seed).inputs:
        c = x.shape[1]
        mean = rng.uniform(20, 60, (n, c, 1, 1))
        out.append(torch.from_numpy(mean + rng.uniform(-20, 20, (n, c, 48, 48))))
    return tuple(out)


def _calibrated(comp, seed: int) -> nn.Module:
    """The example module with running statistics of the large inputs (a trained
    network's batch norms see its activations, so eval mode stays well conditioned)."""
    module = comp.make_example(seed).module
    if getattr(module, "force_mask", None) is not None:
        module.force_mask = None
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # the cumulative average: exactly this batch's statistics
        with torch.no_grad():
            module.train()(*_large_inputs(comp, seed, 8, draw=1))
    return module.eval()


def _forward_backward(module, inputs, grad_out, autocast_dtype=None):
    inputs = [x.detach().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = module(*inputs)
    out.backward(grad_out.to(out.dtype))
    return out.detach().double(), inputs[0].grad.double()


def _relative_error(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{what}: {bad} of {got.numel()} values are NaN or Inf"
    diff = (got - want).abs()
    where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape))
    return float(diff.norm() / want.norm().clamp_min(1e-300)), where


@pytest.mark.parametrize("dtype_name,autocast", HALF_MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("comp", COMPONENTS, ids=lambda c: c.name)
def test_half_precision_with_large_activations(comp, dtype_name, autocast):
    """Output and input gradient finite and close to float64, in float16 / bfloat16 and
    under autocast to them, with activations large enough that sums overflow float16."""
    dtype = getattr(torch, dtype_name)
    module = _calibrated(comp, 0)
    inputs = tuple(x.to(dtype).double() for x in _large_inputs(comp, 0, 2))  # exact in dtype
    with torch.no_grad():
        shape = tuple(module(*inputs).shape)
    grad_out = torch.from_numpy(np.random.default_rng(1).standard_normal(shape))
    ref, ref_grad = _forward_backward(module, inputs, grad_out)
    if autocast:  # a float32 module and input, the operations in dtype
        low = copy.deepcopy(module).float()
        got, got_grad = _forward_backward(low, [x.float() for x in inputs], grad_out, dtype)
    else:
        low = copy.deepcopy(module).to(dtype)
        got, got_grad = _forward_backward(low, [x.to(dtype) for x in inputs], grad_out)
    out_tol, grad_tol = HALF_TOLERANCES[dtype_name]
    mode = f"{comp.name}, {dtype_name}{' autocast' if autocast else ''}"
    err, where = _relative_error(got, ref, f"{mode} output")
    assert err <= out_tol, f"{mode}: output relative error {err:.2e} (largest at {where})"
    err, where = _relative_error(got_grad, ref_grad, f"{mode} input gradient")
    assert err <= grad_tol, f"{mode}: gradient relative error {err:.2e} (largest at {where})"
