"""Detection metrics for nucleus detection: greedy matching, P/R/F1 and COCO-style AP.

Conventions used throughout this module:

* Boxes are ``x1, y1, x2, y2`` in pixels (N x 4, numpy arrays or torch tensors).
  Areas are ``(x2 - x1) * (y2 - y1)`` with no ``+1``, the same as pycocotools.
* A prediction is kept at a score threshold ``t`` when ``score >= t``.
* A prediction matches a ground-truth box when their IoU is ``>= iou_threshold``
  (pycocotools uses the same inclusive comparison).
* Matching is greedy in descending score order (ties keep input order): each
  prediction takes the unmatched ground-truth box with the highest IoU; a
  ground-truth box is matched at most once, so duplicate detections are false
  positives.
* Empty cases: ``precision = TP / (TP + FP)`` and ``recall = TP / (TP + FN)``; a
  0/0 ratio is 1.0 when the other side is also empty (no predictions *and* no
  ground truth: nothing to find and nothing wrongly found) and 0.0 otherwise.
  F1 follows from these (so it is 1.0 for an empty image with no predictions).
  Overall COCO AP with no ground truth at all is 1.0 without predictions and 0.0
  with any. Per-size-bucket values are ``None`` when the bucket holds no ground
  truth (undefined, shown as ``-`` by :func:`format_report`); never NaN.
* Object size is the box side ``sqrt(w * h)`` in pixels (the side of the square
  of equal area), bucketed by ``size_bins``: with the default ``(12, 24)``,
  small < 12 px <= medium < 24 px <= large. COCO's own area ranges (32² / 96²)
  are far too large for nuclei, so they are replaced in ``COCOeval.params``.

COCO AP and AR come from :mod:`cellrcnn.coco_ap`.
"""

import math
from dataclasses import dataclass

import numpy as np

from .boxes import as_boxes, as_scores, iou_pairs_above
from .coco_ap import SIZE_LABELS, coco_ap
from .errors import CellRCNNError

#: default bucket edges (box side in pixels): small < 12 <= medium < 24 <= large
DEFAULT_SIZE_BINS = (12.0, 24.0)


# --------------------------------------------------------------------------- input helpers

def _pred_arrays(pred, index):
    """(boxes, scores) from one prediction entry: a dict with 'boxes' and 'scores'."""
    if not isinstance(pred, dict) or 'boxes' not in pred:
        raise CellRCNNError(
            f'prediction {index} must be a dict with "boxes" (N x 4) and "scores" (N)')
    boxes = as_boxes(pred['boxes'], f'prediction {index} boxes')
    scores = as_scores(pred.get('scores'), len(boxes), f'prediction {index} scores')
    return boxes, scores


def _gt_array(gt, index):
    """Boxes from one ground-truth entry: an M x 4 array or a dict with 'boxes'."""
    if isinstance(gt, dict):
        if 'boxes' not in gt:
            raise CellRCNNError(f'ground truth {index} is a dict without "boxes"')
        gt = gt['boxes']
    return as_boxes(gt, f'ground truth {index} boxes')


def _ratio(num, den, other_side_empty):
    """num / den with the 0/0 convention documented in the module docstring."""
    if den > 0:
        return num / den
    return 1.0 if other_side_empty else 0.0


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def box_sides(boxes):
    """Box side ``sqrt(w * h)`` in pixels, the size used for the size buckets."""
    b = as_boxes(boxes)
    return np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def size_bucket_index(boxes, size_bins=DEFAULT_SIZE_BINS):
    """Bucket index per box: 0 small (< bins[0]), 1 medium, 2 large (>= bins[1])."""
    return np.searchsorted(np.asarray(size_bins, dtype=np.float64), box_sides(boxes), side='right')


# --------------------------------------------------------------------------- matching

@dataclass
class MatchResult:
    """Outcome of :func:`match_detections` for one image.

    ``pred_gt[i]`` is the index of the ground-truth box matched by prediction ``i``
    (input order) or -1; ``gt_pred[j]`` the prediction matched to ground truth ``j``
    or -1; ``pred_iou[i]`` the IoU of that match (0 when unmatched).
    """

    tp: int
    fp: int
    fn: int
    pred_gt: np.ndarray
    gt_pred: np.ndarray
    pred_iou: np.ndarray

    @property
    def pred_matched(self):
        """Boolean mask over predictions (input order): True for true positives."""
        return self.pred_gt >= 0

    @property
    def gt_matched(self):
        """Boolean mask over ground-truth boxes: True when detected."""
        return self.gt_pred >= 0


