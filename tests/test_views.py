"""Views of a tile (``cellrcnn.views``): their geometry, their fusion, and detection with them."""

import large_image
import numpy as np
import pytest

from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.errors import CellRCNNError
from cellrcnn.inference import DetectorSpec
from cellrcnn.settings import VIEWS, DetectionSettings
from cellrcnn.views import boxes_from_view, fuse_views, to_view, view_transforms


def mask_box(mask):
    """``x1, y1, x2, y2`` pixel edges of a mask's True pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize('transform', view_transforms(8))
def test_a_box_seen_in_a_view_comes_back_where_it_was(transform):
    tile = np.zeros((50, 70, 3), np.uint8)  # not square: a transposed view is 70 x 50
    tile[5:12, 40:61] = 255
    view = to_view(tile, transform)
    assert view.shape == ((70, 50, 3) if transform[2] else (50, 70, 3)) and view.flags.c_contiguous
    seen = mask_box(view[..., 0] > 0)
    np.testing.assert_array_equal(boxes_from_view(seen[None], transform, tile.shape)[0], [40, 5, 61, 12])


def test_views_are_the_first_of_the_eight_and_other_numbers_are_refused():
    assert [len(view_transforms(n)) for n in VIEWS] == [1, 2, 4, 8]
    assert view_transforms(1) == ((False, False, False),)
    assert len(set(view_transforms(8))) == 8
    with pytest.raises(CellRCNNError, match='views must be one of 1, 2, 4, 8, not 3'):
        view_transforms(3)


def detections(boxes, scores, logits=None):
    out = {'boxes': np.array(boxes, np.float32).reshape(-1, 4), 'scores': np.array(scores, np.float32)}
    if logits is not None:
        out['cell_type_logits'] = np.array(logits, np.float32).reshape(-1, 2)
    return out


def test_fusion_weighs_each_views_best_box_and_scores_down_what_few_views_found():
    views = [
        # a nucleus seen by all four views, the first view boxing it twice; a second one by the first view only
        detections([[10, 10, 20, 20], [11, 10, 21, 20], [50, 50, 60, 58]], [0.9, 0.5, 0.8], [[2, 0], [0, 0], [0, 4]]),
        detections([[12, 10, 22, 20]], [0.6], [[0, 2]]),
        detections([[10, 12, 20, 22]], [0.3], [[1, 1]]),
        detections([[10, 10, 20, 20]], [0.2], [[4, 0]]),
    ]
    fused = fuse_views(views, iou=0.35)
    assert fused['boxes'].shape == (2, 4) and fused['cell_type_logits'].shape == (2, 2)
    weights = np.array([0.9, 0.6, 0.3, 0.2], np.float32)  # the first view's second box does not count
    np.testing.assert_allclose(fused['scores'], [weights.sum() / 4, 0.8 / 4], rtol=1e-6)
    best = np.array([[10, 10, 20, 20], [12, 10, 22, 20], [10, 12, 20, 22], [10, 10, 20, 20]], np.float32)
    np.testing.assert_allclose(fused['boxes'][0], weights @ best / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(fused['cell_type_logits'][0],
                               weights @ np.array([[2, 0], [0, 2], [1, 1], [4, 0]]) / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(fused['boxes'][1], [50, 50, 60, 58])
    # boxes that overlap only up to the IoU are separate nuclei, even from different views
    apart = fuse_views([detections([[0, 0, 10, 10]], [0.9]), detections([[6, 0, 16, 10]], [0.9])], iou=0.35)
    assert len(apart['scores']) == 2 and 'cell_type_logits' not in apart
    assert len(fuse_views([detections([], []), detections([], [])], iou=0.35)['boxes']) == 0


@pytest.fixture(scope='module')
def real_crop():
    """A 240 x 320 crop of the bundled sample slide (real skin, its densest) at 20x, not square."""
    source = large_image.open(SAMPLE_SLIDE)
    rgb, _ = source.getRegion(region={'left': 1000, 'top': 960, 'width': 320, 'height': 240},
                              format=large_image.constants.TILE_FORMAT_NUMPY)
    return np.ascontiguousarray(rgb[..., :3])


def test_eight_views_make_detection_follow_a_flip_or_turn_of_the_tile(real_crop):
    """The eight views of a tile turned or flipped are the tile's own eight views, so what they find is what the
    tile's views find, turned or flipped. One view is not: that is what the views average out."""
    detector = DetectorSpec(device='cpu', batch_size=1, views=8).build()
    single = DetectorSpec(device='cpu', batch_size=1).build()
    height, width = real_crop.shape[:2]
    found = detector.detect_tiles_with_types([real_crop])[0]
    assert len(found['boxes']) > 20 and set(found) >= {'boxes', 'scores', 'cell_types', 'cell_type_scores'}
    moved = False
    for transform in view_transforms(8)[1:]:
        view = to_view(real_crop, transform)
        seen = detector.detect_tiles_with_types([view])[0]
        back = boxes_from_view(seen['boxes'], transform, real_crop.shape)
        order, again = np.lexsort(found['boxes'].T[::-1]), np.lexsort(back.T[::-1])
        assert len(back) == len(found['boxes'])
        np.testing.assert_allclose(back[again], found['boxes'][order], atol=1e-3)
        np.testing.assert_allclose(seen['scores'][again], found['scores'][order], atol=1e-5)
        np.testing.assert_array_equal(seen['cell_types'][again], found['cell_types'][order])
        plain, plain_view = single.detect_tiles_with_types([real_crop, view])
        plain_back = boxes_from_view(plain_view['boxes'], transform, real_crop.shape)
        moved |= len(plain_back) != len(plain['boxes']) or not np.allclose(
            np.sort(plain_back, axis=0), np.sort(plain['boxes'], axis=0), atol=1e-3)
    assert moved
    assert (found['boxes'][:, 2] <= width + 1e-3).all() and (found['boxes'][:, 3] <= height + 1e-3).all()


def test_views_are_a_result_setting_recorded_only_when_used():
    assert 'views' not in DetectionSettings().identity()  # runs without views keep their resume keys
    assert DetectionSettings(views=4).identity()['views'] == 4
    assert DetectionSettings(views=4).validate().views == 4
    with pytest.raises(CellRCNNError, match='^views must be one of 1, 2, 4, 8, not 3$'):
        DetectionSettings(views=3).validate()
