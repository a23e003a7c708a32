"""Evaluating a model on a labelled set, and choosing its operating point."""

import dataclasses
import time

import numpy as np
import torch

from .boxes import box_centres
from .inference import Detector
from .labels import rescale
from .metrics import DEFAULT_SIZE_BINS, best_f1_threshold, evaluate
from .point_metrics import (
    centroid_metrics,
    format_centroid_report,
    match_points,
    type_confusion,
    type_figures,
    unmatched,
)
from .roi_heads import name_cell_types

#: a detection finds a dot when its box's centre lies within this many micrometres of it
CENTROID_RADIUS_UM = 3.0


def predict_samples(model, samples, device='auto', batch_size=8, views=1):
    """All detections above the box head's low score floor, per sample (each seen in ``views`` views), and the
    seconds inference took."""
    detector = Detector(model, device, batch_size, threshold=model.config.box_score_thresh, views=views)
    started = time.perf_counter()
    outputs = detector.detect_tiles([image for image, *_ in samples])
    seconds = time.perf_counter() - started
    return [{'boxes': b, 'scores': s} for b, s in outputs], seconds


def evaluate_model(model, samples, device='auto', batch_size=8, threshold=None, size_bins=DEFAULT_SIZE_BINS,
                   views=1):
    """Metrics at the model's operating point (or the score ``threshold``), plus inference speed; ``size_bins``: the
    box sides (px) between small, medium and large nuclei; ``views``: as ``Detector``'s."""
    predictions, seconds = predict_samples(model, samples, device, batch_size, views)
    threshold = model.config.threshold if threshold is None else threshold
    metrics = evaluate(predictions, [boxes for _, boxes, *_ in samples], threshold=threshold, size_bins=size_bins)
    megapixels = sum(image.shape[0] * image.shape[1] for image, *_ in samples) / 1e6
    metrics['seconds'] = seconds
    metrics['megapixels_per_second'] = megapixels / seconds if seconds else float('nan')
    return metrics


def calibrate_threshold(model, samples, device='auto', batch_size=8, records=None, radius_um=CENTROID_RADIUS_UM):
    """Set the model's operating point to the score threshold that maximises box F1 on ``samples``; returns
    ``(threshold, f1)``. With ``records``, the same images as labelled images naming cell types
    (``annotation_classes.sample_records``), the ``cell_type_bias`` of a model with cell types is then fitted at that
    threshold on the same detections (:func:`fit_type_bias`): the images are run once."""
    detector = Detector(model, device, batch_size, threshold=model.config.box_score_thresh)
    outputs = detector.detect_tiles_with_types([image for image, *_ in samples], logits=records is not None)
    threshold, f1, _, _ = best_f1_threshold(outputs, [boxes for _, boxes, *_ in samples])
    model.config = dataclasses.replace(model.config, threshold=float(threshold))  # a new config, not an edit
    if records is not None:
        _fit_type_bias_on(model, [rescale(r, model.config.mpp) for r in records], outputs, radius_um)
    return threshold, f1


def calibrate_on_records(model, record_sets, device='auto', batch_size=8, radius_um=CENTROID_RADIUS_UM, step=0.02):
    """Set the model's operating point to the score threshold (on a grid of ``step`` from the box head's floor) that
    maximises the mean, over ``record_sets`` (lists of ``labels.LabelledImage``, dots or boxes: one list per training
    set), of each set's centroid F1 within ``radius_um``; returns ``(threshold, mean F1)``. Each set counts the same,
    whatever its number of nuclei: pooled by nucleus, one large set (18 647 breast nuclei) would choose the
    threshold for a small one of other organs (3 331 DSB nuclei). For a model with cell types, when some nuclei of
    the records name them, its ``cell_type_bias`` is then fitted at that threshold (:func:`fit_type_bias`).
    Calibrate on training images, never on the held-out ones reported."""
    config = model.config
    record_sets = [list(records) for records in record_sets]
    scaled, outputs = _detect_records(model, [r for records in record_sets for r in records], device, batch_size)
    best = threshold_of_best_mean_f1(outputs, [r.points for r in scaled], [len(s) for s in record_sets],
                                     np.arange(config.box_score_thresh, 1, step), radius_um / config.mpp)
    if best[0] is None:  # no labelled image: the threshold stays
        return config.threshold, float('nan')
    model.config = dataclasses.replace(config, threshold=best[0])  # a new config, not an edit
    _fit_type_bias_on(model, scaled, outputs, radius_um)
    return best


def threshold_of_best_mean_f1(outputs, points, set_sizes, thresholds, radius):
    """``(threshold, mean F1)``: the first of ``thresholds`` at which the mean over sets of each set's centroid F1
    (``radius`` px) is highest. ``outputs``: per image ``boxes`` and ``scores``; ``points``: per image the true
    centres; the images are the sets' in turn, ``set_sizes`` images each (a set of none is left out)."""
    ends = np.cumsum(set_sizes)
    sets = [(int(end - size), int(end)) for size, end in zip(set_sizes, ends) if size]
    truths = [(p, [-1] * len(p)) for p in points]
    best = (None, -1.0)
    for threshold in thresholds:
        kept = [{'boxes': out['boxes'][out['scores'] >= threshold]} for out in outputs]
        f1 = float(np.mean([centroid_metrics(kept[a:b], truths[a:b], radius)['f1'] for a, b in sets])) if sets else -1
        if f1 > best[1]:
            best = (float(threshold), f1)
    return best


