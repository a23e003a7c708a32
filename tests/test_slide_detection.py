import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, nms

from cellrcnn.__main__ import main as cellrcnn
from cellrcnn.annotation import read_annotation_file
from cellrcnn.boxes import suppress_close_centres
from cellrcnn.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, stored_config
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.errors import CellRCNNError
from cellrcnn.exports import MARKS_BGR, MARKS_WIDTH, detection_summary_lines, write_overlay
from cellrcnn.inference import DetectorSpec
from cellrcnn.slide import Slide
from cellrcnn.slide_detection import detect_slide
from cellrcnn.tiling import tile_grid
from cellrcnn.tissue_outline import MARKS_LABEL, TISSUE_LABEL
from support import BLUE_INK, PassingDetector, mark_beside


@pytest.fixture(scope='module')
def slide_path(synthetic_slide):
    return synthetic_slide(900, 700, seed=11)[0]


@pytest.fixture
def detector(tiny_checkpoint):
    return DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, nms=0.3, device='cpu', batch_size=3).build()


def sorted_rows(boxes):
    boxes = np.asarray(boxes, np.float64)
    return boxes[np.lexsort(boxes.T[::-1])]


class Recording(PassingDetector):
    """A detector that keeps every raw result it returns, in order."""

    def __init__(self, detector):
        super().__init__(detector)
        self.results = []

    def detect_tiles_with_types(self, tiles, parts=False, stain=None):
        results = self.inner.detect_tiles_with_types(tiles, parts, stain=stain)
        self.results.extend((out['boxes'], out['scores']) for out in results)
        return results


def test_merged_result_equals_one_global_nms_over_all_raw_detections(slide_path, detector, tmp_path):
    slide = Slide(slide_path)
    recording = Recording(detector)
    result = detect_slide(slide, recording, tile_size=256, overlap=48, min_tissue=0.0, workers=2)
    tiles = tile_grid(slide, 256, 48, min_tissue=0.0, align=detector.model.config.fields[-1])
    assert len(recording.results) == len(tiles)
    raw_boxes = [slide.to_base(boxes, tile).astype(np.float32) for tile, (boxes, _) in zip(tiles, recording.results)]
    raw_scores = [scores for _, scores in recording.results]
    raw_boxes = torch.from_numpy(np.concatenate(raw_boxes))
    raw_scores = torch.from_numpy(np.concatenate(raw_scores))
    keep = nms(raw_boxes, raw_scores, 0.3)
    assert len(raw_boxes) > len(keep) > 50  # overlaps produced duplicates that the merge removed
    np.testing.assert_array_equal(sorted_rows(result.boxes), sorted_rows(raw_boxes[keep].numpy()))
    assert result.stats['tiles'] == result.stats['tiles_read'] == 20  # 4 rows of 5 tiles
    assert result.boxes[:, 2].max() <= 900 and result.boxes[:, 3].max() <= 700
    assert result.stats['ink_or_fill_mm2'] == 0 and 'left out' not in detection_summary_lines(result)[0]
    write_overlay(result, tmp_path / 'overview.png')  # no outline of marks
    assert not (cv2.imread(str(tmp_path / 'overview.png')) == MARKS_BGR).all(axis=2).any()


def test_close_centres_are_suppressed_once_over_the_merged_nuclei(slide_path, tiny_checkpoint, tmp_path):
    """A model with ``centre_distance_um`` suppresses by centre distance over the whole slide's merged nuclei (tiles
    go to the merge unsuppressed), and within each image that is detected whole."""
    payload = load_checkpoint(tiny_checkpoint)
    path = tmp_path / 'centres.pt'
    config = dataclasses.replace(stored_config(payload), centre_distance_um=4.0)
    save_checkpoint(path, model_from_checkpoint(payload, config=config), half=True)
    detector = DetectorSpec(model=str(path), threshold=0.05, nms=0.3, device='cpu', batch_size=3).build()
    slide = Slide(slide_path)
    recording = Recording(detector)
    result = detect_slide(slide, recording, tile_size=256, overlap=48, min_tissue=0.0, workers=2)
    tiles = tile_grid(slide, 256, 48, min_tissue=0.0, align=detector.model.config.fields[-1])
    raw_boxes = np.concatenate([slide.to_base(b, t).astype(np.float32) for t, (b, _) in zip(tiles, recording.results)])
    raw_scores = np.concatenate([s for _, s in recording.results])
    kept = nms(torch.from_numpy(raw_boxes), torch.from_numpy(raw_scores), 0.3).numpy()
    far = suppress_close_centres(raw_boxes[kept], raw_scores[kept], 4.0 / 0.5 * slide.scale)
    assert result.stats['centre_suppressed'] == (~far).sum() > 10
    np.testing.assert_array_equal(sorted_rows(result.boxes), sorted_rows(raw_boxes[kept][far]))

    image = slide.read(tiles[0])
    (parts_boxes, parts_scores), = [(o['boxes'], o['scores']) for o in detector.detect_tiles_with_types([image], True)]
    (boxes, scores), = detector.detect_tiles([image])
    far = suppress_close_centres(parts_boxes, parts_scores, 8.0)
    assert 0 < far.sum() < len(far)
    np.testing.assert_array_equal(boxes, parts_boxes[far])
    np.testing.assert_array_equal(scores, parts_scores[far])


