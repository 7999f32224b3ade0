"""The command line: ``python -m refimpl [list | check | bench]`` (``check`` by default).

python -m refimpl                  # check every component on every device
python -m refimpl check --only se --device cpu --seed 7 --examples 10
python -m refimpl list             # the papers and their components
python -m refimpl bench --quick    # the speed and memory benchmark (see benchmarks/)
"""

from __future__ import annotations

import argparse
import sys

import torch


def _list() -> int:
    from refimpl.registry import papers

    print("| paper | arXiv | component | PyTorch class | NumPy function | tutorial |")
    print("|---|---|---|---|---|---|")
    for paper in papers().values():
        cite = f"{paper.title} ({paper.venue} {paper.year})"
        for comp in paper.components:
            names = ", ".join((comp.name, *comp.aliases))
            np_fn = f"{comp.numpy_forward.__module__}.{comp.numpy_forward.__name__}"
            print(
                f"| {cite} | {paper.arxiv} | {names} | {comp.module.__name__} | {np_fn} | "
                f"{paper.tutorial} |"
            )
    return 0


def _check(args: argparse.Namespace) -> int:
    from refimpl.check import format_table, run_checks

    devices = [args.device] if args.device else None
    rows = run_checks(args.only, devices, seed=args.seed, examples=args.examples)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} checks passed "
        f"(torch {torch.__version__}, seed {args.seed}, {args.examples} examples each)."
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m refimpl`` and of the ``refimpl`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmark has its own options
        from refimpl.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="refimpl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="the papers and their components")
    sub.add_parser("bench", help="speed and memory against x.clone() and peers", add_help=False)
    check = sub.add_parser("check", help="NumPy against PyTorch, and invariants (default)")
    for p in (parser, check):  # `python -m refimpl --only se` works as `check --only se`
        p.add_argument("--only", action="append", metavar="NAME", help="component (repeat)")
        p.add_argument("--device", help="one device (default: cpu and cuda if present)")
        p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
        p.add_argument("--examples", type=int, default=8, help="random examples per component")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list()
    try:
        return _check(args)
    except KeyError as err:
        parser.error(str(err.args[0]))
    return 2


if __name__ == "__main__":
    sys.exit(main())
