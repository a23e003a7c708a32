"""Boxes ``x1, y1, x2, y2`` (pixel-edge coordinates): checking what callers pass in, their overlap (IoU), and the
suppression of boxes centred on another's centre.

The streaming merge keeps its own float32 IoU (``merge._pair_iou``): it must match torchvision's NMS bit for bit.
This module does not import torch.
"""

import numpy as np
from scipy.spatial import cKDTree

from .errors import CellRCNNError

# Pair IoUs are computed in blocks of at most this many elements (memory bound).
_IOU_BLOCK = 4_000_000


def to_numpy(x):
    """A numpy array of a torch tensor (without importing torch), an array or nested lists; None stays None."""
    if x is None:
        return None
    if hasattr(x, 'detach'):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_boxes(boxes, what='boxes'):
    """Boxes as a float64 (N, 4) array; a one-line CellRCNNError naming ``what`` when they are not boxes."""
    arr = to_numpy(boxes)
    if arr is None:
        return np.zeros((0, 4), dtype=np.float64)
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise CellRCNNError(f'{what} must be numeric x1,y1,x2,y2 boxes') from None
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise CellRCNNError(f'{what} must have shape (N, 4) as x1,y1,x2,y2; got shape {arr.shape}')
    if not np.isfinite(arr).all():
        raise CellRCNNError(f'{what} contain NaN or infinite coordinates')
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise CellRCNNError(f'{what} must be x1,y1,x2,y2 with x2 >= x1 and y2 >= y1')
    return arr


def as_scores(scores, n, what='scores'):
    """Scores as a float64 (n,) array, one per box."""
    arr = to_numpy(scores)
    if arr is None:
        if n:
            raise CellRCNNError(f'{what} are missing for {n} boxes')
        return np.zeros((0,), dtype=np.float64)
    try:
        arr = arr.astype(np.float64, copy=False).reshape(-1)
    except (TypeError, ValueError):
        raise CellRCNNError(f'{what} must be numbers, one per box') from None
    if arr.shape[0] != n:
        raise CellRCNNError(f'got {arr.shape[0]} {what} for {n} boxes')
    if not np.isfinite(arr).all():
        raise CellRCNNError(f'{what} contain NaN or infinite values')
    return arr


def as_detections(boxes, scores):
    """Checked float64 (N, 4) boxes and (N,) scores."""
    b = as_boxes(boxes)
    return b, as_scores(scores, len(b))


def box_centres(boxes):
    """float64 N x 2 centres ``x, y`` of N x 4 boxes."""
    b = as_boxes(boxes).astype(np.float64)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


def iou(a, b):
    """IoU of boxes ``a[..., 4]`` and ``b[..., 4]``, broadcast against each other (``a[:, None]`` against ``b[None]``
    gives the N x M matrix; equal shapes give one IoU per pair); zero-area pairs give 0."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
             - inter)
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(union > 0, inter / union, 0.0)


def box_iou(boxes_a, boxes_b):
    """Dense IoU matrix (N x M) of two sets of boxes."""
    a, b = as_boxes(boxes_a), as_boxes(boxes_b)
    return iou(a[:, None], b[None])


def iou_pairs_above(a, b, threshold):
    """Index pairs (i, j) and IoUs of boxes a[i], b[j] with IoU >= threshold.

    The IoU matrix is computed in row blocks so memory stays bounded.
    """
    rows_per_block = max(1, _IOU_BLOCK // max(1, len(b)))
    pi, gi, iv = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for start in range(0, len(a), rows_per_block):
        block = box_iou(a[start:start + rows_per_block], b)
        r, c = np.nonzero(block >= threshold)
        pi.append(r + start)
        gi.append(c)
        iv.append(block[r, c])
    return np.concatenate(pi), np.concatenate(gi), np.concatenate(iv)


def suppress_close_centres(boxes, scores, distance):
    """Which boxes a greedy suppression by centre distance keeps (bool N): in order of score (equal scores: the
    earlier box first), a box whose centre lies within ``distance`` pixels of a kept box's centre is dropped;
    ``distance`` <= 0 keeps every box. A box's fate depends on higher-scoring boxes only, so suppressing before or
    after a score threshold keeps the same boxes above it."""
    boxes, scores = as_detections(boxes, scores)
    keep = np.ones(len(boxes), bool)
    if distance <= 0 or len(boxes) < 2:
        return keep
    centres = np.column_stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]]).astype(np.float64) / 2
    pairs = cKDTree(centres).query_pairs(float(distance), output_type='ndarray')
    if not len(pairs):
        return keep
    rank = np.empty(len(boxes), np.int64)
    rank[np.argsort(-scores, kind='stable')] = np.arange(len(boxes))
    first = rank[pairs[:, 0]] < rank[pairs[:, 1]]
    higher = np.where(first, pairs[:, 0], pairs[:, 1])
    lower = np.where(first, pairs[:, 1], pairs[:, 0])
    order = np.argsort(rank[higher], kind='stable')
    higher, lower = higher[order], lower[order]
    starts = np.flatnonzero(np.r_[True, higher[1:] != higher[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(higher)]):
        if keep[higher[start]]:  # every box ranked above it is decided by now
            keep[lower[start:end]] = False
    return keep
