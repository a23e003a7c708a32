"""Test-time adaptation: BatchNorm statistics re-estimated on a slide's own tissue tiles before detecting it."""

import dataclasses

import numpy as np
import pytest
import torch

from cellrcnn.adapt import batchnorm_stats
from cellrcnn.inference import DetectorSpec
from cellrcnn.slide import Slide
from cellrcnn.slide_adaptation import adapt_to_slide, adaptation_tiles
from cellrcnn.slide_detection import detect_slide
from cellrcnn.tiling import tile_grid

RUN = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)


@pytest.fixture(scope='module')
def slide(synthetic_slide):
    return Slide(synthetic_slide(900, 700, seed=11)[0])


def new_detector(checkpoint):
    return DetectorSpec(model=str(checkpoint), threshold=0.05, device='cpu', batch_size=3).build()


def test_adaptation_changes_the_batchnorm_statistics_and_no_parameter(slide, tiny_checkpoint):
    detector = new_detector(tiny_checkpoint)
    model = detector.model
    parameters = {k: v.clone() for k, v in model.named_parameters()}
    before = batchnorm_stats(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    used = adapt_to_slide(slide, detector, tile_grid(slide, 256, 48, min_tissue=0.0), 4, workers=2)
    assert len(used) == 4
    after = batchnorm_stats(model)
    assert after.keys() == before.keys() and len(after) > 10
    assert all(not np.allclose(after[k], before[k]) for k in before)  # every layer's mean and variance moved
    for k, v in model.named_parameters():
        assert torch.equal(v, parameters[k]), k
    assert not model.training
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta


def test_the_adaptation_tiles_are_deterministic_bounded_and_tissue(slide):
    tiles = tile_grid(slide, 256, 48, min_tissue=0.0)
    assert len(tiles) == 20
    for count in (0, 1, 3, 8, 19, 20, 25):
        chosen = adaptation_tiles(tiles, count)
        assert len(chosen) == min(count, 20)
        assert len({t.index for t in chosen}) == len(chosen)
        assert [t.index for t in adaptation_tiles(tiles, count)] == [t.index for t in chosen]
    # spread evenly in raster order over equally covered tiles
    full = [dataclasses.replace(t, tissue=1.0) for t in tiles]
    assert [t.index for t in adaptation_tiles(full, 4)] == [2, 7, 12, 17]
    # skipped tiles are never used, and tiles on the tissue's edge only when there are no better ones
    mixed = [dataclasses.replace(t, tissue=0.2 if t.index % 2 else 0.9, skipped=t.index < 4) for t in tiles]
    assert all(t.index >= 4 and t.tissue == 0.9 for t in adaptation_tiles(mixed, 8))
    assert {t.index for t in adaptation_tiles(mixed, 16)} == set(range(4, 20))
    assert adaptation_tiles([dataclasses.replace(t, skipped=True) for t in tiles], 8) == []
    # most of a whole slide is glass (or fill): the median is then 0, and no tile without tissue is chosen
    glassy = [dataclasses.replace(t, tissue=0.0 if t.index % 4 else 0.5) for t in tiles]
    assert [t.index for t in adaptation_tiles(glassy, 4)] == [0, 4, 12, 16]
    assert [t.index for t in adaptation_tiles(glassy, 8)] == [0, 4, 8, 12, 16]
    assert len(adaptation_tiles([dataclasses.replace(t, tissue=0.0) for t in tiles], 4)) == 4  # glass alone


def test_two_runs_on_a_slide_give_identical_detections(slide, tiny_checkpoint):
    first = detect_slide(slide, new_detector(tiny_checkpoint), adapt_tiles=8, **RUN)
    second = detect_slide(slide, new_detector(tiny_checkpoint), adapt_tiles=8, **RUN)
    assert first.stats['adapt_tiles'] == 8 and first.stats['seconds']['adapt'] > 0
    assert len(first.boxes) > 50
    np.testing.assert_array_equal(first.boxes, second.boxes)
    np.testing.assert_array_equal(first.scores, second.scores)


def test_no_adaptation_gives_exactly_the_unadapted_detections(slide, tiny_checkpoint):
    unadapted = detect_slide(slide, new_detector(tiny_checkpoint), adapt_tiles=0, **RUN)
    assert unadapted.stats['adapt_tiles'] == 0
    detector = new_detector(tiny_checkpoint)
    loaded = batchnorm_stats(detector.model)
    adapted = detect_slide(slide, detector, adapt_tiles=8, **RUN)
    assert not (adapted.boxes.shape == unadapted.boxes.shape and np.array_equal(adapted.boxes, unadapted.boxes))
    # the adapted run put the detector's statistics back: the same detector now detects as it was loaded
    after = batchnorm_stats(detector.model)
    assert all(np.array_equal(after[k], loaded[k]) for k in loaded)
    again = detect_slide(slide, detector, adapt_tiles=0, **RUN)
    np.testing.assert_array_equal(again.boxes, unadapted.boxes)
    np.testing.assert_array_equal(again.scores, unadapted.scores)
