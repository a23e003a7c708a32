"""Scoring detections against a synthetic slide's exact ground-truth boxes, for the slide benchmarks
(``slide_benchmark.py``, ``gpu_benchmark.py``): boxes inside a region, boxes read from cellrcnn's CSV and from a
HistomicsTK annotation, and precision, recall, F1 (and COCO AP) at IoU 0.5 of a whole slide evaluated as independent
windows.
"""

import json
import time

import numpy as np

IOU = 0.5


# ------------------------------------------------------------------------------------------------------------------
# boxes in a region, boxes from files
# ------------------------------------------------------------------------------------------------------------------

def inside_mask(boxes, region):
    """Which boxes have their centre in region (x, y, w, h); all of them when region is None."""
    if region is None or len(boxes) == 0:
        return np.ones(len(boxes), bool)
    x, y, w, h = region
    from cellrcnn.boxes import box_centres

    cx, cy = box_centres(boxes).T
    return (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)


def centres_inside(boxes, region):
    """Boxes whose centre lies in region (x, y, w, h); all of them when region is None."""
    return boxes[inside_mask(boxes, region)]


def read_csv_boxes(path):
    """Boxes and scores from a cellrcnn CSV (columns x1, y1, x2, y2, score)."""
    import csv

    with open(path, newline='') as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = [header.index(c) for c in ('x1', 'y1', 'x2', 'y2', 'score')]
        rows = [[float(r[c]) for c in cols] for r in reader]
    a = np.asarray(rows, np.float64).reshape(-1, 5)
    return a[:, :4], a[:, 4]


def read_htk_boxes(path):
    """Boxes of a HistomicsTK annotation's rectangle elements (centre, width, height; rotation 0)."""
    with open(path) as f:
        doc = json.load(f)
    docs = doc if isinstance(doc, list) else [doc]
    rects = [e for d in docs for e in d.get('elements', []) if e.get('type') == 'rectangle']
    if not rects:
        return np.zeros((0, 4))
    c = np.array([e['center'][:2] for e in rects], np.float64)
    wh = np.array([[e['width'], e['height']] for e in rects], np.float64)
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


# ------------------------------------------------------------------------------------------------------------------
# evaluation of a whole slide as independent windows
# ------------------------------------------------------------------------------------------------------------------

def linked_pairs(pred, gt, threshold, cell=64.0, chunk=200_000):
    """(i, j) of every prediction/ground-truth pair with IoU >= threshold (and possibly a few more), in linear time:
    boxes with both sides <= cell are found through a grid of their top-left corners (overlapping boxes lie in
    neighbouring cells), larger ones are compared with everything."""
    from cellrcnn.boxes import box_iou, iou
    from cellrcnn.merge import concat_ranges

    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if len(pred) == 0 or len(gt) == 0:
        return out_i[0], out_j[0]
    big_p = np.maximum(pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]) > cell
    big_g = np.maximum(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]) > cell
    sp, sg = np.flatnonzero(~big_p), np.flatnonzero(~big_g)
    if len(sp) and len(sg):
        origin = np.minimum(pred[sp, :2].min(0), gt[sg, :2].min(0)) - cell
        gcx = np.floor((gt[sg, 0] - origin[0]) / cell).astype(np.int64)
        gcy = np.floor((gt[sg, 1] - origin[1]) / cell).astype(np.int64)
        pcx_all = np.floor((pred[sp, 0] - origin[0]) / cell).astype(np.int64)
        pcy_all = np.floor((pred[sp, 1] - origin[1]) / cell).astype(np.int64)
        width = int(max(gcx.max(), pcx_all.max())) + 3
        key = gcy * width + gcx
        order = np.argsort(key, kind='stable')
        skey = key[order]
        for start in range(0, len(sp), chunk):
            pcx, pcy = pcx_all[start:start + chunk], pcy_all[start:start + chunk]
            q = np.arange(start, start + len(pcx))
            for dy in (-1, 0, 1):
                row = (pcy + dy) * width + pcx
                lo = np.searchsorted(skey, row - 1, 'left')
                hi = np.searchsorted(skey, row + 1, 'right')
                counts = hi - lo
                pi = sp[np.repeat(q, counts)]
                gj = sg[order[concat_ranges(lo, counts)]]
                hit = iou(pred[pi], gt[gj]) >= threshold
                out_i.append(pi[hit])
                out_j.append(gj[hit])
    for rows, against, flip in ((np.flatnonzero(big_p), gt, False), (np.flatnonzero(big_g), pred, True)):
        for start in range(0, len(rows), 256):
            r = rows[start:start + 256]
            overlap = box_iou((gt if flip else pred)[r], against)
            a, b = np.nonzero(overlap >= threshold)
            out_i.append(b if flip else r[a])
            out_j.append(r[a] if flip else b)
    return np.concatenate(out_i), np.concatenate(out_j)


