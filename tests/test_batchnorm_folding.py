"""What makes CPU inference cheaper without changing its detections: BatchNorm folded into the convolutions
(``cellrcnn.batchnorm_folding``), and freed memory kept for the next allocations (``devices.keep_freed_memory``)."""

import subprocess
import sys

import numpy as np
import torch

from cellrcnn.adapt import batchnorm_stats, load_batchnorm_stats
from cellrcnn.batchnorm_folding import fold_batchnorm
from cellrcnn.boxes import suppress_close_centres
from cellrcnn.inference import DetectorSpec
from cellrcnn.model import to_tensor
from cellrcnn.synthetic import make_tile


def _tiles(count, seed):
    rng = np.random.default_rng(seed)
    return [make_tile(rng, size=256)[0] for _ in range(count)]


def _unfolded_detections(detector, tiles):
    """What the model itself, with its BatchNorm layers, detects (as ``Detector`` keeps them: its input, threshold
    and suppression by centre distance)."""
    with torch.no_grad():
        outputs = detector.model([detector.model_input(t) for t in tiles])
    kept = []
    for o in outputs:
        keep = o['scores'] >= detector.threshold
        boxes, scores = o['boxes'][keep].numpy(), o['scores'][keep].numpy()
        far = suppress_close_centres(boxes, scores, detector.model.config.centre_distance_px)
        kept.append((boxes[far], scores[far]))
    return kept


def _assert_same(found, expected):
    for (boxes, scores), (want_boxes, want_scores) in zip(found, expected, strict=True):
        assert boxes.shape == want_boxes.shape and len(boxes) > 0
        np.testing.assert_allclose(boxes, want_boxes, atol=0.05)
        np.testing.assert_allclose(scores, want_scores, atol=1e-3)


def test_folding_removes_every_batchnorm_and_keeps_the_outputs():
    detector = DetectorSpec(device='cpu', batch_size=2).build()  # the bundled model: trained statistics
    folded = fold_batchnorm(detector.model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.model.modules())  # the model keeps its own
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = to_tensor(_tiles(1, 0)[0])[None]
    with torch.no_grad():
        want, got = detector.model.backbone(x), folded.backbone(x)
    for level in want:
        torch.testing.assert_close(got[level], want[level], atol=1e-4, rtol=1e-4)


def test_the_detector_folds_again_when_the_statistics_change():
    detector = DetectorSpec(device='cpu', batch_size=2).build()
    tiles = _tiles(2, 1)
    first = detector.detect_tiles(tiles)
    _assert_same(first, _unfolded_detections(detector, tiles))
    stats = batchnorm_stats(detector.model)
    rng = np.random.default_rng(2)  # as adaptation to a slide does: every mean and variance moves
    load_batchnorm_stats(detector.model, {k: v * rng.uniform(0.7, 1.3, v.shape).astype(np.float32)
                                          for k, v in stats.items()})
    moved = detector.detect_tiles(tiles)
    _assert_same(moved, _unfolded_detections(detector, tiles))
    assert any(a[0].shape != b[0].shape or not np.allclose(a[0], b[0]) for a, b in zip(moved, first))
    load_batchnorm_stats(detector.model, stats)  # restored, as detect_slide does after an adapted slide
    for (boxes, scores), (want_boxes, want_scores) in zip(detector.detect_tiles(tiles), first):
        np.testing.assert_array_equal(boxes, want_boxes)
        np.testing.assert_array_equal(scores, want_scores)


LATER_BATCH_FAULTS = """
import resource
import sys
import numpy as np
import cellrcnn.inference
from cellrcnn.synthetic import make_tile
if sys.argv[1] == 'without':
    cellrcnn.inference.keep_freed_memory = lambda: None
detector = cellrcnn.inference.DetectorSpec(device='cpu', batch_size=2).build()
tiles = [make_tile(np.random.default_rng(seed), size=1024)[0] for seed in (3, 4)]
detector.detect_tiles(tiles)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    detector.detect_tiles(tiles)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _later_batch_faults(mode):
    run = subprocess.run([sys.executable, '-c', LATER_BATCH_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(run.stdout)


def test_a_cpu_detector_reuses_freed_feature_maps_instead_of_faulting_them_in_again():
    """Each in a process of its own, as ``cellrcnn detect`` runs: a batch of two 1024 px tiles has feature maps of
    30-130 MB, above glibc's own 32 MB mapping threshold, so without ``keep_freed_memory`` each batch faults in
    110 000-145 000 pages, freed and mapped again in every layer (378 000-423 000 for three batches in six runs).
    With it, the three batches after the first faulted in 4 000-34 000 in all, by how the heap lay after the first:
    the heap keeps up to 1 GB free at its top. (With 256 MB, a batch now and then gave 280 MB back and faulted it in
    again, and the second batch alone once faulted in 43 000.)"""
    assert 4 * _later_batch_faults('with') < _later_batch_faults('without')
