"""Cell types through a run: the detection loop (merge, resume rows, Dask batches), the ``classes`` filter and every
output (nuclei and density annotations, GeoJSON, CSV, overview, summary); a model without cell types writes what it
did before."""

import csv
import dataclasses
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.exports import detection_summary_lines, write_overlay
from cellrcnn.inference import DetectorSpec
from cellrcnn.job import detect_to_files, output_paths, write_results
from cellrcnn.merge import StreamingNMS
from cellrcnn.nuclei_map import BOXES_SHOWN, DOT_RADIUS, shown_on_open
from cellrcnn.resume import RowStore
from cellrcnn.settings import DetectionSettings
from cellrcnn.slide import Slide
from cellrcnn.slide_detection import CELL_TYPE, detect_slide
from support import PassingDetector

KW = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)
NAMES = ('lymphocyte', 'tumour', 'stromal')
COLORS = {'lymphocyte': '#0000ff', 'tumour': '#ff0000', 'stromal': '#00ff00'}


@pytest.fixture(scope='module')
def slide_path(synthetic_slide):
    return synthetic_slide(900, 700, seed=11)[0]


def spec(checkpoint):
    return DetectorSpec(model=str(checkpoint), threshold=0.05, nms=0.3, device='cpu', batch_size=3)


@pytest.fixture(scope='module')
def full(slide_path, typed_checkpoint):
    """The typed model's result on the slide, without interruptions or filters."""
    return detect_slide(Slide(slide_path), spec(typed_checkpoint).build(), **KW)


class Recording(PassingDetector):
    """A detector that keeps every raw result it returns and, with ``batches``, stops the run (as Ctrl-C would)
    after that many batches."""

    def __init__(self, detector, batches=None):
        super().__init__(detector)
        self.left, self.results = batches, []

    def detect_tiles_with_types(self, tiles, parts=False, stain=None):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left = None if self.left is None else self.left - 1
        results = self.inner.detect_tiles_with_types(tiles, parts, stain=stain)
        self.results.extend(results)
        return results


def test_the_merge_hands_back_the_cell_type_of_the_box_it_keeps():
    nms = StreamingNMS(0.3, 64)
    types = np.array([(0, 0.9), (2, 0.6), (1, 0.7)], CELL_TYPE)
    nms.add(np.array([[0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50]], np.float32), np.array([0.5, 0.8, 0.3]),
            types)
    boxes, scores, kept = nms.finish()
    assert scores.tolist() == pytest.approx([0.8, 0.3])
    assert kept.tolist() == [(2, pytest.approx(0.6)), (1, pytest.approx(0.7))]


def test_each_nucleus_keeps_the_type_of_its_own_raw_detection(slide_path, typed_checkpoint, full):
    recording = Recording(spec(typed_checkpoint).build())
    result = detect_slide(Slide(slide_path), recording, **KW)
    raw = {(float(s), int(t), float(p)) for out in recording.results
           for s, t, p in zip(out['scores'], out['cell_types'], out['cell_type_scores'])}
    assert len(result.boxes) == len(result.cell_types) == len(result.cell_type_scores) > 20
    assert {(float(s), NAMES[t], float(p)) for s, t, p in
            zip(result.scores, result.cell_types, result.cell_type_scores)} <= {(s, NAMES[t], p) for s, t, p in raw}
    assert len(set(result.cell_types.tolist())) > 1  # random weights: every type shows up
    assert result.cell_type_names == NAMES and result.cell_type_colors == tuple(COLORS.values())
    assert result.stats['cell_types'] == result.type_counts()
    assert list(result.stats['cell_types']) == list(NAMES) and sum(result.stats['cell_types'].values()) == \
        len(result.boxes) == result.stats['detections']
    np.testing.assert_array_equal(result.cell_types, full.cell_types)


