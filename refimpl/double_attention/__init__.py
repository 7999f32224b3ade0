r"""A^2-Nets: Double Attention Networks (Chen, Kalantidis, Li, Yan, Feng; NeurIPS 2018;
arXiv 1810.11579).

A convolution sees a small window; relating two far-apart parts of an image takes many
layers. The double attention block gives every position access to the whole image in
two attention steps. *Gathering* (Eq. (3)): n attention maps, each a softmax over all
positions, pool the features A = phi(X) into n global descriptors G = A softmax(B)^T, a
second-order (bilinear) pooling whose second factor is normalised into attention.
*Distribution* (Eq. (4)): each position i takes its own convex combination z_i = G v_i
of the descriptors, with v_i a softmax over the n descriptors. A 1x1 convolution maps Z
back to the input's width and the result is added to the input. Multiplying G first
costs O(m n hw) per image where the other order, through an hw x hw matrix, costs
O((hw)^2). The paper's A^2-ResNet-50 (33.0M parameters, 6.5 GFLOPs, 77.0% top-1 on
ImageNet) adds a few such blocks to ResNet-50.
"""

from refimpl._lazy import lazy_exports
from refimpl.double_attention.numpy_forward import (
    double_attention,
    feature_distribution,
    feature_gathering,
    naive_order,
)

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "a2_resnet50": "refimpl.double_attention.networks",
    "DoubleAttention": "refimpl.double_attention.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = [
    "DoubleAttention",
    "a2_resnet50",
    "double_attention",
    "feature_distribution",
    "feature_gathering",
    "naive_order",
]
