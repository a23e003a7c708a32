"""cellrcnn.labels: each reader on a small real example cut at test time from the shared data (BRCA-M2C dots, DSB 2018
masks and boxes), written in tmp_path in the format under test, plus hand-made shapes where real examples do not
exist; scale estimation, rescaling, the ``--data`` entries, splits, and the one-line errors."""

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellrcnn import labels as L
from cellrcnn.errors import CellRCNNError


def _shared_data():
    """``<repo>/../shared/data`` (where CI has it), else $CELLRCNN_SHARED_DATA."""
    beside = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
    if beside.is_dir():
        return beside
    env = os.environ.get('CELLRCNN_SHARED_DATA')
    return Path(env) if env and Path(env).is_dir() else None


SHARED = _shared_data()
needs_data = pytest.mark.skipif(SHARED is None, reason='the shared labelled data (<repo>/../shared/data or '
                                                       '$CELLRCNN_SHARED_DATA) is not on this machine')


@pytest.fixture(scope='module')
def brca():
    """(images folder, points.json as loaded, name of one image with nuclei of all three classes)."""
    if SHARED is None:
        pytest.skip('no shared data')
    folder = SHARED / 'brca-m2c'
    points = json.loads((folder / 'points.json').read_text())
    name = next(n for n in sorted(points) if len({row[2] for row in points[n]}) == 3)
    return folder / 'images', points, name


@pytest.fixture(scope='module')
def dsb():
    """(images folder, masks folder, boxes.json as loaded)."""
    if SHARED is None:
        pytest.skip('no shared data')
    folder = SHARED / 'dsb2018-he'
    return folder / 'images', folder / 'masks', json.loads((folder / 'boxes.json').read_text())


def one_line_error(call, *fragments):
    with pytest.raises(CellRCNNError) as info:
        call()
    message = str(info.value)
    assert '\n' not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def assert_same_dots(record, rows):
    """The record holds exactly the dots ``rows`` ([x, y, class]) in some order, with no extent."""
    assert len(record) == len(rows)
    assert not record.has_extent.any() and np.isnan(record.boxes).all()
    got = sorted(zip(record.points[:, 0].tolist(), record.points[:, 1].tolist(), record.classes))
    assert got == sorted((float(x), float(y), c) for x, y, c in rows)


# --------------------------------------------------------------------------- dots: JSON and CSV

@needs_data
def test_points_json_reads_brca_m2c(brca):
    images, points, name = brca
    records = L.read_points_json(images.parent / 'points.json', images, mpp=0.5)
    assert [r.name for r in records] == list(points)
    # the dataset's README: 21 780 nuclei, lymphocyte 4 899, tumor_epithelial 10 689, stromal 6 192
    assert sum(len(r) for r in records) == 21_780
    assert Counter(c for r in records for c in r.classes) == {'lymphocyte': 4899, 'tumor_epithelial': 10689,
                                                              'stromal': 6192}
    record = records[list(points).index(name)]
    assert record.mpp == 0.5 and record.image == os.path.join(images, name)
    assert record.shape == cv2.imread(str(images / name)).shape[:2]
    np.testing.assert_array_equal(record.points, [row[:2] for row in points[name]])  # in the file's order
    assert list(record.classes) == [row[2] for row in points[name]]
    assert not record.has_extent.any()
    assert record.load().shape == record.shape + (3,)


@needs_data
def test_csv_per_image_and_with_an_image_column(brca, tmp_path):
    images, points, name = brca
    rows = points[name]
    stem = os.path.splitext(name)[0]
    with open(tmp_path / f'{stem}.csv', 'w', newline='') as f:  # columns in another order, names in capitals
        writer = csv.writer(f)
        writer.writerow(['Class', 'note', 'Y', 'X'])
        writer.writerows([c, 'n', y, x] for x, y, c in rows)
    [record] = L.read_csv(tmp_path / f'{stem}.csv', images)
    assert record.name == name and record.mpp is None
    assert_same_dots(record, rows)

    other = sorted(points)[0] if sorted(points)[0] != name else sorted(points)[1]
    with open(tmp_path / 'all.csv', 'w', newline='') as f:  # image names without their extension, no class column
        writer = csv.writer(f)
        writer.writerow(['image', 'x', 'y'])
        writer.writerows([os.path.splitext(n)[0], x, y] for n in (name, other) for x, y, _ in points[n])
    records = L.read_csv(tmp_path / 'all.csv', images, mpp='0.5')
    assert [r.name for r in records] == [name, other] and records[0].mpp == 0.5
    for record, n in zip(records, (name, other)):
        assert_same_dots(record, [(x, y, None) for x, y, _ in points[n]])


