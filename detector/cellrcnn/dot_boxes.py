"""Boxes for nuclei labelled by dots only, from a teacher model (``cellrcnn train --dot-boxes-from MODEL``).

A dot says where a nucleus is, not how big it is (``training_data``: a dot-only nucleus teaches no box regression,
and only a prior square matches anchors and proposals to it). A teacher, a model that learnt extents from boxes and
masks, proposes them: each training image is run through it once, at its operating point, before training, and
its detections are matched to the image's dot-only nuclei one to one within ``radius_um`` (``point_metrics``). A
matched dot takes the detection's box and is trained as a boxed nucleus (matched by IoU, regressed); an unmatched
dot stays dot-only. Nuclei that have boxes are left as they are.
"""

import numpy as np

from .boxes import box_centres
from .inference import Detector
from .point_metrics import match_points


def teacher_boxes(samples, teacher, mpp, radius_um=3.0, device='cpu', batch_size=4):
    """``(samples, matched, dots)``: four-part ``samples`` (``training_data.real_samples``, at ``mpp`` um/px) with
    each dot-only nucleus that ``teacher`` (a model) detects given that detection's box; the number of dots so
    boxed, and of dot-only nuclei in all."""
    if all(extent.all() for _, _, extent, _ in samples):
        return samples, 0, 0
    outputs = Detector(teacher, device, batch_size).detect_tiles([image for image, *_ in samples])
    boxed, matched, dots_in_all = [], 0, 0
    for (image, boxes, extent, types), (detected, _) in zip(samples, outputs):
        dots = np.flatnonzero(~extent)
        # a dot's prior square is centred on it
        d, t = match_points(box_centres(detected), box_centres(boxes[dots]), radius_um / mpp)
        boxes, extent = boxes.copy(), extent.copy()
        boxes[dots[t]] = detected[d]
        extent[dots[t]] = True
        boxed.append((image, boxes, extent, types))
        matched, dots_in_all = matched + len(t), dots_in_all + len(dots)
    return boxed, matched, dots_in_all
