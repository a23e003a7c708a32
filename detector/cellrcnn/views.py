"""Views: a tile seen flipped and turned, and the detections of its views fused into one set (test-time augmentation).

A model's detections on a tile flipped left to right are not quite its detections on the tile, flipped: scores,
extents and cell types all move a little. Seen in several views, a nucleus is found by most of them, a false box by
few, and the box of each view errs its own way. :func:`view_transforms` gives the views (1, 2, 4 or 8: the identity,
the mirror images, the half turn, and with 8 every quarter turn and mirror of the square too), :func:`to_view` and
:func:`boxes_from_view` carry a tile into a view and boxes back, and :func:`fuse_views` makes one nucleus of the boxes
the views found of it (weighted box fusion: Solovyev et al., 2021, with each view's best box only, and the cell-type
logits fused alike, which the ``ensemble-boxes`` package does not carry).

A nucleus found in every view keeps its mean score; one found in some views only is scored down in proportion, so
the model's calibrated threshold still applies (``docs/real-tissue.md`` has the held-out figures). The eight views
are a group: a tile flipped or turned has the same eight views, so its fused detections are those of the tile,
flipped or turned (``tests/test_views.py``).
"""

import numpy as np
from scipy.spatial import cKDTree

from .boxes import iou as pair_iou
from .settings import check_views

#: every view, ``(mirror left-right, mirror top-bottom, transpose)``, applied transpose first; the first N are the views
#: of N: the identity, the two mirrors and the half turn, then the transposes (quarter turns and diagonal mirrors)
_TRANSFORMS = ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
               (False, False, True), (True, False, True), (False, True, True), (True, True, True))


def view_transforms(views):
    """The transforms of ``views`` views (one of ``settings.VIEWS``); a one-line CellRCNNError for another number."""
    check_views(views)
    return _TRANSFORMS[:views]


def to_view(tile, transform):
    """The tile (H x W x C) as the view ``transform`` sees it (a contiguous copy)."""
    mirror_x, mirror_y, transpose = transform
    if transpose:
        tile = tile.transpose(1, 0, 2)
    if mirror_x:
        tile = tile[:, ::-1]
    if mirror_y:
        tile = tile[::-1]
    return np.ascontiguousarray(tile)


def boxes_from_view(boxes, transform, shape):
    """Boxes (N x 4, ``x1, y1, x2, y2``) found in the view ``transform`` of a tile of ``shape`` (H, W, ...), in the
    tile's own pixels."""
    mirror_x, mirror_y, transpose = transform
    height, width = (shape[1], shape[0]) if transpose else shape[:2]
    boxes = np.array(boxes, np.float32, copy=True).reshape(-1, 4)
    if mirror_x:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if mirror_y:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    if transpose:
        boxes = boxes[:, [1, 0, 3, 2]]
    return boxes


def _overlapping_pairs(boxes, iou):
    """Pairs ``(i, j)``, i < j, of boxes whose IoU is above ``iou`` (> 0): only boxes whose centres lie within the
    longest diagonal can overlap, so the pairs come from a k-d tree, not from every pair."""
    if len(boxes) < 2:
        return np.zeros((0, 2), np.int64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    reach = float(np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max())
    pairs = cKDTree(centres).query_pairs(reach, output_type='ndarray')
    if not len(pairs):
        return pairs.reshape(0, 2).astype(np.int64)
    pairs = np.sort(pairs[pair_iou(boxes[pairs[:, 0]], boxes[pairs[:, 1]]) > iou], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def fuse_views(detections, iou):
    """One set of detections from those of the views of a tile (``detections``: per view a dict of numpy arrays,
    ``boxes`` N x 4 in the tile's pixels, ``scores`` N and, for a model with cell types, ``cell_type_logits`` N x K).

    In order of score, the best box not yet taken and every box not yet taken that overlaps it by an IoU above ``iou``
    (the model's NMS threshold: boxes the model itself would call one nucleus) are one nucleus. Of its boxes, the best
    of each view count: its box and logits are their score-weighted mean, its score the sum of their scores over the
    number of views (a view that did not find it counts 0). The result is in order of score, the higher first."""
    views = len(detections)
    keys = [key for key in ('boxes', 'scores', 'cell_type_logits') if key in detections[0]]
    joined = {key: np.concatenate([np.asarray(d[key], np.float32) for d in detections]) for key in keys}
    joined['boxes'] = joined['boxes'].reshape(-1, 4)
    view = np.concatenate([np.full(len(d['scores']), i) for i, d in enumerate(detections)])
    order = np.argsort(-joined['scores'], kind='stable')
    joined = {key: value[order] for key, value in joined.items()}
    view = view[order]
    boxes, scores = joined['boxes'], joined['scores']
    pairs = _overlapping_pairs(boxes, iou)
    starts = np.searchsorted(pairs[:, 0], np.arange(len(boxes) + 1)) if len(pairs) else np.zeros(len(boxes) + 1, int)
    taken = np.zeros(len(boxes), bool)
    fused = {key: [] for key in keys}
    for i in range(len(boxes)):
        if taken[i]:
            continue
        members = np.concatenate([[i], pairs[starts[i]:starts[i + 1], 1]])
        members = members[~taken[members]]
        taken[members] = True
        members = np.sort(members)  # in order of score: the first of each view is its best
        best = members[np.unique(view[members], return_index=True)[1]]
        weights = scores[best]
        total = weights.sum()
        fused['scores'].append(total / views)
        fused['boxes'].append(weights @ boxes[best] / total)
        if 'cell_type_logits' in fused:
            fused['cell_type_logits'].append(weights @ joined['cell_type_logits'][best] / total)
    shapes = {'boxes': (-1, 4), 'scores': (-1,), 'cell_type_logits': (-1, joined.get('cell_type_logits',
                                                                                        boxes).shape[1])}
    out = {key: np.array(fused[key], np.float32).reshape(shapes[key]) for key in keys}
    order = np.argsort(-out['scores'], kind='stable')
    return {key: value[order] for key, value in out.items()}
