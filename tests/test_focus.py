"""Tissue out of focus (``cellrcnn.focus``): measured on the real sample slide, sharp and blurred on purpose, and
carried through the detection loop (local, resumed and on Dask), the tissue outline annotation, the overview and the
run's summary."""

import dataclasses
import types

import numpy as np
import pytest

from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.exports import BLURRED_BGR, detection_summary_lines, write_overlay
from cellrcnn.focus import BLUR_LIMIT, NO_PATCHES, mark_blurred, patch_blur
from cellrcnn.inference import DetectorSpec
from cellrcnn.resume import RowStore
from cellrcnn.settings import DetectionSettings
from cellrcnn.slide import Slide
from cellrcnn.slide_detection import detect_slide
from cellrcnn.tissue import find_tissue
from cellrcnn.tissue_outline import BLURRED_LABEL, qupath_regions, tissue_outline_annotation
from support import blur_right_half

#: the Gaussian (um) the right half of the sample is blurred by: the model loses a third of its nuclei at 1.5 um
#: (benchmarks/focus_blur.py)
SIGMA_UM = 1.5
KW = dict(tile_size=512, overlap=48, min_tissue=0.0, workers=2)
#: how far left of the blurred half (base px) blur may be found: a patch (128 px) that reaches into it, and the
#: tissue mask pixel (8 px) it touches
MARGIN = 128 + 32


def sample_20x(x, y, size):
    """RGB of the sample slide (20x, 0.499 um/px) from base pixel (x, y), ``size`` square."""
    import large_image

    region, _ = large_image.open(SAMPLE_SLIDE).getRegion(
        region={'left': x, 'top': y, 'width': size, 'height': size}, format=large_image.constants.TILE_FORMAT_NUMPY)
    return np.ascontiguousarray(region[..., :3])


@pytest.fixture(scope='module')
def half_blurred(tmp_path_factory):
    """The sample slide with its right half blurred by SIGMA_UM, and the same slide left sharp (both tiled JPEG
    pyramids at 0.5 um/px)."""
    folder = tmp_path_factory.mktemp('focus')
    return (str(blur_right_half(SAMPLE_SLIDE, folder / 'half-blurred.tiff', SIGMA_UM)),
            str(blur_right_half(SAMPLE_SLIDE, folder / 'sharp.tiff', 0)))


@pytest.fixture(scope='module')
def spec(tiny_checkpoint):
    return DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, nms=0.3, device='cpu', batch_size=2)


def test_sharp_tissue_is_judged_sharp_and_the_same_tissue_blurred_is_not():
    import cv2
    from skimage.measure import blur_effect

    sharp = sample_20x(768, 1792, 1024)  # dermis with cells: every patch has stain enough
    mpp = Slide(SAMPLE_SLIDE).mpp
    found = patch_blur(sharp, 100, 200, mpp)
    blurred = patch_blur(cv2.GaussianBlur(sharp, (0, 0), SIGMA_UM / mpp), 100, 200, mpp)
    assert found.dtype == np.float32 and found.shape == (64, 5)  # 8 x 8 patches of 128 px (64 um)
    assert (found[:, 4] <= BLUR_LIMIT).all() and (blurred[:, 4] > BLUR_LIMIT).all()
    np.testing.assert_array_equal(found[:, :4], blurred[:, :4])
    # the measure is scikit-image's blur_effect, patch by patch, but for the pixels at a patch's edge (which see its
    # neighbours, not their own mirror image)
    for image, patches in ((sharp, found), (cv2.GaussianBlur(sharp, (0, 0), SIGMA_UM / mpp), blurred)):
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        alone = [blur_effect(grey[int(y0) - 200:int(y1) - 200, int(x0) - 100:int(x1) - 100])
                 for x0, y0, x1, y1, _ in patches]
        np.testing.assert_allclose(patches[:, 4], alone, rtol=0, atol=0.04)
    assert found[0, :4].tolist() == [100, 200, 228, 328] and found[-1, :4].tolist() == [996, 1096, 1124, 1224]


