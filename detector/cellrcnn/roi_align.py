"""RoIAlign of the box head: torchvision's while training and on a GPU, a weighted gather of feature rows on the CPU.

torchvision's CPU RoIAlign is a scalar loop over RoIs, channels and sample points on one core. On real tissue each
1024 px tile sends 4000-7000 proposals to the box head, and that loop took a third of the tile's CPU time
(``docs/performance.md``). Yet every output bin is a weighted sum of 16 feature vectors (``sampling_ratio`` ** 2 sample
points, each interpolated between its 2 x 2 neighbouring features): on a channels-last feature map those vectors are
contiguous rows, and ``embedding_bag`` sums weighted rows vectorised over the channels and threaded over the bins.
The sample points, weights and edge rules are torchvision's (``aligned=False``), so the two agree to float32
rounding, and
each gives the same result every time.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align


def _taps(start, end, size, bins, sampling_ratio):
    """The feature indices and weights along one axis of every RoI: ``(index, weight)``, both RoIs x bins x
    2 * sampling_ratio (the low and high neighbour of each sample point), in feature coordinates. torchvision's rules:
    a RoI is at least one feature long; a sample more than one feature outside the map weighs nothing; one less than
    one feature outside reads the edge feature."""
    bin_size = (end - start).clamp(min=1.0) / bins
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None] * bin_size[:, None, None]
    offsets = (torch.arange(sampling_ratio, dtype=start.dtype, device=start.device) + 0.5) * \
        (bin_size / sampling_ratio)[:, None, None]
    points = start[:, None, None] + steps + offsets
    inside = (points >= -1) & (points <= size)
    points = points.clamp(min=0)
    low = points.floor().clamp(max=size - 1)
    points = torch.where(low >= size - 1, low, points)
    frac = points - low
    low = low.long()
    index = torch.stack([low, (low + 1).clamp(max=size - 1)], -1).flatten(2)
    weight = (torch.stack([1 - frac, frac], -1) * inside[..., None]).flatten(2)
    return index, weight


def gather_roi_align(features, boxes, scale, output_size, sampling_ratio):
    """torchvision's ``roi_align(features, boxes, output_size, scale, sampling_ratio)`` (``aligned=False``) for a
    N x C x H x W feature map (channels-last saves a copy) and a list of N tensors of boxes (x1, y1, x2, y2) in image
    pixels: K x C x output_size x output_size, float32."""
    n, channels, height, width = features.shape
    table = features.permute(0, 2, 3, 1).reshape(-1, channels).float()  # float32, as torchvision's under autocast
    pooled = []
    for image, image_boxes in enumerate(boxes):  # one image at a time bounds the index and weight tensors
        scaled = image_boxes.float() * scale
        rows, row_weights = _taps(scaled[:, 1], scaled[:, 3], height, output_size, sampling_ratio)
        cols, col_weights = _taps(scaled[:, 0], scaled[:, 2], width, output_size, sampling_ratio)
        index = image * height * width + rows[:, :, None, :, None] * width + cols[:, None, :, None, :]
        weight = row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :] / sampling_ratio ** 2
        shape = (len(image_boxes) * output_size ** 2, (2 * sampling_ratio) ** 2)  # a bag of taps per bin
        sums = F.embedding_bag(index.reshape(shape), table, per_sample_weights=weight.reshape(shape), mode='sum')
        pooled.append(sums.view(-1, output_size, output_size, channels))
    return torch.cat(pooled).permute(0, 3, 1, 2)


class RoIAlign(nn.Module):
    """RoIAlign of one feature level (``featmap_name``, stride ``field`` px) into output_size x output_size bins."""

    def __init__(self, featmap_name, field, output_size=7, sampling_ratio=2):
        super().__init__()
        self.featmap_name = featmap_name
        self.scale = 1 / field
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features, boxes, image_shapes=None):
        x = features[self.featmap_name]
        if self.training or x.device.type != 'cpu':
            return roi_align(x, boxes, self.output_size, self.scale, self.sampling_ratio)
        return gather_roi_align(x, boxes, self.scale, self.output_size, self.sampling_ratio)
