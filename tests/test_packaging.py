"""What a newcomer gets: the wheel and its metadata, the license, the README's examples.

The wheel is built once per session, without build isolation (no download: the test
extra asks for a setuptools that reads `pyproject.toml`), from a copy of the files that
go into it, so the working tree is never written to.
"""

from __future__ import annotations

import ast
import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import refimpl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """The wheel of a copy of the project, and pip's verbose log of building it."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "refimpl", src / "refimpl", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "-v", "--no-deps", "--no-build-isolation"]
        + ["--no-cache-dir", "--disable-pip-version-check", "-w", str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    (wheel,) = out.glob("refimpl-*.whl")
    return zipfile.ZipFile(wheel), log


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_the_build_prints_no_deprecation_warning(built) -> None:
    """The TOML-table form of `license` printed a SetuptoolsDeprecationWarning here; from
    2027-02-18 setuptools refuses it."""
    _, log = built
    warnings = [line for line in log.splitlines() if re.search(r"deprecat", line, re.I)]
    assert not warnings, "\n".join(warnings)


def test_the_wheel_carries_the_license(built) -> None:
    wheel, _ = built
    (license_path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_path) == (ROOT / "LICENSE").read_bytes()
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier")
    assert classifiers and not [c for c in classifiers if c.startswith("License ::")]


def test_the_wheel_has_every_module_and_nothing_else(built) -> None:
    wheel, _ = built
    names = set(wheel.namelist())
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "refimpl").rglob("*")
        if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    }
    assert package <= names, sorted(package - names)
    outside = {n for n in names if not n.startswith(("refimpl/", "refimpl-"))}
    assert not outside, sorted(outside)  # no tests, tutorials or benchmarks in the wheel
    meta = _metadata(wheel)
    assert meta["Name"] == "refimpl" and meta["Version"] == refimpl.__version__
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "refimpl = refimpl.__main__:main" in wheel.read(entry).decode()


def test_license_and_citation() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the refimpl authors" in text
    cff = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "license: MIT" in cff
    assert re.search(r"^title: .+", cff, re.M) and re.search(r"^authors:\n  - name: ", cff, re.M)


# ---------------------------------------------------------------------------------------
# The README's examples

NOT_RUN = "<!-- not run: "


def _python_blocks() -> list[tuple[int, str, bool]]:
    """``(line, code, run)`` of every ```python block in the README; ``run`` is False for a
    block right under a ``<!-- not run: why -->`` comment."""
    blocks = []
    lines = (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            i += 1
            while lines[i].strip() != "```":
                i += 1
            run = not (start > 0 and lines[start - 1].startswith(NOT_RUN))
            blocks.append((start + 1, "\n".join(lines[start + 1 : i]) + "\n", run))
        i += 1
    return blocks


BLOCKS = _python_blocks()


def test_the_readme_has_examples() -> None:
    assert len([b for b in BLOCKS if b[2]]) >= 1, "no runnable python block in README.md"


@pytest.mark.parametrize(("line", "code", "run"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_example(line, code, run, capsys, tmp_path, monkeypatch) -> None:
    """Every example runs as written and prints what it checked; one that needs a file we
    do not ship (a checkpoint) runs its imports, so its names stay right."""
    monkeypatch.chdir(tmp_path)
    tree = ast.parse(code, filename=f"README.md:{line}")
    if run:
        exec(compile(tree, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        assert capsys.readouterr().out.strip(), f"the example at README.md:{line} prints nothing"
    else:
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        exec(compile(ast.Module(imports, []), f"README.md:{line}", "exec"), {})


def test_readme_examples_have_no_unused_imports(tmp_path) -> None:
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    for line, code, _ in BLOCKS:
        path = tmp_path / f"readme_line{line}.py"
        path.write_text(code)
        done = subprocess.run(
            [ruff, "check", "--no-cache", "--isolated", "--select", "F,E9", str(path)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"README.md:{line}:\n{done.stdout}"
