"""Run the benchmark: ``python benchmarks/run.py [args]`` = ``python -m refimpl bench [args]``.

See benchmarks/README.md for the arguments and what is measured.
"""

import sys

from refimpl.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
