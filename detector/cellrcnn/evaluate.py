"""Evaluating a model on a labelled set, and choosing its operating point."""

import dataclasses
import time

from .inference import Detector
from .metrics import DEFAULT_SIZE_BINS, best_f1_threshold, evaluate


def predict_samples(model, samples, device='auto', batch_size=8):
    """All detections above the box head's low score floor, per sample, and the seconds inference took."""
    detector = Detector(model, device, batch_size, threshold=model.config.box_score_thresh)
    started = time.perf_counter()
    outputs = detector.detect_tiles([image for image, _ in samples])
    seconds = time.perf_counter() - started
    return [{'boxes': b, 'scores': s} for b, s in outputs], seconds


def evaluate_model(model, samples, device='auto', batch_size=8, threshold=None, size_bins=DEFAULT_SIZE_BINS):
    """Metrics at the model's operating point (or the score ``threshold``), plus inference speed; ``size_bins``: the
    box sides (px) between small, medium and large nuclei."""
    predictions, seconds = predict_samples(model, samples, device, batch_size)
    threshold = model.config.threshold if threshold is None else threshold
    metrics = evaluate(predictions, [boxes for _, boxes in samples], score_threshold=threshold, size_bins=size_bins)
    megapixels = sum(image.shape[0] * image.shape[1] for image, _ in samples) / 1e6
    metrics['seconds'] = seconds
    metrics['megapixels_per_second'] = megapixels / seconds if seconds else float('nan')
    return metrics


def calibrate_threshold(model, samples, device='auto', batch_size=8):
    """Set the model's operating point to the score threshold that maximises F1 on ``samples``."""
    predictions, _ = predict_samples(model, samples, device, batch_size)
    threshold, f1, _, _ = best_f1_threshold(predictions, [boxes for _, boxes in samples])
    model.config = dataclasses.replace(model.config, threshold=float(threshold))  # a new config, not an edit
    return threshold, f1
