"""Detection metrics: hand-computed cases for matching, P/R/F1, COCO AP and size buckets."""

import math

import numpy as np
import pytest
import torch

from cellrcnn import metrics as M
from cellrcnn.boxes import box_iou
from cellrcnn.coco_ap import coco_ap
from cellrcnn.errors import CellRCNNError
from support import report_figures


def pred(boxes, scores):
    return {'boxes': np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            'scores': np.asarray(scores, dtype=np.float64)}


def no_nan(metrics):
    for key, value in metrics.items():
        if isinstance(value, float):
            assert not math.isnan(value), key


# Three ground-truth boxes (sides 10, 10, 10).
GT3 = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=float)


def test_box_iou_known_values():
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 4], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[50 / 150, 0.4, 0.0]])
    # zero-area boxes give 0, not NaN
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0


def test_two_correct_one_low_iou_prediction():
    # the third prediction covers 40% of the third GT box: IoU 0.4 < 0.5
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 4]]
    m = M.match_detections(boxes, [0.9, 0.8, 0.7], GT3)
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.pred_gt.tolist() == [0, 1, -1]
    r = M.evaluate([pred(boxes, [0.9, 0.8, 0.7])], [GT3], threshold=0.5)
    assert (r['tp'], r['fp'], r['fn']) == (2, 1, 1)
    assert r['precision'] == pytest.approx(2 / 3)
    assert r['recall'] == pytest.approx(2 / 3)
    assert r['f1'] == pytest.approx(2 / 3)
    # IoU exactly at the threshold matches (>=, as in pycocotools)
    m = M.match_detections(boxes, [0.9, 0.8, 0.7], GT3, iou_threshold=0.4)
    assert (m.tp, m.fp, m.fn) == (3, 0, 0)


def test_duplicates_are_false_positives():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [0.5, 0, 10.5, 10]]
    m = M.match_detections(boxes, [0.9, 0.8, 0.7], GT3[:1])
    assert (m.tp, m.fp, m.fn) == (1, 2, 0)
    assert m.pred_matched.tolist() == [True, False, False]


def test_score_order_decides_the_greedy_matching():
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], dtype=float)   # A, B
    x = [1, 0, 11, 10]   # IoU 0.818 with A, 0.538 with B
    y = [0, 0, 9, 10]    # IoU 0.9 with A, 0.357 with B
    # X first: X takes A (its best), Y finds only B at IoU 0.357 -> FP
    m = M.match_detections([x, y], [0.9, 0.5], gt)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    assert m.pred_gt.tolist() == [0, -1]
    # Y first: Y takes A, X falls back to B (0.538 >= 0.5)
    m = M.match_detections([x, y], [0.5, 0.9], gt)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert m.pred_gt.tolist() == [1, 0]
    assert m.gt_pred.tolist() == [1, 0]
    assert m.pred_iou[1] == pytest.approx(0.9)


def test_match_accepts_torch_tensors():
    m = M.match_detections(torch.tensor(GT3, dtype=torch.float32), torch.ones(3),
                           torch.tensor(GT3))
    assert (m.tp, m.fp, m.fn) == (3, 0, 0)
    r = M.evaluate([{'boxes': torch.tensor(GT3), 'scores': torch.ones(3)}],
                   [{'boxes': torch.tensor(GT3)}])
    assert r['f1'] == 1.0 and r['AP'] == pytest.approx(1.0)


def test_ap_perfect_and_worse_ranking():
    gt = GT3[:2]
    fp = [100, 100, 110, 110]
    perfect = M.evaluate([pred(np.r_[gt, [fp]], [0.9, 0.8, 0.1])], [gt])
    assert perfect['AP'] == pytest.approx(1.0)
    assert perfect['AP50'] == pytest.approx(1.0)
    assert perfect['AP75'] == pytest.approx(1.0)
    # The FP ranked first: recall 0.5 at precision 1/2, recall 1 at 2/3; COCO's
    # interpolated precision is then 2/3 at every recall level -> AP = 2/3.
    worse = M.evaluate([pred(np.r_[gt, [fp]], [0.8, 0.7, 0.9])], [gt])
    assert worse['AP50'] == pytest.approx(2 / 3)
    assert worse['AP'] == pytest.approx(2 / 3)
    assert worse['AP'] < perfect['AP']
    # at score >= 0.5 the low-scored FP is dropped, the high-scored one is kept
    assert perfect['precision'] == 1.0
    assert worse['precision'] == pytest.approx(2 / 3)