# --------------------------------------------------------------------------- masks and boxes

@needs_data
def test_masks_give_the_boxes_of_dsb_boxes_json(dsb):
    images, masks, boxes = dsb
    records = L.read_entry(f'masks:{masks}')  # images: the folder "images" beside masks/
    assert len(records) == len(boxes) == 107
    for record in records:
        # boxes.json holds the masks' tight boxes in pixel edges, in the order of the labels: the same convention
        np.testing.assert_array_equal(record.boxes, np.array(boxes[record.name], np.float32))
        assert record.has_extent.all() and record.classes == (None,) * len(record)
        np.testing.assert_allclose(record.points, (record.boxes[:, :2] + record.boxes[:, 2:]) / 2)


@needs_data
def test_masks_as_tiff_any_integer_type_and_sparse_values(dsb, tmp_path):
    images, masks, boxes = dsb
    name = sorted(boxes)[0]
    labels = cv2.imread(str(masks / name), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.max() < 256
    expected = np.array(boxes[name], np.float32)
    tifffile.imwrite(tmp_path / 'sixteen.tif', labels)
    # sparse, large values (a label image from another tool): order and boxes stay those of the values
    tifffile.imwrite(tmp_path / 'sparse.tiff', labels.astype(np.uint32) * 100_003)
    cv2.imwrite(str(tmp_path / 'eight.png'), labels.astype(np.uint8))  # under 256 nuclei here
    for file in ('sixteen.tif', 'sparse.tiff', 'eight.png'):
        record = L.read_mask(str(tmp_path / file), str(images / name))
        np.testing.assert_array_equal(record.boxes, expected)


@needs_data
def test_boxes_json(dsb, tmp_path):
    images, masks, boxes = dsb
    records = L.read_boxes_json(images.parent / 'boxes.json', images)
    assert [r.name for r in records] == list(boxes)
    for record in records:
        np.testing.assert_array_equal(record.boxes, np.array(boxes[record.name], np.float32))
    name = sorted(boxes)[1]
    rows = [box + [cls] for box, cls in zip(boxes[name], ['a', 'b'] * len(boxes[name]))]
    (tmp_path / 'classes.json').write_text(json.dumps({name: rows}))
    [record] = L.read_boxes_json(tmp_path / 'classes.json', images)
    assert list(record.classes) == [row[4] for row in rows]


def test_hand_made_mask_boxes_and_centres(tmp_path):
    image = np.full((12, 10, 3), 200, np.uint8)
    labels = np.zeros((12, 10), np.uint16)
    labels[2:5, 3:6] = 7          # rows 2..4, columns 3..5
    labels[8:12, 0:2] = 3         # at the image's corner
    cv2.imwrite(str(tmp_path / 'image.png'), image)
    cv2.imwrite(str(tmp_path / 'mask.png'), labels)
    record = L.read_mask(str(tmp_path / 'mask.png'), str(tmp_path / 'image.png'))
    # by value: 3 first; pixel edges: columns 3..5 -> x1 = 3, x2 = 6
    np.testing.assert_array_equal(record.boxes, [[0, 8, 2, 12], [3, 2, 6, 5]])
    np.testing.assert_array_equal(record.points, [[1, 10], [4.5, 3.5]])


# --------------------------------------------------------------------------- ImageScope XML

def imagescope_xml(layers, mpp=None):
    """ImageScope XML text: ``layers`` is [(layer name, [(region attributes, [(x, y), ...]), ...])]."""
    root = ET.Element('Annotations', {'MicronsPerPixel': str(mpp)} if mpp else {})
    for i, (layer_name, regions) in enumerate(layers):
        layer = ET.SubElement(root, 'Annotation', {'Id': str(i + 1), 'Name': layer_name, 'Type': '4'})
        ET.SubElement(ET.SubElement(layer, 'Attributes'), 'Attribute', {'Name': 'Description', 'Value': ''})
        container = ET.SubElement(layer, 'Regions')
        ET.SubElement(container, 'RegionAttributeHeaders')
        for j, (attributes, vertices) in enumerate(regions):
            region = ET.SubElement(container, 'Region', {'Id': str(j + 1), 'Type': '0', **attributes})
            ET.SubElement(region, 'Attributes')
            vs = ET.SubElement(region, 'Vertices')
            for x, y in vertices:
                ET.SubElement(vs, 'Vertex', {'X': str(x), 'Y': str(y), 'Z': '0'})
    return ET.tostring(root, encoding='unicode')


@needs_data
def test_imagescope_markers_from_brca(brca, tmp_path):
    images, points, name = brca
    rows = points[name]
    layers = [(cls, [({}, [(x, y)]) for x, y, c in rows if c == cls]) for cls in sorted({r[2] for r in rows})]
    path = tmp_path / f'{os.path.splitext(name)[0]}.xml'
    path.write_text(imagescope_xml(layers, mpp=0.5))
    record = L.read_imagescope(str(path), str(images / name))
    assert record.mpp == 0.5                               # the file's MicronsPerPixel
    assert_same_dots(record, rows)
    assert L.read_imagescope(str(path), str(images / name), mpp=0.25).mpp == 0.25   # the caller's word wins
    # a plain path: the format from its extension
    [same] = L.read_entry(f'{path},images={images}')
    assert_same_dots(same, rows)


def test_imagescope_shapes(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((100, 120, 3), np.uint8))
    layers = [('tumour', [
        ({'Type': '0'}, [(10, 10), (30, 12), (20, 40)]),                      # polygon
        ({'Type': '1', 'Text': 'stroma'}, [(50, 5), (60, 5), (60, 25), (50, 25)]),   # rectangle, its own class
        ({'Type': '2'}, [(70.5, 30), (90, 44)]),                              # ellipse: its box's corners
        ({'Type': '3'}, [(0, 0), (40, 40)]),                                  # arrow: skipped
        ({'Type': '0', 'NegativeROA': '1'}, [(1, 1), (5, 1), (5, 5)]),        # excluded region: skipped
        ({'Type': '5'}, [(100, 90)]),                                         # one vertex: a dot
    ]), ('', [({'Type': '1'}, [(0, 60), (10, 60), (10, 70), (0, 70)])])]     # no class anywhere
    (tmp_path / 'field.xml').write_text(imagescope_xml(layers))
    record = L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png'))
    assert record.mpp is None
    np.testing.assert_array_equal(record.boxes[record.has_extent], [[10, 10, 30, 40], [50, 5, 60, 25],
                                                                    [70.5, 30, 90, 44], [0, 60, 10, 70]])
    np.testing.assert_array_equal(record.points, [[20, 25], [55, 15], [80.25, 37], [100, 90], [5, 65]])
    assert record.classes == ('tumour', 'stroma', 'tumour', 'tumour', None)
    assert list(record.has_extent) == [True, True, True, False, True]
    # a layer named by an attribute (not ImageScope's default Description) gives its class
    (tmp_path / 'field.xml').write_text(
        '<Annotations><Annotation Name=""><Attributes><Attribute Name="Description" Value=""/>'
        '<Attribute Name="lymphocyte" Value=""/></Attributes><Regions><Region Type="2"><Vertices>'
        '<Vertex X="1" Y="1"/><Vertex X="5" Y="4"/></Vertices></Region></Regions></Annotation></Annotations>')
    assert L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png')).classes == ('lymphocyte',)


# --------------------------------------------------------------------------- QuPath GeoJSON

def feature(geometry_type, coordinates, cls=None, object_type='annotation', legacy_class=False, **extra):
    properties = {'objectType': object_type}
    if cls:
        properties['classification'] = cls if legacy_class else {'name': cls, 'color': [255, 0, 0]}
    return {'type': 'Feature', 'id': 'a1b2', 'geometry': {'type': geometry_type, 'coordinates': coordinates},
            'properties': properties, **extra}


@needs_data
def test_qupath_points_from_brca(brca, tmp_path):
    images, points, name = brca
    rows = points[name]
    lymphocytes = [[x, y] for x, y, c in rows if c == 'lymphocyte']
    features = [feature('MultiPoint', lymphocytes, 'lymphocyte')]  # QuPath's points tool: one MultiPoint per class
    features += [feature('Point', [x, y], c, legacy_class=i % 2) for i, (x, y, c) in enumerate(rows)
                 if c != 'lymphocyte']
    path = tmp_path / f'{os.path.splitext(name)[0]}.geojson'
    path.write_text(json.dumps({'type': 'FeatureCollection', 'features': features}))
    record = L.read_qupath(str(path), str(images / name), mpp=0.5)
    assert record.mpp == 0.5
    assert_same_dots(record, rows)


def test_qupath_outlines(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((100, 100, 3), np.uint8))
    square = [[[10, 10], [20, 10], [20, 16], [10, 16], [10, 10]]]
    region = [[[0, 0], [99, 0], [99, 99], [0, 99], [0, 0]]]
    nucleus = [[[40, 40], [46, 41], [44, 50], [40, 40]]]
    features = [
        feature('Polygon', region, 'Tumor'),                                  # the region detected in: skipped
        feature('Polygon', square, 'Tumor', object_type='detection'),
        feature('MultiPolygon', [[[[60, 60], [64, 60], [64, 64], [60, 60]]], [[[70, 70], [72, 70], [72, 75],
                                                                               [70, 70]]]], object_type='detection'),
        feature('Polygon', region, 'Immune cells', object_type='cell', legacy_class=True,
                nucleusGeometry={'type': 'Polygon', 'coordinates': nucleus}),  # a cell: its nucleus
        feature('LineString', [[0, 0], [50, 50]], object_type='detection'),   # not a nucleus
        feature('Point', [5, 95], 'Tumor'),                                   # a dot, whatever its object type
    ]
    (tmp_path / 'field.geojson').write_text(json.dumps(features))            # a list of features
    record = L.read_qupath(str(tmp_path / 'field.geojson'), str(tmp_path / 'field.png'))
    np.testing.assert_array_equal(record.boxes[:3], [[10, 10, 20, 16], [60, 60, 72, 75], [40, 40, 46, 50]])
    np.testing.assert_array_equal(record.points, [[15, 13], [66, 67.5], [43, 45], [5, 95]])
    assert record.classes == ('Tumor', None, 'Immune cells', 'Tumor')
    # annotations only (no detection or cell): hand-drawn nuclei, read
    only = [feature('Polygon', square, 'Tumor'), feature('Polygon', nucleus)]
    (tmp_path / 'field.geojson').write_text(json.dumps(only[0]))             # a single Feature
    assert len(L.read_qupath(str(tmp_path / 'field.geojson'), str(tmp_path / 'field.png'))) == 1
    (tmp_path / 'field.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': only}))
    record = L.read_qupath(str(tmp_path / 'field.geojson'), str(tmp_path / 'field.png'))
    np.testing.assert_array_equal(record.boxes, [[10, 10, 20, 16], [40, 40, 46, 50]])