def test_an_interrupted_typed_run_resumes_with_its_types(slide_path, typed_checkpoint, full, tmp_path):
    slide, detector = Slide(slide_path), spec(typed_checkpoint).build()
    with pytest.raises(KeyboardInterrupt):
        detect_slide(slide, Recording(detector, 3), resume=RowStore(str(tmp_path), 'k'), **KW)
    with np.load(tmp_path / 'k' / 'row_00000.npz') as row:
        assert row['extra'].dtype == CELL_TYPE and len(row['extra']) == len(row['scores']) > 0
    resumed = detect_slide(slide, detector, resume=RowStore(str(tmp_path), 'k'), **KW)
    assert resumed.stats['tile_rows_resumed'] == 1
    assert resumed.boxes.shape == full.boxes.shape
    np.testing.assert_array_equal(resumed.cell_types, full.cell_types)
    np.testing.assert_allclose(resumed.cell_type_scores, full.cell_type_scores, atol=1e-5)


def test_rows_saved_without_types_are_read_again_by_a_typed_run(slide_path, tiny_checkpoint, typed_checkpoint,
                                                                 tmp_path):
    slide = Slide(slide_path)
    plain = detect_slide(slide, spec(tiny_checkpoint).build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    assert plain.cell_types is None and 'cell_types' not in plain.stats and plain.cell_type_names == ()
    again = detect_slide(slide, spec(tiny_checkpoint).build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    assert again.stats['tiles_read'] == 0 and again.cell_types is None  # rows without types resume as before
    typed = detect_slide(slide, spec(typed_checkpoint).build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    assert typed.stats['tile_rows_resumed'] == 0 and len(typed.cell_types) == len(typed.boxes)


@pytest.fixture(scope='module')
def typed_run(slide_path, typed_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp('typed')
    paths = output_paths(str(folder), 'slide', pixelmap=True)
    settings = DetectionSettings(model=str(typed_checkpoint), threshold=0.05, nms=0.3, tile_size=256, overlap=48,
                                 min_tissue=0.0, device='cpu', batch_size=3, progress='none')
    return detect_to_files(slide_path, paths, settings), paths, settings


def test_the_nuclei_annotation_names_and_colours_each_type(typed_run):
    result, paths, _ = typed_run
    doc = json.loads(open(paths['annotation']).read())
    counts = result.stats['cell_types']
    assert doc['attributes']['stats']['cell_types'] == counts
    assert doc['description'] == f'{len(result.boxes)} detections by cellrcnn; ' + ', '.join(
        f'{name}: {COLORS[name]} ({counts[name]})' for name in NAMES)
    assert len(doc['elements']) == len(result.boxes)
    for element, index in zip(doc['elements'], result.cell_types):
        name = NAMES[index]
        assert (element['label'], element['group'], element['lineColor'], element['user']['class']) == \
            ({'value': name}, name, COLORS[name], name)
    assert 'classes' not in doc['attributes']['params']


def test_one_density_annotation_per_type(typed_run):
    result, paths, _ = typed_run
    docs = json.loads(open(paths['class_density']).read())
    assert [d['name'] for d in docs] == [f'cellrcnn nuclei density ({name})' for name in NAMES]
    assert [d['attributes']['density']['nuclei'] for d in docs] == list(result.stats['cell_types'].values())
    assert [d['attributes']['cell_type'] for d in docs] == list(NAMES)
    assert all(d['elements'][0]['type'] == 'griddata' for d in docs)
    everyone = json.loads(open(paths['density']).read())
    assert everyone['attributes']['density']['nuclei'] == len(result.boxes)


def test_the_nuclei_map_holds_every_nucleus_in_its_types_colour(typed_run):
    result, paths, _ = typed_run
    doc = json.loads(open(paths['map']).read())
    counts = result.stats['cell_types']
    assert doc['attributes']['density'] == {'kind': 'nuclei map', 'nuclei': len(result.boxes), 'cell_types': counts}
    assert doc['attributes']['model_sha256'] == json.loads(open(paths['annotation']).read())['attributes'][
        'model_sha256']
    elements = {e['label']['value']: e for e in doc['elements']}
    assert {name: len(e['points']) for name, e in elements.items()} == {n: c for n, c in counts.items() if c}
    for index, name in enumerate(NAMES):
        if not counts[name]:
            continue
        boxes = result.boxes[result.cell_types == index]
        centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
        points = np.array(elements[name]['points'])
        assert np.abs(points[:, :2] - centres).max() <= 0.05 + 1e-6 and (points[:, 3] == 1).all()
        rgb = ','.join(str(int(COLORS[name][i:i + 2], 16)) for i in (1, 3, 5))
        assert elements[name]['colorRange'][1].startswith(f'rgba({rgb},') and elements[name]['radius'] == DOT_RADIUS


def test_a_small_result_opens_on_its_boxes_a_large_one_on_its_map(typed_run, tmp_path):
    result, paths, settings = typed_run
    shown = {key: json.loads(open(paths[key]).read())['display']['visible'] for key in ('annotation', 'map', 'density')}
    assert len(result.boxes) <= BOXES_SHOWN and shown == {'annotation': True, 'map': False, 'density': False}
    assert all(d['display'] == {'visible': False} for d in json.loads(open(paths['class_density']).read()))
    assert shown_on_open('auto', BOXES_SHOWN + 1) == (False, True, False)
    assert shown_on_open('auto', BOXES_SHOWN + 1, has_pixelmap=True) == (False, False, True)
    assert shown_on_open('auto', BOXES_SHOWN, has_pixelmap=True) == (True, False, False)
    # a run that wrote neither view (a folder run without them) still opens on something: its boxes
    assert shown_on_open('auto', BOXES_SHOWN + 1, has_map=False) == (True, False, False)
    assert shown_on_open('boxes', 10 ** 6) == (True, False, False) and shown_on_open('map', 1) == (False, True, False)
    assert shown_on_open('pixelmap', 1, has_pixelmap=True) == (False, False, True)
    # The user's choice is written into the documents.
    again = output_paths(str(tmp_path), 'slide', pixelmap=True)
    for display in ('map', 'pixelmap'):
        write_results(result, again, 'rectangle', {'model': 'm.pt'}, display=display)
        assert [json.loads(open(again[key]).read())['display']['visible'] for key in ('annotation', 'map', 'pixelmap')
                ] == [False, display == 'map', display == 'pixelmap']
    with pytest.raises(CellRCNNError, match='display must be one of auto, boxes, map'):
        dataclasses.replace(settings, display='both').validate()


def test_the_pixelmap_outlines_every_nucleus_in_its_types_colour(typed_run, tmp_path):
    import large_image

    result, paths, _ = typed_run
    doc = json.loads(open(paths['pixelmap']).read())
    assert doc['attributes']['density'] == {'kind': 'nuclei pixelmap', 'nuclei': len(result.boxes)}
    assert doc['display'] == {'visible': False}  # a small result opens on its boxes
    (element,) = doc['elements']
    assert element['girderId'] == 'slide.labels.tiff'  # the task names its output instead (cli/CellDetection)
    assert element['values'] == [0] + (result.cell_types + 1).tolist()
    assert [c['label'] for c in element['categories']] == ['none', *NAMES]
    labels = large_image.open(paths['label_image'])
    assert (labels.sizeX, labels.sizeY) == result.slide.base_size
    rgb, _ = labels.getRegion(format=large_image.constants.TILE_FORMAT_NUMPY)  # base pixels, as the boxes are
    rgb = rgb.astype(np.int64)
    label = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    x0, y0 = np.floor(result.boxes[:, 0]).astype(int), np.floor(result.boxes[:, 1]).astype(int)
    corner = label[y0, x0]  # each box's top-left pixel: its own outline, or a later box over it
    assert (corner[-1] == 2 * len(result.boxes) + 1) and (corner % 2 == 1).mean() > 0.8
    assert (corner >= 2 * np.arange(len(result.boxes)) + 2).all()
    assert len(np.unique(label[label > 0] // 2)) >= 0.9 * len(result.boxes)  # nuclei overlap a little at most
    # both or neither, told before any detection
    with pytest.raises(CellRCNNError, match='needs both its annotation and its label image'):
        detect_to_files('no-such-slide.svs', {'pixelmap': str(tmp_path / 'p.anot.json')}, typed_run[2])
    # opening on the pixelmap needs one
    with pytest.raises(CellRCNNError, match='display pixelmap needs the nuclei pixelmap written'):
        detect_to_files('no-such-slide.svs', {'annotation': str(tmp_path / 'a.anot.json')},
                        dataclasses.replace(typed_run[2], display='pixelmap'))
    with pytest.raises(CellRCNNError, match='display map needs the nuclei map written'):
        detect_to_files('no-such-slide.svs', {'annotation': str(tmp_path / 'a.anot.json')},
                        dataclasses.replace(typed_run[2], display='map'))


def test_the_tables_hold_the_type_and_its_probability(typed_run):
    result, paths, _ = typed_run
    features = [f for f in json.loads(open(paths['geojson']).read())['features']
                if f['properties']['objectType'] == 'detection']  # after the tissue's annotations
    assert len(features) == len(result.boxes)
    rgb = {'lymphocyte': [0, 0, 255], 'tumour': [255, 0, 0], 'stromal': [0, 255, 0]}
    for feature, index, p in zip(features, result.cell_types, result.cell_type_scores):
        props = feature['properties']
        assert props['classification'] == {'name': NAMES[index], 'color': rgb[NAMES[index]]}
        assert props['measurements']['class_probability'] == pytest.approx(float(p), abs=1e-4)
    rows = list(csv.DictReader(open(paths['csv'], newline='')))
    assert list(rows[0])[-3:] == ['score', 'class', 'class_probability']
    assert [r['class'] for r in rows] == [NAMES[i] for i in result.cell_types]
    np.testing.assert_allclose([float(r['class_probability']) for r in rows], result.cell_type_scores, atol=1e-4)


def test_the_overview_draws_each_box_in_its_types_colour(typed_run, tmp_path):
    result, paths, _ = typed_run
    typed = cv2.imread(paths['overlay'])[..., ::-1]
    write_overlay(dataclasses.replace(result, cell_types=None), tmp_path / 'plain.png')  # every box green
    plain = cv2.imread(str(tmp_path / 'plain.png'))[..., ::-1]
    recoloured = (typed != plain).any(axis=2)
    assert (plain[recoloured] == [0, 255, 0]).all()  # only box outlines differ
    # stromal boxes are green (#00ff00) either way; lymphocytes turned blue, tumour cells red
    assert set(map(tuple, typed[recoloured].tolist())) == {(0, 0, 255), (255, 0, 0)}
    assert result.stats['cell_types']['lymphocyte'] and result.stats['cell_types']['tumour']


def test_the_summary_counts_each_type(typed_run):
    result, _, settings = typed_run
    counts = result.stats['cell_types']
    assert detection_summary_lines(result)[-1] == \
        f'cell types: lymphocyte {counts["lymphocyte"]}, tumour {counts["tumour"]}, stromal {counts["stromal"]}'


def test_classes_keep_only_those_types(typed_run, slide_path, tmp_path):
    full_result, _, settings = typed_run
    paths = output_paths(str(tmp_path), 'slide')
    settings = DetectionSettings(**{**settings.__dict__, 'classes': ('stromal', 'lymphocyte')})
    result = detect_to_files(slide_path, paths, settings)
    keep = np.isin(full_result.cell_types, [0, 2])
    assert 0 < keep.sum() < len(keep)
    np.testing.assert_allclose(result.boxes, full_result.boxes[keep], atol=1e-3)
    assert result.cell_type_names == ('lymphocyte', 'stromal')  # the model's order
    assert [result.cell_type_names[i] for i in result.cell_types] == [NAMES[i] for i in full_result.cell_types[keep]]
    counts = full_result.stats['cell_types']
    assert result.stats['cell_types'] == {'lymphocyte': counts['lymphocyte'], 'stromal': counts['stromal']}
    doc = json.loads(open(paths['annotation']).read())
    assert doc['attributes']['params']['classes'] == ['lymphocyte', 'stromal']
    assert {e['group'] for e in doc['elements']} == {name for name, n in result.stats['cell_types'].items() if n}
    assert [d['name'] for d in json.loads(open(paths['class_density']).read())] == \
        ['cellrcnn nuclei density (lymphocyte)', 'cellrcnn nuclei density (stromal)']


@pytest.mark.parametrize('model, classes, message', [
    ('typed', ('neutrophil',), "^unknown class 'neutrophil': the model's cell types are lymphocyte, tumour, stromal$"),
    ('tiny', ('tumour',), '^classes tumour asked for, but the model has no cell types$'),
    ('typed', (), r'^classes must be distinct cell type names, not \(\)$'),
    ('typed', ('tumour', 'tumour'), r"^classes must be distinct cell type names, not \('tumour', 'tumour'\)$"),
    ('typed', 'tumour', "^classes must be a sequence, not 'tumour'$"),
])
def test_bad_classes_are_one_line_errors_before_detection(request, tmp_path, model, classes, message):
    checkpoint = request.getfixturevalue(f'{model}_checkpoint')
    with pytest.raises(CellRCNNError, match=message):
        detect_to_files(str(tmp_path / 'missing.svs'), {'annotation': str(tmp_path / 'a.anot.json')},
                        DetectionSettings(model=str(checkpoint), classes=classes, device='cpu'))


def test_classes_on_the_command_line(slide_path, typed_checkpoint, tmp_path):
    def detect(*classes):
        return subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', str(slide_path), '-o', str(tmp_path),
                               '--model', str(typed_checkpoint), '--threshold', '0.05', '--tile-size', '256',
                               '--device', 'cpu', '--progress', 'none', '--classes', *classes],
                              capture_output=True, text=True, timeout=600)

    run = detect('tumour', 'lymphocyte')
    assert run.returncode == 0, run.stderr
    assert re.search(r'^cell types: lymphocyte \d+, tumour \d+$', run.stdout, re.M)
    assert {row['class'] for row in csv.DictReader(open(tmp_path / 'slide.csv'))} <= {'tumour', 'lymphocyte'}
    run = detect('neutrophil')
    assert run.returncode == 2 and run.stderr == "cellrcnn: error: unknown class 'neutrophil': the model's cell " \
        'types are lymphocyte, tumour, stromal\n'


def test_a_model_without_types_writes_what_it_wrote_before(slide_path, tiny_checkpoint, tmp_path):
    paths = output_paths(str(tmp_path), 'slide')
    settings = DetectionSettings(model=str(tiny_checkpoint), threshold=0.05, tile_size=256, min_tissue=0.0,
                                 device='cpu', progress='none')
    result = detect_to_files(slide_path, paths, settings)
    assert result.cell_types is None and 'cell_types' not in result.stats
    doc = json.loads(open(paths['annotation']).read())
    assert doc['description'] == f'{len(result.boxes)} detections by cellrcnn' and 'classes' not in \
        doc['attributes']['params']
    assert all(set(e) == {'type', 'center', 'width', 'height', 'rotation', 'lineColor', 'user'} and
               e['user']['class'] == 'nucleus' and e['lineColor'] == 'rgb(0,255,0)' for e in doc['elements'])
    assert open(paths['csv']).readline() == 'x,y,x1,y1,x2,y2,width_um,height_um,score,class\n'
    assert 'class_probability' not in open(paths['geojson']).read()
    assert json.loads(open(paths['class_density']).read()) == []
    nuclei_map = json.loads(open(paths['map']).read())
    assert 'cell_types' not in nuclei_map['attributes']['density'] and len(nuclei_map['elements']) == 1
    assert len(nuclei_map['elements'][0]['points']) == len(result.boxes) and 'label' not in nuclei_map['elements'][0]
    assert len(detection_summary_lines(result)) == 1


def test_dask_batches_carry_the_types(slide_path, typed_checkpoint, full):
    spread = detect_slide(Slide(slide_path), spec(typed_checkpoint).build(), scheduler='local:1', **KW)
    np.testing.assert_array_equal(spread.cell_types, full.cell_types)
    np.testing.assert_allclose(spread.cell_type_scores, full.cell_type_scores, atol=1e-5)


def test_a_cohort_with_a_class_the_model_lacks_stops_before_its_first_slide(slide_path, typed_checkpoint, tmp_path):
    """One line and no table, not one failed row per slide."""
    from support import run_batch

    folder = tmp_path / 'slides'
    folder.mkdir()
    for name in ('a.tiff', 'b.tiff'):
        (folder / name).write_bytes(open(slide_path, 'rb').read())
    code, out, err, rows = run_batch(folder, '-o', tmp_path / 'out', '--model', typed_checkpoint, '--classes',
                                     'neutrophil')
    assert code == 2 and rows == {} and out == ''
    assert err == "cellrcnn: error: unknown class 'neutrophil': the model's cell types are lymphocyte, tumour, " \
        'stromal\n'
