r"""Squeeze-and-Excitation Networks (Hu, Shen, Albanie, Sun, Wu; CVPR 2018; arXiv 1709.01507).

A convolution mixes channels only inside its receptive field. The SE block gives every
channel a weight computed from the whole image: it *squeezes* each channel to its
spatial mean (a channel descriptor z, Eq. (2)), *excites* a vector of channel weights
s from z through a bottleneck of two fully connected layers and a sigmoid (Eq. (3)),
and *scales* each channel of the input by its weight (Eq. (4)). In SE-ResNet-50 the
block sits on the residual branch of every bottleneck, after the last batch norm and
before the addition; it adds about 10% parameters and 0.3% multiply-accumulates.
"""

from refimpl._lazy import lazy_exports
from refimpl.squeeze_excitation.numpy_forward import squeeze_excitation

# The PyTorch side loads on first use: the NumPy forward imports without torch.
_TORCH_SIDE = {
    "se_resnet50": "refimpl.squeeze_excitation.networks",
    "SqueezeExcitation": "refimpl.squeeze_excitation.torch_module",
}
__getattr__, __dir__ = lazy_exports(__name__, _TORCH_SIDE, globals())

__all__ = ["SqueezeExcitation", "se_resnet50", "squeeze_excitation"]
