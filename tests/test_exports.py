"""Slide outputs: density griddata annotation, QuPath GeoJSON, per-nucleus CSV."""

import csv
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from cellrcnn import density as D
from cellrcnn import exports as O
from cellrcnn.errors import CellRCNNError

BOXES = np.array([[10, 20, 30, 50], [100.25, 200.5, 112.75, 211], [0, 0, 5, 5]], dtype=np.float32)
SCORES = np.array([0.98766, 0.5, 0.123456], dtype=np.float32)


def box_at(cx, cy, half=4):
    return [cx - half, cy - half, cx + half, cy + half]


def no_tmp_left(directory):
    return not [p for p in os.listdir(directory) if '.tmp' in p]


# --------------------------------------------------------------------------- density

def test_density_matches_hand_count():
    # 1000 x 600 px at 0.5 µm/px, 100 µm cells -> 200 px cells, a 5 x 3 grid of 0.01 mm².
    centres = [(50, 50), (150, 199), (199.9, 0.5),      # 3 in cell (row 0, col 0)
               (900, 500), (450, 300), (420, 380)]       # (2, 4), then 2 in (1, 2)
    boxes = np.array([box_at(x, y, 0.1) for x, y in centres])
    doc = D.density_annotation(boxes, (1000, 600), 0.5, cell_size_um=100)
    (el,) = doc['elements']
    assert el['type'] == 'griddata' and el['interpretation'] == 'heatmap'
    assert (el['gridWidth'], el['dx'], el['dy']) == (5, 200.0, 200.0)
    assert el['origin'] == [100.0, 100.0, 0]               # values sit at cell centres
    expected = np.zeros((3, 5))
    expected[0, 0], expected[2, 4], expected[1, 2] = 300, 100, 200   # count / 0.01 mm²
    assert el['values'] == expected.ravel().tolist()
    assert all(type(v) is float for v in el['values'])
    assert el['radius'] == 200.0 and el['scaleWithZoom'] is True
    assert len(el['colorRange']) == len(el['rangeValues'])
    assert el['rangeValues'][0] == 0 and el['rangeValues'][-1] == doc['attributes']['density']['max_density']
    assert doc['attributes']['density']['grid'] == [5, 3]
    assert doc['attributes']['density']['nuclei'] == 6
    json.dumps(doc, allow_nan=False)


def test_density_last_cell_absorbs_remainder_and_uses_true_area():
    # 1050 px wide: 5.25 cells -> 5 columns, the last 250 px (0.125 x 0.1 mm).
    boxes = np.array([box_at(1040, 50), box_at(100, 50)])
    el = D.density_annotation(boxes, (1050, 200), 0.5, 100)['elements'][0]
    assert el['gridWidth'] == 5 and len(el['values']) == 5
    assert el['values'] == [100.0, 0.0, 0.0, 0.0, 80.0]
    # 1150 px: 5.75 cells -> 6 columns, the last 150 px wide.
    el = D.density_annotation(np.array([box_at(1140, 50)]), (1150, 200), 0.5, 100)['elements'][0]
    assert el['gridWidth'] == 6 and el['values'][-1] == pytest.approx(1 / (0.075 * 0.1), abs=0.01)


def test_density_rectangular_pixels_contour_and_max_density():
    boxes = np.array([box_at(10, 10), box_at(10, 10), box_at(150, 30)])
    doc = D.density_annotation(boxes, (200, 40), (0.5, 0.25), cell_size_um=25,
                               interpretation='contour', max_color='#ff0000')
    el = doc['elements'][0]
    assert (el['dx'], el['dy'], el['gridWidth'], len(el['values'])) == (50.0, 100.0, 4, 4)
    # 40 px high at 0.25 µm/px: one row 10 µm high, so cells are 25 x 10 µm = 0.00025 mm².
    assert el['values'] == [8000.0, 0.0, 0.0, 4000.0]
    assert el['interpretation'] == 'contour' and el['maxColor'] == '#ff0000'
    assert 'colorRange' not in el and 'scaleWithZoom' not in el
    heat = D.density_annotation(boxes, (200, 40), 0.5, 25, max_density=5000,
                                scale_with_zoom=False)['elements'][0]
    assert heat['rangeValues'][-1] == 5000 and 'scaleWithZoom' not in heat


def test_density_empty_and_errors():
    doc = D.density_annotation(np.zeros((0, 4)), (400, 400), 0.5, 100)
    el = doc['elements'][0]
    assert el['values'] == [0.0] * 4 and el['rangeValues'][-1] == 1.0
    assert doc['attributes']['density']['nuclei'] == 0
    with pytest.raises(CellRCNNError, match='outside'):
        D.density_annotation(np.array([box_at(500, 10)]), (400, 400), 0.5)
    with pytest.raises(CellRCNNError, match='choropleth'):
        D.density_annotation(BOXES, (400, 400), 0.5, interpretation='choropleth')
    for bad in [dict(mpp=0), dict(mpp='x'), dict(slide_size=(0, 10)), dict(slide_size=5),
                dict(cell_size_um=-1), dict(cell_size_um=1, slide_size=(1e5, 1e5))]:
        kwargs = {**dict(boxes=BOXES, slide_size=(400, 400), mpp=0.5), **bad}
        with pytest.raises(CellRCNNError):
            D.density_annotation(**kwargs)


# --------------------------------------------------------------------------- GeoJSON