def test_glass_and_other_scales_are_not_judged():
    mpp = Slide(SAMPLE_SLIDE).mpp
    glass = np.full((512, 512, 3), 240, np.uint8)
    assert patch_blur(glass, 0, 0, mpp).shape == (0, 5)
    tissue = sample_20x(868, 1892, 300)  # 2 x 2 patches: the last 44 px join the patch before them
    assert patch_blur(tissue, 0, 0, mpp)[:, :4].tolist() == [[0, 0, 128, 128], [128, 0, 300, 128],
                                                            [0, 128, 128, 300], [128, 128, 300, 300]]
    assert len(patch_blur(tissue, 0, 0, 1.0)) == len(patch_blur(tissue, 0, 0, 0.19)) == 0  # 10x, 53x: no limit


def test_finer_scales_are_judged_on_tiles_reduced_to_20x():
    import cv2

    mpp = Slide(SAMPLE_SLIDE).mpp
    sharp = sample_20x(768, 1792, 1024)
    blurred = cv2.GaussianBlur(sharp, (0, 0), SIGMA_UM / mpp)
    for image in (sharp, blurred):
        at_20x = patch_blur(image, 100, 200, mpp)
        # the same tissue at 40x (here enlarged from 20x): the same patches, in 40x pixels (reduced to 0.5 um/px,
        # not 0.499: 1022 px, not 1024), and the same blur
        at_40x = patch_blur(cv2.resize(image, (2048, 2048), interpolation=cv2.INTER_CUBIC), 200, 400, mpp / 2)
        np.testing.assert_allclose(at_40x[:, :4], 2 * at_20x[:, :4], rtol=0.005)
        np.testing.assert_allclose(at_40x[:, 4], at_20x[:, 4], rtol=0, atol=0.03)
    assert (at_40x[:, 4] > BLUR_LIMIT).all()


def test_the_sharpest_view_of_the_tissue_decides():
    tissue = find_tissue(Slide(SAMPLE_SLIDE))
    kept = mark_blurred(tissue, np.array([[0, 0, 1024, 1024, 0.7],  # one tile calls it blurred
                                          [0, 0, 512, 512, 0.3]], np.float32))  # another sees its top left sharp
    x, y = np.meshgrid(np.arange(0, 2048, 64) + 32, np.arange(0, 2048, 64) + 32)
    blurred = tissue.grid(kept.blurred, x[0], y[:, 0])
    on_tissue = tissue.grid(tissue.mask, x[0], y[:, 0])
    inside = (x < 1024) & (y < 1024) & ~((x < 512) & (y < 512))
    np.testing.assert_array_equal(blurred, inside & on_tissue)
    assert 0 < kept.blurred_mm2((0, 0, 2220, 2967)) < tissue.area_mm2((0, 0, 2220, 2967))
    assert tissue.with_blurred(np.zeros_like(tissue.mask)).blurred is None
    assert mark_blurred(tissue, NO_PATCHES).blurred is None


@pytest.fixture(scope='module')
def runs(half_blurred, spec):
    """The sample half blurred and sharp, each detected by the tiny model."""
    blurred, sharp = (detect_slide(Slide(path), spec.build(), **KW) for path in half_blurred)
    return blurred, sharp