def test_localisation_quality_lowers_ap_but_not_ap50():
    gt = np.array([[0, 0, 20, 20]], dtype=float)
    shifted = [[0, 0, 20, 26]]          # IoU 400/520 = 0.769: matches at .50-.75 only
    r = M.evaluate([pred(shifted, [0.9])], [gt])
    assert r['AP50'] == pytest.approx(1.0)
    assert r['AP75'] == pytest.approx(1.0)
    assert r['AP'] == pytest.approx(6 / 10)   # thresholds .50,.55,...,.75 of 10


def test_size_buckets():
    sides = [8, 11.9, 12, 16, 23.9, 24, 30]
    gt = np.array([[100 * i, 0, 100 * i + s, s] for i, s in enumerate(sides)], dtype=float)
    np.testing.assert_array_equal(M.size_bucket_index(gt), [0, 0, 1, 1, 1, 2, 2])
    # a 6 x 24 box has side sqrt(144) = 12: medium
    assert M.size_bucket_index([[0, 0, 6, 24]]).tolist() == [1]
    # detect the small and large boxes exactly, miss the medium ones
    found = gt[[0, 1, 5, 6]]
    r = M.evaluate([pred(found, [0.9, 0.9, 0.9, 0.9])], [gt])
    assert (r['n_gt_small'], r['n_gt_medium'], r['n_gt_large']) == (2, 3, 2)
    assert r['recall_small'] == 1.0
    assert r['recall_medium'] == 0.0
    assert r['recall_large'] == 1.0
    assert r['AP_small'] == pytest.approx(1.0)
    assert r['AP_medium'] == pytest.approx(0.0)
    assert r['AP_large'] == pytest.approx(1.0)
    assert r['AR_medium'] == pytest.approx(0.0)
    assert r['recall'] == pytest.approx(4 / 7)
    # custom bins move the boxes
    r = M.evaluate([pred(found, [0.9] * 4)], [gt], size_bins=(9, 100))
    assert (r['n_gt_small'], r['n_gt_medium'], r['n_gt_large']) == (1, 6, 0)
    assert r['recall_large'] is None and r['AP_large'] is None


def test_recall_by_size_uses_the_threshold():
    gt = np.array([[0, 0, 8, 8], [50, 0, 80, 30]], dtype=float)   # small, large
    r = M.evaluate([pred(gt, [0.3, 0.9])], [gt], threshold=0.5)
    assert r['recall_small'] == 0.0 and r['recall_large'] == 1.0
    assert r['AP_small'] == pytest.approx(1.0)   # AP uses every prediction


def test_many_objects_are_not_truncated_at_100():
    xs = np.arange(300) * 20.0
    gt = np.stack([xs, np.zeros(300), xs + 10, np.full(300, 10.0)], axis=1)
    scores = np.linspace(1, 0.5, 300)
    r = M.evaluate([pred(gt, scores)], [gt])
    assert r['AP'] == pytest.approx(1.0)
    assert r['AR'] == pytest.approx(1.0)
    assert r['max_dets'] >= 300
    # an explicit cap keeps the 100 highest-scored detections, as COCOeval does
    capped = M.evaluate([pred(gt, scores)], [gt], max_dets=100)
    assert capped['AR'] == pytest.approx(1 / 3)
    # COCOeval's own maxDets (used as such when the image is not split into groups)
    plain = coco_ap([(gt[:120], scores[:120])], [gt[:120]], M.DEFAULT_SIZE_BINS, None, group_boxes=None)
    assert plain['AP'] == pytest.approx(1.0) and plain['AR'] == pytest.approx(1.0)


def _random_set(seed, n_images=2, n=60):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n_images):
        xy = rng.uniform(0, 150, (n, 2))
        g = np.c_[xy, xy + rng.uniform(5, 30, (n, 2))]
        p = g + rng.normal(0, 2.5, g.shape)
        p = np.r_[p, p[:10] + rng.normal(0, 1, (10, 4))]
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
        preds.append((p, rng.uniform(0, 1, len(p))))
        gts.append(g[: n - 10])
    return preds, gts


def test_split_coco_evaluation_equals_plain_cocoeval():
    preds, gts = _random_set(3)
    grouped = coco_ap(preds, gts, M.DEFAULT_SIZE_BINS, None)
    plain = coco_ap(preds, gts, M.DEFAULT_SIZE_BINS, None, group_boxes=None)
    assert 0.05 < plain['AP'] < 0.95          # a non-trivial case
    for key, value in plain.items():
        assert grouped[key] == pytest.approx(value, abs=1e-12), key


