"""The contract every registered component keeps, tested once from the registry.

Parametrised over ``refimpl.registry.components()``: a new paper's components are covered
as soon as they are registered. Per-paper files (``tests/test_<paper>.py``) keep only
what is particular to the paper: literals, official and popular equivalence, converters,
networks and the paper's own invariants.

- Agreement with the NumPy float64 oracle, float64 and float32, eval and training mode,
  options, shapes and seeds drawn by Hypothesis from the paper's declared option space
  (``Component.option_space``); tolerances from ``Component.tolerances``, plus the
  example's own measured sensitivity to rounding (:func:`rounding_sensitivity`).
- What a PyTorch module promises (DESIGN.md): the input is never modified; channels_last
  gives the same result; dtype and device follow the input; bad input raises clear
  errors on both sides; ``torch.compile(fullgraph=True)``, ``torch.export`` and autocast
  work; gradients pass ``gradcheck``; bounded bytes saved for backward;
  ``reset_parameters()``, ``extra_repr()``, ``deepcopy`` and mode switches.
- The shared invariants, through the conformance kit (``refimpl.testing.check_invariants``).

Fixed examples (``covering_options``: every declared value of every option at least once)
where a test is too slow for Hypothesis: compile, export, gradcheck, autocast.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from refimpl.registry import (
    DEFAULT_TOLERANCES,
    Component,
    components,
    randomize_,
    state_dict_numpy,
)
from tests.strategies import (
    Case,
    cases,
    covering_options,
    hidden_width,
    spread,
    to_torch,
)

COMPONENTS = list(components().values())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while this file runs, restored after: its tensors are small,
    where a second thread buys nothing, and on a loaded machine competing OpenMP threads
    made one small forward 500 times slower (8.7 s against 15 ms, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BY_NAME = {c.name: c for c in COMPONENTS}
FUSIONS = [c for c in COMPONENTS if c.n_inputs == 2]


def each(components: list[Component] = COMPONENTS):
    """``@pytest.mark.parametrize`` over components, named by registry key."""
    return pytest.mark.parametrize("comp", components, ids=[c.name for c in components])


def takes_maps(fn) -> bool:
    return "return_maps" in inspect.signature(fn).parameters


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fixed_shape(comp: Component, n: int = 2, c: int = 8, h: int = 7, w: int = 5):
    """A small fixed (N, C, H, W) inside the component's shape space."""
    space = comp.shape_space
    return (n, min(c, space["C"][1]), h, w)


def build(comp: Component, options: dict, shape, seed: int = 0, device="cpu", dtype=None):
    """The component's module and inputs (float64 unless ``dtype``), on ``device``."""
    ex = comp.build_example(options, shape, seed)
    dtype = dtype or torch.float64
    module = ex.module.to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype) for x in ex.inputs)
    return module, inputs, dict(ex.options)


def default_case(comp: Component, training: bool = False, **shape):
    """The first covering option set, at a small fixed shape."""
    shp = fixed_shape(comp, **shape)
    return covering_options(comp, shp, training)[0], shp


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


# ---------------------------------------------------------------------------------------
# Agreement with the NumPy oracle


UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


#: The NumPy primitives whose results a module in ``dtype`` rounds at every position
#: (see :func:`rounding_sensitivity`).
PRIMITIVES = (
    "linear", "relu", "sigmoid", "tanh", "conv2d", "batch_norm", "softmax", "max_pool2d",
    "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "interpolate",
)  # fmt: skip


