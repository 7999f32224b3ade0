"""Re-execute the tutorial notebooks in place, so the committed files carry their outputs.

Usage::

    python tutorials/run_all.py                                    # every tutorials/*.ipynb
    python tutorials/run_all.py tutorials/02_squeeze_excitation.ipynb   # just these

Each notebook runs top to bottom in a fresh kernel of *this* Python interpreter
(ipykernel's own ``python3`` kernel spec, which starts ``sys.executable``, whatever
kernel specs are installed elsewhere), with the working directory ``tutorials/``,
``MPLBACKEND=Agg`` and a per-cell timeout; then it is written back with its outputs.
A notebook that fails is left untouched on disk and the command exits with status 1.

``tests/test_tutorials.py`` uses :func:`execute` from this file to run the same
notebooks on temporary copies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parent
#: Seconds one cell may run before the execution fails.
CELL_TIMEOUT = 300


def kernel_manager() -> AsyncKernelManager:
    """A manager for a ``python3`` kernel that runs ``sys.executable``.

    With no kernel directories to search, jupyter_client falls back to ipykernel's
    built-in spec, whose command line is the interpreter running this code; so a
    ``python3`` spec installed for another Python elsewhere on the machine is not used.
    """
    specs = KernelSpecManager(kernel_dirs=[])
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(
    path: Path | str, *, cwd: Path | str | None = None, timeout: int = CELL_TIMEOUT
) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom and return it with its outputs.

    Args:
        path: the ``.ipynb`` file; it is read, never written.
        cwd: the kernel's working directory; the notebook's own directory by default.
        timeout: seconds allowed per cell.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; the message holds the
            cell's source and its traceback.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier run
    client = NotebookClient(
        nb,
        km=kernel_manager(),
        kernel_name="python3",
        timeout=timeout,
        coalesce_streams=True,  # one stdout output per cell, however often it was flushed
        record_timing=False,  # no timestamps in cell metadata: re-runs give small diffs
        resources={"metadata": {"path": str(cwd if cwd is not None else path.parent)}},
    )
    # cleanup_kc: shut the kernel down afterwards. nbclient keeps a kernel alive when it was
    # given the kernel manager, so without it every notebook run leaves a kernel process
    # (torch imported: hundreds of MB) until this process exits.
    client.execute(env={**os.environ, "MPLBACKEND": "Agg"}, cleanup_kc=True)  # kernel env
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: tutorials/*.ipynb)"
    )
    parser.add_argument(
        "--timeout", type=int, default=CELL_TIMEOUT, help="seconds per cell (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(TUTORIALS.glob("*.ipynb"))
    failed = []
    for path in notebooks:
        start = time.perf_counter()
        print(f"{path}: running ...", end=" ", flush=True)
        try:
            nb = execute(path, cwd=TUTORIALS, timeout=args.timeout)
        except CellExecutionError as err:
            print(f"FAILED\n{err}", flush=True)
            failed.append(path)
            continue
        nbformat.write(nb, path)
        size = path.stat().st_size / 1024
        print(f"ok in {time.perf_counter() - start:.1f} s, {size:.0f} KB written", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
