"""The command line as a newcomer meets it: version, exit codes, one-line errors, no
tracebacks, case-insensitive names, a `list` that shows everything `create` accepts.

Most tests call ``main(argv)`` in this process (cheap); the two that need a real process
(a closed pipe, the installed entry point) run ``python -m refimpl``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refimpl
from refimpl.__main__ import build_parser, main, networks
from refimpl.check import require_device
from refimpl.registry import components, papers

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = list(components().values())
#: The networks the papers define, which `list` must show (more may be listed).
NETWORKS = {
    "refimpl.squeeze_excitation.networks.se_resnet50",
    "refimpl.cbam.networks.cbam_resnet50",
    "refimpl.bam.networks.bam_resnet50",
    "refimpl.double_attention.networks.a2_resnet50",
    "refimpl.feature_fusion.networks.aff_resnet50",
    "refimpl.feature_fusion.networks.iaff_resnet50",
    "refimpl.residual_attention.networks.attention56",
    "refimpl.residual_attention.networks.attention92",
    "refimpl.backbones.resnet50",
}
#: reST that must not reach a terminal: roles and double back-quotes.
REST_MARKUP = re.compile(r":(func|class|mod|meth|data|attr):|``")


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"refimpl {refimpl.__version__} ")
    assert torch.__version__ in out


def test_version_is_the_same_everywhere() -> None:
    # Read with a regex: tomllib is Python >= 3.11, refimpl supports 3.10.
    project = re.search(r'^version = "(\S+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    cff = re.search(r"^version: (\S+)$", (ROOT / "CITATION.cff").read_text(), re.M)
    assert project is not None and cff is not None, "no version in pyproject.toml or CITATION.cff"
    assert project.group(1) == refimpl.__version__ == cff.group(1)
    assert f"## [{refimpl.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        "cuda:99",  # not there even with CUDA
        "gpu",  # not a torch device string
    ],
)
@pytest.mark.parametrize("command", ["check", "bench"])
def test_unavailable_device_is_one_line_and_exit_2(command, device, capsys) -> None:
    assert main([command, "--device", device]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith(f"refimpl {command}: error: ") and repr(device) in line, line
    assert captured.out == ""


def test_require_device_accepts_the_cpu_and_explains_cuda() -> None:
    assert require_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available: .*(CUDA|GPU)"):
            require_device("cuda")


def test_unknown_component_is_one_line_and_exit_2(capsys) -> None:
    assert main(["check", "--only", "no_such_module"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown component 'no_such_module'" in line and "registered: " in line


def test_names_are_case_insensitive(capsys) -> None:
    assert main(["check", "--only", "CBAM", "--examples", "1", "--device", "cpu"]) == 0
    assert "| cbam | cpu | float64 eval vs NumPy |" in capsys.readouterr().out
    for spelling in ("CBAM", "Cbam", "SE", "Squeeze_Excitation"):
        assert type(refimpl.create(spelling, 16)) is refimpl.get(spelling.lower()).module


def test_a_name_given_twice_is_checked_once(capsys) -> None:
    argv = ["check", "--only", "SE", "--only", "se", "--examples", "1", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("| squeeze_excitation | cpu | float64 eval vs NumPy |") == 1


def test_check_prints_progress_to_stderr_and_explains_its_columns(capsys) -> None:
    argv = ["check", "--only", "se", "--only", "bam", "--examples", "1", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    progress = captured.err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in progress] == ["squeeze_excitation", "bam"]
    assert all(re.fullmatch(r"check: \w+: \d+ of \d+ checks passed, .*", p) for p in progress)
    assert "check:" not in captured.out  # the table on stdout stays clean
    assert "worst / tolerance" in captured.out
    assert "|torch - numpy| / (atol + rtol |numpy|)" in captured.out and "at most 1" in captured.out


def _list_output(capsys) -> str:
    assert main(["list"]) == 0
    return capsys.readouterr().out


def _create_names(out: str) -> set[str]:
    """The names in the `refimpl.create names` column of the components table."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| paper |"))
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("refimpl.create names")
    names = set()
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cell = [c.strip() for c in line.strip("|").split("|")][column]
        names |= {n.strip() for n in cell.split(",") if n.strip() != "—"}
    return names


def test_list_shows_exactly_the_names_create_accepts(capsys) -> None:
    shown = _create_names(_list_output(capsys))
    accepted = {n for c in COMPONENTS if c.attention for n in (c.name, *c.aliases)}
    assert shown == accepted
    for name in shown:  # each one really builds
        assert isinstance(refimpl.create(name, 16), torch.nn.Module), name
    for comp in COMPONENTS:
        if not comp.attention:
            with pytest.raises(ValueError, match="not a drop-in attention module"):
                refimpl.create(comp.name, 16)


def test_list_shows_every_component_class_and_numpy_function(capsys) -> None:
    out = _list_output(capsys)
    for comp in COMPONENTS:
        assert f"| {comp.name} |" in out
        assert f".{comp.module.__name__} |" in out
        assert f"{comp.numpy_forward.__module__}.{comp.numpy_forward.__name__}" in out


def test_list_shows_the_networks(capsys) -> None:
    out = _list_output(capsys)
    listed = {name for name, _ in networks()}
    assert NETWORKS <= listed, NETWORKS - listed
    if hasattr(importlib.import_module("refimpl.backbones"), "resnet"):
        assert "refimpl.backbones.resnet" in listed
    for name in listed:
        assert f"| {name}() |" in out
        module, _, function = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_list_says_where_the_tutorials_are(capsys) -> None:
    out = _list_output(capsys)
    assert "source repository" in out and "not installed" in out
    for paper in papers().values():
        assert paper.tutorial in out
        assert (ROOT / paper.tutorial).is_file()


def _help_texts() -> dict[str, str]:
    parser = build_parser()
    texts = {"refimpl": parser.format_help()}
    for action in parser._actions:  # argparse offers no public way to reach subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                texts[name] = sub.format_help()
    return texts


def test_help_texts_cover_every_command() -> None:
    texts = _help_texts()
    assert {"refimpl", "check", "list", "bench"} <= set(texts)
    assert "worst / tolerance" in texts["check"]


#: Help texts known to carry reST; strict, so the marker goes when the text is fixed.
REST_IN_HELP: dict[str, str] = {}  # commands whose help may keep reST markup (none)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=REST_IN_HELP[name]))
        if name in REST_IN_HELP
        else name
        for name in [*_help_texts(), "list output"]
    ],
)
def test_help_texts_are_plain(command, capsys) -> None:
    text = _list_output(capsys) if command == "list output" else _help_texts()[command]
    found = REST_MARKUP.search(text)
    assert not found, f"reST markup in {command}'s help: {found.group()!r}"
    assert not re.search(r"\bissue", text, re.I), f"an internal word in {command}'s help"


def test_without_a_command_it_checks(capsys) -> None:
    assert main(["--only", "se", "--examples", "1", "--device", "cpu"]) == 0
    assert "| squeeze_excitation | cpu | float64 eval vs NumPy |" in capsys.readouterr().out


def test_a_closed_pipe_is_no_traceback() -> None:
    """`refimpl list | head -1`: the reader goes away before the writer is done.

    The read end is closed before the process has written anything (it is still importing
    torch), so its writes fail however small the output is.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "refimpl", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err.decode() and "BrokenPipe" not in err.decode(), err.decode()
    assert process.returncode == 1


def test_installed_script_is_the_same_command() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nrefimpl = "refimpl.__main__:main"\n' in text