# --------------------------------------------------------------------------- DSA annotation JSON

@needs_data
def test_dsa_points_from_brca(brca, tmp_path):
    images, points, name = brca
    rows = points[name]
    elements = [{'type': 'point', 'center': [x, y, 0], **({'label': {'value': c}} if i % 2 else {'group': c})}
                for i, (x, y, c) in enumerate(rows)]
    other = {'name': 'regions', 'elements': [{'type': 'point', 'center': [1, 1, 0]}]}
    path = tmp_path / f'{name}.json'   # a.png.json names the image a.png
    path.write_text(json.dumps([{'name': 'nuclei', 'elements': elements}, other]))
    [record] = L.read_entry(f'dsa:{path},images={images},annotation=nuclei,mpp=0.5')
    assert record.name == name and record.mpp == 0.5
    assert_same_dots(record, rows)


def test_dsa_shapes(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((100, 100, 3), np.uint8))
    doc = {'_id': 'abc', 'annotation': {'name': 'nuclei', 'elements': [
        {'type': 'rectangle', 'center': [50, 50, 0], 'width': 20, 'height': 10, 'rotation': math.pi / 2,
         'user': {'class': 'tumour'}, 'label': {'value': 'ignored'}},
        {'type': 'ellipse', 'center': [20, 20, 0], 'width': 8, 'height': 6, 'rotation': 0, 'group': 'stroma'},
        {'type': 'circle', 'center': [80, 20, 0], 'radius': 3},
        {'type': 'polyline', 'closed': True, 'points': [[5, 60, 0], [17, 56, 0], [12, 84, 0]],
         'label': {'value': 'lymphocyte'}},
        {'type': 'polyline', 'closed': False, 'points': [[0, 0, 0], [99, 99, 0]]},
        {'type': 'point', 'center': [90, 90, 0]},
    ]}}
    (tmp_path / 'field.json').write_text(json.dumps(doc))
    record = L.read_dsa(str(tmp_path / 'field.json'), str(tmp_path / 'field.png'))
    np.testing.assert_allclose(record.boxes[:4], [[45, 40, 55, 60], [16, 17, 24, 23], [77, 17, 83, 23],
                                                  [5, 56, 17, 84]], atol=1e-5)
    np.testing.assert_allclose(record.points, [[50, 50], [20, 20], [80, 20], [11, 70], [90, 90]], atol=1e-5)
    assert record.classes == ('tumour', 'stroma', None, 'lymphocyte', None)
    assert list(record.has_extent) == [True] * 4 + [False]


