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

from refimpl._lazy import lazy_exports

__version__ = "0.1.0"

# The registry imports torch; it loads on first use, so that the NumPy side
# (refimpl.numpy_functional, refimpl.<paper>.numpy_forward) imports without torch.
_TORCH_SIDE = {
    name: "refimpl.registry"
    for name in (
        "Component",
        "Example",
        "Paper",
        "components",
        "create",
        "get",
        "papers",
        "state_dict_numpy",
    )
}
_TORCH_SIDE["registry"] = "refimpl.registry"
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

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