def _detect_records(model, records, device, batch_size):
    """``(records rescaled to the model's scale, their detections above the box head's floor with type logits)``."""
    scaled = [rescale(r, model.config.mpp) for r in records]
    detector = Detector(model, device, batch_size, threshold=model.config.box_score_thresh)
    return scaled, detector.detect_tiles_with_types([r.load() for r in scaled], logits=True)


def _fit_type_bias_on(model, scaled, outputs, radius_um):
    """Set the model's ``cell_type_bias`` to :func:`fit_type_bias`'s on its detections at its operating point
    (``outputs``, with type logits, of the records ``scaled``), when the model has cell types and the records name
    some of them."""
    config = model.config
    index = config.cell_type_index()
    types = [np.array([index.get(c, -1) for c in r.classes], np.int64) for r in scaled]
    if config.cell_types and any((t >= 0).any() for t in types):
        kept = [{k: v[out['scores'] >= config.threshold] for k, v in out.items()} for out in outputs]
        bias = fit_type_bias(kept, [(r.points, t) for r, t in zip(scaled, types)], radius_um / config.mpp)
        model.config = dataclasses.replace(config, cell_type_bias=bias)


def fit_type_bias(detections, truths, radius, grid=np.arange(-2, 2.001, 0.1), rounds=5):
    """The ``ModelConfig.cell_type_bias`` (a tuple of K floats) under which the detections' types have the best mean
    per-type F1 against the truth (:func:`point_metrics.centroid_metrics`' per-type figures): coordinate ascent from
    no bias, each type's bias in turn over ``grid``, until a round changes nothing. ``detections``: per image
    ``boxes`` and ``cell_type_logits`` (N x K); ``truths``: per image ``(points, types)``, -1 unknown.

    A classifier learns the type priors of its training mix; this moves its decisions to where the labelled
    images' types are best told apart. Detection does not change."""
    logits, truth, false_logits, missed = [], [], [], []
    for det, (points, types) in zip(detections, truths):
        d, t = match_points(box_centres(det['boxes']), points, radius)
        logits.append(det['cell_type_logits'][d])
        truth.append(types[t])
        false_logits.append(det['cell_type_logits'][unmatched(len(det['boxes']), d)])
        missed.append(types[unmatched(len(points), t)])
    logits, false_logits = (torch.from_numpy(np.concatenate(v)) for v in (logits, false_logits))
    truth, missed = np.concatenate(truth), np.concatenate(missed)
    num_types = logits.shape[1]

    def mean_f1(bias):
        detected, false_types = (name_cell_types(v, bias)[0].numpy() for v in (logits, false_logits))
        confusion = type_confusion(truth, detected, false_types, missed, num_types)
        return np.mean([f['f1'] for f in type_figures(confusion)])

    bias = [0.0] * num_types
    best = mean_f1(bias)
    for _ in range(rounds):
        before = list(bias)
        for c in range(num_types):
            for value in grid:
                trial = bias[:c] + [round(float(value), 4)] + bias[c + 1:]
                f1 = mean_f1(trial)
                if f1 > best + 1e-9:
                    bias, best = trial, f1
        if bias == before:
            break
    return tuple(bias)


def evaluate_records(model, records, device='auto', batch_size=8, threshold=None, radius_um=CENTROID_RADIUS_UM,
                     views=1):
    """Figures of a model on labelled images (``labels.LabelledImage``, of known scale), each rescaled to the
    model's analysis scale first (and seen in ``views`` views: ``Detector``), at the model's operating point (or the
    score ``threshold``):

    - ``centroid``: :func:`point_metrics.centroid_metrics` within ``radius_um`` micrometres, with per-type figures
      and a confusion matrix when the model has cell types and the truth names some of them;
    - ``boxes``: :func:`metrics.evaluate` (box F1 at IoU 0.5, COCO AP) over the images whose nuclei all have boxes,
      None when there is none.
    """
    config = model.config
    threshold = config.threshold if threshold is None else threshold
    scaled = [rescale(r, config.mpp) for r in records]
    detector = Detector(model, device, batch_size, threshold=config.box_score_thresh, views=views)
    outputs = detector.detect_tiles_with_types([r.load() for r in scaled])
    kept = [{k: v[out['scores'] >= threshold] for k, v in out.items()} for out in outputs]
    index = config.cell_type_index()
    truths = [(r.points, [index.get(c, -1) for c in r.classes]) for r in scaled]
    typed = bool(config.cell_types) and any(t >= 0 for _, types in truths for t in types)
    result = {'n_images': len(scaled), 'threshold': float(threshold),
              'centroid': centroid_metrics(kept, truths, radius_um / config.mpp, len(config.cell_types) if typed
                                           else 0)}
    boxed = [i for i, r in enumerate(scaled) if r.has_extent.all()]
    result['boxes'] = evaluate([outputs[i] for i in boxed], [scaled[i].boxes for i in boxed],
                               threshold=threshold) if boxed else None
    return result


def format_records_report(result, type_names=()):
    """Text of :func:`evaluate_records`' figures."""
    lines = [format_centroid_report(result['centroid'], type_names)]
    boxes = result['boxes']
    if boxes is not None:
        lines.append(f"boxes (IoU >= 0.5) on {boxes['n_images']} images with boxes: precision {boxes['precision']:.3f}"
                     f"  recall {boxes['recall']:.3f}  F1 {boxes['f1']:.3f}  AP50 {boxes['AP50']:.3f}")
    return '\n'.join(lines)
