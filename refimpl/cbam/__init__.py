r"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon; ECCV 2018; arXiv 1807.06521).

CBAM refines a feature map F along its two axes in turn. A *channel* gate decides "what"
matters: it pools every channel over the positions twice, by average and by maximum,
sends both descriptors through one shared MLP, adds them and squashes the sum with a
sigmoid into a map M_c of C weights (Eq. (2)); F' = M_c * F. A *spatial* gate then
decides "where": it pools F' across the channels at every position, again by average and
by maximum, convolves the two maps with one 7x7 kernel and a sigmoid into a map M_s of
H x W weights (Eq. (3)); the output is F'' = M_s * F' (Eq. (1)). Like SE, it sits on the
residual branch of every block of a ResNet; CBAM-ResNet-50 has the parameters of
SE-ResNet-50 and 0.1% more multiply-accumulates.

``variant="paper"`` (default) follows the equations, ``variant="official"`` the
authors' code (MLP biases, [max; mean] pooling order, batch norm after the spatial
convolution); :func:`convert_official_state_dict` loads the code's weights.
"""

from refimpl._lazy import lazy_exports
from refimpl.cbam.numpy_forward import cbam, channel_attention, spatial_attention

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "convert_official_state_dict": "refimpl.cbam.convert",
    "load_official_state_dict": "refimpl.cbam.convert",
    "CBAM": "refimpl.cbam.torch_module",
    "ChannelAttention": "refimpl.cbam.torch_module",
    "SpatialAttention": "refimpl.cbam.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = [
    "CBAM",
    "ChannelAttention",
    "SpatialAttention",
    "cbam",
    "channel_attention",
    "convert_official_state_dict",
    "load_official_state_dict",
    "spatial_attention",
]