def window_images(pred, scores, gt, window=1024):
    """Split a slide's predictions and ground truth into window-sized images that no possible match crosses."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, m = len(pred), len(gt)
    if n + m == 0:
        return [], []
    i, j = linked_pairs(pred, gt, IOU - 1e-6)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j + n)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    boxes = np.concatenate([pred, gt]) if n and m else (pred if n else gt)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell = np.floor(centre / window).astype(np.int64)
    cell -= cell.min(0)
    node_window = cell[:, 1] * (int(cell[:, 0].max()) + 1) + cell[:, 0]
    _, first = np.unique(label, return_index=True)
    comp_window = np.empty(label.max() + 1, np.int64)
    comp_window[label[first]] = node_window[first]
    win = comp_window[label]
    ids, inverse = np.unique(win, return_inverse=True)
    order = np.argsort(inverse, kind='stable')
    splits = np.searchsorted(inverse[order], np.arange(1, len(ids)))
    preds, gts = [], []
    for idx in np.split(order, splits):
        p, g = idx[idx < n], idx[idx >= n] - n
        preds.append({'boxes': pred[p], 'scores': scores[p]})
        gts.append(gt[g])
    return preds, gts


def score_detections(pred, scores, gt, coco):
    """P/R/F1 at IoU 0.5 of all given detections, best F1 over score thresholds and (with coco) COCO AP."""
    from cellrcnn import metrics

    started = time.perf_counter()
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    preds, gts = window_images(pred, scores, gt)
    if coco:
        r = metrics.evaluate(preds, gts, threshold=0.0, iou_threshold=IOU)
        out = {k: r[k] for k in ('n_gt', 'n_pred', 'tp', 'fp', 'fn', 'precision', 'recall', 'f1', 'best_f1',
                                 'best_f1_threshold', 'AP', 'AP50')}
    else:
        tp = fp = 0
        for p, g in zip(preds, gts):
            res = metrics.match_detections(p['boxes'], p['scores'], g, IOU)
            tp, fp = tp + res.tp, fp + res.fp
        n_gt = len(gt)
        precision = tp / (tp + fp) if tp + fp else float(n_gt == 0)
        recall = tp / n_gt if n_gt else float(tp + fp == 0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        thr, best, _, _ = metrics.best_f1_threshold(preds, gts, IOU) if preds else (1.0, 1.0, 1.0, 1.0)
        out = {'n_gt': n_gt, 'n_pred': len(pred), 'tp': tp, 'fp': fp, 'fn': n_gt - tp, 'precision': precision,
               'recall': recall, 'f1': f1, 'best_f1': best, 'best_f1_threshold': thr, 'AP': None, 'AP50': None}
    out['windows'] = len(preds)
    out['seconds'] = time.perf_counter() - started
    return out


def score_htk(boxes, gt):
    """F1 etc. of HistomicsTK's rectangles (no scores) as written, and widened by one pixel: they span the traced
    boundary's pixel indices (x2 = last column), the ground truth pixel edges (x2 = last column + 1)."""
    ones = np.ones(len(boxes))
    return (score_detections(boxes, ones, gt, coco=False),
            score_detections(boxes + [0, 0, 1, 1], ones, gt, coco=False))