@contextlib.contextmanager
def rounding_inside(jitter):
    """Every :data:`PRIMITIVES` function of ``refimpl.numpy_functional`` (which every oracle
    calls through the module, ``nf.conv2d``) returns its result through ``jitter``."""
    from refimpl import numpy_functional as nf

    saved = {name: getattr(nf, name) for name in PRIMITIVES}

    def jittered(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            return jitter(out) if isinstance(out, np.ndarray) else out

        return call

    try:
        for name, fn in saved.items():
            setattr(nf, name, jittered(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(nf, name, fn)


def rounding_sensitivity(fn, inputs, params, unit: float, **options) -> np.ndarray:
    """How far the float64 oracle's output moves, elementwise (the larger of two draws),
    when the inputs and every weight are perturbed by relative noise of ``unit``, and so
    is the result of every primitive (convolution, batch norm, interpolation, ...) at
    every position, as rounding perturbs them inside a module.

    Rounding in ``dtype`` moves a well-conditioned function by a few ``unit`` of its
    values, and the plain tolerances cover that. Where the example is ill-conditioned (a
    training-mode batch norm over a nearly constant channel, f3 on logits that barely
    vary, f2 on a short logit vector, a batch norm after global pooling over two images
    whose means nearly coincide), two correct implementations legitimately differ by far
    more: this measures that on the example itself, so the tolerance stays tight where
    the function is well-conditioned. A wrong formula is off by orders of magnitude more.
    The inputs alone do not tell it all: a map upsampled from 1 x 1 is constant whatever
    the inputs are, but a float32 module's rounding makes its positions differ by a unit
    or so, which f3 then divides by sqrt(1e-5) (found by the thorough profile: 0.5000094
    where exact arithmetic gives 0.5).
    """
    rng = np.random.default_rng(0)

    def jitter(a):
        a = np.asarray(a)
        return a * (1 + unit * rng.uniform(-1, 1, a.shape)) if a.dtype.kind == "f" else a

    expected = fn(*inputs, params, **options)
    moved = []
    for _ in range(2):
        moved_params = {k: jitter(v) for k, v in params.items()}
        with rounding_inside(jitter):
            moved.append(fn(*(jitter(x) for x in inputs), moved_params, **options))
    return np.maximum(*(np.abs(m - expected) for m in moved))


def tolerance(comp: Component, dtype: torch.dtype, training: bool) -> tuple[float, float]:
    """(rtol, atol): the component's registered tolerance; in eval mode at most the
    default one. The registries loosen float32 for training mode's batch statistics over
    few values (BAM, AFF: argued where they register); eval mode has none of that, and
    keeps the default tightness (plus the measured sensitivity, for the deep modules)."""
    key = str(dtype).removeprefix("torch.")
    rtol, atol = comp.tolerances[key]
    if not training:
        rtol, atol = min(rtol, DEFAULT_TOLERANCES[key][0]), min(atol, DEFAULT_TOLERANCES[key][1])
    return rtol, atol


def assert_agrees(comp: Component, case: Case, device: str, dtype: torch.dtype) -> None:
    """The module (``dtype``) against the NumPy float64 oracle on the same rounded weights
    and inputs: ``|diff| <= atol + rtol |expected| + 100 s``, s from
    :func:`rounding_sensitivity` (measured: float32's error stays below 55 s wherever it
    exceeds the plain tolerance). Maps too, where both sides return them (float64)."""
    module, inputs, np_options = build(comp, case.options, case.shape, case.seed, device, dtype)
    module.train(case.training)
    params = state_dict_numpy(module)  # before the forward: training updates statistics
    xs = [numpy_of(x) for x in inputs]  # the oracle sees the rounded inputs
    maps_too = dtype == torch.float64 and takes_maps(comp.numpy_forward)
    with torch.no_grad():
        got = module(*inputs, return_maps=True) if maps_too else module(*inputs)
    actual, maps = got if maps_too else (got, {})
    options = {"training": case.training, **np_options}
    if maps_too:
        expected, np_maps = comp.numpy_forward(*xs, params, **options, return_maps=True)
    else:
        expected, np_maps = comp.numpy_forward(*xs, params, **options), {}
    rtol, atol = tolerance(comp, dtype, case.training)
    slack = 100 * rounding_sensitivity(
        comp.numpy_forward, xs, params, UNIT_ROUNDOFF[dtype], **options
    )
    what = f"{comp.name} {dtype} {'train' if case.training else 'eval'} {case}"
    assert_within(numpy_of(actual), expected, rtol, atol, slack, what)
    for key in set(maps) & set(np_maps):
        assert_within(numpy_of(maps[key]), np_maps[key], rtol, atol, 0.0, f"{what}: map {key}")


def assert_within(actual, expected, rtol, atol, slack, what: str) -> None:
    """``|actual - expected| <= atol + rtol |expected| + slack`` elementwise; on failure the
    largest excess, where, both values and the slack there."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    slack = np.broadcast_to(slack, actual.shape)
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected) + slack)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert (excess <= 0).all() and np.isfinite(actual).all(), (
        f"{what}: {int((excess > 0).sum())} of {excess.size} beyond atol={atol:g} + "
        f"rtol={rtol:g} |expected| + 100 sensitivity; worst at {worst}: actual "
        f"{actual[worst]!r}, expected {expected[worst]!r}, slack {slack[worst]:.2e}"
    )


@each()
@given(data=st.data())
def test_agrees_with_numpy_float64(device, comp, data):
    assert_agrees(comp, data.draw(cases(comp), label="case"), device, torch.float64)


@each()
@given(data=st.data())
def test_agrees_with_numpy_float32(device, comp, data):
    assert_agrees(comp, data.draw(cases(comp), label="case"), device, torch.float32)


@each()
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_agrees_at_the_smallest_shapes(comp, training):
    """1x1 maps and a batch of one (two in training where one is not defined), each
    covering option set: the corners Hypothesis may not reach in a fast run."""
    for n in (1, 2):
        shape = (n, 3, 1, 1)
        for opts in covering_options(comp, shape, training):
            assert_agrees(comp, Case(opts, shape, 0, training), "cpu", torch.float64)


#: Cases found by Hypothesis (the thorough profile) or chosen by hand in the per-paper
#: files before this contract test, kept as regression cases: (component, options, shape,
#: seed, training, dtype). The builders make the same modules and inputs the per-paper
#: files made from the same seeds.
_RA = {"r": 1, "depth": 3, "skips": 2, "activation": "spatial", "align_corners": True}
_AM = {"p": 1, "t": 2, "r": 1, "depth": 3, "skips": 2, "activation": "mixed", "learning": "arl"}
_CBAM = {
    "reduction": 16,
    "pooling": ("avg", "max"),
    "kernel_size": 7,
    "spatial_pooling": None,
    "arrangement": "channel-spatial",
    "variant": "paper",
    "bias": None,
    "spatial_bias": False,
    "spatial_bn": None,
}
_BAM = {"reduction": 4, "dilation": 4, "norm": "output", "combine": "sum"}
FOUND = [
    ("bam", {**_BAM, "reduction": 16}, (1, 1, 1, 1), 0, False, "float64"),
    ("bam", {**_BAM, "norm": "hidden"}, (2, 3, 1, 1), 1, True, "float64"),
    ("bam", {**_BAM, "combine": "product"}, (2, 16, 1, 17), 2, True, "float64"),
    ("cbam", _CBAM, (1, 1, 1, 1), 0, False, "float64"),
    ("cbam", {**_CBAM, "kernel_size": 9}, (2, 3, 1, 2), 1, True, "float64"),
    ("cbam", {**_CBAM, "variant": "official"}, (1, 5, 2, 1), 2, True, "float64"),
    ("residual_unit", {"out_channels": None, "stride": 1}, (2, 1, 1, 1), 0, True, "float64"),
    ("residual_unit", {"out_channels": 8, "stride": 2}, (2, 3, 1, 1), 0, False, "float64"),
    ("mask_head", {"activation": "spatial"}, (2, 1, 1, 1), 0, False, "float64"),
    ("soft_mask_branch", _RA, (2, 3, 1, 1), 0, True, "float64"),
    (
        "soft_mask_branch",
        {**_RA, "r": 2, "skips": 1, "activation": "channel", "align_corners": False},
        (1, 2, 17, 2),
        1,
        False,
        "float64",
    ),
    (
        "attention_module",
        {**_AM, "force_mask": None, "align_corners": True},
        (2, 1, 1, 1),
        0,
        True,
        "float64",
    ),
    (  # f2, thorough profile: 5.8e-4 off where the sensitivity is 3.6e-5
        "attention_module",
        {
            **_AM,
            "t": 0,
            "r": 2,
            "skips": 1,
            "activation": "channel",
            "force_mask": None,
            "align_corners": False,
        },
        (2, 2, 9, 10),
        15,
        True,
        "float32",
    ),  # fmt: skip
    (  # f3 on logits constant over the positions in exact arithmetic (upsampled from 1 x 1):
        # float32 rounding at each position, divided by sqrt(1e-5), gave 0.5000094 for 0.5
        # (the thorough profile; the inputs' sensitivity alone was 0 there)
        "soft_mask_branch",
        {
            "r": 1,
            "depth": 2,
            "skips": 0,
            "activation": "spatial",
            "align_corners": True,
            "pooling": "paper",
        },
        (2, 7, 1, 4),
        2,
        False,
        "float32",
    ),  # fmt: skip
    (  # f3, thorough profile: 3.5e-4 off where the sensitivity is 2.3e-4
        "attention_module",
        {
            **_AM,
            "p": 2,
            "r": 2,
            "skips": 0,
            "activation": "spatial",
            "learning": "nal",
            "force_mask": None,
            "align_corners": False,
        },
        (3, 10, 11, 9),
        64939922,
        True,
        "float32",
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "name, options, shape, seed, training, dtype",
    FOUND,
    ids=[f"{f[0]}-{i}" for i, f in enumerate(FOUND)],
)
def test_agrees_on_found_cases(name, options, shape, seed, training, dtype):
    comp = BY_NAME[name]
    assert comp.valid(options, shape, training), "a found case outside the declared space"
    for key, value in options.items():
        assert value in comp.option_space[key], f"{key}={value!r} not in the option space"
    assert_agrees(comp, Case(options, shape, seed, training), "cpu", getattr(torch, dtype))


# ---------------------------------------------------------------------------------------
# What a PyTorch module promises


@each()
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_input_not_modified(device, comp, grad):
    """Training mode (batch statistics) and eval, with and without gradients (a no-grad
    path may multiply in place into its own intermediates, never into the input)."""
    shape = fixed_shape(comp)
    for training in (True, False):
        for opts in covering_options(comp, shape, training):
            module, inputs, _ = build(comp, opts, shape, device=device)
            module.train(training)
            before = [x.clone() for x in inputs]
            if grad:
                inputs = [x.requires_grad_() for x in inputs]
                module(*inputs).sum().backward()
            else:
                with torch.no_grad():
                    module(*inputs)
            for x, b in zip(inputs, before, strict=True):
                assert torch.equal(x.detach(), b), f"{comp.name} {opts}: input modified"


@each()
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_channels_last_gives_the_same_result(device, comp, training, grad):
    """Same values for every option; the memory format is kept where the output has the
    input's shape."""
    shape = fixed_shape(comp, h=7, w=5)
    for opts in covering_options(comp, shape, training):
        module, inputs, _ = build(comp, opts, shape, device=device)
        module.train(training)
        last = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        with torch.set_grad_enabled(grad):
            ref = module(*inputs)  # train mode: statistics update once per call, both alike
            out = module(*last)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13, msg=f"{comp.name} {opts}")
        # A gate or a fusion hands back its input's layout, and so does a convolutional
        # branch unless a 1-channel intermediate (hidden width 1), contiguous in both
        # layouts, makes PyTorch pick the default one.
        keeps = comp.attention or comp.n_inputs == 2 or getattr(module, "hidden_channels", 0) > 1
        if keeps and out.shape[2] * out.shape[3] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last), (comp.name, opts)


@each()
def test_output_dtype_and_device_follow_the_input(device, comp):
    """Built with the constructor's defaults (float32), on ``device``."""
    module = comp.module(8).to(device).eval()
    inputs = [torch.ones(2, 8, 3, 3, device=device)] * comp.n_inputs
    out = module(*inputs)
    assert out.dtype == torch.float32 and out.device.type == device
    out64 = module.double()(*[x.double() for x in inputs])
    assert out64.dtype == torch.float64


def test_every_component_declares_its_option_space():
    """The option spaces are declared and every component builds through them."""
    for comp in COMPONENTS:
        assert comp.option_space and comp.build_example is not None, comp.name
        assert set(comp.shape_space) == {"N", "C", "H", "W"}, comp.name


# ---------------------------------------------------------------------------------------
# Bad input: clear errors that say what was expected and what came, on both sides


BAD_INPUTS = [
    (torch.zeros(8, 5, 5), ValueError, ["(N, C, H, W)", "3 dimensions"]),
    (torch.zeros(1, 8, 5, 5, 1), ValueError, ["(N, C, H, W)", "5 dimensions"]),
    (torch.zeros(1, 7, 5, 5), ValueError, ["8 channels", "7 channels"]),
    (torch.zeros(0, 8, 5, 5), ValueError, ["non-empty"]),
    (torch.zeros(1, 8, 0, 5), ValueError, ["non-empty"]),
    (torch.zeros(1, 8, 5, 5, dtype=torch.int64), TypeError, ["floating point", "int64"]),
    (torch.zeros(1, 8, 5, 5, dtype=torch.complex64), TypeError, ["complex64"]),
    (np.zeros((1, 8, 5, 5)), TypeError, ["torch.Tensor", "ndarray"]),
]


@each()
@pytest.mark.parametrize(
    "x, error, words", BAD_INPUTS, ids=["3d", "5d", "channels", "N0", "H0", "int", "complex", "np"]
)
def test_bad_input_raises_clear_errors(comp, x, error, words):
    module = comp.module(8).eval()
    with pytest.raises(error) as info:
        module(*[x] * comp.n_inputs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    params = state_dict_numpy(module)
    knows_c = any(8 in v.shape for v in params.values())
    if isinstance(x, torch.Tensor) and (knows_c or "channels" not in words[0]):
        # the NumPy side says the same (where its weights know C: not CBAM's spatial gate)
        with pytest.raises(error) as np_info:
            comp.numpy_forward(*[x.numpy()] * comp.n_inputs, params)
        for word in words:
            assert word in str(np_info.value), f"NumPy: {word!r} not in {str(np_info.value)!r}"


@each(FUSIONS)
def test_mismatched_fusion_inputs_raise(comp):
    module = comp.module(8).eval()
    params = state_dict_numpy(module)
    x = torch.zeros(2, 8, 5, 5)
    for y, error, words in (
        (torch.zeros(2, 8, 5, 4), ValueError, ["same shape", "(2, 8, 5, 5)", "(2, 8, 5, 4)"]),
        (torch.zeros(3, 8, 5, 5), ValueError, ["same shape"]),
        (torch.zeros(2, 8, 5, 5, dtype=torch.float64), TypeError, ["same dtype", "float64"]),
        (torch.zeros(2, 4, 5, 5), ValueError, ["8 channels", "4 channels"]),
    ):
        with pytest.raises(error) as info:
            module(x, y)
        assert all(w in str(info.value) for w in words), str(info.value)
        with pytest.raises(error) as np_info:
            comp.numpy_forward(x.numpy(), y.numpy(), params)
        assert all(w in str(np_info.value) for w in words), str(np_info.value)


@each([c for c in COMPONENTS if has_batch_norm(c.module(4))])
def test_batch_statistics_of_one_value_raise_on_both_sides_and_eval_works(comp):
    """Training-mode batch norm over one value per channel (one 1x1 image): a ValueError
    from both sides that says so, where the registry says the component is undefined;
    eval mode computes."""
    shape = (1, 4, 1, 1)
    opts = next(
        (o for o in covering_options(comp, shape, False) if not comp.valid(o, shape, True)),
        None,
    )
    if opts is None:
        pytest.skip(f"{comp.name}: defined in training mode at {shape} for every option set")
    module, inputs, np_options = build(comp, opts, shape)
    params = state_dict_numpy(module)
    with pytest.raises(ValueError, match="value") as info:
        module.train()(*inputs)
    assert "training" in str(info.value) or "train" in str(info.value), str(info.value)
    xs = [numpy_of(x) for x in inputs]
    with pytest.raises(ValueError, match="value"):
        comp.numpy_forward(*xs, params, training=True, **np_options)
    assert module.eval()(*inputs).shape[0] == 1


# ---------------------------------------------------------------------------------------
# Constructor conventions


@each([c for c in COMPONENTS if "reduction" in inspect.signature(c.module).parameters])
@given(channels=st.integers(1, 300), reduction=st.integers(1, 64))
def test_hidden_width_is_floor_of_c_over_r_at_least_one(comp, channels, reduction):
    """Every reduction MLP: ``max(1, C // r)``, read from its weights' shapes."""
    module = comp.module(channels, reduction=reduction, device="meta")
    width = hidden_width(channels, reduction)
    widths = {getattr(module, a) for a in ("hidden_channels", "m", "n") if hasattr(module, a)}
    for m in module.modules():
        if hasattr(m, "hidden_channels"):
            widths.add(m.hidden_channels)
    assert widths == {width}, f"{comp.name}: widths {widths}, expected {width}"
    shapes = [tuple(p.shape) for p in module.parameters() if p.dim() >= 2]
    assert any(s[0] == width and s[1] == channels for s in shapes), (comp.name, shapes)


@each()
def test_reset_parameters_reinitialises_every_parameter(comp):
    opts, shape = default_case(comp)
    module, _, _ = build(comp, opts, shape)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(7.0)
    module.reset_parameters()
    for name, p in module.named_parameters():
        assert not bool((p == 7.0).any()), f"{comp.name}: {name} not re-initialised"


@each()
def test_extra_repr_names_channels_and_options(comp):
    """``extra_repr`` says the width, and every option it names has the value given
    (``name=value``); every non-default string option appears (a preset such as
    ``variant`` resolves into the options it sets); a hidden width it names is C // r."""
    for opts in covering_options(comp, fixed_shape(comp, c=13), False):
        module = comp.module(13, **opts)
        text = module.extra_repr()
        assert "13" in text, f"{comp.name}: {text!r}"
        defaults = inspect.signature(comp.module).parameters
        for name, value in opts.items():
            if f"{name}=" in text and value is not None:
                assert f"{name}={value!r}" in text, f"{comp.name}: {name}={value!r} in {text!r}"
            default = defaults[name].default if name in defaults else None
            stored = getattr(module, name, None) == value and name != "variant"
            if isinstance(value, str) and value != default and stored:
                assert repr(value) in text, f"{comp.name}: {value!r} in {text!r}"
        if "reduction" in opts and "hidden_channels=" in text:
            width = hidden_width(13, opts["reduction"])
            assert f"hidden_channels={width}" in text, f"{comp.name}: {text!r}"


@each()
def test_deepcopy_and_mode_switches_keep_the_function(comp):
    """A deep copy computes the same; training the copy (statistics update) leaves the
    original alone; back in eval mode a module computes what it did. Training mode uses
    batch statistics where there is batch norm, and computes what eval mode does where
    there is none. Every covering option set (batch norm on and off)."""
    shape = fixed_shape(comp)
    for opts in covering_options(comp, shape, True):
        module, inputs, _ = build(comp, opts, shape)
        with torch.no_grad():
            ref = module.eval()(*inputs)
            clone = copy.deepcopy(module)
            torch.testing.assert_close(clone(*inputs), ref, rtol=0, atol=0)
            train_out = clone.train()(*inputs)
            torch.testing.assert_close(module(*inputs), ref, rtol=0, atol=0)
            if not has_batch_norm(module):
                torch.testing.assert_close(train_out, ref, rtol=0, atol=0)
            elif opts.get("force_mask") is None:  # batch statistics, not the running ones
                assert (train_out - ref).abs().max() > 1e-6, f"{comp.name} {opts}: train == eval"
            module.train()(*inputs)
            module.eval()
            if not has_batch_norm(module):
                torch.testing.assert_close(module(*inputs), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Graph capture, export, mixed precision


def _compiled(module: nn.Module) -> nn.Module:
    torch._dynamo.reset()  # each new module recompiles; stay below the recompile limit
    return torch.compile(module, fullgraph=True, backend="eager")


@each()
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_eager_backend_every_option(comp, training):
    """Graph capture with no break, for every declared value of every option; with and
    without gradients (a no-grad path may differ)."""
    shape = fixed_shape(comp, h=5, w=3)
    for opts in covering_options(comp, shape, training):
        module, inputs, _ = build(comp, opts, shape, seed=1)
        if training and not has_batch_norm(module):
            continue  # the same graph as in eval mode
        module.train(training)
        compiled = _compiled(module)
        torch.testing.assert_close(
            compiled(*inputs), module(*inputs), rtol=1e-12, atol=1e-14, msg=f"{opts}"
        )
        with torch.no_grad():
            torch.testing.assert_close(
                compiled(*inputs), module(*inputs), rtol=1e-12, atol=1e-14, msg=f"{opts}"
            )


#: The real inductor backend (code generation, 5-15 s each on this CPU) on one example of
#: one component per paper, the paper's main module.
INDUCTOR = ["attention_module", "squeeze_excitation", "cbam", "bam", "double_attention", "iaff"]


@pytest.mark.slow
@each([BY_NAME[n] for n in INDUCTOR])
def test_compile_fullgraph_inductor(comp):
    opts, shape = default_case(comp, c=16)
    module, inputs, _ = build(comp, opts, shape, seed=1, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(module.eval(), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)


@each()
def test_export(comp):
    """``torch.export`` on the first two covering option sets (both variants where a paper
    has a variant switch), bit-for-bit in eval mode."""
    shape = fixed_shape(comp, h=5, w=3)
    for opts in covering_options(comp, shape)[:2]:
        module, inputs, _ = build(comp, opts, shape, seed=1)
        exported = torch.export.export(module.eval(), inputs)
        torch.testing.assert_close(exported.module()(*inputs), module(*inputs), rtol=0, atol=0)


#: Autocast against float32, elementwise: ``|out - ref| <= rtol |ref| + atol max |ref|``.
#: The convolutions and products run in bfloat16 (8 bits of mantissa, 2^-9 relative): a
#: gate's logits of order 10 are off by ~0.04, a sigmoid by a quarter of that; deep modules
#: round on each convolution of their longest path. Measured (bfloat16, every covering
#: option set), the part beyond 2e-2 |ref|: at most 6.4e-3 of max |ref| (mask head), 0 for
#: the CBAM gates and BAM. A wrong formula (an axis, a missing term) is off by O(1).
AUTOCAST_TOLERANCE = (2e-2, 1e-2)
#: Components whose output is the input times a gate (or a lerp of the two inputs): under
#: autocast it keeps the input's dtype. (The residual attention module's H = (1 + M) T and
#: A^2's reconstruction come out of convolutions, in the autocast dtype.)
GATED = {"squeeze_excitation", "channel_attention", "spatial_attention", "cbam", "bam"} | {
    "mscam",
    "aff",
    "iaff",
}
#: The soft mask branch's output is the mask itself, M in (0, 1), after up to 3 poolings,
#: 2 depth + 1 units of three bfloat16 convolutions and the upsamplings: measured 2.8e-2
#: of max |ref| beyond 2e-2 |ref| (the whole attention module: 2.9e-3).
AUTOCAST_TOLERANCE_OF = {"soft_mask_branch": (2e-2, 5e-2)}


@each()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_stays_finite_and_close(device, comp, dtype):
    """Eval: finite (also for inputs 1000 times larger: means, not sums, where a sum could
    overflow), close to float32; a training step under autocast: finite gradients."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 autocast is a CUDA feature; bfloat16 covers the CPU")
    shape = fixed_shape(comp, c=32, h=9, w=9)
    rtol, atol = AUTOCAST_TOLERANCE_OF.get(comp.name, AUTOCAST_TOLERANCE)
    for opts in covering_options(comp, shape, True):
        module, inputs, _ = build(comp, opts, shape, device=device, dtype=torch.float32)
        module.eval()
        with torch.autocast(device_type=device, dtype=dtype):
            out = module(*inputs)
            huge = module(*[x * 1000 for x in inputs])
        assert torch.isfinite(out).all() and torch.isfinite(huge).all(), (comp.name, opts)
        if comp.name in GATED:  # the float32 input times a gate (or a lerp of inputs)
            assert out.dtype == torch.float32, (comp.name, out.dtype)
        ref = module(*inputs)
        err = (out.float() - ref).abs()
        bound = rtol * ref.abs() + atol * ref.abs().max()
        assert bool((err <= bound).all()), (
            f"{comp.name} {opts}: autocast error up to {(err / ref.abs().max()).max():.3e} "
            "of the output's scale"
        )
        module.train()
        xs = [x.clone().requires_grad_() for x in inputs]
        with torch.autocast(device_type=device, dtype=dtype):
            loss = module(*xs).float().square().mean()
        loss.backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs), comp.name
        grads = [p.grad for p in module.parameters() if p.grad is not None]  # a forced mask
        assert all(torch.isfinite(g).all() for g in grads), (comp.name, opts)


# ---------------------------------------------------------------------------------------
# Autograd


#: Up to this many input and weight elements in at most this many tensors, gradcheck
#: compares every partial derivative; beyond (the deep residual attention modules, AFF's
#: four-branch modules), one random directional derivative per tensor (``fast_mode``, as
#: their per-paper gradchecks did), which a wrong gradient fails too.
FULL_GRADCHECK_ELEMENTS, FULL_GRADCHECK_TENSORS = 500, 30


@each()
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_inputs_and_weights(device, comp, training):
    """float64, every covering option set, in eval and training mode (batch statistics),
    with respect to the inputs and every weight; tie-free inputs (max pooling's gradient
    is then unique)."""
    shape = (2, min(4, comp.shape_space["C"][1]), 3, 4)
    for opts in covering_options(comp, shape, training):
        module, inputs, _ = build(comp, opts, shape, seed=3, device=device)
        module.train(training)
        xs = tuple(
            to_torch(spread(shape, 4 + k) * 3, device).requires_grad_() for k in range(len(inputs))
        )
        names = [n for n, _ in module.named_parameters()]
        weights = tuple(module.parameters())
        n = len(xs)

        def f(*args, module=module, names=names, n=n):
            state = dict(zip(names, args[n:], strict=True))
            return torch.func.functional_call(module, state, args[:n])

        elements = sum(t.numel() for t in (*xs, *weights))
        fast = elements > FULL_GRADCHECK_ELEMENTS or len(weights) > FULL_GRADCHECK_TENSORS
        assert torch.autograd.gradcheck(f, (*xs, *weights), eps=1e-6, atol=1e-7, fast_mode=fast), (
            comp.name,
            opts,
        )


@each([c for c in COMPONENTS if c.saved_bytes_bound is not None])
def test_saved_for_backward_within_the_bound(comp):
    """Bytes autograd keeps for backward in training mode, each storage once, parameters
    excluded, at most ``saved_bytes_bound(shape)`` times the input's; every covering
    option set, at two widths. Deterministic: counted, not timed."""
    from refimpl.bench import saved_bytes

    for channels in (64, 256):
        shape = (4, channels, 14, 14)
        for opts in covering_options(comp, shape, True):
            module = comp.module(channels, **opts).train()
            xs = [torch.randn(shape, requires_grad=True) for _ in range(comp.n_inputs)]
            saved = saved_bytes(module, *xs, exclude=list(module.parameters()))
            ratio = saved / (xs[0].numel() * xs[0].element_size())
            bound = comp.saved_bytes_bound(shape)
            assert ratio <= bound, f"{comp.name} C={channels} {opts}: {ratio:.4f} > {bound:.4f}"


# ---------------------------------------------------------------------------------------
# The shared invariants, through the conformance kit


@each()
@pytest.mark.parametrize("seed", [0, 1000])
def test_invariants_hold(comp, seed):
    """Every property the paper registers (batch items independent, position
    permutations, gates in range, ...) on every covering option set, via
    ``refimpl.testing.check_invariants``. A property may be skipped where an option makes
    it inapplicable (a tanh gate is not in (0, 1)), but each one runs and passes on at
    least one option set: none is skipped for every refimpl module."""
    from refimpl.testing import check_invariants

    passed: set[str] = set()
    names: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opts in covering_options(comp, fixed_shape(comp), False):
            module = randomize_(comp.module(fixed_shape(comp)[1], **opts).double(), seed)
            report = check_invariants(module, comp.name, options=opts, seed=seed, examples=4)
            report.assert_ok()
            names |= {r.name for r in report.rows}
            passed |= {r.name for r in report.rows if r.status == "passed"}
    assert names - passed == set(), f"{comp.name}: never run: {sorted(names - passed)}"
