"""Detection and cell-type figures against dot truth: centroid matching, precision / recall / F1, per-type figures
and a confusion matrix.

* A detection is represented by its box's centre; a truth nucleus by its point (``LabelledImage.points``).
* Matching is one-to-one within ``radius`` pixels (the caller converts micrometres at the image's scale), as many
  pairs as possible and, among those, the least total distance (``scipy.optimize.linear_sum_assignment``), per
  image. A detection matched to a nucleus is a true positive; others are false positives; unmatched nuclei are
  false negatives.
* Per cell type (K types; a nucleus of unknown type is -1): a matched pair counts for type ``c`` when its truth is
  ``c`` (a true positive if the detection's type is ``c`` too, else a false negative of ``c`` and a false positive of
  the detection's type); an unmatched detection is a false positive of its type, an unmatched nucleus a false
  negative of its own. Pairs whose truth type is unknown count for no type.
* The confusion matrix has K + 1 rows (truth types, then "no nucleus") and K + 1 columns (detected types, then
  "missed"): matched pairs of known truth, false detections in the last row, missed nuclei of known type in the last
  column.
* P / R / F1 follow :mod:`cellrcnn.metrics`' 0/0 convention (1.0 when both sides are empty).
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from .boxes import box_centres
from .metrics import _f1, _ratio


def match_points(detected, truth, radius):
    """One-to-one pairs of points within ``radius``: ``(detection index array, truth index array)``, the most pairs
    and, among the most, the least total distance."""
    detected = np.asarray(detected, np.float64).reshape(-1, 2)
    truth = np.asarray(truth, np.float64).reshape(-1, 2)
    if not len(detected) or not len(truth):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    distance = np.hypot(detected[:, None, 0] - truth[None, :, 0], detected[:, None, 1] - truth[None, :, 1])
    close = distance <= radius
    rows, cols = np.flatnonzero(close.any(axis=1)), np.flatnonzero(close.any(axis=0))
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sub = distance[np.ix_(rows, cols)]
    # a pair beyond the radius costs more than any set of pairs within it: the assignment first maximises the pairs
    far = radius * (min(sub.shape) + 1) + 1
    pick_rows, pick_cols = linear_sum_assignment(np.where(sub <= radius, sub, far))
    within = sub[pick_rows, pick_cols] <= radius
    return rows[pick_rows[within]], cols[pick_cols[within]]


def centroid_metrics(detections, truths, radius, num_types=0):
    """Figures over images. ``detections``: per image a dict with ``boxes`` (N x 4) and, for type figures,
    ``cell_types`` (N); ``truths``: per image ``(points M x 2, cell types M, -1 unknown)``; ``radius`` in pixels;
    ``num_types``: K (0: no type figures).

    :returns: ``n_gt, n_pred, tp, fp, fn, precision, recall, f1`` and, with K > 0, ``types`` (per type: ``tp, fp,
    fn, precision, recall, f1``, in index order) and ``confusion`` ((K + 1) x (K + 1) list of counts).
    """
    tp = n_pred = n_gt = 0
    confusion = np.zeros((num_types + 1, num_types + 1), np.int64)
    for det, (points, types) in zip(detections, truths):
        centres = box_centres(det['boxes'])
        types = np.asarray(types, np.int64)
        d, t = match_points(centres, points, radius)
        tp, n_pred, n_gt = tp + len(d), n_pred + len(centres), n_gt + len(points)
        if num_types:
            detected_types = np.asarray(det['cell_types'], np.int64)
            confusion += type_confusion(types[t], detected_types[d], detected_types[unmatched(len(centres), d)],
                                        types[unmatched(len(points), t)], num_types)
    out = _prf(tp, n_pred - tp, n_gt - tp)
    out.update(n_gt=n_gt, n_pred=n_pred, radius=float(radius))
    if num_types:
        out['types'] = type_figures(confusion)
        out['confusion'] = confusion.tolist()
    return out


def unmatched(count, matched):
    """The indices below ``count`` not in ``matched``."""
    return np.setdiff1d(np.arange(count), matched)


def type_confusion(truth, detected, false_types, missed, num_types):
    """The (K + 1) x (K + 1) confusion matrix of matched pairs (their ``truth`` and ``detected`` types; pairs of
    unknown truth, -1, left out), false detections (their types, ``false_types``) and missed nuclei (their types,
    ``missed``; unknown ones left out)."""
    confusion = np.zeros((num_types + 1, num_types + 1), np.int64)
    known = truth >= 0
    np.add.at(confusion, (truth[known], detected[known]), 1)
    np.add.at(confusion, (num_types, false_types), 1)
    np.add.at(confusion, (missed[missed >= 0], num_types), 1)
    return confusion


def type_figures(confusion):
    """Per type, ``tp, fp, fn, precision, recall, f1`` of a :func:`type_confusion` matrix."""
    confusion = np.asarray(confusion)
    return [_prf(int(confusion[c, c]), int(confusion[:, c].sum() - confusion[c, c]),
                 int(confusion[c, :].sum() - confusion[c, c])) for c in range(len(confusion) - 1)]


def _prf(tp, fp, fn):
    precision = _ratio(tp, tp + fp, tp + fn == 0)
    recall = _ratio(tp, tp + fn, tp + fp == 0)
    return {'tp': int(tp), 'fp': int(fp), 'fn': int(fn), 'precision': precision, 'recall': recall,
            'f1': _f1(precision, recall)}


def format_centroid_report(metrics, type_names=()):
    """A small text table of :func:`centroid_metrics`' figures (with ``type_names``: per type and the confusion)."""
    m = metrics
    lines = [f"centroids within {m['radius']:g} px: truth {m['n_gt']}  detections {m['n_pred']}",
             f"{'':18}{'TP':>7}{'FP':>7}{'FN':>7}{'precision':>11}{'recall':>8}{'F1':>8}",
             _row('all', m)]
    if 'types' in m:
        lines += [_row(name, t) for name, t in zip(type_names, m['types'])]
        columns = [*type_names, 'missed']
        lines += ['', 'confusion (rows: truth, then no nucleus; columns: detected type, then missed)',
                  ' ' * 18 + ''.join(f'{c[:11]:>12}' for c in columns)]
        for name, row in zip([*type_names, 'no nucleus'], m['confusion']):
            lines.append(f'{name[:17]:18}' + ''.join(f'{v:>12}' for v in row))
    return '\n'.join(lines)


def _row(name, m):
    return (f"{name[:17]:18}{m['tp']:>7}{m['fp']:>7}{m['fn']:>7}{m['precision']:>11.3f}{m['recall']:>8.3f}"
            f"{m['f1']:>8.3f}")
