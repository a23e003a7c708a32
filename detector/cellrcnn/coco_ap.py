"""COCO-style AP and AR of detections, overall and per size bucket, from pycocotools' ``COCOeval``.

``COCOeval`` is built from in-memory dicts (its prints silenced), with ``maxDets`` raised so that no image's
detections are truncated, and with its area ranges replaced by this library's size buckets (box side
``sqrt(w * h)``: small < ``size_bins[0]`` <= medium < ``size_bins[1]`` <= large; COCO's own 32² / 96² are far too
large for nuclei). Its matching loop is quadratic pure Python, so each image is handed to it as groups of boxes
that cannot match across groups (:func:`_coco_groups`): the same results in time linear in the number of boxes.
"""

import contextlib
import io

import numpy as np

from .boxes import iou_pairs_above

#: the size buckets, smallest first: COCO's own labels, as the results' keys use them (``AP_small``...)
SIZE_LABELS = ('small', 'medium', 'large')

# about this many boxes make one "sub-image" that COCOeval matches on its own (see _coco_groups)
_COCO_GROUP_BOXES = 16
# Below COCO's lowest IoU threshold (0.5) no pair can ever match; the margin absorbs
# rounding differences between this module's IoU and pycocotools' C implementation.
_COCO_LINK_IOU = 0.5 - 1e-6


def _coco_groups(dt_boxes, gt_boxes, group_boxes=_COCO_GROUP_BOXES):
    """Split one image's detections and ground truth into independent groups.

    COCOeval matches a detection only to ground truth with IoU >= 0.5. Boxes are
    linked when their IoU reaches that, and whole connected components are packed
    into groups of about ``group_boxes`` boxes; boxes in different groups never have
    IoU >= 0.5, so evaluating the groups as separate COCO images gives exactly the
    same matches as evaluating the whole image (ground-truth/detection pairs with a
    lower IoU are never matched by COCOeval). The pooled precision/recall curve is
    then unchanged up to the order of detections with exactly equal scores.

    :returns: a list of (detection indices, ground-truth indices) per group.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, m = len(dt_boxes), len(gt_boxes)
    if n + m <= group_boxes:
        return [(np.arange(n), np.arange(m))]
    pi, gi, _ = iou_pairs_above(dt_boxes, gt_boxes, _COCO_LINK_IOU)
    graph = coo_matrix((np.ones(len(pi), dtype=np.int8), (pi, gi + n)), shape=(n + m, n + m))
    n_comp, label = connected_components(graph, directed=False)
    sizes = np.bincount(label, minlength=n_comp)
    group_of_comp = (np.cumsum(sizes) - sizes) // group_boxes
    group = group_of_comp[label]
    n_groups = int(group.max()) + 1
    dt_order = np.argsort(group[:n], kind='stable')
    gt_order = np.argsort(group[n:], kind='stable')
    dt_split = np.searchsorted(group[:n][dt_order], np.arange(1, n_groups))
    gt_split = np.searchsorted(group[n:][gt_order], np.arange(1, n_groups))
    return list(zip(np.split(dt_order, dt_split), np.split(gt_order, gt_split)))


def coco_ap(preds, gts, size_bins, max_dets, group_boxes=_COCO_GROUP_BOXES):
    """COCO AP / AR (overall and per size bucket) from pycocotools' COCOeval.

    ``preds``: ``(boxes, scores)`` per image; ``gts``: ground-truth boxes per image (checked arrays).
    ``max_dets`` caps each image's detections (highest scores kept, as COCOeval does; None: the most any image
    has, at least 1000); ``group_boxes=None`` disables the splitting into independent groups.
    """
    largest = max((len(b) for b, _ in preds), default=0)
    if max_dets is None:
        max_dets = max(1000, largest)
    max_dets = int(max_dets)
    ev = _evaluated(*_coco_annotations(preds, gts, max_dets, group_boxes), size_bins, max_dets)
    return _figures(ev, max_dets)


def _coco_annotations(preds, gts, max_dets, group_boxes):
    """COCO ``images`` and the detection and ground-truth annotation lists: one COCO image per group of
    :func:`_coco_groups`, each image's detections capped at ``max_dets``."""
    images, dt_anns, gt_anns = [], [], []

    def add(anns, boxes, scores, image_id):
        wh = boxes[:, 2:] - boxes[:, :2]
        xywh = np.concatenate([boxes[:, :2], wh], axis=1).tolist()
        area = (wh[:, 0] * wh[:, 1]).tolist()
        sc = scores.tolist() if scores is not None else None
        for j in range(len(boxes)):
            ann = {'id': len(anns) + 1, 'image_id': image_id, 'category_id': 1,
                   'bbox': xywh[j], 'area': area[j], 'iscrowd': 0}
            if sc is not None:
                ann['score'] = sc[j]
            anns.append(ann)

    for (d_boxes, d_scores), g_boxes in zip(preds, gts):
        if len(d_boxes) > max_dets:  # COCOeval's own per-image cap, applied up front
            keep = np.argsort(-d_scores, kind='mergesort')[:max_dets]
            d_boxes, d_scores = d_boxes[keep], d_scores[keep]
        groups = ([(np.arange(len(d_boxes)), np.arange(len(g_boxes)))] if group_boxes is None
                  else _coco_groups(d_boxes, g_boxes, group_boxes))
        for d_idx, g_idx in groups:
            image_id = len(images) + 1
            images.append({'id': image_id})
            add(dt_anns, d_boxes[d_idx], d_scores[d_idx], image_id)
            add(gt_anns, g_boxes[g_idx], None, image_id)
    return images, dt_anns, gt_anns