def test_tiling_hardly_changes_the_detections(slide_path):
    """Tiles start on whole steps of the model's coarsest field, so a nucleus away from tile edges gets the same
    features, and the same box, as in one tile over the whole slide. (A last tile moved back to end flush with the
    slide, off those steps, boxed a third of the nuclei differently from the rest.)"""
    slide = Slide(slide_path)
    detector = DetectorSpec(device='cpu', batch_size=2).build()  # the bundled model
    whole = detect_slide(slide, detector, tile_size=1024, overlap=64, min_tissue=0.0, workers=2)
    tiled = detect_slide(slide, detector, tile_size=384, overlap=64, min_tissue=0.0, workers=2)
    assert (whole.stats['tiles'], tiled.stats['tiles']) == (1, 6)
    assert abs(len(tiled.boxes) - len(whole.boxes)) < 0.05 * len(whole.boxes)
    best = box_iou(torch.from_numpy(whole.boxes), torch.from_numpy(tiled.boxes)).max(1).values
    assert (best > 0.999).float().mean() > 0.75


def test_a_tiles_detections_do_not_depend_on_the_tiles_batched_with_it(slide_path, detector):
    slide = Slide(slide_path)
    tiles = tile_grid(slide, 256, 48, min_tissue=0.0, align=16)
    inner, last = slide.read(tiles[1]), slide.read(tiles[4])  # the last tile of a row is narrower: it ends flush
    assert inner.shape[1] > last.shape[1]
    (boxes, scores), = detector.detect_tiles([last])
    assert len(boxes) > 10
    batched = detector.detect_tiles([inner, last, inner])
    np.testing.assert_array_equal(batched[1][0], boxes)
    np.testing.assert_array_equal(batched[1][1], scores)
    np.testing.assert_array_equal(batched[0][0], batched[2][0])


def test_glass_only_slide_gives_an_empty_result(tmp_path, detector):
    import pyvips
    path = tmp_path / 'glass.tiff'
    glass = pyvips.Image.black(600, 500, bands=3) + 245
    glass.cast('uchar').tiffsave(str(path), tile=True, pyramid=True, compression='jpeg', xres=2000, yres=2000,
                                 resunit='cm')
    result = detect_slide(Slide(path), detector, tile_size=256, overlap=32, min_tissue=0.05, workers=2)
    assert len(result.boxes) == 0
    assert result.stats['tiles_read'] == 0 and result.stats['tiles_skipped'] == result.stats['tiles']
    assert result.stats['adapt_tiles'] == 0  # no tissue to adapt to


def test_no_nucleus_is_kept_on_black_fill(tmp_path, slide_path, detector):
    width = Slide(slide_path).size[0]
    slide = Slide(mark_beside(slide_path, tmp_path / 'filled.tiff', width))
    recording = Recording(detector)
    result = detect_slide(slide, recording, tile_size=256, overlap=32, min_tissue=0.0, workers=2)
    tiles = tile_grid(slide, 256, 32, min_tissue=0.0, align=detector.model.config.fields[-1])
    raw = np.concatenate([slide.to_base(boxes, tile) for tile, (boxes, _) in zip(tiles, recording.results)])
    fill_x = width + 8  # past the mask pixel (8 px) that holds both
    assert ((raw[:, 0] + raw[:, 2]) / 2 >= fill_x).sum() > 10  # the model finds "nuclei" on the fill
    centres = (result.boxes[:, 0] + result.boxes[:, 2]) / 2
    assert len(result.boxes) > 50 and not (centres >= fill_x).any()
    # the fill's area is reported, apart from the tissue's
    fill_mm2 = width * slide.size[1] * (slide.mpp / 1000) ** 2
    assert result.stats['ink_or_fill_mm2'] == pytest.approx(fill_mm2, rel=0.05)
    assert f'({fill_mm2:.2f} mm2 of pen ink or black fill left out)' in detection_summary_lines(result)[0]
    # and outlined in the overview
    write_overlay(result, tmp_path / 'overview.png')
    overview = cv2.imread(str(tmp_path / 'overview.png'))
    outline = (overview == MARKS_BGR).all(axis=2)
    factor = overview.shape[1] / slide.size[0]
    assert outline.sum() > 100 and np.flatnonzero(outline.any(axis=0)).min() >= (width - 8) * factor - MARKS_WIDTH