def match_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold=0.5):
    """Greedily match predictions to ground truth in descending score order.

    Each prediction (highest score first; ties keep input order) is matched to the
    still-unmatched ground-truth box with the highest IoU, if that IoU is
    ``>= iou_threshold``; otherwise it is a false positive. Unmatched ground-truth
    boxes are false negatives. No score threshold is applied here: filter first.

    :returns: a :class:`MatchResult` (``tp``, ``fp``, ``fn`` counts and the
        per-prediction / per-ground-truth match indices).
    """
    preds = as_boxes(pred_boxes, 'predicted boxes')
    scores = as_scores(pred_scores, len(preds), 'predicted scores')
    gts = as_boxes(gt_boxes, 'ground-truth boxes')
    if not 0 < iou_threshold <= 1:
        raise CellRCNNError(f'iou_threshold must be in (0, 1]; got {iou_threshold}')
    n, m = len(preds), len(gts)
    pred_gt = np.full(n, -1, dtype=np.int64)
    gt_pred = np.full(m, -1, dtype=np.int64)
    pred_iou = np.zeros(n, dtype=np.float64)
    if n and m:
        order = np.argsort(-scores, kind='stable')
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        pi, gi, iv = iou_pairs_above(preds, gts, iou_threshold)
        # Visit pairs by prediction rank, then by decreasing IoU (then GT index):
        # the first pair whose GT is still free is each prediction's greedy match.
        visit = np.lexsort((gi, -iv, rank[pi]))
        for p, g, v in zip(pi[visit].tolist(), gi[visit].tolist(), iv[visit].tolist()):
            if pred_gt[p] < 0 and gt_pred[g] < 0:
                pred_gt[p] = g
                gt_pred[g] = p
                pred_iou[p] = v
    tp = int((pred_gt >= 0).sum())
    return MatchResult(tp=tp, fp=n - tp, fn=m - tp, pred_gt=pred_gt, gt_pred=gt_pred,
                       pred_iou=pred_iou)


def _load_pairs(predictions, ground_truths):
    predictions = list(predictions)
    ground_truths = list(ground_truths)
    if len(predictions) != len(ground_truths):
        raise CellRCNNError(
            f'got {len(predictions)} predictions but {len(ground_truths)} ground truths; '
            'there must be one of each per image')
    preds = [_pred_arrays(p, i) for i, p in enumerate(predictions)]
    gts = [_gt_array(g, i) for i, g in enumerate(ground_truths)]
    return preds, gts


def _pooled_matches(preds, gts, iou_threshold):
    """Match every image with no score threshold; pool (score, is_tp) over images.

    Greedy matching visits predictions by score, so the matching after a score
    threshold is exactly the prefix of this one: one pass serves every threshold.
    """
    matches = [match_detections(b, s, g, iou_threshold) for (b, s), g in zip(preds, gts)]
    scores = np.concatenate([s for _, s in preds]) if preds else np.zeros(0)
    is_tp = (np.concatenate([m.pred_matched for m in matches]) if matches
             else np.zeros(0, dtype=bool))
    return matches, scores, is_tp


def _best_f1(scores, is_tp, n_gt):
    """(threshold, f1, precision, recall) maximising F1 over all score cut-offs."""
    n_pred = len(scores)
    # Keeping no predictions at all: threshold above every score.
    best_thr = float(np.nextafter(scores.max(), np.inf)) if n_pred else 1.0
    best_p = _ratio(0, 0, n_gt == 0)
    best_r = _ratio(0, n_gt, True)
    best = (best_thr, _f1(best_p, best_r), best_p, best_r)
    if not n_pred:
        return best
    order = np.argsort(-scores, kind='stable')
    s = scores[order]
    tp = np.cumsum(is_tp[order])
    k = np.arange(1, n_pred + 1)
    # Only cut between distinct scores (``score >= t`` keeps all ties together).
    last_of_value = np.r_[s[1:] != s[:-1], True]
    tp, k, s = tp[last_of_value], k[last_of_value], s[last_of_value]
    precision = tp / k
    recall = tp / n_gt if n_gt else np.zeros_like(precision)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))  # first maximum = highest threshold among ties
    if f1[i] > best[1]:
        best = (float(s[i]), float(f1[i]), float(precision[i]), float(recall[i]))
    return best


