"""Every tutorial notebook runs top to bottom, and the committed copies carry their outputs.

The notebooks are found by globbing ``tutorials/*.ipynb``, so a new tutorial is tested
as soon as it exists. Each one is executed from a temporary copy (the committed file is
never rewritten) by ``execute`` of ``tutorials/run_all.py``, the same code that
produces the committed outputs: a fresh ``python3`` kernel of this interpreter,
``MPLBACKEND=Agg``, a per-cell timeout. A failing cell fails the test with that cell's
source and traceback.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nbclient.exceptions import CellExecutionError  # noqa: E402

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: Seconds one cell may take under test (run_all.py allows more, for slow machines).
CELL_TIMEOUT = 120


def _load_run_all():
    spec = importlib.util.spec_from_file_location("tutorials_run_all", TUTORIALS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def test_tutorials_exist() -> None:
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"


#: The naming rule of tutorials/README.md: two digits of reading order, an optional letter
#: for a companion of the notebook with the same number, the topic in snake_case.
NAME_RULE = re.compile(r"(?P<number>\d\d)(?P<companion>[a-z]?)_[a-z0-9]+(?:_[a-z0-9]+)*\.ipynb")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_name_follows_the_rule_and_the_readme_lists_it(path: Path) -> None:
    match = NAME_RULE.fullmatch(path.name)
    assert match, f"{path.name} does not follow NN_topic.ipynb (see tutorials/README.md)"
    if match["companion"]:
        main = [p for p in NOTEBOOKS if p.name.startswith(f"{match['number']}_")]
        assert main, f"{path.name} is a companion, but no {match['number']}_*.ipynb exists"
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert f"]({path.name})" in readme, f"tutorials/README.md does not link {path.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """The notebook executes top to bottom without an error (its asserts included)."""
    # A copy of the whole folder, so a notebook can read files beside it; run from there.
    workdir = tmp_path / "tutorials"
    shutil.copytree(TUTORIALS, workdir, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    before = path.read_bytes()
    failure = None
    try:
        nb = run_all.execute(workdir / path.name, cwd=workdir, timeout=CELL_TIMEOUT)
    except CellExecutionError as err:
        failure = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the traceback without colours
    if failure is not None:  # outside the except block: report the cell's error alone
        pytest.fail(f"{path.name}: a cell failed\n{failure}", pytrace=False)
    assert path.read_bytes() == before, "the committed notebook was modified"
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {[e.ename for e in errors]}"


def _kernels_of_this_process() -> set[int]:
    """Process ids of the Jupyter kernels that this process started and that still run."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if ppid == os.getpid() and b"ipykernel" in cmdline:
            pids.add(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_execute_shuts_its_kernel_down(tmp_path: Path) -> None:
    """Regression: nbclient keeps a kernel alive when it is given the kernel manager, so
    every executed notebook left a kernel (hundreds of MB with torch) until the end."""
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), path)
    before = _kernels_of_this_process()
    nb = run_all.execute(path)
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "2"
    left = _kernels_of_this_process() - before
    assert not left, f"kernel process(es) {sorted(left)} still running after execute()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_was_executed(path: Path) -> None:
    """The committed notebook has outputs, no errors, and was run in order, top to bottom.

    Produce it with ``python tutorials/run_all.py``.
    """
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    counts = [c.execution_count for c in cells]
    assert None not in counts, (
        f"{path.name}: {counts.count(None)} code cells were never executed; "
        "run `python tutorials/run_all.py`"
    )
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1, 2, 3, ...: the notebook was not "
        "run top to bottom in one fresh kernel; run `python tutorials/run_all.py`"
    )
    assert any(c.outputs for c in cells), f"{path.name} has no outputs"
    for i, cell in enumerate(cells):
        for out in cell.outputs:
            assert out.output_type != "error", (
                f"{path.name}: code cell {i + 1} holds an error output: "
                f"{out.get('ename')}: {out.get('evalue')}"
            )
            if out.output_type == "stream":
                assert out.name != "stderr" or "Traceback" not in out.text, (
                    f"{path.name}: code cell {i + 1} printed a traceback to stderr"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_small(path: Path) -> None:
    """Figures are saved at a modest resolution, so the repository stays light."""
    size_kb = path.stat().st_size / 1024
    assert size_kb < 500, f"{path.name} is {size_kb:.0f} KB; lower the figures' dpi or size"
