"""DSA (large_image) annotation documents: writing detections, reading boxes back. (Validity against large_image's
annotation schema: tests/test_annotation_schema.py.)"""

import json
import math

import numpy as np
import pytest
import torch

from cellrcnn import annotation as A
from cellrcnn.errors import CellRCNNError

BOXES = np.array([[10, 20, 30, 50], [100.25, 200.5, 112.75, 211], [0, 0, 5, 5]],
                 dtype=np.float32)
SCORES = np.array([0.98766, 0.5, 0.123456], dtype=np.float32)


def test_rectangles_round_trip():
    doc = A.detections_to_annotation(BOXES, SCORES, attributes={'model': 'x'})
    assert doc['name'] == 'cellrcnn nuclei' and doc['attributes'] == {'model': 'x'}
    assert len(doc['elements']) == 3
    first = doc['elements'][0]
    assert first['type'] == 'rectangle'
    assert first['center'] == [20.0, 35.0, 0]
    assert (first['width'], first['height']) == (20.0, 30.0)
    assert first['lineColor'] == 'rgb(0,255,0)'
    assert first['user'] == {'score': 0.9877, 'class': 'nucleus'}
    assert [e['user']['score'] for e in doc['elements']] == [0.9877, 0.5, 0.1235]
    boxes = A.annotation_to_boxes(doc)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    np.testing.assert_allclose(boxes, BOXES, atol=0.01)
    # json round trip keeps it equal too
    again = A.annotation_to_boxes(json.loads(json.dumps(doc, allow_nan=False)))
    np.testing.assert_array_equal(again, boxes)


def test_torch_input_and_labels():
    doc = A.detections_to_annotation(torch.tensor(BOXES), torch.tensor(SCORES),
                                     labels=torch.tensor([1, 2, 1]),
                                     class_names=['background', 'nucleus', 'mitosis'])
    assert [e['user']['class'] for e in doc['elements']] == ['nucleus', 'mitosis', 'nucleus']
    doc = A.detections_to_annotation(BOXES, SCORES, labels=['a', 'b', 'a'])
    det = A.annotation_to_detections(doc)
    assert det['classes'] == ['a', 'b', 'a']
    np.testing.assert_allclose(det['scores'], [0.9877, 0.5, 0.1235], atol=1e-6)
    # unnamed integer labels
    doc = A.detections_to_annotation(BOXES, SCORES, labels=[1, 3, 1])
    assert [e['user']['class'] for e in doc['elements']] == ['nucleus', 'class_3', 'nucleus']


def test_points_need_a_box_size():
    doc = A.detections_to_annotation(BOXES, SCORES, element_type='point',
                                     line_color='#ff0000', fill_color='rgba(255,0,0,0.5)')
    assert doc['elements'][0]['type'] == 'point'
    assert doc['elements'][0]['center'] == [20.0, 35.0, 0]
    assert 'width' not in doc['elements'][0]
    boxes = A.annotation_to_boxes(doc, point_box_size=10)
    np.testing.assert_allclose(boxes[0], [15, 30, 25, 40])
    np.testing.assert_allclose(boxes[1], [101.5, 200.75, 111.5, 210.75])
    with pytest.raises(CellRCNNError, match='point_box_size'):
        A.annotation_to_boxes(doc)
    # not reading points: no size needed, nothing found
    assert A.annotation_to_boxes(doc, element_types=('rectangle',)).shape == (0, 4)


def test_nuclei_points_without_a_box_size():
    rectangles = A.detections_to_annotation(BOXES[:2], SCORES[:2], labels=['tumour', 'stroma'])
    points = A.detections_to_annotation(BOXES[2:], SCORES[2:], element_type='point')
    points['elements'].append({'type': 'point', 'center': [7, 8, 0], 'group': 'lymphocyte'})
    points['elements'].append({'type': 'point', 'center': [9, 9, 0]})
    nuclei = A.annotation_to_nuclei([rectangles, points])
    np.testing.assert_allclose(nuclei['boxes'][:2], BOXES[:2], atol=0.01)
    assert np.isnan(nuclei['boxes'][2:]).all()                       # points have no extent
    centres = (BOXES[:, :2] + BOXES[:, 2:]) / 2
    np.testing.assert_allclose(nuclei['points'], np.concatenate([centres, [[7, 8], [9, 9]]]), atol=0.01)
    # written points carry user.class 'nucleus'; a group is a class; without either, no class
    assert nuclei['classes'] == ['tumour', 'stroma', 'nucleus', 'lymphocyte', None]
    with pytest.raises(CellRCNNError, match='malformed point'):
        A.annotation_to_nuclei({'name': 'x', 'elements': [{'type': 'point', 'center': None}]})


def test_rotated_rectangle_polyline_circle():
    doc = {'name': 'hand', 'elements': [
        {'type': 'rectangle', 'center': [50, 50, 0], 'width': 20, 'height': 10,
         'rotation': math.pi / 2},
        {'type': 'rectangle', 'center': [0, 0, 0], 'width': 20, 'height': 10,
         'rotation': math.pi / 4},
        {'type': 'polyline', 'closed': True,
         'points': [[5, 6, 0], [17, 2, 0], [12, 30, 0]]},
        {'type': 'polyline', 'points': [[0, 0, 0], [100, 100, 0]]},   # open: a line
        {'type': 'circle', 'center': [10, 10, 0], 'radius': 3},
        {'type': 'arrow', 'points': [[0, 0, 0], [1, 1, 0]]},
    ]}
    boxes = A.annotation_to_boxes(doc, element_types=('rectangle', 'polyline', 'circle'))
    assert boxes.shape == (4, 4)
    np.testing.assert_allclose(boxes[0], [45, 40, 55, 60], atol=1e-5)
    half = 15 * math.sqrt(0.5)     # (20 + 10) / 2 * cos 45
    np.testing.assert_allclose(boxes[1], [-half, -half, half, half], atol=1e-5)
    np.testing.assert_allclose(boxes[2], [5, 2, 17, 30])
    np.testing.assert_allclose(boxes[3], [7, 7, 13, 13])
    # default types: rectangles only here
    assert A.annotation_to_boxes(doc).shape == (2, 4)
    with pytest.raises(CellRCNNError, match='cannot read element types'):
        A.annotation_to_boxes(doc, element_types=('arrow',))


