"""BatchNorm folded into the convolution before it, for inference: in eval mode a BatchNorm layer is a per-channel
scale and shift, which the convolution's weights and bias can carry, so the folded model computes the same outputs (to
float rounding) with one pass over each feature map fewer.

The model itself keeps its BatchNorm layers: test-time adaptation (``adapt``) re-estimates their statistics, so
:class:`FoldedModel` folds a copy and folds again whenever the statistics change.
"""

import copy

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .adapt import batchnorm_layers

#: the (convolution, BatchNorm) attribute pairs of torchvision's ResNet, BasicBlock and Bottleneck
_PAIRS = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'))


def batchnorm_statistics(model):
    """Every BatchNorm layer's running mean and variance, as one vector (what folding depends on)."""
    stats = [buf.detach().flatten() for m in batchnorm_layers(model).values()
             for buf in (m.running_mean, m.running_var)]
    return torch.cat(stats) if stats else torch.zeros(0)


def fold_batchnorm(model):
    """A copy of ``model`` (in eval mode) with every BatchNorm of a ResNet body folded into its convolution."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        for conv, norm in _PAIRS:
            if isinstance(getattr(module, conv, None), torch.nn.Conv2d) and \
                    isinstance(getattr(module, norm, None), torch.nn.BatchNorm2d):
                setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, norm)))
                setattr(module, norm, torch.nn.Identity())
        shortcut = getattr(module, 'downsample', None)
        if isinstance(shortcut, torch.nn.Sequential) and len(shortcut) == 2 and \
                isinstance(shortcut[0], torch.nn.Conv2d) and isinstance(shortcut[1], torch.nn.BatchNorm2d):
            module.downsample = torch.nn.Sequential(fuse_conv_bn_eval(shortcut[0], shortcut[1]))
    return folded.to(memory_format=torch.channels_last)


class FoldedModel:
    """``model`` with its BatchNorm folded (:func:`fold_batchnorm`), folded again when its statistics change."""

    def __init__(self, model):
        self.model = model
        self._folded = self._stats = None

    def current(self):
        """The folded copy for the model's statistics now."""
        stats = batchnorm_statistics(self.model)
        if self._folded is None or not torch.equal(stats, self._stats):
            self._folded, self._stats = fold_batchnorm(self.model), stats.clone()
        return self._folded

    def __call__(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