def test_no_box_straddles_the_edge_of_black_fill_on_a_real_slide(tmp_path):
    # The sample slide, JPEG-encoded again with black beside it, through the bundled model. Along the seam the JPEG
    # rings, so the column of mask pixels that holds the seam is no fill; the model boxed a thin dark "nucleus" on
    # the seam in a few tiles (6 boxes, centred 3 um into the black). Nothing centred next to the fill is kept.
    width = Slide(SAMPLE_SLIDE).size[0]
    padded = mark_beside(SAMPLE_SLIDE, tmp_path / 'padded.tiff', 1200)
    assert cellrcnn(['detect', str(padded), '-o', str(tmp_path), '--progress', 'none', '--no-resume',
                     '--device', 'cpu']) == 0
    centres = np.loadtxt(tmp_path / 'padded.csv', delimiter=',', skiprows=1, usecols=0)
    assert len(centres) > 2000
    assert centres.max() < width
    # the tissue outline a pathologist opens in HistomicsUI: the tissue left of the seam, the fill outlined beside it
    outline = read_annotation_file(tmp_path / 'padded.tissue.anot.json')
    xs = {label: [np.array(e['points'])[:, 0] for e in outline['elements'] if e['label']['value'] == label]
          for label in (TISSUE_LABEL, MARKS_LABEL)}
    assert xs[TISSUE_LABEL] and max(x.max() for x in xs[TISSUE_LABEL]) < width
    (fill,) = xs[MARKS_LABEL]
    assert width - 16 <= fill.min() <= width + 16 and fill.max() > width + 1150


def test_cellrcnn_detect_keeps_green_and_blue_as_tissue_when_asked(tmp_path, slide_path, tiny_checkpoint):
    # a band of blue ink's colour beside the slide: pen ink by default, tissue with --keep-blue-green (a stain's)
    blue = mark_beside(slide_path, tmp_path / 'blue.tiff', 600, colour=BLUE_INK)
    summaries = {}
    for extra in (), ('--keep-blue-green',):
        out = tmp_path / (extra[0][2:] if extra else 'default')
        assert cellrcnn(['detect', str(blue), '-o', str(out), '--model', str(tiny_checkpoint), '--progress',
                         'none', '--no-resume', '--device', 'cpu', *extra]) == 0
        summaries[extra] = json.loads((out / 'blue.summary.json').read_text())
        params = read_annotation_file(out / 'blue.anot.json')['attributes']['params']
        assert params.get('keep_blue_green', False) is bool(extra)
    band_mm2 = 600 * 700 * (0.5 / 1000) ** 2
    default, kept = summaries[()], summaries[('--keep-blue-green',)]
    assert default['ink_or_fill_mm2'] == pytest.approx(band_mm2, rel=0.05) and kept['ink_or_fill_mm2'] == 0
    assert kept['tissue_mm2'] - default['tissue_mm2'] == pytest.approx(band_mm2, rel=0.1)


def test_a_small_piece_on_the_glass_is_read_where_it_lies(tmp_path, detector):
    import pyvips
    path = tmp_path / 'piece.tiff'
    slide = (pyvips.Image.black(600, 500, bands=3) + 245).cast('uchar').draw_rect([190, 110, 170], 400, 300, 60, 60,
                                                                                  fill=True)
    slide.tiffsave(str(path), tile=True, pyramid=True, compression='jpeg', xres=2000, yres=2000, resunit='cm')
    result = detect_slide(Slide(path), detector, tile_size=256, overlap=32, min_tissue=0.2, workers=2)
    st = result.stats
    assert st['tiles_cut'] == st['tiles_read'] >= 1 and st['tiles_read'] + st['tiles_skipped'] == st['tiles']
    assert st['tiles_skipped'] >= 1
    assert f'{st["tiles_read"]} tiles read ({st["tiles_cut"]} only where their little tissue lies)' in \
        detection_summary_lines(result)[0]