# --------------------------------------------------------------------------- scale

def test_estimate_mpp_of_a_known_size(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((100, 100, 3), np.uint8))
    layers = [('', [({'Type': '1'}, [(x, y), (x + w, y), (x + w, y + h), (x, y + h)])
                    for x, y, w, h in [(0, 0, 16, 16), (20, 0, 8, 32), (40, 0, 30, 30), (0, 40, 4, 4),
                                       (50, 50, 10, 10)]])]
    (tmp_path / 'field.xml').write_text(imagescope_xml(layers))
    record = L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png'), mpp='auto')
    # sizes sqrt(w * h): 16, 16, 30, 4, 10: median 16 px is the reference nucleus
    assert record.mpp == pytest.approx(L.REFERENCE_NUCLEUS_UM / 16)
    assert L.estimate_mpp(record, reference_um=4.0) == pytest.approx(0.25)


@needs_data
@pytest.mark.parametrize('factor', [2, 3, 0.5])
def test_an_image_enlarged_by_a_factor_is_estimated_at_that_factor_finer(dsb, tmp_path, factor):
    images, masks, boxes = dsb
    name = sorted(boxes)[2]
    [before] = L.read_entry(f'masks:{masks / name},mpp=auto')   # its image: in the folder images beside masks/
    labels = cv2.imread(str(masks / name), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(str(images / name))
    size = (round(labels.shape[1] * factor), round(labels.shape[0] * factor))
    (tmp_path / 'images').mkdir()
    (tmp_path / 'masks').mkdir()
    cv2.imwrite(str(tmp_path / 'masks' / name), cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))
    cv2.imwrite(str(tmp_path / 'images' / name), cv2.resize(image, size))
    [after] = L.read_entry(f'{tmp_path / "masks"},mpp=auto')
    # whole factors enlarge every nucleus exactly; halving rounds each side by up to a pixel
    assert after.mpp == pytest.approx(before.mpp / factor, rel=1e-6 if factor >= 1 else 0.1)


