"""Anti-aliased downsampling layers: blur with a binomial low-pass filter, then subsample.

Pure PyTorch (no Composer import), so the layers work in any model. Every layer here:

* gives exactly the output shape of the layer it replaces, for every kernel, stride, padding, dilation, ceil_mode and
  map size (1 px included);
* keeps the original layer's parameters as the *same* ``Parameter`` objects at the same state-dict keys
  (:class:`BlurConv2d` subclasses :class:`torch.nn.Conv2d`, :class:`BlurMaxPool2d` subclasses
  :class:`torch.nn.MaxPool2d`), so optimizers stay valid and baseline checkpoints load;
* holds its filter in a buffer that is saved in state dicts but may be missing when loading one, so a baseline
  (un-blurred) state dict loads strictly, while a blurred one refuses to load strictly into an un-blurred model;
* has no data-dependent Python control flow in ``forward`` (no ``.item()``, no ``int(tensor)``), so ``torch.compile``
  sees no graph break and ``torch.jit.script``, ``torch.fx`` and ONNX export work;
* with ``filter_size=1`` computes exactly the original layer.

The modules: :mod:`~blurpool_algo.layers.blur` (the blur-subsample, its padding and filter buffer, ``BlurPool2d``),
:mod:`~blurpool_algo.layers.convs` (``BlurConv2d``, ``BlurInputConv2d``), :mod:`~blurpool_algo.layers.pools`
(``BlurMaxPool2d``, ``BlurAvgPool2d``), :mod:`~blurpool_algo.layers.sampling` (the padding the blur and the pools share,
and adaptive polyphase sampling: ``choose_phase``, ``select_phase``, ``adaptive_subsample``, ``conv_at_phase``),
:mod:`~blurpool_algo.layers.oned` (the 1-D layers: ``BlurPool1d``, ``blur_pool1d``, ``BlurConv1d``,
``BlurInputConv1d``, ``BlurMaxPool1d``, ``BlurAvgPool1d``, the 2-D layers' code on the 1-D torch layers). Every
layer takes ``sampling='fixed'`` (the grid from the first sample) or ``'adaptive'`` (APS: each sample's polyphase
component of largest l2 norm), with the same parameters, buffers and state-dict keys either way.
"""

from blurpool_algo.layers.blur import FILTER_BUFFER, BlurPool2d, blur_pool2d
from blurpool_algo.layers.convs import BlurConv2d, BlurInputConv2d, conv_copy
from blurpool_algo.layers.oned import (
    BlurAvgPool1d,
    BlurConv1d,
    BlurInputConv1d,
    BlurMaxPool1d,
    BlurPool1d,
    blur_pool1d,
)
from blurpool_algo.layers.pools import BlurAvgPool2d, BlurMaxPool2d
from blurpool_algo.layers.sampling import SAMPLINGS, adaptive_subsample, choose_phase, conv_at_phase, select_phase

__all__ = [
    "FILTER_BUFFER",
    "SAMPLINGS",
    "BlurAvgPool1d",
    "BlurAvgPool2d",
    "BlurConv1d",
    "BlurConv2d",
    "BlurInputConv1d",
    "BlurInputConv2d",
    "BlurMaxPool1d",
    "BlurMaxPool2d",
    "BlurPool1d",
    "BlurPool2d",
    "adaptive_subsample",
    "blur_pool1d",
    "blur_pool2d",
    "choose_phase",
    "conv_at_phase",
    "conv_copy",
    "select_phase",
]
