"""Implementation-independent properties, the building blocks of the papers' invariants.

Each function here returns a :class:`refimpl.registry.Property`: a name a reader
understands, a check that needs only the module's outputs (``m(x)``, or ``m(x, y)`` for
fusion), and what else it needs. The paper registries combine them with their own
(``refimpl/<paper>/registry.py``); :func:`refimpl.testing.check_invariants` runs them on any
module. A check receives the module (float64, eval mode unless it needs ``"train"``), the
inputs (float64 tensors) and the refimpl options the module is said to implement.

Tolerances: the properties are exact in real arithmetic; in float64 they hold to rounding,
a few ulps of the values compared, so ``RTOL`` relative to the largest value involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from refimpl.registry import Property, SkipProperty

#: Relative tolerance of every float64 property (to the largest magnitude compared).
RTOL = 1e-9

Inputs = tuple[torch.Tensor, ...]
Check = Callable[[nn.Module, Inputs, dict[str, Any]], tuple[bool, str]]

__all__ = [
    "RTOL",
    "SkipProperty",
    "batch_independent",
    "between_inputs",
    "channels_last_same",
    "close",
    "commutes_with_channel_permutations",
    "commutes_with_position_permutations",
    "gate_factorises",
    "input_not_modified",
    "map_in_range",
    "map_of",
    "map_unchanged_by_permuting",
    "maps_explain_output",
    "output",
    "permute_positions",
    "property_",
    "returned_maps",
    "scales_input",
]


def output(module: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``module(*inputs)`` without gradients; a tuple output (``out, maps``) gives ``out``."""
    with torch.no_grad():
        out = module(*inputs)
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise SkipProperty(f"the module returned {type(out).__name__}, not a tensor")
    return out


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> tuple[bool, str]:
    """Whether ``a`` and ``b`` agree to ``rtol`` of their largest magnitude; with a detail."""
    if a.shape != b.shape:
        return False, f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}"
    if a.numel() == 0:
        return True, "empty"
    diff = (a - b).abs()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    err = diff.max().item()
    if not np.isfinite(err):
        return False, "non-finite values"
    where = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(diff.shape)))
    return err <= rtol * scale, f"max diff {err:.2e} at {where} (scale {scale:.2g})"


def permute_positions(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) with its H * W positions reordered by ``perm``."""
    return t.flatten(2)[:, :, perm].reshape(t.shape)


def property_(
    name: str, check: Check, needs: tuple[str, ...] = (), batch: bool = False
) -> Property:
    """A :class:`Property` (a short alias used by the paper registries)."""
    return Property(name=name, check=check, needs=needs, batch=batch)


# ---------------------------------------------------------------------------------------
# Properties every component has


def _input_not_modified(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
    before = [x.clone() for x in inputs]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = module(*leaves)
    out = out[0] if isinstance(out, tuple | list) else out
    out.sum().backward()  # a backward may write into a saved input as well
    output(module, inputs)
    changed = [i for i, (x, b) in enumerate(zip(inputs, before, strict=True)) if not x.equal(b)]
    grads_changed = [
        i for i, (x, b) in enumerate(zip(leaves, before, strict=True)) if not x.detach().equal(b)
    ]
    bad = sorted(set(changed) | set(grads_changed))
    return not bad, "unchanged" if not bad else f"input(s) {bad} changed"


def input_not_modified() -> Property:
    """The forward (and backward) never write into the inputs."""
    return property_("input not modified (forward and backward)", _input_not_modified)


def _batch_independent(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
    if inputs[0].shape[0] < 2:
        raise SkipProperty("needs a batch of 2 or more")
    whole = output(module, inputs)
    parts = torch.cat([output(module, [x[i : i + 1] for x in inputs]) for i in range(len(whole))])
    return close(whole, parts)


def batch_independent() -> Property:
    """In eval mode each item's output depends on that item only."""
    return property_("batch items independent (eval)", _batch_independent, batch=True)


