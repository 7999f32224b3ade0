"""The command line of refimpl: check, list, bench.

    python -m refimpl                     # the same as `python -m refimpl check`
    python -m refimpl check --only cbam --device cpu --seed 7 --examples 10
    python -m refimpl list                # what refimpl.create accepts, the networks
    python -m refimpl bench --quick       # speed and memory (see benchmarks/README.md)
    python -m refimpl --version

The ``refimpl`` script that pip installs is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator

import torch

import refimpl

PROG = "refimpl"


# ---------------------------------------------------------------------------------------
# list


def _plain(text: str) -> str:
    """Docstring text without reST markup: ``:func:`~a.b.c``` -> ``c``, ````x```` -> ``x``."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).split(".")[-1], text)
    return text.replace("``", "")


def _first_sentence(doc: str | None) -> str:
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
    return _plain(sentence).replace(" (see above)", "")


def _public_path(cls: type) -> str:
    """``refimpl.cbam.CBAM`` where the paper package exports it, else the defining module."""
    package = cls.__module__.rsplit(".", 1)[0]
    if getattr(importlib.import_module(package), cls.__name__, None) is cls:
        return f"{package}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def networks() -> Iterator[tuple[str, Callable[..., torch.nn.Module]]]:
    """Every network builder: ``(qualified name, function)``.

    A network builder is a public function of ``refimpl.<paper>.networks`` or of
    ``refimpl.backbones`` that takes ``num_classes``; the registry's order, the backbones
    last.
    """
    from refimpl.registry import PAPER_PACKAGES

    for module_name in [f"refimpl.{slug}.networks" for slug in PAPER_PACKAGES] + [
        "refimpl.backbones"
    ]:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a paper without networks
            continue
        for name, fn in vars(module).items():
            if (
                inspect.isfunction(fn)
                and fn.__module__ == module_name
                and not name.startswith("_")
                and "num_classes" in inspect.signature(fn).parameters
            ):
                yield f"{module_name}.{name}", fn


def _list(args: argparse.Namespace) -> int:
    from refimpl.registry import papers

    print(
        "Components. refimpl.create(NAME, channels, **options) builds the module of any NAME "
        "in the second column,\nin any case. The others are parts of a module, or fuse two "
        "inputs (X, Y): build them from their class.\n"
    )
    print("| paper | refimpl.create names | component | PyTorch class | NumPy function |")
    print("|---|---|---|---|---|")
    for paper in papers().values():
        cite = f"{paper.title} ({paper.venue} {paper.year}, arXiv {paper.arxiv})"
        for comp in paper.components:
            names = ", ".join((comp.name, *comp.aliases)) if comp.attention else "—"
            np_fn = f"{comp.numpy_forward.__module__}.{comp.numpy_forward.__name__}"
            print(f"| {cite} | {names} | {comp.name} | {_public_path(comp.module)} | {np_fn} |")
    print("\nNetworks (each takes num_classes, 1000 by default for ImageNet):\n")
    print("| network | what it is |")
    print("|---|---|")
    for name, fn in networks():
        print(f"| {name}() | {_first_sentence(fn.__doc__)} |")
    print(
        "\nTutorials: Jupyter notebooks in the source repository (they are not installed "
        "with the package),\none per paper, under tutorials/:\n"
    )
    for paper in papers().values():
        print(f"  {paper.tutorial}  ({paper.title})")
    return 0


# ---------------------------------------------------------------------------------------
# check


def _check(args: argparse.Namespace) -> int:
    from refimpl.check import LEGEND, format_table, require_device, run_checks
    from refimpl.registry import get

    try:
        for name in args.only or []:
            get(name)
        devices = [require_device(d) for d in args.device] if args.device else None
    except (KeyError, ValueError) as err:
        return _error("check", err.args[0])
    rows = run_checks(
        args.only,
        devices,
        seed=args.seed,
        examples=args.examples,
        progress=lambda line: print(f"check: {line}", file=sys.stderr, flush=True),
    )
    print(format_table(rows))
    print()
    print(LEGEND)
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} checks passed "
        f"(refimpl {refimpl.__version__}, torch {torch.__version__}, seed {args.seed}, "
        f"{args.examples} examples each)."
    )
    return 1 if failed else 0


def _check_options() -> argparse.ArgumentParser:
    """The options of ``check``, shared by the top-level parser (check is the default)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="check only this component (name or alias, any case); repeatable",
    )
    options.add_argument(
        "--device",
        action="append",
        metavar="DEVICE",
        help="torch device, e.g. cpu or cuda:0; repeatable (default: cpu, and cuda if present)",
    )
    options.add_argument(
        "--seed", type=int, default=0, help="seed of the first random example (default 0)"
    )
    options.add_argument(
        "--examples",
        type=int,
        default=8,
        metavar="K",
        help="random examples (options, shapes, weights) per component (default 8)",
    )
    return options


# ---------------------------------------------------------------------------------------
# The parser


def _error(command: str, message: str) -> int:
    """One line on stderr, exit status 2 (a usage error)."""
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """One parser, one subparser per command; each sets ``func(args) -> exit status``."""
    from refimpl.bench import add_arguments as add_bench_arguments
    from refimpl.bench import run_command as run_bench
    from refimpl.bench.core import DESCRIPTION as BENCH_DESCRIPTION
    from refimpl.check import LEGEND

    check_options = _check_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reference implementations of CNN attention methods: the NumPy oracle "
        "against the PyTorch modules. Without a command, runs check.",
        parents=[check_options],  # `refimpl --only se` is `refimpl check --only se`
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {refimpl.__version__} (torch {torch.__version__})",
    )
    parser.set_defaults(func=_check)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        parents=[check_options],
        help="NumPy against PyTorch, and the papers' invariants (the default command)",
        description="Compare every component's PyTorch module (float64 and float32, eval and "
        "train) with its NumPy float64 forward on random examples, and check the papers' "
        "invariants. Exit status 1 if any check fails.",
        epilog=LEGEND,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.set_defaults(func=_check)
    listing = sub.add_parser(
        "list",
        help="the components, the names refimpl.create accepts, the networks, the tutorials",
        description="The registered components with the names refimpl.create accepts, the "
        "networks, and where the tutorials are.",
    )
    listing.set_defaults(func=_list)
    bench = sub.add_parser(
        "bench",
        help="speed and memory against x.clone() and other implementations",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=lambda args: run_bench(args, prog=f"{PROG} bench"))
    from refimpl.testing import cli as compare_cli

    compare_cli.add_parser(sub).set_defaults(func=compare_cli.run)
    # A new command is a few lines here: `sub.add_parser(...)`, its arguments, and
    # `set_defaults(func=...)` with a function `args -> exit status`.
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m refimpl`` and of the ``refimpl`` script.

    Returns:
        The exit status: 0 success, 1 a check or benchmark failed, 2 a usage error.
    """
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `refimpl list | head -1`: the reader left, nothing to say
        if hasattr(sys.stdout, "fileno"):
            try:  # so that Python's own flush at exit does not fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
