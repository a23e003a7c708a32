"""Training from annotations drawn in HistomicsUI, against a real Girder with the DSA plugins
(cellrcnn.devstack.local_girder).

Three synthetic slides with exact nuclei (``annotated_cohort`` in tests/support.py): 100 nuclei
as rectangles inside a "region" rectangle on slide a, 100 as points on slide b, every nucleus of slide c (held out)
as rectangles, and a decoy annotation of another name, in this module's own folder of the session's Girder
(tests/conftest.py); the same nuclei with classes (``typed``) for the cell types. Everything goes through Girder's
REST API.
"""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from cellrcnn.annotation import annotation_to_nuclei
from cellrcnn.annotation_classes import type_colors, typed_config
from cellrcnn.checkpoint import load_checkpoint, load_model
from cellrcnn.config import ModelConfig
from cellrcnn.devstack.local_girder import girder_python
from cellrcnn.errors import CellRCNNError
from cellrcnn.girder_training import holdout_count, train_from_girder, training_summary_lines
from cellrcnn.labelled_slides import find_labelled_slides
from cellrcnn.metrics import evaluate
from cellrcnn.settings import AnnotationTrainingSettings
from cellrcnn.train import CELL_TYPE_PALETTE, TrainConfig
from support import annotated_cohort

PYTHON, WHY_NOT = girder_python()
girder = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT or '')
CLI_DIR = os.path.join(os.path.dirname(__file__), '..', 'cli')


@pytest.fixture(scope='module')
def cohort(server, tmp_path_factory):
    return annotated_cohort(server, str(tmp_path_factory.mktemp('slides')))


