"""A run's region: a rectangle or polygons (HistomicsTK's form), the tissue cut to them, only nuclei inside kept."""

import json
import shutil

import cv2
import numpy as np
import pytest
from scipy.spatial import cKDTree

from cellrcnn.__main__ import main
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.errors import CellRCNNError
from cellrcnn.exports import REGION_BGR
from cellrcnn.inference import DetectorSpec
from cellrcnn.region import (
    annotation_region,
    cut_free_edges,
    element_polygon,
    imagescope_polygons,
    inside,
    keyhole,
    polygon_pixels,
    region_settings,
)
from cellrcnn.settings import DetectionSettings
from cellrcnn.slide import Slide
from cellrcnn.slide_detection import detect_slide

QUAD = [100, 100, 700, 150, 600, 600, 150, 500]  # a quadrilateral, base pixels
HOLE = [250, 250, 450, 260, 400, 420, 260, 380]  # a hole inside it
#: the quadrilateral less the hole, as one polygon (cellrcnn.region.keyhole): HistomicsTK's form carries it
QUAD_LESS_HOLE = QUAD + QUAD[:2] + HOLE + HOLE[:2]


@pytest.mark.parametrize('values,expected', [
    ([-1, -1, -1, -1], {'roi': None, 'polygons': None}),
    (['10', '20', '30', '40'], {'roi': (10, 20, 30, 40), 'polygons': None}),
    ([50, 60, 0, 10, 20, 0], {'roi': (40, 40, 20, 40), 'polygons': None}),  # centre and half sides
    (QUAD, {'roi': (100, 100, 600, 500), 'polygons': (((100, 100), (700, 150), (600, 600), (150, 500)),)}),
    ([0, 0, 10, 0, 10, 10, 0, 10, -1, -1, 20, 20, 30, 20, 30, 30, 20, 30],
     {'roi': (0, 0, 30, 30), 'polygons': (((0, 0), (10, 0), (10, 10), (0, 10)), ((20, 20), (30, 20), (30, 30),
                                                                                (20, 30)))}),
])
def test_a_region_is_a_rectangle_or_polygons(values, expected):
    assert region_settings(values) == expected


@pytest.mark.parametrize('values,message', [
    ([1, 2, 3], 'got 3 numbers'),
    ([1, 2, 'x', 4], 'not 1,2,x,4'),
    ([0, 0, float('inf'), 4], 'must be finite'),
    ([0, 0, 10, 10, 20, 20, 30, 30], 'encloses no area'),
    ([5, 5, 5, 5, 5, 5, 5, 5], 'at least three distinct points'),
    ([100, 100, 0, 0, 50, 0], 'half sides above 0, not 0 and 50'),  # a rectangle without width
])
def test_what_is_no_region_is_one_line(values, message):
    with pytest.raises(CellRCNNError, match=message):
        region_settings(values)


def test_the_areas_an_annotation_outlines_are_its_region():
    # HistomicsUI's shapes: a rectangle turned a quarter turn, an ellipse, a circle, a closed polygon
    rectangle = {'type': 'rectangle', 'center': [100, 50, 0], 'width': 40, 'height': 20, 'rotation': np.pi / 2}
    assert np.allclose(sorted(map(tuple, element_polygon(rectangle, 'x').round(6))),
                       [(90, 30), (90, 70), (110, 30), (110, 70)])
    ellipse = element_polygon({'type': 'ellipse', 'center': [0, 0, 0], 'width': 40, 'height': 20}, 'x')
    assert np.allclose(ellipse.min(axis=0), [-20, -10]) and np.allclose(ellipse.max(axis=0), [20, 10], atol=0.1)
    circle = element_polygon({'type': 'circle', 'center': [10, 10, 0], 'radius': 5}, 'x')
    assert np.allclose(np.hypot(*(circle - 10).T), 5)
    docs = [{'annotation': {'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [10, 0, 0], [10, 10, 0]]},
        {'type': 'point', 'center': [500, 500, 0]},  # a note: left out
        {'type': 'polyline', 'closed': False, 'points': [[0, 0, 0], [900, 900, 0]]}]}},
        {'name': 'tumour', 'elements': [rectangle]}]
    region = annotation_region(docs, 'tumour')
    assert region['roi'] == pytest.approx((0, 0, 110, 70))
    assert region['polygons'][0] == ((0, 0), (10, 0), (10, 10)) and len(region['polygons']) == 2
    assert region_settings([v for p in region['polygons'] for xy in (*p, (-1, -1)) for v in xy][:-2]) == region


