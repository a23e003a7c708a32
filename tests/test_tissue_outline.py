"""The tissue outline annotation: the analysed tissue and the marks left out, as polygons that give the mask back; and
the same pieces as QuPath annotations in the GeoJSON export."""

import json

import cv2
import numpy as np
import pytest

from cellrcnn.exports import write_geojson
from cellrcnn.labels import read_qupath
from cellrcnn.region import polygon_pixels, qupath_polygons
from cellrcnn.tissue import TissueMask
from cellrcnn.tissue_outline import (
    MARKS_COLOR,
    MARKS_LABEL,
    TISSUE_COLOR,
    TISSUE_LABEL,
    TISSUE_NAME,
    qupath_regions,
    tissue_outline_annotation,
)

FX = FY = 8.0  # analysis pixels per mask pixel
MPP = 0.5


def ring_and_blob():
    """A 60 x 80 mask: a square ring (a piece with a hole) and a round blob apart from it."""
    mask = np.zeros((60, 80), bool)
    mask[5:45, 5:45] = True
    mask[15:35, 15:35] = False
    yy, xx = np.mgrid[0:60, 0:80]
    mask |= (xx - 62) ** 2 + (yy - 40) ** 2 <= 10 ** 2
    return mask


def raster(elements, label, shape, scale=1.0):
    """The mask pixels the elements of ``label`` cover (their holes left out), drawn back at mask resolution."""
    out = np.zeros(shape, np.uint8)
    for e in elements:
        if e['label']['value'] != label:
            continue
        to_mask = np.array([FX * scale, FY * scale])

        def pixels(ring):
            return [np.round(np.array(ring)[:, :2] / to_mask - 0.5).astype(np.int32)]
        cv2.fillPoly(out, pixels(e['points']), 1)
        for hole in e.get('holes', ()):
            cv2.fillPoly(out, pixels(hole), 0)
            cv2.polylines(out, pixels(hole), True, 1)  # a hole's ring runs through tissue pixels' centres
    return out.astype(bool)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_each_piece_is_one_polygon_and_its_hole_a_hole():
    mask = ring_and_blob()
    doc = tissue_outline_annotation(TissueMask(mask, FX, FY, MPP), (0, 0, 80 * FX, 60 * FY), 2.0,
                                    attributes={'model': 'm.pt', 'cellrcnn': '1'})
    assert doc['name'] == TISSUE_NAME and doc['display'] == {'visible': False}
    assert [len(e.get('holes', [])) for e in doc['elements']] in ([1, 0], [0, 1])
    assert all(e['closed'] and e['lineColor'] == TISSUE_COLOR and 'fillColor' not in e for e in doc['elements'])
    # the polygons (in base pixels: twice the analysis pixels) give the mask back
    assert iou(raster(doc['elements'], TISSUE_LABEL, mask.shape, scale=2.0), mask) > 0.97
    info = doc['attributes'].pop('density')
    assert doc['attributes'] == {'model': 'm.pt', 'cellrcnn': '1'}
    area = mask.sum() * FX * FY * (MPP / 1000) ** 2
    assert info == {'kind': 'tissue outline', 'tissue_mm2': pytest.approx(area, abs=1e-4), 'ink_or_fill_mm2': 0.0,
                    'out_of_focus_mm2': 0.0, 'tissue_pieces': 2, 'mark_pieces': 0, 'out_of_focus_pieces': 0}
    assert doc['description'] == f'{area:.2f} mm² of tissue analysed in 2 piece(s)'


def test_marks_are_outlined_apart_and_filled():
    mask = ring_and_blob()
    marks = np.zeros_like(mask)
    marks[50:60, :] = True  # a band of fill along the bottom, not tissue
    mask = mask & ~marks
    tissue = TissueMask(mask, FX, FY, MPP, marks)
    doc = tissue_outline_annotation(tissue, (0, 0, 80 * FX, 60 * FY), 1.0)
    (band,) = [e for e in doc['elements'] if e['label']['value'] == MARKS_LABEL]
    assert band['lineColor'] == MARKS_COLOR and band['fillColor'].startswith('rgba(255,0,255,')
    assert iou(raster(doc['elements'], MARKS_LABEL, mask.shape), marks) > 0.97
    assert iou(raster(doc['elements'], TISSUE_LABEL, mask.shape), mask) > 0.97
    info = doc['attributes']['density']
    assert info['mark_pieces'] == 1 and info['ink_or_fill_mm2'] == pytest.approx(
        marks.sum() * FX * FY * (MPP / 1000) ** 2, abs=1e-4)
    assert doc['description'].endswith(f'; {info["ink_or_fill_mm2"]:.2f} mm² of pen ink or black fill left out '
                                       '(magenta)')


