r"""Attentional Feature Fusion (Dai, Gieseke, Oehmcke, Wu, Barnard; WACV 2021; arXiv 2009.14082).

Networks fuse features all the time: a residual block adds its identity branch X to its
residual branch Y, a feature pyramid adds a low-level map to an upsampled high-level one,
an Inception block concatenates branches. The paper replaces the fixed sum by a learned,
element-wise soft selection, Z = M * X + (1 - M) * Y (AFF, Eq. (4)), whose weights M come
from a multi-scale channel attention module (MS-CAM, Eq. (3)): a sigmoid of a *local*
channel context computed at every position by two point-wise convolutions (Eq. (2)) plus
a *global* one computed the same way from the global average pooling. Because the
weights are computed from the initial integration X + Y, the paper also makes that
integration attentional, with a first MS-CAM (iAFF, Eq. (5)). In AFF- and iAFF-ResNet-50
the fusion replaces the residual addition in the last two stages
(:mod:`refimpl.feature_fusion.networks`). Weights of the official and popular code load
with :func:`convert_official_state_dict` and the options ``AFF(factor_two=True)`` and
``IAFF(share_global=True)``.
"""

from refimpl._lazy import lazy_exports
from refimpl.feature_fusion.numpy_forward import (
    aff,
    global_context,
    iaff,
    local_context,
    mscam,
)

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "convert_official_state_dict": "refimpl.feature_fusion.convert",
    "load_official_state_dict": "refimpl.feature_fusion.convert",
    "AFF": "refimpl.feature_fusion.torch_module",
    "IAFF": "refimpl.feature_fusion.torch_module",
    "MSCAM": "refimpl.feature_fusion.torch_module",
    "GlobalContext": "refimpl.feature_fusion.torch_module",
    "LocalContext": "refimpl.feature_fusion.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = [
    "AFF",
    "IAFF",
    "MSCAM",
    "GlobalContext",
    "LocalContext",
    "aff",
    "convert_official_state_dict",
    "load_official_state_dict",
    "global_context",
    "iaff",
    "local_context",
    "mscam",
]
