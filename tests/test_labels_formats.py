"""cellrcnn.labels, one reader per label format: each on a small real example cut at test time from the shared data
(BRCA-M2C dots, DSB 2018 masks and boxes), written in tmp_path in the format under test, plus hand-made shapes where
real examples do not exist. Scale, ``--data`` entries, splits and errors: tests/test_labels_scale_and_entries.py."""

import csv
import json
import math
import os
from collections import Counter

import cv2
import numpy as np
import tifffile

from cellrcnn import labels as L
from labels_support import feature, imagescope_xml, needs_data


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
        ({'Type': '0'}, [(40, 80), (40, 80)]),                                # a click saved as a polygon: a dot
    ]), ('', [({'Type': '1'}, [(0, 60), (10, 60), (10, 70), (0, 70)])])]     # no class anywhere
    (tmp_path / 'field.xml').write_text(imagescope_xml(layers))
    record = L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png'))
    assert record.mpp is None
    np.testing.assert_array_equal(record.boxes[record.has_extent], [[10, 10, 30, 40], [50, 5, 60, 25],
                                                                    [70.5, 30, 90, 44], [0, 60, 10, 70]])
    np.testing.assert_array_equal(record.points, [[20, 25], [55, 15], [80.25, 37], [100, 90], [40, 80], [5, 65]])
    assert record.classes == ('tumour', 'stroma', 'tumour', 'tumour', 'tumour', None)
    assert list(record.has_extent) == [True, True, True, False, False, True]
    # a layer named by an attribute (not ImageScope's default Description) gives its class
    (tmp_path / 'field.xml').write_text(
        '<Annotations><Annotation Name=""><Attributes><Attribute Name="Description" Value=""/>'
        '<Attribute Name="lymphocyte" Value=""/></Attributes><Regions><Region Type="2"><Vertices>'
        '<Vertex X="1" Y="1"/><Vertex X="5" Y="4"/></Vertices></Region></Regions></Annotation></Annotations>')
    assert L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png')).classes == ('lymphocyte',)


# --------------------------------------------------------------------------- QuPath GeoJSON

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
    # beside them, annotations of classes QuPath ignores (Region*, Ignore*, ...) are regions, never nuclei, even
    # with no detection in the file; an ignored class's dot is not a nucleus either
    ignored = [feature('Polygon', region, 'Region*'), feature('Polygon', nucleus, 'Ignore*'),
               feature('Point', [5, 95], 'Out of focus*')]
    (tmp_path / 'field.geojson').write_text(json.dumps(ignored + only))
    record = L.read_qupath(str(tmp_path / 'field.geojson'), str(tmp_path / 'field.png'))
    np.testing.assert_array_equal(record.boxes, [[10, 10, 20, 16], [40, 40, 46, 50]])
    assert record.classes == ('Tumor', None)


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
