"""``python -m refimpl check``: every registered component, NumPy against PyTorch.

For each component, each device and each of ``examples`` seeded random instances (the
seed also draws the component's options and input shape), the PyTorch module in float64
and in float32, in eval and in train mode, is compared with the NumPy float64 forward
given the module's own ``state_dict()``; then the paper's invariants are checked on the
eval-mode float64 output. One table, the worst case of each row; exit status 1 if any
row fails.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from refimpl.registry import Component, Example, components, get, state_dict_numpy


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
) -> list[Row]:
    """All checks for the chosen components (default: all) and devices (default: all)."""
    comps = [get(n) for n in names] if names else list(components().values())
    devices = devices or available_devices()
    # True float32 on CUDA: cuDNN would otherwise run float32 convolutions in TF32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[Row] = []
    for comp in comps:
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
        by_name: dict[str, Row] = {}
        for ex in exs:
            with torch.no_grad():
                out = ex.module(*ex.inputs)
                found = comp.invariants(ex, out)
            for inv in found:
                row = by_name.setdefault(inv.name, Row(comp.name, "cpu", f"invariant: {inv.name}"))
                row.ok &= inv.ok
                if not inv.ok or not row.detail:
                    row.detail = inv.detail
        rows.extend(by_name.values())
    return rows


def available_devices() -> list[str]:
    """The CPU and every CUDA device torch can see."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
            f"{'ok' if r.ok else 'FAIL'} | {detail} |"
        )
    return "\n".join(lines)
