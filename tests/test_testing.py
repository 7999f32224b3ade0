"""The conformance kit, refimpl.testing, on code it was not written for.

Every transcription of popular or official code in the papers' ``popular.py`` goes
through ``compare`` and gets the right catalogue variant named (or, where its weights
cannot be refimpl's, a clear error); every module-expressible catalogue variant is
recognised; batch-coupled forms fail the batch property; deliberately broken modules
fail; the report, the key map, the converters and the command line behave as documented.
The contract test (tests/test_contract.py) runs the kit on refimpl's own modules.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import refimpl
from refimpl.__main__ import main
from refimpl.bam import popular as bam_popular
from refimpl.cbam import popular as cbam_popular
from refimpl.double_attention import popular as a2_popular
from refimpl.feature_fusion import popular as aff_popular
from refimpl.registry import components
from refimpl.squeeze_excitation import SqueezeExcitation
from refimpl.testing import Report, check_invariants, compare

# ---------------------------------------------------------------------------------------
# Popular and official code: the right variant named

#: (what, factory, component, compare keyword arguments, the variants it must match;
#: () means it must agree with refimpl's default form).
TRANSCRIPTIONS = [
    ("popular CBAM", lambda: cbam_popular.PopularCBAM(16, hidden=4), "cbam", {}, ()),
    ("official CBAM", lambda: cbam_popular.OfficialCBAM(16, 4), "cbam", {}, ("official",)),
    (
        "official CBAM, converted",
        lambda: cbam_popular.OfficialCBAM(16, 4),
        "cbam",
        {"converter": "official"},
        ("official",),
    ),
    (
        "official BAM",
        lambda: bam_popular.OfficialBAM(32, 4),
        "bam",
        {},
        ("official_square_pooling",),
    ),
    ("eager A^2", lambda: a2_popular.build_eager(32, 0), "double_attention", {}, ()),
    (
        "zoo A^2",
        lambda: a2_popular.build_zoo(32, 0),
        "double_attention",
        {},
        ("softmax_over_batch",),
    ),
    (
        "blog A^2",
        lambda: a2_popular.build_blog(12, 0),
        "double_attention",
        {},
        ("blog_mean_positions",),
    ),
    ("popular MS-CAM", lambda: aff_popular.PopularMSCAM(16, hidden=4), "mscam", {}, ()),
    ("popular AFF", lambda: aff_popular.PopularAFF(16, hidden=4), "aff", {}, ()),
    (
        "official AFF, factor 2",
        lambda: aff_popular.PopularAFF(16, hidden=4, factor_two=True),
        "aff",
        {},
        ("factor_two",),
    ),
    (
        "popular iAFF",
        lambda: aff_popular.PopularIAFF(16, hidden=4),
        "iaff",
        {},
        ("shared_global",),
    ),
    (
        "popular iAFF, converted",
        lambda: aff_popular.PopularIAFF(16, hidden=4),
        "iaff",
        {"converter": "official"},
        ("shared_global",),
    ),
]


@pytest.mark.parametrize(
    ("factory", "name", "kwargs", "expected"),
    [pytest.param(*t[1:], id=t[0]) for t in TRANSCRIPTIONS],
)
def test_transcriptions_are_named(factory, name, kwargs, expected):
    torch.manual_seed(0)
    module = refimpl.registry.randomize_(factory().double(), seed=1).float()
    report = compare(module, name, **kwargs)
    if expected:
        assert not report.passed, str(report)
        assert set(expected) <= set(report.matches), str(report)
        assert "matches known variant" in str(report)
    else:
        assert report.passed, str(report)
        assert report.matches == [], str(report)


def test_fixed_size_residual_attention_port_is_named():
    """Built for 7x5 inputs, it fails on the others: compared where it runs."""
    from refimpl.residual_attention import popular as ra_popular

    module = ra_popular.FixedSizeAttentionModule(4, size=(7, 5), depth=2)
    report = compare(module, "attention_module", max_combined=1)
    assert report.matches == ["skip_adds_feature"], str(report)


def test_keras_residual_attention_is_not_refimpl_shaped_and_says_why():
    """The Keras form's mask head has two biased convolutions and no batch norm."""
    from refimpl.residual_attention import popular as ra_popular

    with pytest.raises(ValueError, match=r"cannot match .* by shape"):
        compare(ra_popular.FixedFactorAttentionModule(4), "attention_module")


def test_zoo_bam_is_not_refimpl_shaped_and_says_why():
    """The zoo's BAM has three hidden layers: no mapping onto BAM's weights exists."""
    with pytest.raises(ValueError, match=r"cannot match .* by shape(.|\n)*candidates"):
        compare(bam_popular.build_zoo_bam(32, 4), "bam")