def test_rest_form_lists_and_name_filter():
    nuclei = A.detections_to_annotation(BOXES, SCORES)
    other = A.detections_to_annotation(BOXES[:1] + 1000, SCORES[:1], name='tumour')
    rest = {'_id': '0123456789abcdef01234567', 'itemId': 'abc', '_version': 3,
            'annotation': nuclei,
            '_elementQuery': {'count': 3, 'returned': 3, 'offset': 0}}
    np.testing.assert_allclose(A.annotation_to_boxes(rest), BOXES, atol=0.01)
    both = A.annotation_to_boxes([rest, other])
    assert both.shape == (4, 4)
    np.testing.assert_allclose(A.annotation_to_boxes([rest, other], name='tumour'),
                               BOXES[:1] + 1000, atol=0.01)
    with pytest.raises(CellRCNNError, match="no annotation named 'missing'.*cellrcnn nuclei"):
        A.annotation_to_boxes([rest, other], name='missing')
    truncated = dict(rest, _elementQuery={'count': 10, 'returned': 3})
    with pytest.raises(CellRCNNError, match='truncated'):
        A.annotation_to_boxes(truncated)
    listing = {'_id': 'x', 'annotation': {'name': 'cellrcnn nuclei'}}
    with pytest.raises(CellRCNNError, match='no elements'):
        A.annotation_to_boxes(listing)


def test_empty_detections():
    doc = A.detections_to_annotation(np.zeros((0, 4)), np.zeros(0))
    assert doc['elements'] == []
    boxes = A.annotation_to_boxes(doc)
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_write_and_read_files(tmp_path):
    doc = A.detections_to_annotation(BOXES, SCORES, name='run 1')
    path = tmp_path / 'nuclei.json'
    A.write_annotation(doc, path)
    assert A.read_annotation_file(path) == doc
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left behind
    np.testing.assert_allclose(A.annotation_to_boxes(A.read_annotation_file(path)),
                               BOXES, atol=0.01)


@pytest.mark.parametrize('n, chunk', [(0, 2), (1, 2), (5, 2), (6, 2), (500, 7)])
@pytest.mark.parametrize('element_type', ['rectangle', 'point'])
def test_written_in_chunks_is_the_same_document(tmp_path, n, chunk, element_type, rng):
    xy = rng.uniform(0, 1000, (n, 2))
    boxes, scores = np.hstack([xy, xy + rng.uniform(4, 20, (n, 2))]), rng.uniform(0, 1, n)
    options = {'element_type': element_type, 'attributes': {'model': 'm.pt', 'stats': {'n': n}},
               'labels': ['a', 'b'] * (n // 2) + ['a'] * (n % 2)}
    path = tmp_path / 'nuclei.json'
    A.write_detections_annotation(path, boxes, scores, chunk=chunk, **options)
    assert A.read_annotation_file(path) == A.detections_to_annotation(boxes, scores, **options)
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(CellRCNNError, match='^got 1 scores for'):
        A.write_detections_annotation(tmp_path / 'bad.json', boxes[:0].tolist() + [[0, 0, 1, 1]] * 2, [1.0])
    assert not (tmp_path / 'bad.json').exists()


def test_bad_files_raise_one_line_errors(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"name": "x", "elements": [')
    with pytest.raises(CellRCNNError) as info:
        A.read_annotation_file(bad)
    assert str(bad) in str(info.value) and '\n' not in str(info.value)
    missing = tmp_path / 'missing.json'
    with pytest.raises(CellRCNNError, match='missing.json'):
        A.read_annotation_file(missing)
    scalar = tmp_path / 'scalar.json'
    scalar.write_text('42')
    with pytest.raises(CellRCNNError, match='scalar.json'):
        A.read_annotation_file(scalar)
    with pytest.raises(CellRCNNError, match='cannot write'):
        A.write_annotation({'elements': []}, tmp_path / 'no' / 'such' / 'dir.json')
    with pytest.raises(CellRCNNError, match='cannot write'):
        A.write_annotation({'bad': float('nan')}, tmp_path / 'nan.json')


def test_bad_input():
    with pytest.raises(CellRCNNError, match='element_type'):
        A.detections_to_annotation(BOXES, SCORES, element_type='circle')
    with pytest.raises(CellRCNNError, match='colour'):
        A.detections_to_annotation(BOXES, SCORES, line_color='green')
    with pytest.raises(CellRCNNError, match='3 scores for 2 boxes'):
        A.detections_to_annotation(BOXES[:2], SCORES)
    with pytest.raises(CellRCNNError, match='shape'):
        A.detections_to_annotation(BOXES[:, :3], SCORES)
    with pytest.raises(CellRCNNError, match='malformed rectangle'):
        A.annotation_to_boxes({'name': 'x', 'elements': [{'type': 'rectangle', 'center': [1]}]})
    with pytest.raises(CellRCNNError):
        A.annotation_to_boxes('not a document')