def test_geojson_round_trip(tmp_path):
    path = tmp_path / 'dets.geojson'
    assert O.write_geojson(path, BOXES, SCORES, properties={'area_um2': [1, 2.5, 3]}) == str(path)
    fc = json.loads(path.read_text())
    assert fc['type'] == 'FeatureCollection' and len(fc['features']) == 3
    for feat, box, score in zip(fc['features'], BOXES, SCORES):
        assert feat['type'] == 'Feature' and feat['geometry']['type'] == 'Polygon'
        (ring,) = feat['geometry']['coordinates']
        assert len(ring) == 5 and ring[0] == ring[-1]              # closed ring
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        np.testing.assert_allclose([min(xs), min(ys), max(xs), max(ys)], box, atol=0.005)
        props = feat['properties']
        assert props['objectType'] == 'detection'
        assert props['classification'] == {'name': 'Nucleus', 'color': [0, 255, 0]}
        assert props['measurements']['score'] == pytest.approx(round(float(score), 4))
    assert [f['properties']['measurements']['area_um2'] for f in fc['features']] == [1, 2.5, 3]
    assert no_tmp_left(tmp_path)


def test_geojson_classes_chunks_and_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(O, '_CHUNK', 2)   # several chunks joined into one valid array
    path = tmp_path / 'c.geojson'
    O.write_geojson(path, BOXES, SCORES, classes=[1, 2, 'Tumor'],
                    class_colors={'Tumor': (200, 0, 0)})
    feats = json.loads(path.read_text())['features']
    classes = [f['properties']['classification'] for f in feats]
    assert [c['name'] for c in classes] == ['Nucleus', 'class_2', 'Tumor']
    assert classes[2]['color'] == [200, 0, 0]
    assert all(len(c['color']) == 3 for c in classes)
    O.write_geojson(path, np.zeros((0, 4)), [])
    assert json.loads(path.read_text()) == {'type': 'FeatureCollection', 'features': []}


def test_geojson_classes_without_a_colour_take_none_given_to_another(tmp_path):
    path = tmp_path / 'colours.geojson'
    O.write_geojson(path, BOXES, SCORES, classes=['lymph', 'tumour', 'other'], class_colors={'tumour': '#ff0000'})
    colours = {f['properties']['classification']['name']: f['properties']['classification']['color']
               for f in json.loads(path.read_text())['features']}
    assert colours['tumour'] == [255, 0, 0]
    assert len({tuple(c) for c in colours.values()}) == 3  # QuPath tells the three apart


def test_geojson_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'd.geojson'
    path.write_text('old')
    with pytest.raises(CellRCNNError):
        O.write_geojson(path, BOXES, SCORES[:2])
    with pytest.raises(CellRCNNError):
        O.write_geojson(path, BOXES, SCORES, properties={'score': [1, 2, 3]})

    calls = []

    def dumps(*args, **kwargs):        # the 2nd call happens after the file is opened
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError('boom')
        return json.dumps(*args, **kwargs)
    monkeypatch.setattr(O, 'json', types.SimpleNamespace(dumps=dumps))
    with pytest.raises(RuntimeError):
        O.write_geojson(path, BOXES, SCORES)
    assert path.read_text() == 'old' and no_tmp_left(tmp_path)


# --------------------------------------------------------------------------- CSV

def test_csv_round_trip_with_microns(tmp_path):
    path = tmp_path / 'n.csv'
    O.write_csv(path, BOXES, SCORES, classes=['a', 'b', 'c'], mpp=0.25)
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['x', 'y', 'x1', 'y1', 'x2', 'y2', 'width_um', 'height_um',
                             'score', 'class']
    assert len(rows) == 3
    for row, box, score, cls in zip(rows, BOXES, SCORES, 'abc'):
        np.testing.assert_allclose([float(row[k]) for k in ('x1', 'y1', 'x2', 'y2')], box, atol=0.005)
        assert float(row['x']) == pytest.approx((box[0] + box[2]) / 2, abs=0.005)
        assert float(row['y']) == pytest.approx((box[1] + box[3]) / 2, abs=0.005)
        assert float(row['width_um']) == pytest.approx((box[2] - box[0]) * 0.25, abs=0.001)
        assert float(row['height_um']) == pytest.approx((box[3] - box[1]) * 0.25, abs=0.001)
        assert float(row['score']) == pytest.approx(float(score), abs=1e-4)
        assert row['class'] == cls
    assert float(rows[1]['width_um']) == 3.125 and float(rows[1]['height_um']) == 2.625
    assert no_tmp_left(tmp_path)


def test_csv_without_mpp_and_empty(tmp_path):
    path = tmp_path / 'n.csv'
    O.write_csv(path, BOXES, SCORES, mpp=(0.5, 0.25))
    rows = list(csv.DictReader(path.open(newline='')))
    assert float(rows[0]['width_um']) == 10 and float(rows[0]['height_um']) == 7.5
    assert {r['class'] for r in rows} == {'nucleus'}
    O.write_csv(path, BOXES, SCORES)
    assert path.read_text().splitlines()[0] == 'x,y,x1,y1,x2,y2,score,class'
    O.write_csv(path, [], [], mpp=0.25)
    assert path.read_text() == 'x,y,x1,y1,x2,y2,width_um,height_um,score,class\n'


# --------------------------------------------------------------------------- errors, imports

@pytest.mark.parametrize('writer', [O.write_geojson, O.write_csv])
def test_unwritable_path_is_one_line_error(tmp_path, writer):
    path = tmp_path / 'missing_dir' / 'out'
    with pytest.raises(CellRCNNError) as info:
        writer(path, BOXES, SCORES)
    message = str(info.value)
    assert '\n' not in message and str(path) in message and 'No such file' in message
    with pytest.raises(CellRCNNError):
        writer(tmp_path, BOXES, SCORES)        # a directory
    assert no_tmp_left(tmp_path)


def test_outputs_do_not_import_torch():
    code = ('import sys, cellrcnn.exports, cellrcnn.density, cellrcnn.annotation, cellrcnn.boxes; '
            'sys.exit("torch" in sys.modules)')
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0