def test_greedy_matching_agrees_with_cocoeval():
    preds, gts = _random_set(5)
    r = M.evaluate([{'boxes': b, 'scores': s} for b, s in preds], gts, threshold=0.0)
    assert r['n_pred_kept'] == r['n_pred']
    assert r['recall'] == pytest.approx(r['AR50'], abs=1e-12)
    assert 0.2 < r['recall'] < 1.0


def test_best_f1_threshold():
    gt = GT3[:2]
    boxes = [gt[0], [200, 0, 210, 10], gt[1], [300, 0, 310, 10]]
    scores = [0.9, 0.8, 0.7, 0.3]
    # cut-offs: 0.9 -> F1 2/3; 0.8 -> 1/2; 0.7 -> P 2/3, R 1, F1 0.8; 0.3 -> 2/3
    thr, f1, p, r = M.best_f1_threshold([pred(boxes, scores)], [gt])
    assert thr == pytest.approx(0.7)
    assert (f1, p, r) == (pytest.approx(0.8), pytest.approx(2 / 3), 1.0)
    res = M.evaluate([pred(boxes, scores)], [gt], threshold=None)
    assert res['threshold'] == pytest.approx(0.7)
    assert res['f1'] == pytest.approx(0.8) == res['best_f1']
    # with no ground truth the best is to keep nothing
    thr, f1, p, r = M.best_f1_threshold([pred(boxes, scores)], [np.zeros((0, 4))])
    assert thr > 0.9 and f1 == 1.0


def test_empty_cases():
    empty_pred = pred(np.zeros((0, 4)), [])
    some = pred(GT3, [0.9, 0.8, 0.7])
    none_gt = np.zeros((0, 4))

    both = M.evaluate([empty_pred], [none_gt])
    assert (both['precision'], both['recall'], both['f1'], both['AP']) == (1.0, 1.0, 1.0, 1.0)
    no_nan(both)

    only_pred = M.evaluate([some], [none_gt])
    assert (only_pred['fp'], only_pred['precision'], only_pred['recall']) == (3, 0.0, 0.0)
    assert only_pred['f1'] == 0.0 and only_pred['AP'] == 0.0
    no_nan(only_pred)

    only_gt = M.evaluate([empty_pred], [GT3])
    assert (only_gt['fn'], only_gt['precision'], only_gt['recall']) == (3, 0.0, 0.0)
    assert only_gt['AP'] == 0.0 and only_gt['recall_small'] == 0.0
    no_nan(only_gt)

    # an empty image among others changes nothing for the others
    mixed = M.evaluate([some, empty_pred], [GT3, none_gt])
    assert (mixed['precision'], mixed['recall'], mixed['n_images']) == (1.0, 1.0, 2)
    assert mixed['AP'] == pytest.approx(1.0)

    nothing = M.evaluate([], [])
    assert nothing['n_images'] == 0 and nothing['f1'] == 1.0
    for r in (both, only_pred, only_gt, mixed, nothing):
        assert report_figures(M.format_report(r)) == report_figures(r)
    assert report_figures(M.format_report(only_pred)) == ([1, 0, 3], ['0', '3', '0', '0.000', '0.000', '0.000'])

    m = M.match_detections(np.zeros((0, 4)), [], GT3)
    assert (m.tp, m.fp, m.fn) == (0, 0, 3)


def test_format_report(capsys):
    r = M.evaluate([pred(GT3[:2], [0.9, 0.8])], [GT3])
    text = M.format_report(r)
    out, _ = capsys.readouterr()
    assert out == ''                     # pycocotools' prints are silenced
    assert report_figures(text) == ([1, 3, 2], ['2', '0', '1', '1.000', '0.667', '0.800'])
    assert any(line.split()[:2] == ['large', '>='] and line.split()[-3:] == ['-', '-', '-']
               for line in text.splitlines())


def test_bad_input_raises_cellrcnn_error():
    with pytest.raises(CellRCNNError, match='one of each'):
        M.evaluate([pred(GT3, [1, 1, 1])], [GT3, GT3])
    with pytest.raises(CellRCNNError, match='shape'):
        M.evaluate([pred(GT3, [1, 1, 1])], [np.zeros((3, 3))])
    with pytest.raises(CellRCNNError, match='scores'):
        M.evaluate([{'boxes': GT3, 'scores': [1.0]}], [GT3])
    with pytest.raises(CellRCNNError, match='x2 >= x1'):
        M.match_detections([[10, 0, 0, 10]], [1.0], GT3)
    with pytest.raises(CellRCNNError):
        M.evaluate([GT3], [GT3])  # predictions must be dicts