def test_dots_have_no_size_to_estimate_from(tmp_path):
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((10, 10, 3), np.uint8))
    (tmp_path / 'points.json').write_text(json.dumps({'a.png': [[1, 2, 'x']]}))
    one_line_error(lambda: L.read_points_json(tmp_path / 'points.json', tmp_path, mpp='auto'), 'points.json',
                   'no', 'extent')


def dark_rectangles(tmp_path, boxes, size=(120, 160)):
    image = np.full(size + (3,), 235, np.uint8)
    for x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = 30
    cv2.imwrite(str(tmp_path / 'field.png'), image)
    (tmp_path / 'boxes.json').write_text(json.dumps({'field.png': [list(b) for b in boxes]}))
    [record] = L.read_boxes_json(tmp_path / 'boxes.json', tmp_path, mpp=0.5)
    return record


@pytest.mark.parametrize('mpp', [1.0, 0.3125, 0.2])
def test_rescale_moves_the_labels_with_the_pixels(tmp_path, mpp):
    boxes = [(10, 20, 30, 44), (60, 8, 100, 28), (120, 80, 152, 112), (4, 90, 20, 118)]
    record = dark_rectangles(tmp_path, boxes)
    scaled = L.rescale(record, mpp)
    factor = 0.5 / mpp
    assert scaled.mpp == mpp and scaled.shape == (round(120 * factor), round(160 * factor))
    assert scaled.image.shape == scaled.shape + (3,) and scaled.load() is scaled.image
    # the dark rectangles found in the resized image are where the rescaled boxes say, to a pixel
    count, _, stats, _ = cv2.connectedComponentsWithStats((scaled.image.mean(axis=2) < 132).astype(np.uint8))
    found = sorted((x, y, x + w, y + h) for x, y, w, h, _ in stats[1:])
    np.testing.assert_allclose(found, sorted(map(tuple, scaled.boxes.tolist())), atol=1.0)
    np.testing.assert_allclose(scaled.points, record.points * factor, rtol=0.02)
    assert scaled.classes == record.classes and scaled.name == record.name


