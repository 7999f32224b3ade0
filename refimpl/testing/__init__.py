"""The conformance kit: check ANY implementation of a paper's module against refimpl.

    >>> from refimpl.testing import check_invariants, compare
    >>> report = compare(my_cbam, "cbam")          # against the NumPy oracle
    >>> print(report)                               # a table; names the known variant
    >>> check_invariants(my_cbam, "cbam").assert_ok()   # in your pytest

:func:`check_invariants` runs the paper's implementation-independent properties on any
``nn.Module`` with the component's call signature. :func:`compare` gives the module's own
weights to refimpl's NumPy oracle and compares outputs and input gradients; where they
differ, it searches the paper's catalogue of known variants (``Component.variants`` in
``refimpl/<paper>/registry.py``) and names the one the module matches. Both return a
:class:`Report`. From the command line: ``python -m refimpl compare pkg.module:factory
--as cbam``.
"""

from refimpl.testing.core import check_invariants, compare, infer_channels, map_params
from refimpl.testing.report import Report, Row

__all__ = ["Report", "Row", "check_invariants", "compare", "infer_channels", "map_params"]