def test_batch_coupled_form_fails_the_batch_property_by_name():
    report = check_invariants(a2_popular.build_zoo(16, 0), "double_attention", examples=6)
    failed = {r.name for r in report.failed}
    assert failed == {"batch items independent (eval)"}, str(report)
    assert any(v.batch_coupled for v in refimpl.get("double_attention").variants)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: cbam_popular.OfficialCBAM(16, 4),
        lambda: aff_popular.PopularAFF(16, hidden=4),
        lambda: aff_popular.PopularIAFF(16, hidden=4),
        lambda: a2_popular.build_eager(16, 0),
    ],
    ids=["official CBAM", "popular AFF", "popular iAFF", "eager A^2"],
)
def test_batch_independent_transcriptions_pass_the_properties(factory):
    name = {"OfficialCBAM": "cbam", "PopularAFF": "aff", "PopularIAFF": "iaff"}
    module = factory()
    report = check_invariants(
        module, name.get(type(module).__name__, "double_attention"), examples=6
    )
    report.assert_ok()


# ---------------------------------------------------------------------------------------
# Every catalogue variant that refimpl's own module can express is recognised

#: Components whose compare is slow (deep modules): one variant each is enough here.
_FEW = {"attention_module": 1}


def _expressible():
    out = []
    for comp in components().values():
        variants = [v for v in comp.variants if v.numpy_forward is None]
        for v in variants[: _FEW.get(comp.name, len(variants))]:
            out.append(pytest.param(comp.name, v.name, id=f"{comp.name}-{v.name}"))
    return out


@pytest.mark.parametrize(("name", "variant"), _expressible())
def test_every_expressible_variant_is_recognised(name, variant):
    comp = refimpl.get(name)
    v = next(v for v in comp.variants if v.name == variant)
    channels = 48  # where timm's width rounding differs from C // 16
    try:
        module = comp.module(channels, **v.options_for(channels))
    except (TypeError, ValueError) as err:
        pytest.fail(f"refimpl's {comp.module.__name__} does not take {v.options}: {err}")
    refimpl.registry.randomize_(module.double(), seed=3)
    report = compare(module, name, channels=channels)
    assert variant in report.matches, str(report)
    # Told which form it is, the kit agrees with it.
    compare(module, name, channels=channels, options=v.options_for(channels)).assert_ok()


# ---------------------------------------------------------------------------------------
# Broken modules are caught


class _SumSqueeze(SqueezeExcitation):
    """A broken SE: the squeeze is a sum over positions, not a mean."""

    def forward(self, x, return_maps=False):
        z = x.sum((2, 3))
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(z))))
        return x * s[:, :, None, None]


class _InPlace(SqueezeExcitation):
    """A broken SE that scales its input in place."""

    def forward(self, x, return_maps=False):
        out = super().forward(x)
        with torch.no_grad():
            x.mul_(1.0)
            x.add_(0.0 * out + 1e-3)
        return out


class _BatchMean(SqueezeExcitation):
    """A broken SE whose squeeze averages over the batch as well."""

    def forward(self, x, return_maps=False):
        z = x.mean((0, 2, 3), keepdim=False).expand(x.shape[0], -1)
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(z))))
        return x * s[:, :, None, None]


def test_broken_squeeze_fails_compare_and_matches_nothing():
    report = compare(_SumSqueeze(16, reduction=4), "se")
    assert not report.passed and report.matches == []
    assert "matches no known variant" in str(report)


@pytest.mark.parametrize(
    ("module", "failing"),
    [
        (_InPlace(16, reduction=4), "input not modified (forward and backward)"),
        (_BatchMean(16, reduction=4), "batch items independent (eval)"),
    ],
    ids=["in place", "batch mean"],
)
def test_broken_modules_fail_the_named_property(module, failing):
    report = check_invariants(module, "se", examples=6)
    assert failing in {r.name for r in report.failed}, str(report)


def test_a_property_the_module_cannot_provide_is_skipped_with_the_reason():
    from refimpl.residual_attention import popular as ra_popular

    module = ra_popular.FixedFactorAttentionModule(4, encoder_depth=1)
    report = check_invariants(module, "attention_module", examples=2, channels=4)
    row = next(r for r in report.rows if r.name.startswith("M = 0"))
    assert row.status == "skipped" and "mask hook" in row.detail


# ---------------------------------------------------------------------------------------
# Weights: key map, shapes, errors