def test_rescale_needs_a_scale(tmp_path):
    record = dark_rectangles(tmp_path, [(10, 20, 30, 44)])
    unknown = L.LabelledImage(**{**record.__dict__, 'mpp': None})
    one_line_error(lambda: L.rescale(unknown, 0.5), 'boxes.json', 'unknown', 'mpp=')


# --------------------------------------------------------------------------- --data entries and splits

def test_parse_entry():
    assert L.parse_entry('points:/d/p.json,images=/d/im, mpp=0.5') == ('points', '/d/p.json',
                                                                       {'images': '/d/im', 'mpp': '0.5'})
    assert L.parse_entry('/d/masks') == (None, '/d/masks', {})
    assert L.parse_entry(r'C:\data\a.xml,mpp=auto') == (None, r'C:\data\a.xml', {'mpp': 'auto'})
    assert L.parse_entry('dsa:a.json,annotation=nuclei,split=val,seed=3')[2] == {'annotation': 'nuclei',
                                                                                 'split': 'val', 'seed': '3'}
    one_line_error(lambda: L.parse_entry('xml:/d/a.xml'), 'unknown format', "'xml'", 'imagescope')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,colour=red'), 'colour', 'keys')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,mpp=1,mpp=2'), 'mpp=2')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,mpp=-1'), 'mpp', '-1')
    one_line_error(lambda: L.parse_entry('masks:/d/m,seed=4'), 'split=')
    one_line_error(lambda: L.parse_entry('points:,mpp=1'), 'no path')


def test_detect_format(tmp_path):
    (tmp_path / 'a.xml').write_text('<Annotations/>')
    assert L.detect_format(str(tmp_path / 'a.xml')) == 'imagescope'
    assert L.detect_format(str(tmp_path / 'x.geojson')) == 'qupath'
    assert L.detect_format(str(tmp_path / 'x.csv')) == 'csv'
    assert L.detect_format(str(tmp_path / 'x.tiff')) == 'masks'
    for content, fmt in [({'a.png': [[1, 2, 'c']]}, 'points'), ({'a.png': [], 'b.png': [[1, 2, 3, 4]]}, 'boxes'),
                         ({'type': 'FeatureCollection', 'features': []}, 'qupath'),
                         ([{'type': 'Feature'}], 'qupath'), ({'name': 'n', 'elements': []}, 'dsa'),
                         ([{'_id': 'x', 'annotation': {}}], 'dsa')]:
        (tmp_path / 'b.json').write_text(json.dumps(content))
        assert L.detect_format(str(tmp_path / 'b.json')) == fmt, content
    (tmp_path / 'b.json').write_text(json.dumps({'a.png': []}))
    one_line_error(lambda: L.detect_format(str(tmp_path / 'b.json')), 'b.json', 'FORMAT:PATH')
    one_line_error(lambda: L.detect_format(str(tmp_path)), 'several kinds')   # .xml and .json
    (tmp_path / 'b.json').unlink()
    assert L.detect_format(str(tmp_path)) == 'imagescope'
    (tmp_path / 'a.xml').unlink()
    cv2.imwrite(str(tmp_path / 'm.png'), np.zeros((4, 4), np.uint8))
    assert L.detect_format(str(tmp_path)) == 'masks'


