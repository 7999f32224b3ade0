"""refimpl: reference implementations of the attention methods of CNN image classification.

Every method exists twice: a NumPy forward pass that reads like the paper
(``refimpl.<paper>.numpy_forward``) and a PyTorch module for real networks
(``refimpl.<paper>.torch_module``). The two are proven to agree by the test suite and
by ``python -m refimpl check``.

    >>> import refimpl
    >>> se = refimpl.create("se", 256)          # SqueezeExcitation(256)
    >>> sorted(refimpl.components())[:1]
    ['squeeze_excitation']
"""

from refimpl.registry import (
    Component,
    Example,
    Paper,
    components,
    create,
    get,
    papers,
    state_dict_numpy,
)

__version__ = "0.1.0"

__all__ = [
    "Component",
    "Example",
    "Paper",
    "__version__",
    "components",
    "create",
    "get",
    "papers",
    "state_dict_numpy",
]
