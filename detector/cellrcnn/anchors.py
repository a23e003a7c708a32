"""Anchor geometry: where each anchor sits, and feature maps densified to match.

Coordinates are continuous: pixel (row r, column c) covers [c, c + 1) x [r, r + 1), boxes are (x1, y1, x2, y2).

Field and spacing are different things (see ``ModelConfig``). In a ResNet every stride-2 layer with kernel 2p + 1 and
padding p maps output index o onto input index 2o, so the feature at index i of a level with field s is centred on pixel
``s * i``: continuous position ``s * i + 0.5``. (torchvision's AnchorGenerator puts it at ``s * i``, half a pixel
off, and
infers s from the image and feature sizes, which breaks once a feature map is interpolated.)

Anchor density upsampling by k interpolates a level's n x m feature map bilinearly with ``align_corners=True`` onto
``k(n - 1) + 1`` x ``k(m - 1) + 1`` samples: sample j lies at feature coordinate j / k, so every sample is an
interpolation between real features (the originals are kept exactly, at every k-th sample) and its anchor centre is
``field * j / k + 0.5``, anchor spacing ``field / k``. The k - 1 samples per axis that would lie beyond the last real
feature need extrapolated features and are never made: those anchors are dropped.

The cheaper alternative, anchor offsets, keeps the feature map and gives each cell m x m anchor centres
``field * (i + a / m) + 0.5`` for a in 0..m-1, each with its own predictor channels.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def upsampled_length(n, k):
    """Samples along an axis of n features after upsampling by k (no extrapolated samples)."""
    return k * (n - 1) + 1


def upsample_features(x, k):
    """Interpolate a N x C x H x W feature map so samples sit 1/k feature apart, extrapolating nothing."""
    if k == 1:
        return x
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(upsampled_length(h, k), upsampled_length(w, k)), mode='bilinear',
                         align_corners=True)


def sample_positions(length, spacing, device=None):
    """Image positions (continuous px) of `length` feature samples `spacing` px apart, the first on pixel 0's centre."""
    return torch.arange(length, device=device, dtype=torch.float32) * spacing + 0.5


def cell_anchors(sizes, aspect_ratios, spacing, offsets=1):
    """Anchors of one feature position, centred on (0, 0): offsets**2 sub-positions x sizes x ratios, in that order."""
    shapes = []
    for size in sizes:
        for ratio in aspect_ratios:
            h = size * math.sqrt(ratio)
            w = size / math.sqrt(ratio)
            shapes.append((-w / 2, -h / 2, w / 2, h / 2))
    shapes = torch.tensor(shapes, dtype=torch.float32)
    shifts = torch.tensor([(dx * spacing, dy * spacing) for dy in range(offsets) for dx in range(offsets)],
                          dtype=torch.float32)
    shifts = shifts.repeat(1, 2)
    return (shifts[:, None, :] + shapes[None, :, :]).reshape(-1, 4)


class CellAnchorGenerator(nn.Module):
    """Anchors for the RPN levels of a CellRCNN, with explicit fields and spacings.

    ``forward`` takes the (possibly upsampled) feature maps the RPN head ran on and returns, per image, the anchors in
    the order of the head's outputs: level, then row, column, then the anchors of that position.
    """

    def __init__(self, sizes, aspect_ratios, fields, upsample=1, offsets=1):
        super().__init__()
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.fields = tuple(fields)
        self.upsample = upsample
        self.offsets = offsets

    def spacing(self, level):
        """Distance between neighbouring anchor centres of a level."""
        return self.fields[level] / (self.upsample * self.offsets)

    def sample_spacing(self, level):
        """Distance between neighbouring feature samples of a level (after upsampling)."""
        return self.fields[level] / self.upsample

    def num_anchors_per_location(self):
        return [len(s) * len(self.aspect_ratios) * self.offsets ** 2 for s in self.sizes]

    def grid_anchors(self, level, height, width, device=None):
        """All anchors of a level whose (upsampled) feature map is height x width, in float32 (also under autocast:
        half precision cannot hold pixel positions of large tiles)."""
        step = self.sample_spacing(level)
        ys = sample_positions(height, step, device)
        xs = sample_positions(width, step, device)
        cy, cx = torch.meshgrid(ys, xs, indexing='ij')
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
        base = cell_anchors(self.sizes[level], self.aspect_ratios, self.spacing(level), self.offsets)
        return (centres + base.to(device)[None]).reshape(-1, 4)

    def forward(self, image_list, feature_maps):
        anchors = torch.cat([self.grid_anchors(level, *fmap.shape[-2:], device=fmap.device)
                             for level, fmap in enumerate(feature_maps)])
        return [anchors for _ in range(len(image_list.image_sizes))]