@needs_data
def test_read_entries_mixes_formats_and_splits(brca, dsb):
    images, points, _ = brca
    dsb_images, masks, boxes = dsb
    brca_dir, dsb_dir = images.parent, dsb_images.parent
    records = L.read_entries([f'points:{brca_dir}/points.json,images={images},mpp=0.5',
                              f'{masks},mpp=auto'])
    assert len(records) == 90 + 107
    assert all(r.mpp == 0.5 for r in records[:90])
    # DSB's scale varies between images (its README: 2-4x); estimated, every one is somewhere near 20x-40x
    estimated = [r.mpp for r in records[90:]]
    assert all(0.1 < mpp < 1.0 for mpp in estimated) and max(estimated) > 2 * min(estimated)

    splits = json.loads((brca_dir / 'splits.json').read_text())   # {image: 'train' or 'val'}
    val = L.read_entry(f'{brca_dir}/points.json,mpp=0.5,splits={brca_dir}/splits.json,split=val')
    assert sorted(r.name for r in val) == sorted(n for n, s in splits.items() if s == 'val')
    one_line_error(lambda: L.read_entry(f'{brca_dir}/points.json,splits={brca_dir}/splits.json,split=test'),
                   "no split 'test'", 'train', 'val')

    seeded = {s: L.read_entry(f'boxes:{dsb_dir}/boxes.json,split={s},seed=7') for s in ('train', 'val')}
    names = {s: {r.name for r in records} for s, records in seeded.items()}
    assert len(names['train']) == 86 and len(names['val']) == 21           # 80 / 20 of 107
    assert names['train'] | names['val'] == set(boxes) and not names['train'] & names['val']
    again = {r.name for r in L.read_entry(f'{masks},split=val,seed=7')}    # another format, same images: same split
    assert again == names['val']


def test_seeded_split_is_deterministic():
    names = [f'image{i}.png' for i in range(50)]
    split = L.seeded_split(names, seed=1)
    assert split == L.seeded_split(names[::-1], seed=1) == L.seeded_split(names + names[:5], seed=1)
    assert split != L.seeded_split(names, seed=2)
    assert [len(split['train']), len(split['val'])] == [40, 10]
    three = L.seeded_split(names, fractions={'a': 1, 'b': 1, 'c': 2})
    assert [len(v) for v in three.values()] == [12, 13, 25]   # ends at round(12.5) = 12 (half to even), 25, 50
    assert sorted(sum(three.values(), [])) == sorted(names)


def test_read_splits_both_layouts(tmp_path):
    (tmp_path / 'a.json').write_text(json.dumps({'x.png': 'train', 'y.png': 'val', 'z.png': 'train'}))
    assert L.read_splits(tmp_path / 'a.json') == {'train': ['x.png', 'z.png'], 'val': ['y.png']}
    (tmp_path / 'b.json').write_text(json.dumps({'train': ['x.png'], 'test': []}))
    assert L.read_splits(tmp_path / 'b.json') == {'train': ['x.png'], 'test': []}
    (tmp_path / 'c.json').write_text(json.dumps([1, 2]))
    one_line_error(lambda: L.read_splits(tmp_path / 'c.json'), 'c.json')


# --------------------------------------------------------------------------- one-line errors

