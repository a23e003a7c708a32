"""Boxes for dot-only nuclei from a teacher model (``cellrcnn.dot_boxes``, ``cellrcnn train --dot-boxes-from``):
the bundled model boxes the dots of synthetic tissue whose true boxes are known."""

import numpy as np
import torch
from torchvision.ops import box_iou

from cellrcnn.checkpoint import load_model
from cellrcnn.dot_boxes import teacher_boxes
from cellrcnn.synthetic import make_dataset

GLASS = 96  # px of white glass right of each tile, where one dot lies on no nucleus


def dot_samples(seed=5, count=2):
    """Synthetic tiles labelled by dots only (8 um prior squares at 0.5 um/px), each with one dot on glass beside
    them; and each tile's true boxes."""
    samples, truths = [], []
    for image, boxes in make_dataset(seed, count, size=256):
        wide = np.full((256, 256 + GLASS, 3), 255, np.uint8)
        wide[:, :256] = image
        centres = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, [[256 + GLASS / 2, 128]]]).astype(np.float32)
        squares = np.concatenate([centres - 8, centres + 8], axis=1)
        samples.append((wide, squares, np.zeros(len(centres), bool), np.full(len(centres), -1, np.int64)))
        truths.append(boxes)
    return samples, truths


def test_the_teacher_boxes_the_dots_it_detects_with_their_nuclei_boxes():
    samples, truths = dot_samples()
    boxed, matched, dots = teacher_boxes(samples, load_model(), mpp=0.5)
    assert dots == sum(len(t) + 1 for t in truths) and matched == sum(s[2].sum() for s in boxed)
    assert matched >= 0.8 * dots
    for (image, boxes, extent, types), (_, squares, _, _), truth in zip(boxed, samples, truths):
        assert image is not None and (types == -1).all()
        assert not extent[-1] and np.array_equal(boxes[-1], squares[-1])  # the dot on glass stays a dot
        got = extent[:-1]
        iou = box_iou(torch.from_numpy(boxes[:-1][got]), torch.from_numpy(truth[got])).diagonal()
        assert (iou >= 0.5).float().mean() >= 0.9  # the teacher's box is the nucleus' own
        assert np.array_equal(boxes[:-1][~got], squares[:-1][~got])  # undetected dots keep their prior square


def test_nuclei_with_boxes_are_left_as_they_are():
    samples, truths = dot_samples(count=1)
    image, _, _, types = samples[0]
    truth = truths[0].astype(np.float32)
    boxed_sample = (image, truth, np.ones(len(truth), bool), types[:-1])
    (same,), matched, dots = teacher_boxes([boxed_sample], load_model(), mpp=0.5)
    assert (matched, dots) == (0, 0) and same is boxed_sample