def _evaluated(images, dt_anns, gt_anns, size_bins, max_dets):
    """pycocotools' COCOeval of the annotations, evaluated and accumulated, with the size buckets as its area
    ranges."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = [{'id': 1, 'name': 'nucleus'}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {'images': images, 'categories': categories,
                           'annotations': gt_anns}
        coco_gt.createIndex()
        # Built directly rather than with loadRes, which fails on an empty list.
        coco_dt = COCO()
        coco_dt.dataset = {'images': images, 'categories': categories,
                           'annotations': dt_anns}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType='bbox')
        # Only the last maxDets is reported (the [1, 100] entries are not meaningful
        # once images are split into groups).
        ev.params.maxDets = sorted({1, 100, max_dets})
        lo, hi = float(size_bins[0]) ** 2, float(size_bins[1]) ** 2
        # COCOeval's area ranges are inclusive at both ends; shave the upper edges so a
        # box exactly on an edge falls in the same (upper) bucket as metrics.size_bucket_index.
        ev.params.areaRng = [[0.0, 1e12], [0.0, float(np.nextafter(lo, 0))],
                             [lo, float(np.nextafter(hi, 0))], [hi, 1e12]]
        ev.params.areaRngLbl = ['all', *SIZE_LABELS]
        ev.evaluate()
        ev.accumulate()
    return ev


def _figures(ev, max_dets):
    """AP, AP50, AP75, AR, AR50 and per size bucket AP and AR of an accumulated COCOeval at ``max_dets``; None
    where COCOeval has no value (-1)."""
    precision = ev.eval['precision']  # [T, R, K, A, M]
    recall = ev.eval['recall']        # [T, K, A, M]
    iou_thrs = ev.params.iouThrs
    m = ev.params.maxDets.index(max_dets)

    def mean_valid(a):
        a = a[a > -1]
        return float(a.mean()) if a.size else None

    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    out = {
        'AP': mean_valid(precision[:, :, :, 0, m]),
        'AP50': mean_valid(precision[t50, :, :, 0, m]),
        'AP75': mean_valid(precision[t75, :, :, 0, m]),
        'AR': mean_valid(recall[:, :, 0, m]),
        'AR50': mean_valid(recall[t50, :, 0, m]),
    }
    for a, label in enumerate(SIZE_LABELS, start=1):
        out[f'AP_{label}'] = mean_valid(precision[:, :, :, a, m])
        out[f'AR_{label}'] = mean_valid(recall[:, :, a, m])
    out['max_dets'] = max_dets
    return out
