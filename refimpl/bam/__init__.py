r"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon; BMVC 2018; arXiv 1807.06514).

BAM refines a feature map F with a 3D attention map built from two branches computed in
parallel: a *channel* branch ("what"), a global average pool and a one-hidden-layer MLP
like SE's, and a *spatial* branch ("where"), a 1x1 reduction, two 3x3 convolutions
with dilation 4 for a wide receptive field, and a 1x1 convolution to one channel. Each
branch ends in a batch norm so that the two are on the same scale; their sum, broadcast
to C x H x W, passes a sigmoid, and the output is F' = F + F * M(F) (Eqs. (1)-(4)), so
features are only ever amplified, by a factor between 1 and 2. The module sits at the
network's bottlenecks, where the feature maps are downsampled: in BAM-ResNet-50 once
after each of the stages 1, 2 and 3, three modules in all, 0.36M parameters.

The official code combines the branches by a product and places its batch norms
elsewhere; both are options here (``combine="product"``, ``norm="hidden"``), and
:func:`convert_official_state_dict` loads its weights.
"""

from refimpl._lazy import lazy_exports
from refimpl.bam.numpy_forward import attention_map, bam, channel_gate, spatial_gate

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "convert_official_state_dict": "refimpl.bam.convert",
    "load_official_state_dict": "refimpl.bam.convert",
    "BAMResNet": "refimpl.bam.networks",
    "bam_resnet50": "refimpl.bam.networks",
    "BAM": "refimpl.bam.torch_module",
    "ChannelGate": "refimpl.bam.torch_module",
    "SpatialGate": "refimpl.bam.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = [
    "BAM",
    "BAMResNet",
    "ChannelGate",
    "SpatialGate",
    "attention_map",
    "bam",
    "bam_resnet50",
    "channel_gate",
    "convert_official_state_dict",
    "load_official_state_dict",
    "spatial_gate",
]