def pairs(values):
    return np.array(values, np.float64).reshape(-1, 2)


def test_a_polygons_holes_are_cut_out_of_its_area():
    """HistomicsUI's holes (and QuPath's interior rings) are one polygon with its holes joined to its first point by
    cuts walked out and back: inside it by the even-odd rule is the area less the holes, for the mask's pixels and
    for points alike; drawing it leaves the cuts out."""
    second = [500, 300, 560, 300, 560, 360]
    element = {'type': 'polyline', 'closed': True, 'points': [[x, y, 0] for x, y in pairs(QUAD)],
               'holes': [[[x, y, 0] for x, y in pairs(h)] for h in (HOLE, second)]}
    polygon = element_polygon(element, 'x')
    np.testing.assert_array_equal(polygon, pairs(QUAD + QUAD[:2] + HOLE + HOLE[:2] + QUAD[:2] + second + second[:2]))
    np.testing.assert_array_equal(keyhole(pairs(QUAD), []), pairs(QUAD))  # without holes: the outline as it is
    region = annotation_region([{'elements': [element]}], 'x')
    assert region_settings([v for xy in region['polygons'][0] for v in xy]) == region  # the task's numbers carry it
    # the mask of squares of 4.012 base pixels (no centre on an edge): the quadrilateral's pixels less the holes'
    pixels = polygon_pixels(region['polygons'], (200, 200), 4, 4, 1.003)
    alone = [polygon_pixels([pairs(ring)], (200, 200), 4, 4, 1.003) for ring in (QUAD, HOLE, second)]
    np.testing.assert_array_equal(pixels, alone[0] & ~alone[1] & ~alone[2])
    assert alone[1].sum() > 1000 and alone[2].sum() > 100
    points = np.random.default_rng(0).uniform(0, 800, (5000, 2))
    expected = inside([pairs(QUAD)], *points.T) & ~inside([pairs(HOLE), pairs(second)], *points.T)
    np.testing.assert_array_equal(inside(region['polygons'], *points.T), expected)
    # drawn: the outline and the holes' outlines, each edge once, no cut
    edges = {tuple(map(tuple, e)) for e in cut_free_edges(polygon)}
    rings = [pairs(r) for r in (QUAD, HOLE, second)]
    assert edges == {(tuple(a), tuple(b)) for r in rings for a, b in zip(r, np.roll(r, -1, axis=0))}


def test_imagescope_negative_regions_are_cut_out(tmp_path):
    """ImageScope's negative regions of the area's layer (whatever their text) or named like it are cut out of it
    (one polygon with a hole); where one reaches past the area only the part inside counts. Another layer's negative
    region of another name is not."""
    def region(rid, points, negative=False, text=''):
        vertices = ''.join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in pairs(points))
        flag = ' NegativeROA="1"' if negative else ''
        return f'<Region Id="{rid}" Type="0" Text="{text}"{flag}><Vertices>{vertices}</Vertices></Region>'
    path = tmp_path / 'scan.xml'
    path.write_text(f'<Annotations><Annotation Id="1" Name="tumour"><Regions>{region(1, QUAD)}'
                    f'{region(2, HOLE, True, text="necrosis")}</Regions></Annotation>'
                    f'<Annotation Id="2" Name="other"><Regions>{region(4, [120, 400, 200, 400, 200, 480], True)}'
                    f'{region(3, [600, 100, 800, 100, 800, 200, 600, 200], True, text="tumour")}</Regions></Annotation>'
                    '</Annotations>')
    (polygon,) = imagescope_polygons(str(path), 'tumour')
    points = np.random.default_rng(1).uniform(0, 800, (5000, 2))
    expected = (inside([pairs(QUAD)], *points.T) & ~inside([pairs(HOLE)], *points.T)
                & ~((points[:, 0] > 600) & (points[:, 1] < 200)))
    assert (inside([polygon], *points.T) == expected).mean() > 0.999  # (points on the edges aside)