def _channels_last_same(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
    moved = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    return close(output(module, moved), output(module, inputs))


def channels_last_same() -> Property:
    """A channels_last input gives the same result as a contiguous one."""
    return property_("channels_last gives the same result", _channels_last_same)


# ---------------------------------------------------------------------------------------
# Properties of the papers (combined in refimpl/<paper>/registry.py)


def _position_perm(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[2] * x.shape[3]
    if n < 2:
        raise SkipProperty("needs more than one position")
    return torch.from_numpy(np.random.default_rng(n).permutation(n)).to(x.device)


def commutes_with_position_permutations(name: str | None = None) -> Property:
    """Permuting the positions of the input permutes those of the output the same way
    (a method with no spatial structure: channel gates, point-wise and global operations)."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        perm = _position_perm(inputs[0])
        moved = output(module, [permute_positions(x, perm) for x in inputs])
        return close(moved, permute_positions(output(module, inputs), perm))

    return property_(name or "commutes with position permutations", check)


def commutes_with_channel_permutations(name: str | None = None) -> Property:
    """Permuting the channels of the input permutes those of the output (a gate that pools
    over channels, symmetric in them)."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        c = inputs[0].shape[1]
        if c < 2:
            raise SkipProperty("needs more than one channel")
        perm = torch.from_numpy(np.random.default_rng(c).permutation(c)).to(inputs[0].device)
        moved = output(module, [x[:, perm] for x in inputs])
        return close(moved, output(module, inputs)[:, perm])

    return property_(name or "commutes with channel permutations", check)


def scales_input(
    low: float, high: float, name: str, when: Callable[[dict], str | None] | None = None
) -> Property:
    """out = s * x with every factor s in [low, high] (a gate): where x != 0, out / x lies
    in [low, high]; where x = 0, out = 0. ``when(options)`` returns a reason to skip."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        if when is not None and (reason := when(options)):
            raise SkipProperty(reason)
        x = inputs[0]
        out = output(module, inputs)
        if out.shape != x.shape:
            return False, f"output shape {tuple(out.shape)} is not the input's {tuple(x.shape)}"
        nz = x != 0
        s = out[nz] / x[nz]
        slack = 1e-12 * max(abs(low), abs(high), 1.0)
        ok = bool((s >= low - slack).all() and (s <= high + slack).all())
        ok &= bool((out[~nz] == 0).all())
        return ok, f"out / x in [{s.min().item():.6g}, {s.max().item():.6g}]" if s.numel() else ""

    return property_(name, check)


def gate_factorises(axes: str, name: str) -> Property:
    """out / x is one factor per channel (``axes="channel"``: the same at every position),
    one per position (``"position"``: the same in every channel), or a product of both
    (``"both"``: rank one per image, CBAM's M_c * M_s)."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        x = inputs[0]
        out = output(module, inputs)
        if out.shape != x.shape:
            return False, f"output shape {tuple(out.shape)} is not the input's {tuple(x.shape)}"
        if (x == 0).any():
            raise SkipProperty("needs an input without zeros")
        s = (out / x).flatten(2)  # (N, C, HW)
        if axes == "channel":
            return close(s, s[:, :, :1].expand_as(s))
        if axes == "position":
            return close(s, s[:, :1, :].expand_as(s))
        # rank one: s[c, p] s[0, 0] = s[c, 0] s[0, p]
        return close(s * s[:, :1, :1], s[:, :, :1] * s[:, :1, :])

    return property_(name, check)


def between_inputs(name: str = "Z between X and Y elementwise") -> Property:
    """A convex combination of two inputs: min(X, Y) <= Z <= max(X, Y) elementwise."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        x, y = inputs
        z = output(module, inputs)
        if options.get("factor_two"):
            z = z / 2
        slack = 1e-12 * (x.abs() + y.abs())
        low, high = torch.minimum(x, y) - slack, torch.maximum(x, y) + slack
        outside = int(((z < low) | (z > high)).sum())
        return outside == 0, f"{outside} of {z.numel()} elements outside [min, max]"

    return property_(name, check)


def maps_explain_output(
    name: str, formula: Callable[[Inputs, dict[str, torch.Tensor], dict], torch.Tensor]
) -> Property:
    """The output equals ``formula(inputs, maps, options)`` computed from the maps that
    ``forward(..., return_maps=True)`` returns (needs a module that returns them)."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        with torch.no_grad():
            got = module(*inputs, return_maps=True)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
            raise SkipProperty("forward(..., return_maps=True) did not return (out, maps)")
        out, maps = got
        try:
            expected = formula(inputs, maps, options)
        except KeyError as err:
            raise SkipProperty(f"the maps have no {err.args[0]!r}") from None
        return close(out, expected)

    return property_(name, check, needs=("maps",))


# ---------------------------------------------------------------------------------------
# Properties of the returned maps (need ``forward(..., return_maps=True)``)


def returned_maps(
    module: nn.Module, inputs: Inputs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(out, maps)`` of ``module(*inputs, return_maps=True)`` without gradients; raises
    :class:`SkipProperty` where the module does not return them."""
    with torch.no_grad():
        got = module(*inputs, return_maps=True)
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
        raise SkipProperty("forward(..., return_maps=True) did not return (out, maps)")
    return got


def map_of(maps: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``maps[key]``, or :class:`SkipProperty` naming the missing map."""
    if key not in maps:
        raise SkipProperty(f"the maps have no {key!r} (they have {sorted(maps)})")
    return maps[key]


def map_in_range(
    key: str,
    low: float,
    high: float,
    name: str,
    *,
    open_interval: bool = False,
    when: Callable[[dict], str | None] | None = None,
) -> Property:
    """Every value of the returned map ``key`` lies in [low, high] (in (low, high) with
    ``open_interval``). ``when(options)`` returns a reason to skip."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        if when is not None and (reason := when(options)):
            raise SkipProperty(reason)
        m = map_of(returned_maps(module, inputs)[1], key)
        if open_interval:
            ok = bool(((m > low) & (m < high)).all())
        else:
            ok = bool(((m >= low) & (m <= high)).all())
        return ok, f"{key} in [{m.min().item():.6g}, {m.max().item():.6g}]"

    return property_(name, check, needs=("maps",))


def map_unchanged_by_permuting(
    key: str, axis: str, name: str, when: Callable[[dict], str | None] | None = None
) -> Property:
    """The returned map ``key`` is the same when the input's positions (``axis="positions"``)
    or channels (``"channels"``) are permuted: it sees only what pools over that axis."""

    def check(module: nn.Module, inputs: Inputs, options: dict) -> tuple[bool, str]:
        if when is not None and (reason := when(options)):
            raise SkipProperty(reason)
        x = inputs[0]
        if axis == "positions":
            perm = _position_perm(x)
            moved = [permute_positions(t, perm) for t in inputs]
        else:
            if x.shape[1] < 2:
                raise SkipProperty("needs more than one channel")
            perm = torch.from_numpy(np.random.default_rng(x.shape[1]).permutation(x.shape[1]))
            moved = [t[:, perm.to(t.device)] for t in inputs]
        before = map_of(returned_maps(module, inputs)[1], key)
        after = map_of(returned_maps(module, moved)[1], key)
        return close(after, before)

    return property_(name, check, needs=("maps",))
