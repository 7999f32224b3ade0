"""The registry, the ``check`` command and the contract every paper package follows."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import refimpl
from refimpl import check
from refimpl.__main__ import main
from refimpl.registry import (
    Component,
    Property,
    SkipProperty,
    components,
    get,
    papers,
    randomize_,
    state_dict_numpy,
)
from refimpl.testing import core as testing_core

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = list(components().values())


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize("comp", COMPONENTS, ids=lambda c: c.name)
def test_component_contract(comp):
    """Names follow the style guide; the example is deterministic; NumPy takes the keys."""
    assert comp.numpy_forward.__name__ == snake_case(comp.module.__name__)
    assert comp.name == comp.numpy_forward.__name__
    assert comp.numpy_forward.__module__ == f"refimpl.{comp.paper}.numpy_forward"
    assert comp.module.__module__ == f"refimpl.{comp.paper}.torch_module"
    a, b = comp.make_example(11), comp.make_example(11)
    assert len(a.inputs) == comp.n_inputs
    for x, y in zip(a.inputs, b.inputs, strict=True):
        assert torch.equal(x, y) and x.dtype == torch.float64
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # State-dict keys read well in NumPy code: named submodules, no bare Sequential index.
    for key in sa:
        assert not re.search(r"(^|\.)\d+\.", key), f"bare index in state-dict key {key!r}"
    # Defined by the class or a base of refimpl's, not inherited from nn.Module's default.
    assert callable(getattr(comp.module, "reset_parameters", None)), comp.module.__name__
    assert comp.module.extra_repr is not nn.Module.extra_repr, comp.module.__name__


@pytest.mark.parametrize("comp", [c for c in COMPONENTS if c.attention], ids=lambda c: c.name)
def test_create_builds_every_attention_module(comp):
    for name in (comp.name, *comp.aliases):
        module = refimpl.create(name, 32)
        assert type(module) is comp.module
        x = torch.randn(2, 32, 5, 6, generator=torch.Generator().manual_seed(0))
        assert module(x).shape == x.shape


def test_every_paper_has_its_tutorial_and_tests():
    for paper in papers().values():
        assert (ROOT / paper.tutorial).is_file(), paper.tutorial
        assert (ROOT / "tests" / f"test_{paper.slug}.py").is_file()
        assert re.fullmatch(r"\d{4}\.\d{5}", paper.arxiv)


def test_randomize_is_deterministic_and_randomises_running_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    a = state_dict_numpy(randomize_(net, 5))
    b = state_dict_numpy(randomize_(net, 5))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["1.running_mean"], 0) and not np.allclose(a["1.running_var"], 1)
    assert not np.array_equal(a["0.weight"], state_dict_numpy(randomize_(net, 6))["0.weight"])


def test_check_passes_and_exits_zero(capsys):
    assert main(["check", "--examples", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for comp in COMPONENTS:
        assert f"| {comp.name} | cpu | float64 eval vs NumPy |" in out
        assert f"| {comp.name} | cpu | float32 train vs NumPy |" in out
    assert "FAIL" not in out and "checks passed" in out


def test_check_fails_on_a_disagreeing_component(monkeypatch, capsys):
    """A NumPy forward that is off by 1e-8 relative must fail the float64 rows."""
    comp = COMPONENTS[0]

    def off(*args, **kwargs):
        return comp.numpy_forward(*args, **kwargs) * (1 + 1e-8)

    broken = dataclasses.replace(comp, numpy_forward=off)
    monkeypatch.setattr(check, "get", lambda name: broken)
    assert main(["check", "--only", comp.name, "--examples", "2", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    rows = {line.split(" | ")[2]: line for line in out.splitlines() if " vs NumPy " in line}
    assert "| FAIL |" in rows["float64 eval vs NumPy"]
    assert "| FAIL |" in rows["float64 train vs NumPy"]
    assert "| ok |" in rows["float32 eval vs NumPy"]  # 1e-8 is inside float32's tolerance


def _with_properties(monkeypatch, *props: Property) -> Component:
    """The first component with ``props`` added, seen by both ``check`` and the kit."""
    comp = COMPONENTS[0]
    patched = dataclasses.replace(comp, properties=(*comp.properties, *props))
    monkeypatch.setattr(check, "get", lambda name: patched)
    monkeypatch.setattr(testing_core, "get", lambda name: patched)
    return patched


def test_check_fails_on_a_broken_invariant(monkeypatch, capsys):
    comp = _with_properties(monkeypatch, Property("always broken", lambda m, i, o: (False, "bad")))
    assert main(["--only", comp.name, "--examples", "1", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "invariant: always broken" in x]
    assert "|  |  | FAIL | input (" in line and ": bad" in line, line


def test_check_shows_a_skipped_invariant_as_skipped(monkeypatch, capsys):
    def never(module, inputs, options):
        raise SkipProperty("by design")

    comp = _with_properties(monkeypatch, Property("never checkable", never))
    assert main(["--only", comp.name, "--examples", "1", "--device", "cpu"]) == 0
    assert "invariant: never checkable |  |  | skip | by design |" in capsys.readouterr().out


def test_check_runs_every_registered_property(capsys):
    """Every property of the paper, and the kit's generic ones, get a row of ``check``."""
    comp = get("cbam")
    assert main(["--only", comp.name, "--examples", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for prop in comp.properties:
        escaped = prop.name.replace("|", "\\|")  # the table escapes pipes
        assert f"invariant: {escaped} |" in out, prop.name
    assert "invariant: batch items independent (eval) |" in out


def test_unknown_component_is_a_usage_error(capsys):
    assert main(["check", "--only", "no_such_module"]) == 2
    assert "unknown component 'no_such_module'" in capsys.readouterr().err


def test_list_names_every_component(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for comp in COMPONENTS:
        assert comp.module.__name__ in out and comp.name in out


def test_module_entry_point_runs():
    """``python -m refimpl list`` works as a process (the README's command)."""
    done = subprocess.run(
        [sys.executable, "-m", "refimpl", "list"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "SqueezeExcitation" in done.stdout


@pytest.mark.parametrize("comp", COMPONENTS, ids=lambda c: c.name)
def test_examples_carry_their_constructor_options(comp):
    """``Example.module_options`` rebuild the example's module (same keys and shapes, same
    options-driven attributes): ``check`` tells the kit what the module implements."""
    for seed in range(3):
        ex = comp.make_example(seed)
        rebuilt = comp.module(ex.inputs[0].shape[1], **ex.module_options)
        want = {k: tuple(v.shape) for k, v in ex.module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want, seed
        with torch.no_grad():
            got = tuple(rebuilt.double().eval()(*ex.inputs).shape)
            assert got == tuple(ex.module(*ex.inputs).shape), seed


def test_hidden_width_is_the_floor_of_c_over_r_never_zero():
    """The one home of the width rule (``refimpl._checks.hidden_width``, torch-free):
    literals, and clear errors naming the argument and the value that came."""
    from refimpl._checks import hidden_width

    assert [hidden_width(c, r) for c, r in [(64, 16), (17, 4), (3, 16), (1, 1), (15, 16)]] == [
        4,
        4,
        1,
        1,
        1,
    ]
    assert hidden_width(64, 16, 5) == 5  # given directly, C and r still checked
    assert hidden_width(64, 16, 5, "DoubleAttention", "m") == 5
    for args, word in [
        ((0, 4), "channels"),
        ((8, 0), "reduction"),
        ((8, 2, 0), "hidden_channels"),
        ((8.0, 2), "channels"),
        ((True, 1), "channels"),
    ]:
        with pytest.raises(ValueError, match=f"X: {word} must be a positive integer, got"):
            hidden_width(*args, who="X")
    with pytest.raises(ValueError, match="DoubleAttention: m must be a positive integer, got 0"):
        hidden_width(8, 2, 0, "DoubleAttention", "m")


# ---------------------------------------------------------------------------------------
# The properties ported from the old per-paper invariants catch what they state


class _CorruptMaps(nn.Module):
    """refimpl's module with one returned map changed by ``corrupt(map, inputs)``: the
    output stays right, so only a property about that map can notice."""

    def __init__(self, inner: nn.Module, key: str, corrupt) -> None:
        super().__init__()
        self.inner, self.key, self.corrupt = inner, key, corrupt

    def forward(self, *inputs, return_maps: bool = False):
        out, maps = self.inner(*inputs, return_maps=True)
        if not return_maps:
            return out
        return out, {**maps, self.key: self.corrupt(maps[self.key], inputs)}


CORRUPTIONS = [
    ("se", {}, "s", lambda s, i: s + 1.0, "gate s in (0, 1)"),
    ("channel_attention", {}, "M_c", lambda m, i: 2 * m, "M_c in (0, 1)"),
    (
        "channel_attention",
        {},
        "M_c",
        lambda m, i: m + 1e-3 * i[0][:, :, :1, :1],
        "M_c unchanged by permuting positions",
    ),
    (
        "spatial_attention",
        {},
        "M_s",
        lambda m, i: m + 1e-3 * i[0][:, :1],
        "M_s unchanged by permuting channels",
    ),
    ("cbam", {}, "M_s", lambda m, i: m - 1.0, "M_s in (0, 1)"),
    (
        "bam",
        {},
        "M",
        lambda m, i: 0.9 * m,
        "M = sigmoid(M_c + M_s) (M_c * M_s with combine='product')",
    ),
    ("bam", {}, "M", lambda m, i: m + 1.0, "M in [0, 1]"),
    (
        "double_attention",
        {},
        "softmax_B",
        lambda m, i: 1.1 * m,
        "each gathering map sums to 1 over positions",
    ),
    (
        "double_attention",
        {},
        "softmax_V",
        lambda m, i: 1.1 * m,
        "each distribution vector sums to 1 over descriptors",
    ),
    (
        "double_attention",
        {"output_conv": False, "residual": False},
        "G",
        lambda g, i: 0.5 * g,
        "z_i inside G's row-wise [min, max] (after the reconstruction)",
    ),
    ("mscam", {}, "g", lambda g, i: g + 0.1, "logit(M) - L = g at every position"),
    ("mscam", {}, "M", lambda m, i: m + 1.0, "M in [0, 1]"),
    (
        "mask_head",
        {"activation": "spatial"},
        "s",
        lambda s, i: s * torch.linspace(1, 2, s.shape[-1], dtype=s.dtype),
        "spatial mask (f3): unchanged by 2 s + 3 per channel, up to its epsilon",
    ),
    ("attention_module", {}, "H", lambda h, i: 3 * h, "ARL, M in [0, 1]: |T| <= |H| <= 2 |T|"),
    (
        "attention_module",
        {"learning": "nal"},
        "H",
        lambda h, i: 2 * h,
        "NAL, M in [0, 1]: |H| <= |T|",
    ),
    (
        "attention_module",
        {},
        "M",
        lambda m, i: m + 1.0,
        "the returned M in (0, 1) (f1, f3) or unit channel vectors (f2)",
    ),
]


@pytest.mark.parametrize(
    "name, options, key, corrupt, prop", CORRUPTIONS, ids=[f"{c[0]}-{c[4]}" for c in CORRUPTIONS]
)
def test_ported_property_fails_on_a_corrupted_map(name, options, key, corrupt, prop):
    """Each property that replaced an old invariant fails when exactly what it states is
    broken (a test that cannot fail is a defect), and passes on refimpl's own module."""
    from refimpl.testing import check_invariants

    comp = get(name)
    channels = 6
    inner = randomize_(comp.module(channels, **options).double(), 0).eval()
    kwargs = {"options": options, "examples": 3, "channels": channels}
    rows = {r.name: r for r in check_invariants(inner, name, **kwargs).rows}
    assert rows[prop].status == "passed", rows[prop]
    rows = {
        r.name: r for r in check_invariants(_CorruptMaps(inner, key, corrupt), name, **kwargs).rows
    }
    assert rows[prop].status == "failed", rows[prop]


REFIMPL_ONLY = [
    ("residual_unit", {}, "F = 0 gives the identity (identity shortcut)"),
    ("double_attention", {}, "softmax logits shifted: no change"),
    ("iaff", {}, "iAFF'(Y, X) = iAFF(X, Y) with M -> 1 - M"),
    ("attention_module", {}, "M = 0 (ARL): H == T and out == post(T), exactly"),
    (
        "attention_module",
        {"activation": "spatial"},
        "spatial mask (f3): unchanged by 2 s + 3 per channel, up to its epsilon",
    ),
]


class _Wrapped(nn.Module):
    """Another implementation (here: refimpl's, hidden behind a wrapper)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs, **kwargs):
        return self.inner(*inputs, **kwargs)


@pytest.mark.parametrize("name, options, prop", REFIMPL_ONLY, ids=[r[0] for r in REFIMPL_ONLY])
def test_refimpl_only_properties_run_on_refimpl_and_skip_others_with_the_reason(
    name, options, prop
):
    from refimpl.testing import check_invariants

    comp = get(name)
    inner = randomize_(comp.module(6, **options).double(), 0).eval()
    kwargs = {"options": options, "examples": 3, "channels": 6}
    rows = {r.name: r for r in check_invariants(inner, name, **kwargs).rows}
    assert rows[prop].status == "passed", rows[prop]
    rows = {r.name: r for r in check_invariants(_Wrapped(inner), name, **kwargs).rows}
    assert rows[prop].status == "skipped" and "needs refimpl's" in rows[prop].detail, rows[prop]
