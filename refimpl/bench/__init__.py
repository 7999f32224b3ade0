"""The benchmark: speed and memory of every registered module, against a floor and peers.

``python -m refimpl bench`` (or ``python benchmarks/run.py``) calls :func:`main`. See
``benchmarks/README.md`` for what is measured and how, and ``benchmarks/RESULTS.md`` for
recorded runs.

    >>> from refimpl.bench import main
    >>> main(["--quick", "--only", "se"])  # doctest: +SKIP
"""

from refimpl.bench.core import (
    COLUMNS,
    DEFAULT_SHAPES,
    Report,
    Row,
    add_arguments,
    count_ops,
    format_markdown,
    main,
    run,
    run_command,
    saved_bytes,
)
from refimpl.bench.peers import PEERS, TARGETS, Peer, PopularSE, Targets, peers_for, targets_for

__all__ = [
    "COLUMNS",
    "DEFAULT_SHAPES",
    "PEERS",
    "Peer",
    "PopularSE",
    "TARGETS",
    "Targets",
    "Report",
    "Row",
    "add_arguments",
    "count_ops",
    "format_markdown",
    "main",
    "peers_for",
    "run",
    "run_command",
    "saved_bytes",
    "targets_for",
]