def best_f1_threshold(predictions, ground_truths, iou_threshold=0.5):
    """Score threshold maximising F1 over a set of images.

    :param predictions: list of dicts with ``boxes`` (N x 4) and ``scores`` (N).
    :param ground_truths: list (same length) of M x 4 boxes or dicts with ``boxes``.
    :returns: ``(threshold, f1, precision, recall)``; keep predictions with
        ``score >= threshold``. Among equal F1 values the highest threshold wins.
        When keeping nothing is best (e.g. no ground truth), the threshold is just
        above the highest score.
    """
    preds, gts = _load_pairs(predictions, ground_truths)
    _, scores, is_tp = _pooled_matches(preds, gts, iou_threshold)
    return _best_f1(scores, is_tp, int(sum(len(g) for g in gts)))


# --------------------------------------------------------------------------- evaluate

def evaluate(predictions, ground_truths, threshold=0.5, iou_threshold=0.5,
             size_bins=DEFAULT_SIZE_BINS, max_dets=None):
    """Evaluate detections over a list of images (e.g. tiles).

    :param predictions: list of dicts with ``boxes`` (N x 4, x1,y1,x2,y2) and
        ``scores`` (N), numpy arrays or torch tensors; other keys are ignored.
    :param ground_truths: list (same length) of M x 4 boxes or dicts with ``boxes``.
    :param threshold: operating point for precision / recall / F1 (keep
        ``score >= threshold``); ``None`` uses the best-F1 threshold of this
        very set (optimistic: it is tuned on the data it is reported on).
    :param iou_threshold: IoU for a match in precision / recall / F1.
    :param size_bins: the two box-side edges (px) between small, medium and large.
    :param max_dets: COCOeval's per-image detection cap; ``None`` (default) uses
        ``max(1000, most detections in any image)`` so nothing is truncated.
    :returns: a flat dict:

        - ``n_images, n_gt, n_pred`` (all predictions), ``n_pred_kept`` (at the
          threshold), ``threshold, iou_threshold, size_bins``;
        - ``tp, fp, fn, precision, recall, f1`` at the operating point;
        - ``best_f1, best_f1_threshold`` over all thresholds;
        - ``AP`` (AP@[.5:.95]), ``AP50, AP75``, ``AR`` (recall averaged over IoU
          .5:.95) and ``AR50`` (recall at IoU .5): COCO, all predictions, no score
          threshold; ``AP_<size>, AR_<size>`` for size in small/medium/large;
        - ``n_gt_<size>, recall_<size>`` at the operating point (greedy matching,
          bucketed by ground-truth size);
        - ``max_dets``: the COCOeval cap used.
    """
    preds, gts = _load_pairs(predictions, ground_truths)
    if len(size_bins) != 2 or not 0 < size_bins[0] < size_bins[1]:
        raise CellRCNNError(f'size_bins must be two increasing positive sides; got {size_bins}')
    n_gt = int(sum(len(g) for g in gts))
    n_pred = int(sum(len(b) for b, _ in preds))
    matches, scores, is_tp = _pooled_matches(preds, gts, iou_threshold)
    best_thr, best_f1, _, _ = _best_f1(scores, is_tp, n_gt)
    if threshold is None:
        threshold = best_thr
    threshold = float(threshold)

    tp, fp, bucket_gt, bucket_tp = _operating_point(preds, gts, matches, threshold, size_bins)
    fn = n_gt - tp
    n_kept = tp + fp
    precision = _ratio(tp, tp + fp, n_gt == 0)
    recall = _ratio(tp, tp + fn, n_kept == 0)

    out = {
        'n_images': len(gts), 'n_gt': n_gt, 'n_pred': n_pred, 'n_pred_kept': n_kept,
        'threshold': threshold, 'iou_threshold': float(iou_threshold),
        'size_bins': tuple(float(b) for b in size_bins),
        'tp': tp, 'fp': fp, 'fn': fn,
        'precision': precision, 'recall': recall, 'f1': _f1(precision, recall),
        'best_f1': best_f1, 'best_f1_threshold': best_thr,
    }
    out.update(_no_ground_truth_ap(preds, n_pred, max_dets) if n_gt == 0 else coco_ap(preds, gts, size_bins, max_dets))
    for i, label in enumerate(SIZE_LABELS):
        out[f'n_gt_{label}'] = int(bucket_gt[i])
        out[f'recall_{label}'] = float(bucket_tp[i] / bucket_gt[i]) if bucket_gt[i] else None
    return out