def test_bad_detection_loop_settings(slide_path, detector):
    slide = Slide(slide_path)
    run = dict(tile_size=1024, overlap=64, min_tissue=0.05, workers=2)
    with pytest.raises(CellRCNNError, match='overlap must be'):
        detect_slide(slide, detector, **{**run, 'tile_size': 256, 'overlap': 256})
    with pytest.raises(CellRCNNError, match='minimum tissue fraction'):
        detect_slide(slide, detector, **{**run, 'min_tissue': 2})
    with pytest.raises(CellRCNNError, match='outside the slide'):
        detect_slide(slide, detector, roi=(5000, 5000, 100, 100), **run)
    with pytest.raises(CellRCNNError, match='number of tiles to adapt to the slide must be 0 .* or more, not -1'):
        detect_slide(slide, detector, adapt_tiles=-1, **run)


def test_a_dask_cluster_gives_the_same_detections(slide_path, detector, tiny_checkpoint):
    slide = Slide(slide_path)
    kwargs = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)
    local = detect_slide(slide, detector, **kwargs)
    spread = detect_slide(slide, detector, scheduler='local:2', **kwargs)
    assert len(spread.boxes) == len(local.boxes) > 0
    np.testing.assert_allclose(spread.boxes, local.boxes, atol=1e-3)
    np.testing.assert_allclose(spread.scores, local.scores, atol=1e-4)


def test_dask_workers_detect_with_the_adapted_statistics_and_the_anchor_density_of_the_detector(
        slide_path, detector, tiny_checkpoint):
    slide = Slide(slide_path)
    # an override that the model file on the workers does not hold
    detector = DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, nms=0.3, anchor_upsample=2, device='cpu',
                            batch_size=3).build()
    kwargs = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2, adapt_tiles=4)
    local = detect_slide(slide, detector, **kwargs)
    spread = detect_slide(slide, detector, scheduler='local:1', **kwargs)
    assert local.stats['adapt_tiles'] == spread.stats['adapt_tiles'] == 4
    assert len(spread.boxes) == len(local.boxes) > 0
    np.testing.assert_allclose(spread.boxes, local.boxes, atol=1e-3)
    np.testing.assert_allclose(spread.scores, local.scores, atol=1e-4)


def test_unreachable_dask_scheduler(slide_path, detector, tiny_checkpoint):
    with pytest.raises(CellRCNNError, match='cannot reach the Dask scheduler'):
        detect_slide(Slide(slide_path), detector, tile_size=256, overlap=48, min_tissue=0.0, workers=2,
                     scheduler='tcp://127.0.0.1:9')


def test_a_detector_spec_builds_its_overrides_into_a_fixed_configuration(tiny_checkpoint):
    from cellrcnn.checkpoint import load_checkpoint, stored_config

    stored = stored_config(load_checkpoint(tiny_checkpoint))
    detector = DetectorSpec(model=str(tiny_checkpoint), threshold=0.02, nms=0.25, anchor_upsample=2, device='cpu',
                            batch_size=2).build()
    config = detector.model.config
    assert (config.threshold, config.box_score_thresh, config.nms_thresh, config.anchor_upsample) == (0.02, 0.02,
                                                                                                      0.25, 2)
    assert detector.threshold == 0.02
    assert detector.model.roi_heads.nms_thresh == 0.25 and detector.model.roi_heads.score_thresh == 0.02
    assert detector.model.rpn.upsample == detector.model.rpn.anchor_generator.upsample == 2
    assert stored_config(load_checkpoint(tiny_checkpoint)) == stored  # the checkpoint's own is untouched
    plain = DetectorSpec(model=str(tiny_checkpoint), device='cpu', batch_size=2).build()
    assert plain.model.config == stored and plain.threshold == stored.threshold
    with pytest.raises(CellRCNNError, match='score threshold must be between 0 and 1, not 1.5'):
        DetectorSpec(model=str(tiny_checkpoint), threshold=1.5, device='cpu', batch_size=2).build()
    with pytest.raises(CellRCNNError, match='NMS IoU threshold must be above 0 and at most 1, not 0'):
        DetectorSpec(model=str(tiny_checkpoint), nms=0, device='cpu', batch_size=2).build()