@pytest.fixture(scope='module')
def trained(server, cohort, tmp_path_factory):
    """The library flow, fine-tuning the bundled model briefly on the CPU, uploading to a folder of models."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    models = server.client().createFolder(server.collection_id, 'models', parentType='collection')['_id']
    try:
        result = train_from_girder(server.api_url, server.token, server.folder_id, 'nuclei',
                                   str(tmp_path_factory.mktemp('run')),
                                   AnnotationTrainingSettings(steps=16, batch_size=2, device='cpu'),
                                   output_folder=models)
    finally:
        torch.set_num_threads(threads)
    return result, models


@girder
def test_training_from_annotations_finds_the_cells_of_a_held_out_slide(server, cohort, trained):
    result, models = trained
    assert [s.name for s in result.train_slides] == ['a_rectangles.tiff', 'b_points.tiff']
    assert [s.name for s in result.heldout_slides] == ['c_heldout.tiff']
    # the decoy annotation and the region rectangle are not nuclei; points were sized by the starting model
    assert [s.cells for s in result.train_slides] == [100, 100]
    assert result.train_slides[0].elements == {'rectangle': 100}
    assert result.train_slides[1].elements == {'point': 100} and result.train_slides[1].points_sized >= 90
    assert result.heldout_slides[0].cells == len(cohort['c_heldout.tiff']['all_boxes'])
    assert result.metrics['n_gt'] == len(cohort['c_heldout.tiff']['all_boxes'])
    assert result.metrics['f1'] >= 0.8, result.metrics

    gc = server.client()
    items = {item['name']: item for item in gc.listItem(models)}
    assert set(items) == {'cellrcnn-nuclei.pt', 'cellrcnn-nuclei.md'}
    assert {f['itemId'] for f in result.uploaded} == {item['_id'] for item in items.values()}
    card = b''.join(gc.downloadFileAsIterator(next(gc.listFile(items['cellrcnn-nuclei.md']['_id']))['_id']))
    card = card.decode()
    n = len(cohort['c_heldout.tiff']['all_boxes'])
    assert "**'nuclei'**" in card and f'| c_heldout.tiff | held out | {n} | rectangle {n} |' in card
    assert f"**{result.metrics['f1']:.3f}**" in card and 'training** slides' in card
    # who made the training data: every annotation used, by id and by its creator's login
    login = gc.get('user/me')['login']
    for labelled in result.train_slides + result.heldout_slides:
        assert labelled.annotation_creators == [login] * len(labelled.annotation_ids) and labelled.annotation_ids
        for annotation_id in labelled.annotation_ids:
            assert f'| {labelled.path} | `{annotation_id}` | {login} |' in card
    stored = load_checkpoint(result.model_path)['training_data']['annotations']
    assert {(a['id'], a['creator']) for a in stored} == {
        (i, login) for s in result.train_slides + result.heldout_slides for i in s.annotation_ids}


@girder
def test_the_cell_detection_task_takes_the_trained_model(server, cohort, trained, tmp_path):
    """The uploaded model file, downloaded from Girder, is a Model the CellDetection task runs with; on the held-out
    slide it finds the nuclei."""
    result, models = trained
    gc = server.client()
    item = next(i for i in gc.listItem(models) if i['name'].endswith('.pt'))
    model = tmp_path / 'model.pt'
    gc.downloadFile(next(gc.listFile(item['_id']))['_id'], str(model))
    slide = result.heldout_slides[0].local_path
    nuclei = tmp_path / 'nuclei.anot'
    run = subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'CellDetection', slide,
                          str(nuclei), '--model_file', str(model), '--device', 'cpu', '--api-url', '',
                          '--girder-token', ''], cwd=CLI_DIR, capture_output=True, text=True, timeout=300,
                         env={**os.environ, 'OMP_NUM_THREADS': '2'})
    assert run.returncode == 0, run.stderr
    doc = json.loads(nuclei.read_text())
    assert doc['attributes']['model'] == 'model.pt'
    boxes = np.array([[e['center'][0] - e['width'] / 2, e['center'][1] - e['height'] / 2,
                       e['center'][0] + e['width'] / 2, e['center'][1] + e['height'] / 2] for e in doc['elements']])
    scores = np.array([e['user']['score'] for e in doc['elements']])
    truth = cohort['c_heldout.tiff']['all_boxes']
    assert evaluate([{'boxes': boxes, 'scores': scores}], [truth], threshold=0)['f1'] >= 0.8


@girder
def test_an_unknown_annotation_name_is_one_line_naming_those_present(server, cohort, tmp_path):
    with pytest.raises(CellRCNNError) as info:
        train_from_girder(server.api_url, server.token, server.folder_id, 'nucleii', str(tmp_path),
                          AnnotationTrainingSettings(steps=1))
    message = str(info.value)
    assert '\n' not in message
    assert "no annotation named 'nucleii' on the 3 slide(s)" in message
    assert "'nuclei' (3)" in message and "'tumour outline' (1)" in message
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


@girder
def test_the_task_reports_a_bad_folder_in_one_line(server, tmp_path):
    run = subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'TrainCellDetector',
                          '0123456789abcdef01234567', str(tmp_path / 'model.pt'), '--api-url', server.api_url,
                          '--girder-token', server.token], cwd=CLI_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith('TrainCellDetector: error: ') and run.stderr.count('\n') == 1
    assert 'folder' in run.stderr and not (tmp_path / 'model.pt').exists()


@girder
def test_a_rectangle_of_negative_size_is_one_line_naming_it_before_any_download(server, synthetic_slide, tmp_path):
    """Girder stores a rectangle with negative width and height when a valid element comes first; before, training
    downloaded every slide and then stopped in a torchvision assertion."""
    gc = server.client()
    folder = gc.createFolder(server.collection_id, 'negative', parentType='collection')['_id']  # apart from the cohort
    item_id, _ = server.upload_slide(synthetic_slide(320, 256, seed=51)[0], 'neg.tiff', folder_id=folder)
    good = {'type': 'rectangle', 'center': [50, 50, 0], 'width': 10, 'height': 12, 'rotation': 0}
    annotation = gc.post('annotation', parameters={'itemId': item_id}, json={
        'name': 'nuclei', 'elements': [good, {**good, 'center': [90, 90, 0], 'width': -10, 'height': -12}]})
    element_id = gc.get(f'annotation/{annotation["_id"]}')['annotation']['elements'][1]['id']
    with pytest.raises(CellRCNNError) as info:
        train_from_girder(server.api_url, server.token, folder, 'nuclei', str(tmp_path / 'run'),
                          AnnotationTrainingSettings(steps=1, device='cpu'))
    assert str(info.value) == (f"neg.tiff: annotation 'nuclei' element 1 (id {element_id}): a rectangle of negative "
                               'size (width -10, height -12); correct or delete it')
    assert not (tmp_path / 'run').exists()


def test_held_out_slides():
    assert holdout_count(1, 3) == 1 and holdout_count(0.25, 8) == 2 and holdout_count('2', 5) == 2
    for bad, n in ((3, 3), (0, 3), (1.5, 3), ('x', 3), (1, 1)):
        with pytest.raises(CellRCNNError):
            holdout_count(bad, n)


def test_the_task_lists_its_parameters():
    run = subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'TrainCellDetector', '--xml'],
                         cwd=CLI_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    import xml.etree.ElementTree as ET

    root = ET.fromstring(run.stdout)
    folder = next(root.iter('directory'))
    assert folder.get('reference') == '_girder_id_'  # the id is passed: the slides are not copied into the job
    outputs = {e.findtext('name'): e.get('fileExtensions') for e in root.iter('file')
               if e.findtext('channel') == 'output'}
    assert outputs == {'outputModelFile': '.pt', 'outputModelCard': '.md'}
    names = {e.findtext('name') for e in root.iter() if e.find('name') is not None}
    assert {'annotation_name', 'holdout', 'steps', 'init_model', 'girderApiUrl', 'girderToken'} <= names


def test_a_region_drawn_with_many_vertices_is_cheap_to_test_nuclei_against():
    """Nuclei x vertices would be 4e9 pairs here (tens of GB): prepared geometry answers in time and memory that
    grow with nuclei + vertices."""
    from cellrcnn.labelled_slides import _centres_inside

    angle = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    circle = np.stack([5000 + 3000 * np.cos(angle), 5000 + 3000 * np.sin(angle)], 1)
    square = np.array([[0, 0], [500, 0], [500, 500], [0, 500]], float)
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 10_000, (200_000, 2))
    boxes = np.hstack([centres - 4, centres + 4])
    inside = _centres_inside(boxes, [circle, square])
    distance = np.hypot(centres[:, 0] - 5000, centres[:, 1] - 5000)
    expected = (distance < 3000) | ((centres < 500).all(axis=1))
    near_edge = np.abs(distance - 3000) < 1  # the polygon is a 20 000-gon, not the circle
    assert inside.dtype == bool and (inside == expected)[~near_edge].all() and inside.sum() > 50_000


def test_a_regions_hole_is_left_out_of_the_nuclei_and_the_pixels_trained_on():
    """A region drawn around an area left unannotated (HistomicsUI's hole): its nuclei are not trained on, and its
    pixels are painted white like those outside the region, so that they teach no background either."""
    from types import SimpleNamespace

    from cellrcnn.labelled_slides import _centres_inside, _region_mask, split_annotation

    region = {'type': 'polyline', 'closed': True, 'label': {'value': 'region'},
              'points': [[0, 0, 0], [400, 0, 0], [400, 400, 0], [0, 400, 0]],
              'holes': [[[100, 100, 0], [300, 100, 0], [300, 300, 0], [100, 300, 0]]]}
    nucleus = {'type': 'point', 'center': [50, 50, 0]}
    docs, polygons = split_annotation([{'name': 'nuclei', 'elements': [region, nucleus]}])
    assert docs[0]['elements'] == [nucleus] and len(polygons) == 1
    centres = np.array([[50, 50], [200, 200], [350, 150], [500, 500]], float)
    assert _centres_inside(np.hstack([centres, centres]), polygons).tolist() == [True, False, True, False]
    tile = SimpleNamespace(base_x=0, base_y=0, base_width=400, base_height=400, width=200, height=200)
    mask = _region_mask(tile, SimpleNamespace(region=polygons))
    assert mask[:45].all() and mask[155:].all() and not mask[55:145, 55:145].any()


# --------------------------------------------------------------------------- big regions

FAR = 3072  #: side of the slides whose two annotated nuclei lie in opposite corners
TILE_PIXELS = 512 * 512  #: the training tiles' size (held-out tiles: 1024²)


def corner_nuclei(boxes):
    """Rectangle elements of the two nuclei nearest to a slide's top-left and bottom-right corners."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    chosen = [boxes[np.argmin(centres.sum(axis=1))], boxes[np.argmax(centres.sum(axis=1))]]
    return [{'type': 'rectangle', 'center': [float(x1 + x2) / 2, float(y1 + y2) / 2, 0], 'width': float(x2 - x1),
             'height': float(y2 - y1), 'rotation': 0} for x1, y1, x2, y2 in chosen]


@pytest.fixture
def pixels_read(monkeypatch):
    """``[(path, width, height), ...]`` of every tile read through ``Slide.read`` while the test runs."""
    from cellrcnn.slide import Slide

    reads, read = [], Slide.read

    def counted(self, tile):
        image = read(self, tile)
        reads.append((self.path, image.shape[1], image.shape[0]))
        return image

    monkeypatch.setattr(Slide, 'read', counted)
    return reads


def labelled_on(path, elements, region=None):
    """A :class:`LabelledSlide` of annotation ``elements`` (and a region polygon), read and prepared on ``path``."""
    from cellrcnn.labelled_slides import LabelledSlide, prepare_slide, read_nuclei
    from cellrcnn.slide import Slide

    slide = Slide(str(path), magnification=20)
    labelled = LabelledSlide('far.tiff', 'far.tiff', 'item', 'file', {}, ['annotation-id'], ['me'], {}, region,
                             docs=[{'name': 'nuclei', 'elements': elements}])
    return slide, prepare_slide(read_nuclei(labelled), slide)


@pytest.mark.parametrize('region', [None, 'labelled'])
def test_a_region_spanning_the_slide_reads_only_the_tiles_of_its_nuclei(synthetic_slide, pixels_read, region):
    """Two nuclei in opposite corners (the bounding box of the nuclei, or a labelled region over the whole slide):
    the tiles read and kept are those of the two nuclei, not the slide between them; before, every tile of the
    region was read and kept (pixels growing with the region's area)."""
    from cellrcnn.labelled_slides import region_samples, region_tiles

    path, boxes = synthetic_slide(FAR, FAR, seed=61)
    outline = [np.array([[0, 0], [FAR, 0], [FAR, FAR], [0, FAR]], float)] if region else None
    slide, labelled = labelled_on(path, corner_nuclei(boxes), outline)
    assert np.prod(labelled.region_box[2:]) > 2 * 3e6  # the region is more than twice the cap
    tiles, whole = region_tiles(slide, labelled, tile_size=512, overlap=64, max_megapixels=3)
    samples = region_samples(tiles, labelled)
    assert not whole and 2 <= len(tiles) <= 4  # a nucleus in the overlap of two tiles is in both
    assert sum(width * height for _, width, height in pixels_read) <= 4 * TILE_PIXELS
    assert sum(image.nbytes for image, _ in samples) <= 4 * TILE_PIXELS * 3
    assert sum(len(b) for _, b in samples) >= 2 and all(len(b) for _, b in samples)


def test_a_region_that_fits_is_read_whole(synthetic_slide, pixels_read):
    """Under the cap nothing changes: every tile of the region is a sample, those without nuclei too."""
    from cellrcnn.labelled_slides import region_samples, region_tiles
    from cellrcnn.tiling import tile_grid

    path, boxes = synthetic_slide(FAR, FAR, seed=61)
    slide, labelled = labelled_on(path, corner_nuclei(boxes))
    tiles, whole = region_tiles(slide, labelled, tile_size=512, overlap=64, max_megapixels=256)
    grid = tile_grid(slide, tile_size=512, overlap=64, roi=labelled.region_box, min_tissue=0)
    assert whole and [t for t, _ in tiles] == grid and len(pixels_read) == len(grid) > 4
    assert sum(not len(b) for _, b in region_samples(tiles, labelled)) >= len(grid) - 4


def test_a_region_whose_nuclei_need_more_than_the_cap_is_one_line_before_a_read(synthetic_slide, pixels_read):
    from cellrcnn.labelled_slides import region_tiles

    path, boxes = synthetic_slide(FAR, FAR, seed=61)
    elements = [{'type': 'point', 'center': [float(x1 + x2) / 2, float(y1 + y2) / 2, 0]}
                for x1, y1, x2, y2 in boxes]  # nuclei all over the slide
    slide, labelled = labelled_on(path, elements)
    with pytest.raises(CellRCNNError) as info:
        region_tiles(slide, labelled, tile_size=512, overlap=64, max_megapixels=1)
    message = str(info.value)
    assert '\n' not in message and message.startswith('far.tiff: the region of annotation annotation-id needs ')
    assert 'more than the 1 a region may keep (max_region_megapixels)' in message
    assert not pixels_read


@girder
def test_training_on_nuclei_in_opposite_corners_reads_only_their_tiles(server, synthetic_slide, pixels_read,
                                                                       tmp_path):
    """The reviewer's case through Girder: on each slide, one annotation of two nuclei in opposite corners (its
    region, their bounding box, is the whole slide). Training and the held-out evaluation run on the tiles of the
    nuclei; the slides are never read whole."""
    import torch

    gc = server.client()
    folder = gc.createFolder(server.collection_id, 'far apart', parentType='collection')['_id']
    for name, seed in (('far_a.tiff', 62), ('far_b.tiff', 63)):
        path, boxes = synthetic_slide(FAR, FAR, seed=seed)
        item_id, _ = server.upload_slide(path, name, folder_id=folder)
        gc.post('annotation', parameters={'itemId': item_id},
                json={'name': 'nuclei', 'elements': corner_nuclei(boxes)})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_from_girder(server.api_url, server.token, folder, 'nuclei', str(tmp_path),
                                   AnnotationTrainingSettings(steps=2, batch_size=2, device='cpu',
                                                              max_region_megapixels=3))
    finally:
        torch.set_num_threads(threads)
    assert [s.cells for s in result.train_slides + result.heldout_slides] == [2, 2]
    assert result.metrics['n_gt'] == 2 and os.path.exists(result.model_path)
    read = sum(width * height for _, width, height in pixels_read)
    assert read <= 4 * TILE_PIXELS + 2 * 1024 * 1024  # the training slide's tiles, the held-out slide's
    assert read < FAR * FAR / 2  # of two slides


def test_training_settings_out_of_bounds_stop_the_run_before_it_starts(tmp_path):
    """Checked before the server is asked anything (this address answers nothing)."""
    for change, message in (({'steps': 10 ** 9}, 'steps must be between 1 and 100000, not 1e+09'),
                            ({'max_region_megapixels': 10 ** 6}, 'max_region_megapixels must be between 1 and 4096'),
                            ({'holdout': '2'}, "holdout must be a number, not '2'"),
                            ({'from_scratch': 1}, 'from_scratch must be true or false, not 1')):
        with pytest.raises(CellRCNNError, match=f'^{re.escape(message)}'):
            train_from_girder('http://127.0.0.1:9/api/v1', 'token', 'folder', 'nuclei', str(tmp_path / 'run'),
                              AnnotationTrainingSettings(**change))
    assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------- cell types


@pytest.fixture(scope='module')
def typed(server, cohort):
    """The cohort's annotated nuclei posted again with a class by size ('small' below the median side, else 'big'):
    as one annotation ``typed`` whose rectangles have the label 'S' or 'B' and the style group 'small' or 'big', and
    as one annotation per class, named 'small' and 'big'. Small nuclei are drawn red, big ones in two colours.
    :returns: ``{file name: class per annotated nucleus}``."""
    gc = server.client()
    every = np.concatenate([c['boxes'] for c in cohort.values()])
    cut = np.median(np.sqrt(np.prod(every[:, 2:] - every[:, :2], axis=1)))
    classes = {}
    for filename, c in cohort.items():
        names = np.where(np.sqrt(np.prod(c['boxes'][:, 2:] - c['boxes'][:, :2], axis=1)) < cut, 'small', 'big')
        elements = [{'type': 'rectangle', 'center': [(x1 + x2) / 2, (y1 + y2) / 2, 0], 'width': x2 - x1,
                     'height': y2 - y1, 'rotation': 0, 'label': {'value': name[0].upper()}, 'group': str(name),
                     'lineColor': 'rgb(255,0,0)' if name == 'small' else ('#00ff00', '#0000ff')[i % 2]}
                    for i, ((x1, y1, x2, y2), name) in enumerate(zip(c['boxes'].tolist(), names))]
        gc.post('annotation', parameters={'itemId': c['item_id']}, json={'name': 'typed', 'elements': elements})
        for name in ('small', 'big'):
            gc.post('annotation', parameters={'itemId': c['item_id']},
                    json={'name': name, 'elements': [e for e, n in zip(elements, names) if n == name]})
        classes[filename] = names
    return classes


@girder
@pytest.mark.parametrize('class_from, small, big', [('label', 'S', 'B'), ('group', 'small', 'big')])
def test_a_nucleus_class_is_its_label_or_its_group(server, typed, class_from, small, big):
    slides = find_labelled_slides(server.api_url, server.token, server.folder_id, 'typed', class_from=class_from)
    assert {s.name: s.classes.tolist() for s in slides} == {
        name: np.where(classes == 'small', small, big).tolist() for name, classes in typed.items()}


@girder
def test_cell_types_learnt_from_one_annotation_per_type(server, typed, tmp_path):
    """Classes from annotation names, no --annotation-name: the model carries the types, their labels and colours;
    the held-out slide is measured per type (counts, confusion) and the card and the summary say so."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_from_girder(server.api_url, server.token, server.folder_id, None, str(tmp_path),
                                   AnnotationTrainingSettings(steps=4, batch_size=2, device='cpu',
                                                              cell_types=('small', 'large=big'),
                                                              class_from='annotation'))
    finally:
        torch.set_num_threads(threads)
    config = load_model(result.model_path).config
    assert config.cell_types == ('small', 'large') and config.cell_type_labels == ((), ('big',))
    assert config.cell_type_colors == ('#ff0000', CELL_TYPE_PALETTE[1])  # big nuclei were drawn in two colours
    # the type bias is fitted on the training slides' nuclei (the bundled model's own is not kept)
    assert len(config.cell_type_bias) == 2 and result.model_config.cell_type_bias == config.cell_type_bias
    held = typed['c_heldout.tiff']
    m = result.class_metrics
    assert [t['tp'] + t['fn'] for t in m['types']] == [(held == 'small').sum(), (held == 'big').sum()]
    assert len(m['confusion']) == 3 and sum(map(sum, m['confusion'][:2])) == result.metrics['n_gt'] == len(held)
    assert load_checkpoint(result.model_path)['held_out_cell_types'] == m
    trained = np.concatenate([typed['a_rectangles.tiff'], typed['b_points.tiff']])
    card = open(result.card_path).read()
    assert result.model_path.endswith('cellrcnn-small-large.pt') and "**'small'** or **'large'** or **'big'**" in card
    assert (f"| small | small | `#ff0000` | {(trained == 'small').sum()} | {(held == 'small').sum()} | "
            f"{m['types'][0]['precision']:.3f} | {m['types'][0]['recall']:.3f} | **{m['types'][0]['f1']:.3f}** |"
            ) in card
    assert f"| large | large, big | `{CELL_TYPE_PALETTE[1]}` | {(trained == 'big').sum()} |" in card
    assert '| truth \\ detected | small | large | missed |' in card
    assert 'Cell-type bias (added to the classifier' in card and f'small {config.cell_type_bias[0]:+.1f}' in card
    assert f"| no nucleus | {' | '.join(map(str, m['confusion'][2]))} |" in card
    lines = training_summary_lines(result)
    assert 'held-out cell types:' in lines and any(line.startswith('small ') for line in lines)


@girder
def test_bad_cell_types_are_one_line_before_anything_is_downloaded(server, typed, tmp_path, tiny_checkpoint):
    cases = [({'cell_types': ('small', 'big')}, "no annotated nucleus of cell type 'small', 'big' on the training "
                                                "slides (class from label); classes there: 'B' ("),  # labels: S, B
             ({'cell_types': ('small',), 'class_from': 'colour'}, "not 'colour'"),
             # (a starting model with cell types of its own, like the bundled one, names the annotations itself)
             ({'class_from': 'annotation', 'init': str(tiny_checkpoint)}, 'need --cell-types')]
    for options, words in cases:
        with pytest.raises(CellRCNNError) as info:
            train_from_girder(server.api_url, server.token, server.folder_id, 'typed', str(tmp_path),
                              AnnotationTrainingSettings(steps=1, **options))
        assert words in str(info.value) and '\n' not in str(info.value), str(info.value)
    assert not list(tmp_path.iterdir())


def test_colours_of_cell_types_come_from_their_nuclei_when_they_agree():
    doc = {'name': 'tumour', 'elements': [
        {'type': 'point', 'center': [5, 5, 0], 'label': {'value': 'T'}, 'group': 'g', 'lineColor': 'rgb(0,128,255)'},
        {'type': 'circle', 'center': [9, 9, 0], 'radius': 2, 'group': 'g', 'lineColor': '#0080ff'},
        {'type': 'rectangle', 'center': [20, 9, 0], 'width': 4, 'height': 4, 'lineColor': '#0f0'}]}
    assert [annotation_to_nuclei(doc, class_from=c)['classes'] for c in ('label', 'group', 'annotation')] == [
        ['T', 'g', None], ['g', 'g', None], ['tumour'] * 3]
    nuclei = annotation_to_nuclei(doc, class_from='group')
    slide = types.SimpleNamespace(classes=nuclei['classes'], colors=nuclei['colors'])
    config = typed_config(ModelConfig(), TrainConfig(cell_types=('g', 'other')), 'group')
    assert type_colors([slide], config) == ('#0080ff', CELL_TYPE_PALETTE[1])