def test_a_region_cuts_the_outlines():
    mask = ring_and_blob()
    bounds = (100, 60, 520, 300)  # analysis pixels: through the ring and the blob
    doc = tissue_outline_annotation(TissueMask(mask, FX, FY, MPP), bounds, 1.0)
    points = np.array([p for e in doc['elements'] for ring in [e['points'], *e.get('holes', [])] for p in ring])
    assert points[:, 0].min() >= 100 and points[:, 0].max() <= 520
    assert points[:, 1].min() >= 60 and points[:, 1].max() <= 300
    assert points[:, 0].max() > 520 - FX  # the blob reaches past the region's right edge: cut there
    assert doc['attributes']['density']['tissue_mm2'] == pytest.approx(
        TissueMask(mask, FX, FY, MPP).area_mm2(bounds), abs=1e-4)


def test_no_tissue_is_an_empty_outline():
    doc = tissue_outline_annotation(TissueMask(np.zeros((10, 10), bool), FX, FY, MPP), (0, 0, 80, 80), 1.0)
    assert doc['elements'] == [] and doc['description'] == 'no tissue found'
    assert doc['attributes']['density']['tissue_pieces'] == 0


def test_the_geojson_holds_the_same_pieces_as_locked_annotations_that_are_never_nuclei(tmp_path):
    mask = ring_and_blob()
    marks = np.zeros_like(mask)
    marks[50:60, :] = True
    tissue = TissueMask(mask & ~marks, FX, FY, MPP, marks)
    bounds = (0, 0, 80 * FX, 60 * FY)
    doc = tissue_outline_annotation(tissue, bounds, 2.0)
    features = qupath_regions(tissue, bounds, 2.0)
    assert len(features) == len(doc['elements']) == 3
    for found, element in zip(features, doc['elements']):
        outline, *holes = found['geometry']['coordinates']
        assert outline[-1] == outline[0] and outline[:-1] == [p[:2] for p in element['points']]
        assert [h[:-1] for h in holes] == [[p[:2] for p in h] for h in element.get('holes', [])]
        properties = found['properties']
        assert properties['objectType'] == 'annotation' and properties['isLocked'] is True
        assert properties['name'] == element['label']['value']
        assert properties['classification']['name'] == {TISSUE_LABEL: 'Region*', MARKS_LABEL: 'Ignore*'}[
            properties['name']]
    # written before the detections; the tissue reads back by its name as a region, its hole cut out ...
    path = tmp_path / 'slide.geojson'
    write_geojson(path, [[100, 100, 120, 116]], [0.9], annotations=features)
    kinds = [f['properties']['objectType'] for f in json.loads(path.read_text())['features']]
    assert kinds == ['annotation'] * 3 + ['detection']
    back = polygon_pixels(qupath_polygons(str(path), TISSUE_LABEL), mask.shape, FX, FY, 2.0)
    assert iou(back, tissue.mask) > 0.95
    # ... and as labels it is never a nucleus, beside detections or without any
    cv2.imwrite(str(tmp_path / 'slide.png'), np.zeros((960, 1280, 3), np.uint8))
    np.testing.assert_array_equal(read_qupath(str(path), str(tmp_path / 'slide.png'), mpp=0.25).boxes,
                                  [[100, 100, 120, 116]])
    write_geojson(path, np.zeros((0, 4)), [], annotations=features)
    assert json.loads(path.read_text())['features'] == features
    assert len(read_qupath(str(path), str(tmp_path / 'slide.png'), mpp=0.25)) == 0