def _operating_point(preds, gts, matches, threshold, size_bins):
    """TP and FP over all images at ``threshold``, and ground truth and TP counts per size bucket: prefixes of
    the unthresholded greedy matching (see _pooled_matches)."""
    tp = fp = 0
    bucket_gt = np.zeros(3, dtype=np.int64)
    bucket_tp = np.zeros(3, dtype=np.int64)
    for (_, s), g, match in zip(preds, gts, matches):
        kept = s >= threshold
        tp_mask = kept & match.pred_matched
        tp += int(tp_mask.sum())
        fp += int((kept & ~match.pred_matched).sum())
        if len(g):
            found = np.zeros(len(g), dtype=bool)
            found[match.pred_gt[tp_mask]] = True
            bucket = size_bucket_index(g, size_bins)
            bucket_gt += np.bincount(bucket, minlength=3)
            bucket_tp += np.bincount(bucket[found], minlength=3)
    return tp, fp, bucket_gt, bucket_tp


def _no_ground_truth_ap(preds, n_pred, max_dets):
    """The COCO figures with no ground truth at all, where COCOeval reports -1 (undefined): the P/R convention, 1.0
    without predictions and 0.0 with any; None per size bucket."""
    empty = 1.0 if n_pred == 0 else 0.0
    largest = max((len(b) for b, _ in preds), default=0)
    coco = {'AP': empty, 'AP50': empty, 'AP75': empty, 'AR': empty, 'AR50': empty,
            'max_dets': int(max_dets) if max_dets else max(1000, largest)}
    for label in SIZE_LABELS:
        coco[f'AP_{label}'] = coco[f'AR_{label}'] = None
    return coco


# --------------------------------------------------------------------------- report

def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f'{value:.{digits}f}'


def format_report(metrics):
    """A small aligned text table of the dict returned by :func:`evaluate`."""
    m = metrics
    bins = m.get('size_bins', DEFAULT_SIZE_BINS)
    lines = [
        f"images {m['n_images']}  ground truth {m['n_gt']}  predictions {m['n_pred']}  "
        f"(IoU >= {m['iou_threshold']:g}, score >= {m['threshold']:.3f})",
        '',
        f"{'':10}{'TP':>8}{'FP':>8}{'FN':>8}{'precision':>11}{'recall':>8}{'F1':>8}",
        f"{'all':10}{m['tp']:>8}{m['fp']:>8}{m['fn']:>8}{_fmt(m['precision']):>11}"
        f"{_fmt(m['recall']):>8}{_fmt(m['f1']):>8}",
        f"best F1 {_fmt(m['best_f1'])} at score >= {m['best_f1_threshold']:.3f}",
        '',
        f"{'COCO':10}{'AP':>8}{'AP50':>8}{'AP75':>8}{'AR':>8}{'AR50':>8}"
        f"   (maxDets {m['max_dets']})",
        f"{'all':10}{_fmt(m['AP']):>8}{_fmt(m['AP50']):>8}{_fmt(m['AP75']):>8}"
        f"{_fmt(m['AR']):>8}{_fmt(m['AR50']):>8}",
        '',
        f"{'size':10}{'side px':>10}{'GT':>8}{'recall':>8}{'AP':>8}{'AR':>8}",
    ]
    ranges = (f'< {bins[0]:g}', f'{bins[0]:g}-{bins[1]:g}', f'>= {bins[1]:g}')
    for label, rng in zip(SIZE_LABELS, ranges):
        lines.append(
            f"{label:10}{rng:>10}{m[f'n_gt_{label}']:>8}{_fmt(m[f'recall_{label}']):>8}"
            f"{_fmt(m[f'AP_{label}']):>8}{_fmt(m[f'AR_{label}']):>8}")
    return '\n'.join(lines)