def test_bad_input_gives_one_line_naming_the_file(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((20, 30, 3), np.uint8))
    image = str(tmp_path / 'field.png')

    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    one_line_error(lambda: L.read_entry(f'points:{tmp_path}/missing.json'), 'missing.json', 'no such file')
    one_line_error(lambda: L.read_imagescope(write('bad.xml', '<Annotations><Annotation>'), image), 'bad.xml', 'XML')
    one_line_error(lambda: L.read_imagescope(write('svg.xml', '<svg/>'), image), 'svg.xml', '<svg>')
    one_line_error(lambda: L.read_imagescope(write('nov.xml', '<Annotations><Annotation><Regions><Region Type="0">'
                                                              '<Vertices/></Region></Regions></Annotation>'
                                                              '</Annotations>'), image), 'nov.xml', 'vertices')
    one_line_error(lambda: L.read_qupath(write('bad.geojson', '{"type": "Point"'), image), 'bad.geojson', 'JSON')
    one_line_error(lambda: L.read_qupath(write('pt.geojson', '{"type": "Point", "coordinates": [1, 2]}'), image),
                   'pt.geojson', 'Feature')
    one_line_error(lambda: L.read_qupath(write('poly.geojson', json.dumps(feature('Polygon', [[[1, 2]]]))), image),
                   'poly.geojson', 'feature 0')
    one_line_error(lambda: L.read_dsa(write('dsa.json', '{"elements": [{"type": "rectangle", "center": [1]}]}'),
                                      image), 'dsa.json', 'malformed rectangle')
    # a point outside its image (the image is 30 x 20)
    one_line_error(lambda: L.read_points_json(write('out.json', '{"field.png": [[5, 5], [31, 4]]}'), tmp_path),
                   'out.json', 'nucleus 1', '(31, 4)', 'outside', '30 x 20')
    one_line_error(lambda: L.read_points_json(write('row.json', '{"field.png": [[5, "y"]]}'), tmp_path),
                   'row.json', 'row 0')
    one_line_error(lambda: L.read_points_json(write('img.json', '{"other.png": []}'), tmp_path),
                   'img.json', "no image 'other.png'")
    one_line_error(lambda: L.read_boxes_json(write('flat.json', '{"field.png": [[5, 5, 5, 9]]}'), tmp_path),
                   'flat.json', 'empty box')
    one_line_error(lambda: L.read_csv(write('field.csv', 'a,b\n1,2\n'), tmp_path), 'field.csv', 'x and y')
    one_line_error(lambda: L.read_csv(write('field.csv', 'x,y\n1,z\n'), tmp_path), 'field.csv', 'line 2')
    # masks that are not label images
    cv2.imwrite(str(tmp_path / 'rgb.png'), np.zeros((20, 30, 3), np.uint8))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'rgb.png'), image), 'rgb.png', 'not a label image')
    tifffile.imwrite(tmp_path / 'float.tif', np.zeros((20, 30), np.float32))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'float.tif'), image), 'float.tif', 'float32')
    binary = np.zeros((20, 30), np.uint8)
    binary[2:5, 2:5] = binary[10:15, 10:15] = 255
    cv2.imwrite(str(tmp_path / 'binary.png'), binary)
    one_line_error(lambda: L.read_mask(str(tmp_path / 'binary.png'), image), 'binary.png', 'binary mask')
    cv2.imwrite(str(tmp_path / 'small.png'), np.ones((10, 30), np.uint8))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'small.png'), image), 'small.png', '30 x 10', '30 x 20')
    write('text.png', b'not an image')
    one_line_error(lambda: L.read_mask(str(tmp_path / 'text.png'), image), 'text.png')
    one_line_error(lambda: L.read_mask(str(tmp_path / 'small.png'), str(tmp_path / 'text.png')), 'text.png')
    one_line_error(lambda: L.read_entry(f'masks:{tmp_path}/small.png,images={tmp_path}'), 'different folders')
    one_line_error(lambda: L.read_entry(f'masks:{tmp_path}/small.png,images={tmp_path}/none'), 'none', 'no such folder')
    one_line_error(lambda: L.read_entry(f'{tmp_path}/field.png.unknown'), 'field.png.unknown')
    one_line_error(lambda: L.read_entry(f'{tmp_path}/out.json,annotation=nuclei'), 'annotation=', 'dsa', 'points')
