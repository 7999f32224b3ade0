"""``python -m refimpl check``: every registered component, NumPy against PyTorch.

For each component, each device and each of ``examples`` seeded random instances (the
seed also draws the component's options and input shape), the PyTorch module in float64
and in float32, in eval and in train mode, is compared with the NumPy float64 forward
given the module's own ``state_dict()``; then the paper's properties are checked by
``refimpl.testing.check_invariants`` on each example's module (eval mode, float64). One
table, the worst case of each row (see :data:`LEGEND`); exit status 1 if any row fails.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from refimpl.registry import Component, Example, components, get, state_dict_numpy

#: What the columns of the table mean, printed under it.
LEGEND = """\
Columns: "max abs diff" is the largest |torch - numpy| over all elements of all examples;
"worst / tolerance" is the largest |torch - numpy| / (atol + rtol |numpy|), with the row's
atol and rtol (in "detail"): at most 1 passes, so 0.02 means the worst element used 2% of
what the tolerance allows. NumPy computes in float64 and is the reference. An invariant row
states a property (refimpl.testing.check_invariants) checked in float64, eval mode, on a
few random inputs per example; "skip" means no example could check it (reason in detail)."""


@dataclass
class Row:
    """One line of the table: the worst of several examples."""

    component: str
    device: str
    check: str  # "float64 eval", "float32 train", "invariant: ..."
    worst: float = 0.0  # max |diff| / (atol + rtol |ref|); <= 1 passes
    max_abs: float = 0.0  # max |torch - numpy|
    ok: bool = True
    detail: str = ""
    skipped: bool = False  # an invariant no example could check (the reason in detail)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def compare(
    component: Component, example: Example, device: str, dtype: torch.dtype, training: bool
) -> tuple[float, float, bool]:
    """One comparison: returns (worst ratio to tolerance, max |diff|, finite)."""
    module = copy.deepcopy(example.module).train(training)
    params = state_dict_numpy(module)  # before the forward: train mode updates statistics
    module = module.to(device=device, dtype=dtype)
    inputs = [x.to(device=device, dtype=dtype) for x in example.inputs]
    with torch.no_grad():
        actual = _to_numpy(module(*inputs))
    np_inputs = [_to_numpy(x) for x in inputs]  # the oracle sees the rounded inputs too
    expected = component.numpy_forward(*np_inputs, params, training=training, **example.options)
    rtol, atol = component.tolerances[str(dtype).removeprefix("torch.")]
    diff = np.abs(actual - expected)
    worst = float((diff / (atol + rtol * np.abs(expected))).max())
    return worst, float(diff.max()), bool(np.isfinite(actual).all())


def run_checks(
    names: list[str] | None = None,
    devices: list[str] | None = None,
    seed: int = 0,
    examples: int = 8,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """All checks for the chosen components (default: all) and devices (default: all).

    Args:
        names: component names or aliases, in any case; ``None`` for all.
        devices: torch devices; ``None`` for :func:`available_devices`. Each must be
            available (see :func:`require_device`).
        seed: the first example's seed; example ``i`` uses ``seed + i``.
        examples: random examples per component.
        progress: called with one line per component as soon as its rows are done.

    Raises:
        KeyError: an unknown component name.
        ValueError: a device that is not available here.
    """
    comps = [get(n) for n in names] if names else list(components().values())
    comps = list({c.name: c for c in comps}.values())  # "se" and "SE" run once
    devices = [require_device(d) for d in devices] if devices else available_devices()
    # True float32 on CUDA: cuDNN would otherwise run float32 convolutions in TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[Row] = []
    for comp in comps:
        start, first = time.perf_counter(), len(rows)
        exs = [comp.make_example(seed + i) for i in range(examples)]
        for device in devices:
            for dtype in (torch.float64, torch.float32):
                for training in (False, True):
                    mode = "train" if training else "eval"
                    row = Row(comp.name, device, f"{str(dtype)[6:]} {mode} vs NumPy")
                    for ex in exs:
                        worst, max_abs, finite = compare(comp, ex, device, dtype, training)
                        row.worst = max(row.worst, worst)
                        row.max_abs = max(row.max_abs, max_abs)
                        row.ok &= finite and worst <= 1.0
                    rtol, atol = comp.tolerances[str(dtype)[6:]]
                    row.detail = f"rtol {rtol:g}, atol {atol:g}"
                    rows.append(row)
        rows.extend(invariant_rows(comp, exs, seed))
        if progress is not None:
            done = rows[first:]
            failed = sum(not r.ok for r in done)
            worst = max((r.worst for r in done if not r.check.startswith("invariant")), default=0)
            progress(
                f"{comp.name}: {len(done) - failed} of {len(done)} checks passed, worst "
                f"{worst:.3f} of tolerance ({time.perf_counter() - start:.1f} s)"
            )
    return rows


#: Random inputs per example on which ``refimpl.testing.check_invariants`` runs each
#: property (shapes from 1x1 to 11x11): with 8 examples, 16 inputs per property.
INVARIANT_INPUTS = 2


def invariant_rows(comp: Component, exs: list[Example], seed: int) -> list[Row]:
    """One row per property of ``comp`` (the kit's generic ones and the paper's), run by
    ``refimpl.testing.check_invariants`` on each example's module with the constructor
    options it was built with; a row fails if any example fails it, and is "skipped" (with
    the reason) only if every example skips it."""
    from refimpl.testing import check_invariants  # imports the registries: not at the top

    by_name: dict[str, Row] = {}
    for i, ex in enumerate(exs):
        report = check_invariants(
            ex.module,
            comp.name,
            options=ex.module_options,
            seed=seed + 1000 * i,
            examples=INVARIANT_INPUTS,
            channels=int(ex.inputs[0].shape[1]),
        )
        for r in report.rows:
            row = by_name.setdefault(
                r.name, Row(comp.name, "cpu", f"invariant: {r.name}", skipped=True)
            )
            if r.status == "failed":
                row.ok, row.skipped, row.detail = False, False, r.detail
            elif r.status == "passed" and row.skipped:
                row.skipped, row.detail = False, r.detail
            elif row.skipped and not row.detail:
                row.detail = r.detail
    for row in by_name.values():
        if row.ok and not row.skipped:
            row.detail = f"{len(exs)} examples x {INVARIANT_INPUTS} inputs"
    return list(by_name.values())


def available_devices() -> list[str]:
    """The CPU and every CUDA device torch can see."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def require_device(name: str) -> str:
    """``name`` if torch can run on that device here; otherwise a ValueError saying why.

    Raises:
        ValueError: not a torch device string (``"gpu"``), or a device this machine or this
            build of torch does not have (``"cuda"`` on a CPU-only build, ``"cuda:3"`` with
            one GPU, ``"mps"`` off a Mac).
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is built without CUDA"
        elif not torch.cuda.is_available():
            why = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        elif device.index is not None and device.index >= torch.cuda.device_count():
            why = f"only {torch.cuda.device_count()} CUDA device(s) are visible"
        else:
            return name
        raise ValueError(f"device {name!r} is not available: {why}")
    try:
        torch.empty(0, device=device)
    except Exception as err:  # torch raises RuntimeError, AssertionError, ... per backend
        raise ValueError(f"device {name!r} is not available: {err}") from None
    return name


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| component | device | check | max abs diff | worst / tolerance | result | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        is_cmp = not r.check.startswith("invariant")
        check, detail = (text.replace("|", "\\|") for text in (r.check, r.detail))
        lines.append(
            f"| {r.component} | {r.device} | {check} | "
            f"{f'{r.max_abs:.2e}' if is_cmp else ''} | {f'{r.worst:.3f}' if is_cmp else ''} | "
            f"{'FAIL' if not r.ok else 'skip' if r.skipped else 'ok'} | {detail} |"
        )
    return "\n".join(lines)
