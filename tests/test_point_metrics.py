"""Centroid matching against dots, and per-type figures, on hand-made cases."""

import numpy as np
import pytest

from cellrcnn.point_metrics import centroid_metrics, format_centroid_report, match_points


def square(x, y, side=10.0):
    return [x - side / 2, y - side / 2, x + side / 2, y + side / 2]


def test_matching_is_one_to_one_within_the_radius_and_finds_the_most_pairs():
    # greedy nearest-first would pair detection 0 with truth 1 (distance 1) and leave truth 0 unmatched
    detected = [[10.0, 0.0], [14.0, 0.0]]
    truth = [[6.0, 0.0], [11.0, 0.0]]
    d, t = match_points(detected, truth, radius=5)
    assert sorted(zip(d.tolist(), t.tolist())) == [(0, 0), (1, 1)]
    # beyond the radius: no pair; two detections on one dot: one pair
    assert len(match_points([[0.0, 0.0]], [[6.1, 0.0]], radius=6)[0]) == 0
    d, t = match_points([[0.0, 0.0], [1.0, 0.0]], [[0.5, 0.0]], radius=6)
    assert len(d) == 1 and t.tolist() == [0]
    assert len(match_points(np.zeros((0, 2)), [[1.0, 1.0]], radius=6)[0]) == 0


def test_centroid_figures_count_matches_over_images():
    detections = [{'boxes': np.array([square(10, 10), square(50, 50), square(90, 90)])},
                  {'boxes': np.zeros((0, 4))}]
    truths = [(np.array([[12.0, 11.0], [50.0, 58.0]]), [-1, -1]),   # the second dot is 8 px from its detection
              (np.array([[5.0, 5.0]]), [-1])]
    m = centroid_metrics(detections, truths, radius=6)
    assert (m['tp'], m['fp'], m['fn'], m['n_gt'], m['n_pred']) == (1, 2, 2, 3, 3)
    assert m['precision'] == pytest.approx(1 / 3) and m['recall'] == pytest.approx(1 / 3)
    assert m['f1'] == pytest.approx(1 / 3)
    assert 'types' not in m


def test_per_type_figures_and_confusion():
    # types: 0 lymphocyte, 1 tumour
    boxes = np.array([square(10, 10), square(30, 10), square(50, 10), square(70, 10), square(90, 90)])
    detections = [{'boxes': boxes, 'cell_types': np.array([0, 1, 0, 1, 1])}]
    points = np.array([[10, 10], [30, 10], [50, 10], [70, 10], [200, 200], [300, 300]], dtype=float)
    truths = [(points, [0, 1, 1, -1, 0, -1])]
    m = centroid_metrics(detections, truths, radius=6, num_types=2)
    assert (m['tp'], m['fp'], m['fn']) == (4, 1, 2)
    # pairs: (0 as 0), (1 as 1), (truth 1 detected 0), (unknown truth: no type); false detection of type 1;
    # missed: one of type 0 and one unknown (not in the matrix)
    assert m['confusion'] == [[1, 0, 1],
                              [1, 1, 0],
                              [0, 1, 0]]
    lymphocyte, tumour = m['types']
    assert (lymphocyte['tp'], lymphocyte['fp'], lymphocyte['fn']) == (1, 1, 1)
    assert (tumour['tp'], tumour['fp'], tumour['fn']) == (1, 1, 1)
    assert tumour['f1'] == pytest.approx(0.5)
    text = format_centroid_report(m, ('lymphocyte', 'tumour'))
    assert 'confusion' in text and text.splitlines()[3].split()[:4] == ['lymphocyte', '1', '1', '1']


def test_calibration_picks_the_threshold_of_best_centroid_f1():
    from cellrcnn.checkpoint import load_model
    from cellrcnn.evaluate import calibrate_on_records, evaluate_records
    from cellrcnn.labels import LabelledImage
    from cellrcnn.synthetic import make_tile

    records = []
    for seed in (11, 12):
        image, boxes = make_tile(seed, size=128)
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        records.append(LabelledImage(image=image, shape=(128, 128), mpp=0.5, points=points,
                                     boxes=np.full((len(points), 4), np.nan), classes=[None] * len(points),
                                     source='test', name=f'{seed}.png'))
    model = load_model()
    threshold, f1 = calibrate_on_records(model, [records], device='cpu')
    assert model.config.threshold == threshold and 0.05 <= threshold < 1
    assert evaluate_records(model, records, device='cpu')['centroid']['f1'] == pytest.approx(f1)
    for other in (0.05, 0.99):
        assert evaluate_records(model, records, device='cpu', threshold=other)['centroid']['f1'] <= f1


