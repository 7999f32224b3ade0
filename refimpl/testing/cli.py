"""``python -m refimpl compare MODULE --as NAME``: the conformance kit on the command line.

MODULE is ``package.module:factory`` where ``factory(channels)`` returns the ``nn.Module``
to check (a class whose first argument is the channel count works as it is). The report
is printed; the exit status is 0 when the module agrees with the oracle, 1 when it does
not (the report then names the known variant it matches, if any), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

#: The help text (plain, no markup): what the command does and its exit status.
DESCRIPTION = """Check an implementation against refimpl's NumPy oracle of a component.

MODULE is package.module:factory, where factory(channels) returns the torch module to
check (a class whose first argument is the channel count works as it is). Its own
weights go to the oracle; outputs and input gradients are compared on seeded inputs,
and where they differ the paper's catalogue of known variants is searched. Exit status:
0 the module agrees, 1 it does not (the report names the variant it matches, if any),
2 bad arguments."""

#: The channel count the module is built with when --channels is not given.
DEFAULT_CHANNELS = 32


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "compare",
        help="check your implementation against refimpl's oracle",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("module", metavar="MODULE", help="package.module:factory, factory(C) -> module")
    p.add_argument("--as", dest="name", required=True, metavar="NAME", help="component, e.g. cbam")
    p.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        metavar="C",
        help=f"channel count given to the factory (default {DEFAULT_CHANNELS})",
    )
    p.add_argument(
        "--key-map",
        metavar="FILE.json",
        help="a JSON object {refimpl key: your key} for the weights",
    )
    p.add_argument(
        "--converter",
        metavar="NAME",
        help="one of refimpl's converters for the paper, e.g. official",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a refimpl constructor option of the form to compare with "
        "(VALUE as JSON, else a string); repeat",
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="the module's computing dtype (default float64)",
    )
    p.add_argument(
        "--invariants",
        action="store_true",
        help="also run the paper's implementation-independent properties",
    )
    return p


def load_factory(spec: str) -> Any:
    """The callable named by ``package.module:factory``."""
    if ":" not in spec:
        raise UsageError(f"MODULE must be package.module:factory, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise UsageError(f"cannot import {mod_name!r}: {err}") from err
    factory = mod
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"{mod_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"{spec} is not callable")
    return factory


def _options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _key_map(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read the key map {path!r}: {err}") from err
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise UsageError(f"the key map {path!r} must be a JSON object of strings")
    return data


def run(args: argparse.Namespace) -> int:
    """Run the ``compare`` subcommand; returns the exit status."""
    import torch

    from refimpl.registry import get
    from refimpl.testing import check_invariants, compare

    try:
        comp = get(args.name)
        factory = load_factory(args.module)
        options, key_map = _options(args.option), _key_map(args.key_map)
        if args.channels < 1:
            raise UsageError(f"--channels must be positive, got {args.channels}")
        torch.manual_seed(0)  # the factory's own initialisation: the same report each run
        try:
            module = factory(args.channels)
        except Exception as err:
            raise UsageError(f"{args.module}({args.channels}) failed: {err}") from err
        if not isinstance(module, torch.nn.Module):
            raise UsageError(f"{args.module}({args.channels}) returned {type(module).__name__}")
        dtype = getattr(torch, args.dtype)
        report = compare(
            module,
            comp.name,
            key_map=key_map,
            converter=args.converter,
            options=options,
            dtype=dtype,
            channels=args.channels,
        )
    except (UsageError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"refimpl compare: error: {msg}", file=sys.stderr)
        return 2
    print(report)
    ok = report.passed
    if args.invariants:
        inv = check_invariants(module, comp.name, options=options, channels=args.channels)
        print()
        print(inv)
        ok &= inv.passed
    return 0 if ok else 1
