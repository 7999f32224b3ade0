r"""Residual Attention Network for Image Classification (Wang, Jiang, Qian, Yang, Li,
Zhang, Wang, Tang; CVPR 2017; arXiv 1704.06904).

The network is a stack of *attention modules*. Each one splits its features in two: a
trunk branch T of ordinary pre-activation residual units, and a soft mask branch M that
pools down to a coarse resolution and interpolates back up (bottom-up top-down, with skip
connections), ending in a sigmoid, so that M has the trunk's shape and values in [0, 1].
Multiplying the trunk by the mask (H = M * T) would shrink the features a little more in
every module; *attention residual learning* uses H = (1 + M) * T instead, so that a mask
of zero gives back the trunk exactly and modules stack to hundreds of layers. The paper
also compares three mask activations (mixed f1, channel f2, spatial f3) and builds
Attention-56 and Attention-92 for ImageNet.
"""

from refimpl._lazy import lazy_exports
from refimpl.residual_attention.numpy_forward import (
    attention_module,
    mask_head,
    residual_unit,
    soft_mask_branch,
)

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "AttentionModule": "refimpl.residual_attention.torch_module",
    "MaskHead": "refimpl.residual_attention.torch_module",
    "ResidualUnit": "refimpl.residual_attention.torch_module",
    "SoftMaskBranch": "refimpl.residual_attention.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = [
    "AttentionModule",
    "MaskHead",
    "ResidualUnit",
    "SoftMaskBranch",
    "attention_module",
    "mask_head",
    "residual_unit",
    "soft_mask_branch",
]