def test_each_set_counts_the_same_in_the_operating_point():
    from cellrcnn.evaluate import threshold_of_best_mean_f1

    # a large set (10 nuclei, each found at 0.9, and 10 false boxes at 0.5) and a small one (2 nuclei found at 0.3)
    truth_a = np.array([[20.0 * i + 10, 10] for i in range(10)])
    false_a = truth_a + [0, 100]
    boxes_a = np.array([square(x, y) for x, y in np.concatenate([truth_a, false_a])])
    truth_b = np.array([[10.0, 10], [40, 10]])
    outputs = [{'boxes': boxes_a, 'scores': np.array([0.9] * 10 + [0.5] * 10)},
               {'boxes': np.array([square(x, y) for x, y in truth_b]), 'scores': np.array([0.3, 0.3])}]
    thresholds = [0.2, 0.4, 0.6]
    # pooled by nucleus, 0.6 is best (F1 0.909: the small set's two nuclei lost); each set counting the same, 0.2
    # (F1 2/3 and 1)
    assert threshold_of_best_mean_f1(outputs, [truth_a, truth_b], [1, 1], thresholds, 6) == pytest.approx(
        (0.2, (2 / 3 + 1) / 2))
    assert threshold_of_best_mean_f1(outputs, [truth_a, truth_b], [2], thresholds, 6) == pytest.approx(
        (0.6, 2 * 10 / 22))
    # a set of no images is left out of the mean
    assert threshold_of_best_mean_f1(outputs[:1], [truth_a], [0, 1], [0.2, 0.4], 6) == pytest.approx((0.2, 2 / 3))


def test_the_type_bias_moves_decisions_to_the_best_mean_type_f1():
    from cellrcnn.evaluate import fit_type_bias

    # six nuclei, truth types 0 0 1 1 1 1; the classifier calls them all type 0, though types 0 and 1 lie apart
    logits = np.array([[1.05, 0.0], [0.95, 0.0], [0.45, 0.1], [0.45, 0.0], [0.25, 0.0], [0.55, 0.0]], np.float32)
    boxes = np.array([square(20 * i + 10, 10) for i in range(6)])
    points = (boxes[:, :2] + boxes[:, 2:]) / 2
    detections = [{'boxes': boxes, 'cell_type_logits': logits}]
    truths = [(points, np.array([0, 0, 1, 1, 1, 1]))]
    before = centroid_metrics([{'boxes': boxes, 'cell_types': logits.argmax(1)}], truths, 6, 2)
    bias = fit_type_bias(detections, truths, radius=6)
    after = centroid_metrics([{'boxes': boxes, 'cell_types': (logits + bias).argmax(1)}], truths, 6, 2)
    assert [t['f1'] for t in before['types']] == pytest.approx([0.5, 0.0])
    assert [t['f1'] for t in after['types']] == [1.0, 1.0]
    assert len(bias) == 2 and 0.55 < bias[1] - bias[0] < 0.95
    # the detections themselves do not change
    assert (after['tp'], after['fp'], after['fn']) == (before['tp'], before['fp'], before['fn'])


def test_calibration_fits_the_type_bias_on_typed_dots_only(typed_checkpoint):
    from cellrcnn.checkpoint import load_model
    from cellrcnn.evaluate import calibrate_on_records, evaluate_records
    from cellrcnn.labels import LabelledImage
    from cellrcnn.synthetic import make_tile

    def records(classes):
        out = []
        for seed in (11, 12):
            image, boxes = make_tile(seed, size=128)
            points = (boxes[:, :2] + boxes[:, 2:]) / 2
            out.append(LabelledImage(image=image, shape=(128, 128), mpp=0.5, points=points,
                                     boxes=np.full((len(points), 4), np.nan), classes=classes(len(points)),
                                     source='test', name=f'{seed}.png'))
        return out

    model = load_model(str(typed_checkpoint))
    calibrate_on_records(model, [records(lambda n: [None] * n)], device='cpu')
    assert model.config.cell_type_bias == ()
    # every nucleus a stromal cell: the fitted bias calls more of them stromal than the classifier alone
    stromal = records(lambda n: ['stromal'] * n)
    plain = evaluate_records(model, stromal, device='cpu')['centroid']['types'][2]
    calibrate_on_records(model, [stromal], device='cpu')
    bias = model.config.cell_type_bias
    assert len(bias) == 3 and bias[2] > max(bias[:2])
    fitted = evaluate_records(model, stromal, device='cpu')['centroid']['types'][2]
    assert fitted['f1'] > plain['f1']