def test_a_run_finds_the_blurred_half_of_the_tissue_and_nothing_of_the_sharp_one(runs):
    blurred, sharp = runs
    tissue = blurred.tissue
    width, height = blurred.slide.size
    half = (width // 2, 0, width, height)
    right_mm2 = tissue.area_mm2(half)
    assert sharp.stats['out_of_focus_mm2'] == 0 and sharp.tissue.blurred is None
    # the right half's tissue, give or take the patches that straddle the middle, less its edges, whose patches are
    # mostly glass and not judged
    assert 0.85 * right_mm2 < blurred.stats['out_of_focus_mm2'] < 1.05 * right_mm2
    assert tissue.blurred_mm2((0, 0, width // 2 - MARGIN, height)) == 0
    assert blurred.stats['tissue_mm2'] == pytest.approx(sharp.stats['tissue_mm2'], rel=0.02)
    # the nuclei centred on it: most of those on the right half's tissue, none of the left's
    x, y = (blurred.boxes[:, :2] + blurred.boxes[:, 2:]).T / (2 * blurred.slide.scale)
    on_tissue = dataclasses.replace(tissue, blurred=tissue.mask)
    count, total = blurred.stats['detections_out_of_focus'], len(blurred.boxes)
    right, middle = x >= width // 2, x >= width // 2 - MARGIN
    on_right, near_right = (on_tissue.on_blurred(x[k], y[k]).sum() for k in (right, middle))
    assert 0.8 * on_right < count <= near_right
    assert sharp.stats['detections_out_of_focus'] == 0
    share = 100 * blurred.stats['out_of_focus_mm2'] / blurred.stats['tissue_mm2']
    typed = ' or mistyped' if blurred.cell_type_names else ''
    assert detection_summary_lines(blurred)[-1] == (
        f"{blurred.stats['out_of_focus_mm2']:.2f} mm2 of the tissue ({share:.0f} %) looks out of focus (cyan in the "
        f'overview and the tissue annotation): nuclei there may be missed{typed}; {count} of the {total} found '
        f'({100 * count / total:.0f} %) lie there')
    assert 'out of focus' not in ' '.join(detection_summary_lines(sharp))


def test_the_tissue_annotation_and_the_overview_show_the_blurred_tissue(runs, tmp_path):
    import cv2

    blurred, sharp = runs
    doc = tissue_outline_annotation(blurred.tissue, blurred.analysis_bounds, blurred.slide.scale,
                                    stats=blurred.stats)
    pieces = [e for e in doc['elements'] if e['label']['value'] == BLURRED_LABEL]
    assert pieces and min(p[0] for e in pieces for p in e['points']) >= blurred.slide.size[0] // 2 - MARGIN
    info = doc['attributes']['density']
    assert info['out_of_focus_mm2'] == round(blurred.stats['out_of_focus_mm2'], 4)
    assert info['out_of_focus_pieces'] == len(pieces)
    count = blurred.stats['detections_out_of_focus']
    assert count > 0 and info['cells_out_of_focus'] == count
    typed = ' or mistyped' if blurred.cell_type_names else ''
    assert doc['description'].endswith(
        f"; {info['out_of_focus_mm2']:.2f} mm² of it out of focus (cyan): nuclei there may be missed{typed}; {count} "
        f'of the {len(blurred.boxes)} found ({100 * count / len(blurred.boxes):.0f} %) lie there')
    regions = qupath_regions(blurred.tissue, blurred.analysis_bounds, blurred.slide.scale)
    assert sum(r['properties']['classification']['name'] == 'Out of focus*' for r in regions) == len(pieces)
    plain = tissue_outline_annotation(sharp.tissue, sharp.analysis_bounds, sharp.slide.scale, stats=sharp.stats)
    assert plain['attributes']['density']['out_of_focus_pieces'] == 0 and 'focus' not in plain['description']
    assert plain['attributes']['density']['cells_out_of_focus'] == 0
    for result, name in ((blurred, 'blurred.png'), (sharp, 'sharp.png')):
        write_overlay(result, tmp_path / name)
    cyan = [np.all(cv2.imread(str(tmp_path / name)) == BLURRED_BGR, axis=2) for name in ('blurred.png', 'sharp.png')]
    assert cyan[0].sum() > 1000 and not cyan[0][:, :cyan[0].shape[1] // 2 - 120].any() and not cyan[1].any()


def test_a_run_at_40x_finds_the_blurred_half_and_nothing_of_the_sharp_copy(half_blurred, spec):
    roi = (610, 800, 1000, 1000)  # base pixels: dermis across the middle, half sharp, half blurred
    blurred, sharp = (detect_slide(Slide(path, magnification=40, allow_upsample=True), spec.build(), roi=roi, **KW)
                      for path in half_blurred)
    assert blurred.slide.mpp < 0.3 and blurred.slide.scale == 0.5
    x0, y0, x1, y1 = blurred.analysis_bounds
    middle = blurred.slide.size[0] // 2
    left, right = (x0, y0, middle - 2 * MARGIN, y1), (middle, y0, x1, y1)  # 40x: twice the margin
    assert blurred.tissue.blurred_mm2(left) == 0
    assert 0.85 * blurred.tissue.area_mm2(right) < blurred.tissue.blurred_mm2(right)
    assert blurred.stats['detections_out_of_focus'] > 0
    assert sharp.stats['out_of_focus_mm2'] == 0 and sharp.tissue.blurred is None


def test_leaving_the_tissue_out_of_focus_out_drops_its_nuclei_and_its_area(runs, half_blurred, spec):
    from cellrcnn.boxes import box_centres
    from cellrcnn.cohort import _row
    from cellrcnn.focus import out_of_focus_noted

    blurred, _ = runs
    left = detect_slide(Slide(half_blurred[0]), spec.build(), leave_out_of_focus=True, **KW)
    on = blurred.tissue.on_blurred(*(box_centres(blurred.boxes) / blurred.slide.scale).T)
    np.testing.assert_array_equal(left.boxes, blurred.boxes[~on])  # the same run, less the nuclei out of focus
    np.testing.assert_array_equal(left.scores, blurred.scores[~on])
    if blurred.cell_types is not None:
        np.testing.assert_array_equal(left.cell_types, blurred.cell_types[~on])
    st, before = left.stats, blurred.stats
    assert st['out_of_focus_left_out'] is True and before['out_of_focus_left_out'] is False
    assert st['detections_out_of_focus'] == before['detections_out_of_focus'] == on.sum() > 0
    assert st['detections'] == len(left.boxes) == len(blurred.boxes) - on.sum()
    assert st['out_of_focus_mm2'] == before['out_of_focus_mm2']
    assert st['tissue_mm2'] == pytest.approx(before['tissue_mm2'] - before['out_of_focus_mm2'], abs=1e-9)
    share = 100 * st['out_of_focus_mm2'] / before['tissue_mm2']
    assert detection_summary_lines(left)[-1] == (
        f"{st['out_of_focus_mm2']:.2f} mm2 of the tissue ({share:.0f} %) looks out of focus (cyan in the overview and "
        f"the tissue annotation) and is left out, with the {on.sum()} nuclei found there: the counts and densities "
        f"are of the {st['tissue_mm2']:.2f} mm2 in focus")
    # the tissue annotation outlines the tissue in focus in orange, and the rest in cyan, left out
    doc = tissue_outline_annotation(left.tissue, left.analysis_bounds, left.slide.scale, stats=st)
    info = doc['attributes']['density']
    assert info['tissue_mm2'] == round(st['tissue_mm2'], 4) and info['out_of_focus_left_out'] is True
    assert doc['description'].endswith(f"; {info['out_of_focus_mm2']:.2f} mm² more out of focus (cyan) and left out, "
                                       f"with the {on.sum()} nuclei found there")
    assert not (left.tissue.mask & left.tissue.blurred).any()
    # the cohort's row says so, and still finds it worth a word
    row = _row(types.SimpleNamespace(name='s', item_id=None, output='o'), left,
               DetectionSettings(leave_out_of_focus=True), 1.0)
    assert row['out_of_focus_left_out'] is True and row['cells_out_of_focus'] == on.sum() and out_of_focus_noted(row)


def test_a_resumed_run_and_a_dask_run_find_the_same_blurred_tissue(runs, half_blurred, spec, tmp_path):
    from test_resume import Interrupting

    blurred, _ = runs
    slide = Slide(half_blurred[0])
    with pytest.raises(KeyboardInterrupt):
        detect_slide(slide, Interrupting(spec.build(), 6), resume=RowStore(str(tmp_path), 'k'), **KW)
    resumed = detect_slide(slide, spec.build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    spread = detect_slide(slide, spec.build(), scheduler='local:1', **KW)
    assert resumed.stats['tile_rows_resumed'] >= 1
    for other in (resumed, spread):
        np.testing.assert_array_equal(other.tissue.blurred, blurred.tissue.blurred)
        assert other.stats['out_of_focus_mm2'] == blurred.stats['out_of_focus_mm2']
        assert other.stats['detections_out_of_focus'] == blurred.stats['detections_out_of_focus'] > 0