class _Renamed(nn.Module):
    """refimpl's SE under other names and in another order."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Conv2d(hidden, channels, 1)
        self.down = nn.Conv2d(channels, hidden, 1)

    def forward(self, x):
        s = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))
        return x * s


def test_key_map_as_mapping_and_as_callable():
    module = _Renamed(16, 4)
    names = {"reduce": "down", "expand": "up"}
    by_dict = {f"{a}.{b}": f"{names[a]}.{b}" for a in names for b in ("weight", "bias")}
    compare(module, "se", key_map=by_dict).assert_ok()
    compare(
        module, "se", key_map=lambda k: names[k.split(".")[0]] + "." + k.split(".")[1]
    ).assert_ok()
    # Without a map the 1x1 convolutions are matched by their shapes.
    compare(module, "se").assert_ok()


def test_key_map_to_a_missing_key_names_it():
    with pytest.raises(KeyError, match="no_such"):
        compare(_Renamed(16, 4), "se", key_map={"reduce.weight": "no_such.weight"})


def test_ambiguous_shapes_list_the_candidates():
    module = _Renamed(16, 16)  # other names: matched by shapes, three of (16, 16) for two
    module.register_parameter("extra", nn.Parameter(torch.zeros(16, 16)))
    with pytest.raises(ValueError, match=r"ambiguous(.|\n)*extra(.|\n)*key_map"):
        compare(module, "se")


def test_a_width_the_caller_gives_is_checked_not_replaced():
    module = refimpl.registry.randomize_(refimpl.cbam.CBAM(16, reduction=4).double(), seed=1)
    with pytest.raises(ValueError, match="cannot match"):
        compare(module, "cbam", options={"reduction": 16})
    compare(module, "cbam", options={"reduction": 4}).assert_ok()
    compare(module, "cbam").assert_ok()  # none given: read from the weights


def test_unknown_converter_lists_the_known_ones():
    with pytest.raises(ValueError, match="official"):
        compare(cbam_popular.OfficialCBAM(16, 4), "cbam", converter="nonsense")


def test_float32_module_is_compared_at_the_float32_tolerance():
    report = compare(SqueezeExcitation(16, reduction=4), "se", dtype=torch.float32)
    report.assert_ok()
    assert "float32" in report.title


# ---------------------------------------------------------------------------------------
# The report


def test_report_table_and_assert_ok():
    report = Report("title")
    report.add("a property", "passed", "fine")
    report.add("another", "skipped", "needs maps")
    assert report.passed
    report.assert_ok()
    report.add("a third", "failed", "max diff 1.0 at (0, 1)")
    assert not report.passed
    with pytest.raises(AssertionError) as err:
        report.assert_ok()
    text = str(err.value)
    assert "FAIL  a third" in text and "max diff 1.0 at (0, 1)" in text and "skip" in text
    with pytest.raises(ValueError, match="status"):
        report.add("x", "maybe")


# ---------------------------------------------------------------------------------------
# The command line


def test_cli_names_the_variant_and_exits_1(capsys):
    status = main(
        ["compare", "refimpl.cbam.popular:OfficialCBAM", "--as", "CBAM", "--channels", "16"]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "matches known variant(s): official" in out


def test_cli_passes_a_correct_module(capsys, tmp_path):
    status = main(
        [
            "compare",
            "refimpl.squeeze_excitation:SqueezeExcitation",
            "--as",
            "se",
            "--channels",
            "16",
            "--invariants",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("PASSED") == 2


def test_cli_key_map_file(capsys, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"reduce.weight": "reduce.weight"}))
    status = main(
        [
            "compare",
            "refimpl.squeeze_excitation:SqueezeExcitation",
            "--as",
            "se",
            "--channels",
            "8",
            "--key-map",
            str(path),
            "--option",
            "reduction=16",
        ]
    )
    assert status == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["compare", "nonexistent_pkg:f", "--as", "se"], "cannot import"),
        (["compare", "refimpl.cbam", "--as", "cbam"], "package.module:factory"),
        (["compare", "refimpl.cbam:Nope", "--as", "cbam"], "no attribute"),
        (["compare", "refimpl.cbam:CBAM", "--as", "nonsense"], "unknown component"),
        (["compare", "refimpl.cbam:CBAM", "--as", "cbam", "--option", "novalue"], "KEY=VALUE"),
        (
            ["compare", "refimpl.cbam:CBAM", "--as", "cbam", "--key-map", "/nonexistent.json"],
            "key map",
        ),
        (["compare", "refimpl.cbam.popular:build_official_cbam", "--as", "cbam"], "failed"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Other libraries' correct modules pass (interop: CI runs these where timm imports)


@pytest.mark.interop
def test_timm_semodule_passes():
    timm_layers = pytest.importorskip("timm.layers")
    module = timm_layers.SEModule(64)  # hidden width rounded to a multiple of 8
    report = compare(module, "se")
    report.assert_ok()
    assert report.matches == ["width_multiple_of_8"]
    check_invariants(module, "se", examples=6).assert_ok()


@pytest.mark.interop
def test_torchvision_squeeze_excitation_passes():
    ops = pytest.importorskip("torchvision.ops")
    module = ops.SqueezeExcitation(64, 4)
    compare(module, "se").assert_ok()
    check_invariants(module, "se", examples=6).assert_ok()


def test_fixed_factor_upsampling_is_named():
    """A mask branch that upsamples by a fixed factor 2 fails on odd sizes and equals the
    paper's where sizes halve evenly: the search compares it on such an input."""
    from refimpl.residual_attention import SoftMaskBranch

    class FixedFactorBranch(SoftMaskBranch):
        def _upsample(self, h, like):
            return torch.nn.functional.interpolate(
                h, scale_factor=2, mode="bilinear", align_corners=self.align_corners
            )

    report = compare(FixedFactorBranch(4), "soft_mask_branch", channels=4, max_combined=1)
    assert report.matches == ["fixed_factor_upsampling"], str(report)
    # refimpl's own branch runs at odd sizes too: it is not that variant.
    compare(SoftMaskBranch(4), "soft_mask_branch", channels=4).assert_ok()