@pytest.mark.parametrize('elements,message', [
    ([{'type': 'point', 'center': [1, 2, 0]}], "annotation 'tumour' on a.svs outlines no area"),
    ([{'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [5, 5, 0], [10, 10, 0]]}], 'encloses no area'),
    ([{'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [9, 0, 0], [9, 9, 0]], 'holes': [[[1, 1, 0]]]}],
     'not this \'polyline\' element'),
    ([{'type': 'rectangle', 'center': [1, 2, 0]}], 'not this \'rectangle\' element'),
])
def test_an_annotation_that_outlines_no_area_is_one_line(elements, message):
    with pytest.raises(CellRCNNError, match=message):
        annotation_region([{'name': 'tumour', 'elements': elements}], "annotation 'tumour' on a.svs")


def test_polygons_need_their_box():
    with pytest.raises(CellRCNNError, match='polygons need their bounding box'):
        DetectionSettings(polygons=(((0, 0), (5, 0), (5, 5)),)).validate()
    # the identity of a run without polygons is what it was before they existed
    assert 'polygons' not in DetectionSettings(roi=(0, 0, 5, 5)).identity()
    assert DetectionSettings(**region_settings(QUAD)).identity()['polygons'] == region_settings(QUAD)['polygons']


def test_the_mask_pixels_of_a_polygon_are_those_whose_centre_is_inside():
    polygons = region_settings(QUAD + [-1, -1, 750, 50, 850, 50, 800, 120])['polygons']
    fx, fy, scale = 8.0, 6.0, 1.5
    pixels = polygon_pixels(polygons, (80, 80), fx, fy, scale)
    rows, cols = np.mgrid[0:80, 0:80]
    centres = inside(polygons, ((cols + 0.5) * fx * scale).ravel(), ((rows + 0.5) * fy * scale).ravel())
    assert pixels.sum() > 100 and (pixels.ravel() != centres).mean() < 0.01  # only pixels the edge runs through


@pytest.fixture(scope='module')
def slide_path(synthetic_slide):
    return synthetic_slide(900, 700, seed=11)[0]


@pytest.mark.parametrize('values', [QUAD, QUAD_LESS_HOLE])
def test_a_polygon_run_keeps_the_box_runs_nuclei_inside_and_its_tissue(slide_path, tiny_checkpoint, values):
    slide = Slide(slide_path)
    detector = DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, nms=0.3, device='cpu', batch_size=3).build()
    region = region_settings(values)
    run = dict(tile_size=256, overlap=32, min_tissue=0.0, workers=2)
    box = detect_slide(slide, detector, roi=region['roi'], **run)
    cut = detect_slide(slide, detector, **region, **run)
    b = box.boxes
    within = inside(region['polygons'], (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
    assert 0 < within.sum() < len(box.boxes)
    in_hole = inside([pairs(HOLE)], (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
    assert in_hole.any() and (within & in_hole).any() == (values == QUAD)
    np.testing.assert_array_equal(cut.boxes, box.boxes[within])
    np.testing.assert_array_equal(cut.scores, box.scores[within])
    # the tissue is the box run's, cut to the polygon: its area and the outline follow
    t = box.tissue
    expected = t.mask & polygon_pixels(region['polygons'], t.mask.shape, t.fx, t.fy, slide.scale)
    np.testing.assert_array_equal(cut.tissue.mask, expected)
    assert 0 < cut.stats['tissue_mm2'] < box.stats['tissue_mm2']
    # (within the mask pixels the box's edge cuts)
    assert cut.stats['tissue_mm2'] == pytest.approx(t.area_mm2((0, 0, *slide.size), expected), rel=1e-3)


def test_cellrcnn_detect_takes_polygons(slide_path, tiny_checkpoint, tmp_path):
    assert main(['detect', str(slide_path), '-o', str(tmp_path), '--model', str(tiny_checkpoint), '--roi',
                 ','.join(map(str, QUAD)), '--tile-size', '256', '--progress', 'none', '--no-resume']) == 0
    doc = json.loads((tmp_path / 'slide.anot.json').read_text())
    params = doc['attributes']['params']
    assert params['roi'] == [100, 100, 600, 500] and params['polygons'] == [[[100, 100], [700, 150], [600, 600],
                                                                            [150, 500]]]
    centres = np.array([e['center'][:2] for e in doc['elements']])
    assert len(centres) and inside(region_settings(QUAD)['polygons'], centres[:, 0], centres[:, 1]).all()
    outline = json.loads((tmp_path / 'slide.tissue.anot.json').read_text())
    points = np.array([p[:2] for e in outline['elements'] for p in e['points']])
    assert len(points) and (points.min(axis=0) >= 100).all() and (points.max(axis=0) <= [700, 600]).all()
    # the overview shows the box the tiles cover, with the polygon drawn on it
    overview = cv2.imread(str(tmp_path / 'slide.overlay.png'))
    assert overview.shape[:2] == (500, 600) and (overview == REGION_BGR).all(axis=2).sum() > 1000


def test_an_area_with_a_hole_is_drawn_without_its_cut(slide_path, tiny_checkpoint, tmp_path):
    assert main(['detect', str(slide_path), '-o', str(tmp_path), '--model', str(tiny_checkpoint), '--roi',
                 ','.join(map(str, QUAD_LESS_HOLE)), '--tile-size', '256', '--progress', 'none', '--no-resume']) == 0
    params = json.loads((tmp_path / 'slide.anot.json').read_text())['attributes']['params']
    assert params['polygons'] == [pairs(QUAD_LESS_HOLE).tolist()]
    blue = (cv2.imread(str(tmp_path / 'slide.overlay.png')) == REGION_BGR).all(axis=2)  # the overview from 100, 100

    def drawn(x, y):  # near the base pixel x, y
        return blue[y - 102:y - 97, x - 102:x - 97].any()
    assert drawn(350, 255) and drawn(425, 340)  # the hole's edges
    assert not drawn(175, 175) and not drawn(220, 220)  # the cut from the outline's first point to the hole's


def test_cellrcnn_detect_takes_the_region_drawn_beside_the_slide(slide_path, tiny_checkpoint, tmp_path, capsys):
    # QuPath's export beside a copy of the slide: the polygon classified 'tumour' is --roi QUAD
    shutil.copy(slide_path, tmp_path / 'scan.tiff')
    ring = [QUAD[i:i + 2] for i in range(0, len(QUAD), 2)]
    (tmp_path / 'scan.geojson').write_text(json.dumps({'type': 'Feature', 'properties': {
        'objectType': 'annotation', 'classification': {'name': 'tumour'}},
        'geometry': {'type': 'Polygon', 'coordinates': [ring + ring[:1]]}}))
    docs = {}
    for name, region in (('roi', ('--roi', ','.join(map(str, QUAD)))), ('drawn', ('--region-annotation', 'tumour'))):
        assert main(['detect', str(tmp_path / 'scan.tiff'), '-o', str(tmp_path / name), '--model',
                     str(tiny_checkpoint), *region, '--tile-size', '256', '--progress', 'none', '--no-resume']) == 0
        docs[name] = json.loads((tmp_path / name / 'scan.anot.json').read_text())
    params = docs['drawn']['attributes']['params']
    assert params.pop('region_annotation') == 'tumour' and params == docs['roi']['attributes']['params']
    assert docs['drawn']['elements'] == docs['roi']['elements'] and docs['roi']['elements']
    capsys.readouterr()
    for args, message in ((('--region-annotation', 'stroma'), "no annotation named 'stroma' in scan.geojson"),
                          (('--region-annotation', 'tumour', '--roi', '0,0,10,10'),
                           'give --roi or --region-annotation NAME, not both')):
        assert main(['detect', str(tmp_path / 'scan.tiff'), '-o', str(tmp_path / 'bad'), *args]) == 2
        assert capsys.readouterr().err.strip() == f'cellrcnn: error: {message}'


def test_a_regions_nuclei_are_the_whole_slides_there():
    # The bundled model on the sample. A region is read in the whole slide's tiles that reach into it, cut to it
    # grown by the overlap, on their own phase: each nucleus inside sees what it sees in the slide's run. Before, a
    # region had a grid of its own, and --roi 600,400,1200,1500 found 1121 nuclei where the slide's run finds 1180.
    slide = Slide(SAMPLE_SLIDE)
    detector = DetectorSpec(device='cpu', batch_size=2).build()
    run = dict(tile_size=1024, overlap=64, min_tissue=0.05, workers=2)
    whole = detect_slide(slide, detector, **run)
    b = whole.boxes
    x, y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    for region in ([600, 400, 1200, 1500], [600, 400, 1800, 700, 1500, 1900, 700, 1500]):
        settings = region_settings(region)
        part = detect_slide(slide, detector, **settings, **run)
        roi = settings['roi']
        there = (x >= roi[0]) & (x < roi[0] + roi[2]) & (y >= roi[1]) & (y < roi[1] + roi[3])
        if settings['polygons']:
            there &= inside(settings['polygons'], x, y)
        distance, _ = cKDTree(b[there]).query(part.boxes, p=np.inf)
        same = int((distance <= 0.05).sum())  # the same box, to a twentieth of a pixel
        assert there.sum() > 500 and same >= 0.98 * max(there.sum(), len(part.boxes)), \
            (region, same, there.sum(), len(part.boxes))
