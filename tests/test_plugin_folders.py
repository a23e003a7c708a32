"""The Girder plugin (plugin/, girder_cellrcnn) in a real DSA Girder: its folder endpoints, the results table (JSON
and CSV, paged, with cells a spreadsheet would run neutralised) and folder-wide CellDetection through slicer_cli_web,
under Girder's access control. The plugin's other modules: tests/test_plugin_results.py (a slide's result as item
metadata, cell types, re-runs) and tests/test_plugin_trust.py (users who try to borrow others' rights).

Skipped unless the server's own virtualenv is there (see tests/test_girder_posting.py). The server is the session's
(tests/conftest.py, which also holds the fixtures the plugin's modules share: the slide and the bundled model's result
on it, the registered CellDetection task, the user ``reader``), this module's folders in a collection of its own. No
RabbitMQ here: the server's celery broker is kombu's in-process memory transport, so slicer_cli_web really creates and
queues each slide's job (girder_worker publishes its message) but no worker takes it; the tests play the worker's part
through the same ``PUT /job/{id}`` calls girder_worker makes.
"""

import csv
import hashlib
import io
import json
import math
import pathlib
import sys
import time

import numpy as np
import pytest
import requests

from cellrcnn import __version__
from cellrcnn.checkpoint import load_checkpoint, stored_config
from cellrcnn.girder_post import post_annotations
from plugin_support import (
    COLUMNS,
    DEFAULT_MODEL,
    FAST,
    NEEDS_GIRDER,
    READ,
    WRITE,
    annotate,
    children,
    detect,
    error_of,
    expected_summary,
    folder,
    grant,
    in_database,
    nuclei,
    play_worker,
    queued,
    result_of,
    rounded,
    slide_in,
)

pytestmark = NEEDS_GIRDER

QUEUED_OR_RUNNING = {0, 1, 2}
CANCELED, CANCELING = 5, 824


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def child_inputs(job):
    """(slide file id, model file id or None, output file names) from a slicer_cli_web job's container arguments:
    ``CellDetection [--flag value ...] SLIDE NUCLEI_OUTPUT``, files as girder_worker transforms."""
    args = job['kwargs']['container_args']

    def file_id(arg):
        assert 'GirderFileIdToVolume' in arg
        return arg.split('File ID=')[1].split(' ')[0]

    assert args[0] == 'CellDetection'
    model = file_id(args[args.index('--model_file') + 1]) if '--model_file' in args else None
    outputs = sorted(a.split('"')[1] for a in args if 'VolumePath' in a)
    for flag in ('--api-url', '--girder-token'):  # empty in the request: slicer_cli_web fills them in
        assert args[args.index(flag) + 1].startswith('<slicer_cli_web.girder_worker_plugin')
    return file_id(args[-2]), model, outputs


# --------------------------------------------------------------------------- the results table


def typed_columns(doc):
    """The cell-type columns a result of a model with cell types adds to the table: per type its count, density
    and fraction, then lymphocytes per tumour cell."""
    names = list(doc['attributes']['stats']['cell_types'])
    return [f'{n}{suffix}' for n in names for suffix in ('_count', '_per_mm2', '_fraction')] + [
        'lymphocyte_per_tumour']


@pytest.fixture(scope='module')
def study(server, slide_file, nuclei_doc):
    """study/{a,b}.tiff, study/notes.txt, study/batch2/c.tiff, study/private/d.tiff; a and c have results."""
    root = folder(server, server.folder_id, 'study')
    ids = {'root': root, 'batch2': folder(server, root, 'batch2'), 'private': folder(server, root, 'private')}
    for name, where in (('b.tiff', 'root'), ('a.tiff', 'root'), ('c.tiff', 'batch2'), ('d.tiff', 'private')):
        ids[name] = slide_in(server, slide_file, ids[where], name)[0]
    server.client().uploadStreamToFolder(root, io.BytesIO(b'not a slide'), 'notes.txt', 11)
    ids['a_result'] = post_annotations(server.api_url, server.token, ids['a.tiff'], nuclei_doc, **FAST)[0]['_id']
    ids['c_result'] = post_annotations(server.api_url, server.token, ids['c.tiff'],
                                       nuclei(12, 'other.pt', keep_blue_green=True, threshold=0.6,
                                              classes=['tumour', 'lymphocyte'], views=4),
                                       **FAST)[0]['_id']
    return ids


def test_the_results_table(server, study, nuclei_doc):
    rows = server.client().get(f'cellrcnn/folder/{study["root"]}/results')
    assert [(r['path'], r['name'], r['item_id']) for r in rows] == [
        ('a.tiff', 'a.tiff', study['a.tiff']), ('b.tiff', 'b.tiff', study['b.tiff']),
        ('batch2/c.tiff', 'c.tiff', study['c.tiff']), ('private/d.tiff', 'd.tiff', study['d.tiff'])]
    a, b, c, _ = rows
    want = expected_summary(nuclei_doc)
    assert (a['cells'], a['model'], a['annotation_id'], a['cellrcnn_version']) == \
        (want['cells'], DEFAULT_MODEL, study['a_result'], __version__)
    assert a['cells_per_mm2'] == pytest.approx(want['cells_per_mm2'], rel=1e-3)
    assert a['score_mean'] == pytest.approx(want['mean'], abs=1e-4)
    assert a['score_median'] == pytest.approx(want['p50'], abs=1e-4)
    assert (c['cells'], c['model'], c['tissue_mm2'], c['ink_or_fill_mm2'], c['out_of_focus_mm2'],
            c['cells_out_of_focus'], c['out_of_focus_left_out'], c['keep_blue_green'], c['threshold'],
            c['magnification'], c['classes'], c['views']) == (
        12, 'other.pt', 0.04, 0.01, 0.02, 4, True, True, 0.6, None, 'lymphocyte,tumour', 4)
    assert a['ink_or_fill_mm2'] == 0  # a real run's, on a slide without pen ink or black fill
    assert a['out_of_focus_mm2'] == pytest.approx(nuclei_doc['attributes']['stats']['out_of_focus_mm2'], abs=1e-6)
    assert a['cells_out_of_focus'] == nuclei_doc['attributes']['stats']['detections_out_of_focus'] == 0
    assert a['out_of_focus_left_out'] is False and a['keep_blue_green'] is False  # the defaults
    # a real run records the threshold and magnification it used: by default its model's own
    config = nuclei_doc['attributes']['model_config']
    assert (a['threshold'], a['magnification'], a['classes'], a['views']) == (rounded(config['threshold']), 20, None, 1)
    assert a['magnification'] == 10 / config['mpp']
    columns = COLUMNS + typed_columns(nuclei_doc)  # the bundled model has cell types
    assert typed_columns(nuclei_doc)[:3] == ['lymphocyte_count', 'lymphocyte_per_mm2', 'lymphocyte_fraction']
    assert a['lymphocyte_count'] == nuclei_doc['attributes']['stats']['cell_types']['lymphocyte']
    assert set(b) == set(columns) and all(b[k] is None for k in columns[3:])

    response = server.client().sendRestRequest('GET', f'cellrcnn/folder/{study["root"]}/results',
                                               {'format': 'csv'}, jsonResp=False)
    assert response.headers['Content-Type'].startswith('text/csv')
    assert response.headers['Content-Disposition'] == 'attachment; filename="study-cellrcnn.csv"'
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == columns
    assert table[1:] == [['' if r[k] is None else str(r[k]) for k in columns] for r in rows]


# --------------------------------------------------------------------------- folder-wide detection


@pytest.fixture(scope='module')
def run_folder(server, slide_file, nuclei_doc):
    """run/r1.tiff (a result of the bundled model), run/r2.tiff (of other.pt), run/more/r3.tiff (none),
    run/more/r4.tiff (of the bundled model on a region only)."""
    root = folder(server, server.folder_id, 'run')
    ids = {'root': root, 'more': folder(server, root, 'more')}
    for name, where in (('r1.tiff', 'root'), ('r2.tiff', 'root'), ('r3.tiff', 'more'), ('r4.tiff', 'more')):
        ids[name], ids[name + ' file'] = slide_in(server, slide_file, ids[where], name)
    post_annotations(server.api_url, server.token, ids['r1.tiff'], nuclei_doc, **FAST)
    post_annotations(server.api_url, server.token, ids['r2.tiff'], nuclei(20, 'other.pt'), **FAST)
    post_annotations(server.api_url, server.token, ids['r4.tiff'], nuclei(9, DEFAULT_MODEL, roi=[0, 0, 200, 200]),
                     **FAST)
    return ids


def test_detect_queues_the_unfinished_slides_and_counts_them_done(server, cli_id, run_folder, nuclei_doc, slide_file):
    ids = run_folder
    parent, jobs = detect(server, ids['root'])
    # each slide folder has a subfolder for the label images of its slides' pixelmaps, marked as such (that the label
    # image lands there, the real worker's run in test_dsa.py checks)
    label_folders = {}
    for where in ('root', 'more'):
        (sub,) = [f for f in server.client().listFolder(ids[where]) if f['name'] == 'cellrcnn label images']
        assert sub['meta'] == {'cellrcnn': {'labelImages': True}}
        label_folders[ids[where]] = sub['_id']
    assert parent['type'] == 'cellrcnn_batch' and parent['status'] == 2
    assert parent['cellrcnnBatch'] | {'scheduled': None} == {'total': 4, 'finished': 1, 'running': 0, 'todo': 3,
                                                             'no_write_folders': 0, 'model': DEFAULT_MODEL,
                                                             'model_sha256': None, 'scheduled': None}
    assert (parent['progress']['current'], parent['progress']['total']) == (0, 3)
    by_slide = {j['cellrcnnSlide']: j for j in jobs}
    # r1 already has the bundled model's result; r4 has one of a region only
    assert set(by_slide) == {ids['r2.tiff'], ids['r3.tiff'], ids['r4.tiff']}
    for name in ('r2.tiff', 'r3.tiff', 'r4.tiff'):
        job = server.client().get(f'job/{by_slide[ids[name]]["_id"]}')
        assert job['type'] == 'cellrcnn:latest#CellDetection' and job['handler'] == 'celery_handler'
        assert job['status'] == 0 and job['celeryTaskId'] and job['title'] == f'Cell detection on {name}'
        stem = name[:-5]
        assert child_inputs(job) == (ids[name + ' file'], None, [f'{stem}-outputCellAnnotationFile.anot',
                                                                  f'{stem}-outputDensityAnnotationFile.anot',
                                                                  f'{stem}-outputNucleiLabelImage.tiff',
                                                                  f'{stem}-outputNucleiMapAnnotationFile.anot',
                                                                  f'{stem}-outputNucleiPixelmapAnnotationFile.anot',
                                                                  f'{stem}-outputTissueAnnotationFile.anot'])

    # A label image is a large image: in its subfolder it is no slide to the results table or to a folder run.
    label_item, _ = slide_in(server, slide_file, label_folders[ids['root']], 'r2-outputNucleiLabelImage.tiff')
    assert label_item not in {row['item_id'] for row in server.client().get(f'cellrcnn/folder/{ids["root"]}/results')}

    # Started again while they wait: nothing new is queued.
    again, again_jobs = detect(server, ids['root'])
    assert again_jobs == [] and again['status'] == 3
    assert again['cellrcnnBatch']['running'] == 3 and again['cellrcnnBatch']['todo'] == 0
    assert again['cellrcnnBatch']['total'] == 4  # not the label image

    # The worker runs the jobs of r2 and r4: they succeed and their annotations land on the slides; r3's job fails.
    r2, r3, r4 = (by_slide[ids[name]]['_id'] for name in ('r2.tiff', 'r3.tiff', 'r4.tiff'))
    for job_id, name in ((r2, 'r2.tiff'), (r4, 'r4.tiff')):
        play_worker(server, job_id, 2)
        post_annotations(server.api_url, server.token, ids[name], nuclei(30, DEFAULT_MODEL), **FAST)
        play_worker(server, job_id, 3)
    progress = server.client().get(f'job/{parent["_id"]}')
    assert progress['status'] == 2 and progress['progress']['current'] == 2
    assert progress['progress']['message'] == '2 of 3 slides done'
    play_worker(server, r3, 2, 4)
    ended = server.client().get(f'job/{parent["_id"]}')
    assert ended['status'] == 4 and ended['progress']['current'] == 3
    assert ended['progress']['message'] == '3 of 3 slides done, 1 failed'
    assert ended['log'][-1] == f'1 of 3 slide jobs did not succeed: {r3}\n'

    # After the interruption, a new run picks up the one slide left.
    resumed, resumed_jobs = detect(server, ids['root'])
    assert [j['cellrcnnSlide'] for j in resumed_jobs] == [ids['r3.tiff']]
    assert resumed['cellrcnnBatch']['finished'] == 3
    play_worker(server, resumed_jobs[0]['_id'], 2, 3)
    assert server.client().get(f'job/{resumed["_id"]}')['status'] == 3


def test_cancelling_a_batch_cancels_its_slide_jobs(server, cli_id, slide_file):
    root = folder(server, server.folder_id, 'canceled')
    for name in ('a.tiff', 'b.tiff'):
        slide_in(server, slide_file, root, name)
    parent, jobs = detect(server, root)
    assert len(jobs) == 2 and all(j['status'] in QUEUED_OR_RUNNING for j in jobs)
    server.client().put(f'job/{parent["_id"]}/cancel')
    assert server.client().get(f'job/{parent["_id"]}')['status'] == CANCELED
    # girder_worker cancels a queued job by revoking its task: canceling (824) until a worker acknowledges it
    assert {j['status'] for j in children(server, parent)} <= {CANCELED, CANCELING}


def test_detect_inside_each_slides_region_annotation(server, cli_id, slide_file):
    """``regionAnnotation=tumour``: a slide without the annotation is left out, one whose annotation cannot be
    counted is named in the log; one with a result of the model inside it saved since it last changed is done; the
    rest are queued with the name and the polygons the annotation outlines as the region to analyse. Redrawing the
    region makes its slide's result stale."""
    root = folder(server, server.folder_id, 'regions')
    ids = {name: slide_in(server, slide_file, root, name) for name in ('drawn.tiff', 'done.tiff', 'none.tiff',
                                                                        'holes.tiff', 'line.tiff')}
    tumour = {'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': [[10, 10, 0], [300, 20, 0], [200, 300, 0]]}]}
    for name in ('drawn.tiff', 'done.tiff'):
        ids[name + ' tumour'] = annotate(server, ids[name][0], tumour)['_id']
    annotate(server, ids['none.tiff'][0], {**tumour, 'name': 'stroma'})
    # a tumour around a necrotic centre: the hole is cut out (one polygon, cellrcnn.region.keyhole)
    annotate(server, ids['holes.tiff'][0], {'name': 'tumour', 'elements': [
        {**tumour['elements'][0], 'holes': [[[100, 100, 0], [120, 100, 0], [110, 120, 0]]]}]})
    annotate(server, ids['line.tiff'][0], {'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': [[10, 10, 0], [300, 20, 0]]}]})
    # the pathologist's second area on drawn.tiff, in an annotation of its own: an ellipse turned a quarter turn
    annotate(server, ids['drawn.tiff'][0], {'name': 'tumour', 'elements': [
        {'type': 'ellipse', 'center': [500, 300, 0], 'width': 100, 'height': 40, 'rotation': math.pi / 2},
        {'type': 'point', 'center': [600, 50, 0]}]})
    inside = nuclei(7, DEFAULT_MODEL, roi=[10, 10, 290, 290])
    inside['attributes']['params']['region_annotation'] = 'tumour'
    post_annotations(server.api_url, server.token, ids['done.tiff'][0], inside, **FAST)
    # a whole-slide result does not count as one inside the region
    post_annotations(server.api_url, server.token, ids['drawn.tiff'][0], nuclei(9, DEFAULT_MODEL), **FAST)
    assert result_of(server, ids['done.tiff'][0])['region_annotation'] == 'tumour'

    parent, jobs = detect(server, root, regionAnnotation=' tumour ')
    assert parent['cellrcnnBatch'] | {'scheduled': None} == {
        'total': 5, 'finished': 1, 'running': 0, 'todo': 2, 'no_region': 1, 'unusable_region': 1,
        'no_write_folders': 0, 'model': DEFAULT_MODEL, 'model_sha256': None, 'region_annotation': 'tumour',
        'scheduled': None}
    log = ''.join(parent['log'])
    assert "1 already have a result of cellrcnn-default.pt inside their annotation 'tumour'" in log
    assert "1 have no annotation named 'tumour', 1 have one that cannot be counted" in log
    assert "left out: line.tiff: its annotation 'tumour' has a polygon or a hole of fewer than three points\n" in log
    job, holed = sorted(jobs, key=lambda j: j['cellrcnnSlide'] != ids['drawn.tiff'][0])
    assert (job['cellrcnnSlide'], holed['cellrcnnSlide']) == (ids['drawn.tiff'][0], ids['holes.tiff'][0])
    args = server.client().get(f'job/{holed["_id"]}')['kwargs']['container_args']
    assert [float(v) for v in args[args.index('--analysis_roi') + 1].split(',')] == [
        10, 10, 300, 20, 200, 300, 10, 10, 100, 100, 120, 100, 110, 120, 100, 100, 10, 10]
    args = server.client().get(f'job/{job["_id"]}')['kwargs']['container_args']
    assert args[args.index('--region_annotation') + 1] == 'tumour' and '--girder_slide' not in args
    # both annotations' areas, each closed by its first point, -1,-1 between them: what the task's region takes
    values = [float(v) for v in args[args.index('--analysis_roi') + 1].split(',')]
    assert values[:8] == [10, 10, 300, 20, 200, 300, 10, 10] and values[8:10] == [-1, -1]
    ellipse = np.array(values[10:]).reshape(-1, 2)
    assert len(ellipse) == 65 and np.allclose(ellipse.min(axis=0), [480, 250]) and np.allclose(
        ellipse.max(axis=0), [520, 350])

    # the pathologist redraws done.tiff's region: its result is older than the region now
    server.client().put(f'annotation/{ids["done.tiff tumour"]}', json=tumour)
    rows = {r['name']: r for r in server.client().get(f'cellrcnn/folder/{root}/results')}
    assert rows['done.tiff']['region_annotation'] == 'tumour' and rows['drawn.tiff']['region_annotation'] is None
    again, again_jobs = detect(server, root, regionAnnotation='tumour')
    assert [j['cellrcnnSlide'] for j in again_jobs] == [ids['done.tiff'][0]]
    assert (again['cellrcnnBatch']['running'], again['cellrcnnBatch']['finished']) == (2, 0)
    assert error_of(lambda: server.client().post(f'cellrcnn/folder/{root}/detect',
                                                 {'regionAnnotation': 'x' * 201})) == (
        400, 'regionAnnotation is at most 200 characters')


def test_a_region_named_like_a_nuclei_result_is_refused_before_its_elements_are_read(server, cli_id, slide_file):
    root = folder(server, server.folder_id, 'region-of-nuclei')
    item_id, _ = slide_in(server, slide_file, root, 'many.tiff')
    post_annotations(server.api_url, server.token, item_id, nuclei(1001, DEFAULT_MODEL), **FAST)
    name = nuclei(1, DEFAULT_MODEL)['name']  # the nuclei result's own name, given as the region
    parent, jobs = detect(server, root, regionAnnotation=name)
    assert jobs == [] and parent['cellrcnnBatch']['unusable_region'] == 1
    assert (f"left out: many.tiff: its annotation {name!r} has 1001 elements, more than the 1000 a region may have "
            '(outlines of areas, not nuclei)\n') in ''.join(parent['log'])


def test_detect_with_the_tasks_choices(server, cli_id, slide_file):
    """A folder run sets the task's parameters that change what is counted (threshold, magnification, classes,
    views, leaveOutOfFocus, keepBlueGreen) in each slide's job; a slide is done, or running, only by a result or a
    job made with the same choices, the others at the task's defaults, whatever the order of the classes and the
    way a number was written."""
    root = folder(server, server.folder_id, 'choices')
    ids = {name: slide_in(server, slide_file, root, name)
           for name in ('plain.tiff', 'focus.tiff', 'types.tiff', 'none.tiff')}
    for name, params in (('plain.tiff', {}), ('focus.tiff', {'leave_out_of_focus': True}),
                         ('types.tiff', {'threshold': 0.6, 'classes': ['tumour', 'lymphocyte']})):
        post_annotations(server.api_url, server.token, ids[name][0], nuclei(5, DEFAULT_MODEL, **params), **FAST)
    flags = ('--leave_out_of_focus', '--keep_blue_green', '--threshold', '--analysis_mag', '--classes', '--views')

    def queued_choices(jobs):
        """Per slide name, the task's choices its job gives, each with its value, in name order."""
        names = {ids[name][0]: name for name in ids}
        given = {}
        for job in jobs:
            args = server.client().get(f'job/{job["_id"]}')['kwargs']['container_args']
            given[names[job['cellrcnnSlide']]] = sorted(f'{a}={args[i + 1]}' for i, a in enumerate(args)
                                                        if a in flags)
        return given

    def counts(parent):
        return parent['cellrcnnBatch']['finished'], parent['cellrcnnBatch']['running']

    parent, jobs = detect(server, root, leaveOutOfFocus='true')
    assert queued_choices(jobs) == {name: ['--leave_out_of_focus=true']
                                    for name in ('plain.tiff', 'types.tiff', 'none.tiff')}
    assert parent['cellrcnnBatch']['choices'] == {'leave_out_of_focus': True} and counts(parent) == (1, 0)
    assert ('1 already have a result of cellrcnn-default.pt with leave_out_of_focus, 0 have a CellDetection job of it '
            'waiting or running; 3 to detect with cellrcnn-default.pt with leave_out_of_focus\n') in parent['log'][0]

    # a run without the choice: plain.tiff is done; the waiting jobs with it do not count for the others
    parent, jobs = detect(server, root)
    assert queued_choices(jobs) == {'focus.tiff': [], 'types.tiff': [], 'none.tiff': []}
    assert 'choices' not in parent['cellrcnnBatch']
    # with it again: the jobs of the first run are waiting
    parent, jobs = detect(server, root, leaveOutOfFocus=True)
    assert jobs == [] and counts(parent) == (1, 3)
    parent, jobs = detect(server, root, leaveOutOfFocus=True, keepBlueGreen=True)
    assert queued_choices(jobs) == {name: ['--keep_blue_green=true', '--leave_out_of_focus=true'] for name in ids}
    assert parent['cellrcnnBatch']['choices'] == {'leave_out_of_focus': True, 'keep_blue_green': True}

    # a threshold and cell types: types.tiff's result kept them, named in another order
    parent, jobs = detect(server, root, threshold=0.6, classes=' lymphocyte,tumour')
    assert queued_choices(jobs) == {name: ['--classes=lymphocyte, tumour', '--threshold=0.6']
                                    for name in ('plain.tiff', 'focus.tiff', 'none.tiff')}
    assert parent['cellrcnnBatch']['choices'] == {'threshold': 0.6, 'classes': ['lymphocyte', 'tumour']}
    assert counts(parent) == (1, 0) and ('to detect with cellrcnn-default.pt with threshold 0.6 and classes '
                                         'lymphocyte,tumour\n') in parent['log'][0]
    # the same choices written otherwise: the jobs just queued are waiting; the threshold alone is another run
    parent, jobs = detect(server, root, threshold='0.60', classes='tumour,,lymphocyte')
    assert jobs == [] and counts(parent) == (1, 3)
    parent, jobs = detect(server, root, threshold=0.6)
    assert len(jobs) == 4 and counts(parent) == (0, 0)
    parent, jobs = detect(server, root, magnification=40, views=4)
    assert queued_choices(jobs) == {name: ['--analysis_mag=40.0', '--views=4'] for name in ids}
    # the defaults given as such are no choice: the first run without one is waiting
    parent, jobs = detect(server, root, threshold=-1, magnification=-1, views=1, classes='', keepBlueGreen=False)
    assert jobs == [] and 'choices' not in parent['cellrcnnBatch'] and counts(parent) == (1, 3)

    for asked, message in (({'threshold': 1.5}, 'threshold must be at most 1, not 1.5'),
                           ({'magnification': 'nan'}, 'magnification must be at most 100, not nan'),
                           ({'views': 3}, 'views must be one of 1, 2, 4, 8, not 3'),
                           # a type the bundled model lacks: the line each slide's job would have failed with
                           ({'classes': 'tumour,neutrophil'}, "unknown class 'neutrophil': the model's cell types are "
                                                              'lymphocyte, tumour, stromal'),
                           ({'classes': 'x' * 101}, 'classes takes at most 50 printable names of at most 100 '
                                                    'characters each')):
        assert error_of(lambda: server.client().post(f'cellrcnn/folder/{root}/detect', asked)) == (400, message)


def test_a_real_result_is_done_at_its_models_own_threshold(server, cli_id, slide_file, nuclei_doc):
    """A real run records the threshold and magnification it used, its model's own: it is done for a folder run
    that leaves them at the task's defaults or names the model's own, and not for another threshold; naming the
    bundled model's own is a run at the defaults, which finds the jobs made at them (HistomicsUI's)."""
    root = folder(server, server.folder_id, 'own threshold')
    post_annotations(server.api_url, server.token, slide_in(server, slide_file, root, 'real.tiff')[0], nuclei_doc,
                     **FAST)
    slide_in(server, slide_file, root, 'new.tiff')
    config = nuclei_doc['attributes']['model_config']
    parent, jobs = detect(server, root)  # as HistomicsUI's default job of new.tiff would be
    assert len(jobs) == 1 and parent['cellrcnnBatch']['finished'] == 1
    # the bundled model's own threshold and magnification named: the same run, which finds that job waiting
    parent, jobs = detect(server, root, threshold=config['threshold'], magnification=10 / config['mpp'])
    assert jobs == [] and (parent['cellrcnnBatch']['finished'], parent['cellrcnnBatch']['running']) == (1, 1)
    assert 'choices' not in parent['cellrcnnBatch']
    parent, jobs = detect(server, root, threshold=round(config['threshold'] + 0.1, 2))
    assert len(jobs) == 2 and parent['cellrcnnBatch']['finished'] == 0


@pytest.fixture(scope='module')
def model_bytes(typed_checkpoint, tmp_path_factory):
    """``model_bytes(note, **settings)``: the bytes of a real cellrcnn checkpoint with cell types (lymphocyte, tumour,
    stromal), told apart by ``note``, saved in it, its model settings updated with ``settings`` (the plugin reads a
    model file's configuration before it runs it)."""
    import torch

    payload = torch.load(typed_checkpoint, weights_only=True)
    models = tmp_path_factory.mktemp('model-files')

    def make(note, **settings):
        torch.save({**payload, 'note': note, 'config': {**payload['config'], **settings}}, models / f'{note}.pt')
        return (models / f'{note}.pt').read_bytes()

    return make


def test_detect_with_another_model(server, cli_id, run_folder, model_bytes, tmp_path):
    """A model file's configuration is read from its checkpoint: a cell type it lacks is refused with the line the
    task would fail each slide's job with, and its own threshold and magnification named are no choice."""
    ids = run_folder
    model_path = tmp_path / 'other.pt'
    model_path.write_bytes(model_bytes('other'))
    models = folder(server, server.folder_id, 'models')
    model_file = server.client().uploadFileToFolder(models, str(model_path))
    parent, jobs = detect(server, ids['root'], model=model_file['_id'])
    assert parent['cellrcnnBatch']['model'] == 'other.pt' and parent['cellrcnnBatch']['finished'] == 1
    inputs = {j['cellrcnnSlide']: child_inputs(server.client().get(f'job/{j["_id"]}')) for j in jobs}
    # r2 holds a result of other.pt, though its metadata now describes the newer one of the bundled model
    assert set(inputs) == {ids['r1.tiff'], ids['r3.tiff'], ids['r4.tiff']}
    assert inputs[ids['r1.tiff']][:2] == (ids['r1.tiff file'], model_file['_id'])

    config = stored_config(load_checkpoint(str(model_path)))  # as the task's library reads it
    parent, jobs = detect(server, ids['root'], model=model_file['_id'], threshold=config.threshold,
                          magnification=10 / config.mpp)
    assert jobs == [] and (parent['cellrcnnBatch']['finished'], parent['cellrcnnBatch']['running']) == (1, 3)
    assert 'choices' not in parent['cellrcnnBatch']
    with pytest.raises(Exception) as err:
        server.client().post(f'cellrcnn/folder/{ids["root"]}/detect', {'model': model_file['_id'],
                                                                       'classes': 'tumour,neutrophil'})
    assert err.value.status == 400 and json.loads(err.value.responseText)['message'] == (
        "unknown class 'neutrophil': the model's cell types are lymphocyte, tumour, stromal")


def test_detect_refuses_unknown_models_and_tasks(server, cli_id, run_folder, model_bytes):
    gc = server.client()
    models = folder(server, server.folder_id, 'not-models')
    text = gc.uploadStreamToFolder(models, io.BytesIO(b'a model file'), 'notes.pt', 12)
    data = model_bytes('newer', tile_overlap_um=12.0)  # a setting the task's cellrcnn does not know
    newer = gc.uploadStreamToFolder(models, io.BytesIO(data), 'newer.pt', len(data))
    data = model_bytes('big')
    model = gc.uploadStreamToFolder(models, io.BytesIO(data), 'big.pt', len(data))
    gc.put('system/setting', {'key': 'core.filehandle_max_size', 'value': 4096})  # less than its zip directory
    try:
        with pytest.raises(Exception) as err:
            gc.post(f'cellrcnn/folder/{run_folder["root"]}/detect', {'model': model['_id']})
    finally:
        gc.put('system/setting', {'key': 'core.filehandle_max_size', 'value': 16 << 20})
    assert err.value.status == 400 and json.loads(err.value.responseText)['message'] == (
        f'the model file {model["_id"]} (big.pt) cannot be read here: Read exceeds maximum allowed size.')
    for params, message in (({'model': '0' * 24}, f'no model file {"0" * 24} that you may read'),
                            ({'model': text['_id']}, f'the model file {text["_id"]} (notes.pt) is not a readable '
                                                     'checkpoint (not a whole model file as torch writes them; '
                                                     'cellrcnn train writes one)'),
                            ({'model': newer['_id']}, f'the model file {newer["_id"]} (newer.pt) is a cellrcnn '
                                                      "checkpoint with model settings that the task's cellrcnn does "
                                                      f'not know: tile_overlap_um (written by cellrcnn {__version__})'),
                            ({'cli': run_folder['r1.tiff']}, f'no slicer_cli_web task with id {run_folder["r1.tiff"]} '
                                                           'that you may read')):
        with pytest.raises(Exception) as err:
            gc.post(f'cellrcnn/folder/{run_folder["root"]}/detect', params)
        assert err.value.status == 400 and json.loads(err.value.responseText)['message'] == message


def test_a_model_file_whose_bytes_are_lost_is_refused_for_that_reason(server, cli_id, run_folder, model_bytes):
    """A model file cut short on the assetstore's disk, then gone from it, is refused as lost, not as a file that
    is no checkpoint, and the refusal does not name the server's own paths: by the request, and by the batch's
    thread (which hashes the file later, when it may have been lost since the request read it)."""
    gc = server.client()
    data = model_bytes('lost')
    model = gc.uploadStreamToFolder(folder(server, server.folder_id, 'lost-models'), io.BytesIO(data), 'lost.pt',
                                    len(data))
    sha = hashlib.sha512(data).hexdigest()
    on_disk = pathlib.Path(server.root, 'assetstore', sha[:2], sha[2:4], sha)  # a filesystem assetstore's layout
    assert on_disk.read_bytes() == data
    for lose in (lambda: on_disk.write_bytes(data[:len(data) // 2]), on_disk.unlink):
        lose()
        with pytest.raises(Exception) as err:
            gc.post(f'cellrcnn/folder/{run_folder["root"]}/detect', {'model': model['_id']})
        refusal = (f'the model file {model["_id"]} (lost.pt) cannot be read here: its assetstore has lost its bytes '
                   '(all or part of them): an administrator restores them, or the model is uploaded again')
        assert err.value.status == 400 and json.loads(err.value.responseText)['message'] == refusal
        assert in_database(server, """
            from girder.exceptions import RestException
            from girder_cellrcnn.model_files import model_sha256
            try:
                model_sha256(args[0])
            except RestException as exc:
                result = exc.message
        """, model['_id']) == refusal  # the batch thread's read, with Girder's own models on the same database


# --------------------------------------------------------------------------- access control


def status_of(call):
    try:
        call()
    except Exception as exc:
        return exc.status
    return 200


def test_users_see_and_run_only_where_the_acls_allow(server, study, run_folder, cli_id, reader, slide_file):
    reader_id, token = reader
    as_reader = server.client(token)
    results = lambda folder_id: lambda: as_reader.get(f'cellrcnn/folder/{folder_id}/results')  # noqa: E731
    starts = lambda folder_id: lambda: as_reader.post(f'cellrcnn/folder/{folder_id}/detect')  # noqa: E731
    assert status_of(results(study['root'])) == 403 and status_of(starts(study['root'])) == 403
    grant(server, study['root'], reader_id, READ, recurse=True)
    grant(server, study['private'], reader_id, None)  # everyone but the reader again
    rows = as_reader.get(f'cellrcnn/folder/{study["root"]}/results')
    assert [r['path'] for r in rows] == ['a.tiff', 'b.tiff', 'batch2/c.tiff']  # not private/d.tiff
    assert status_of(results(study['private'])) == 403
    assert status_of(starts(study['root'])) == 403  # reading is not enough to start a run
    assert status_of(starts(run_folder['root'])) == 403

    # Writing is: a folder of the reader's, with a subfolder the reader may only read.
    mine = folder(server, server.folder_id, 'mine')
    locked = folder(server, mine, 'locked')
    own, own_file = slide_in(server, slide_file, mine, 'own.tiff')
    slide_in(server, slide_file, locked, 'locked.tiff')
    grant(server, mine, reader_id, WRITE, recurse=True)
    grant(server, locked, reader_id, READ)
    assert status_of(starts(locked)) == 403
    parent, jobs = detect(server, mine, token=token)
    assert parent['userId'] == reader_id and parent['cellrcnnBatch']['no_write_folders'] == 1
    assert [(j['cellrcnnSlide'], j['userId']) for j in jobs] == [(own, reader_id)]
    assert child_inputs(server.client().get(f'job/{jobs[0]["_id"]}'))[0] == own_file
    assert [r['path'] for r in as_reader.get(f'cellrcnn/folder/{mine}/results')] == ['locked/locked.tiff', 'own.tiff']

    # The run makes the folder's subfolder of label images as the reader; one there that the reader may only read
    # stops the run in one line, before any slide's job is queued.
    assert [f['name'] for f in as_reader.listFolder(mine)] == ['cellrcnn label images', 'locked']
    blocked = folder(server, server.folder_id, 'blocked')
    slide_in(server, slide_file, blocked, 'b.tiff')
    labels = folder(server, blocked, 'cellrcnn label images')
    grant(server, blocked, reader_id, WRITE)
    grant(server, labels, reader_id, READ)
    parent, jobs = detect(server, blocked, token=token)
    assert jobs == [] and parent['status'] == 4
    assert parent['log'][-1].startswith('Stopped after scheduling 0 slides: Write access denied for folder'), parent


def test_a_readers_job_on_a_slide_does_not_make_a_writers_run_leave_it_out(server, cli_id, reader, slide_file):
    reader_id, token = reader
    root = folder(server, server.folder_id, 'lent')
    slide, _ = slide_in(server, slide_file, root, 's.tiff')
    grant(server, root, reader_id, WRITE)
    _, theirs = detect(server, root, token=token)  # queued while the reader could write to the slide ...
    assert [(j['cellrcnnSlide'], j['userId']) for j in theirs] == [(slide, reader_id)]
    grant(server, root, reader_id, READ)  # ... who now may only read it: their result would not count
    parent, jobs = detect(server, root)
    assert parent['cellrcnnBatch']['running'] == 0
    assert [(j['cellrcnnSlide'], j['userId']) for j in jobs] == [(slide, server.user_id)]
    again, _ = detect(server, root)  # the writer's own job waiting: the slide is running
    assert (again['cellrcnnBatch']['running'], again['cellrcnnBatch']['todo']) == (1, 0)


# --------------------------------------------------------------------------- the table: CSV cells, paging (issue 11)


def test_csv_cells_that_spreadsheets_would_run_are_neutralised(server, slide_file):
    root = folder(server, server.folder_id, 'formulas')
    name = '=HYPERLINK("evil.example?q=1","click").tiff'  # no '/': girder_client names the item by the basename
    item_id = slide_in(server, slide_file, root, name)[0]
    other = slide_in(server, slide_file, folder(server, root, '@sub'), 'b.tiff')[0]
    annotate(server, item_id, nuclei(7, '+SUM(1,1).pt'))
    annotate(server, other, nuclei(7, '-2+3.pt'))
    rows = server.client().get(f'cellrcnn/folder/{root}/results')
    assert [(r['name'], r['path'], r['model']) for r in rows] == [(name, name, '+SUM(1,1).pt'),
                                                                 ('b.tiff', '@sub/b.tiff', '-2+3.pt')]
    text = server.client().sendRestRequest('GET', f'cellrcnn/folder/{root}/results', {'format': 'csv'},
                                           jsonResp=False).text
    table = {row['item_id']: row for row in csv.DictReader(io.StringIO(text))}
    assert (table[item_id]['name'], table[item_id]['path'], table[item_id]['model']) == \
        ("'" + name, "'" + name, "'+SUM(1,1).pt")
    assert (table[other]['path'], table[other]['model'], table[other]['cells']) == ("'@sub/b.tiff", "'-2+3.pt", '7')


def test_the_results_table_pages_and_streams(server, study, nuclei_doc):
    gc = server.client()
    url = f'cellrcnn/folder/{study["root"]}/results'
    rows = gc.get(url)
    assert len(rows) == 4
    assert gc.get(url, {'limit': 2, 'offset': 1}) == rows[1:3]
    assert gc.get(url, {'offset': 3}) == rows[3:] and gc.get(url, {'limit': 1}) == rows[:1]
    assert gc.get(url, {'offset': 9}) == []
    assert error_of(lambda: gc.get(url, {'limit': -1}))[0] == 400
    for huge in ({'limit': 10 ** 30}, {'offset': 10 ** 30}, {'format': 'csv', 'offset': 10 ** 30}):
        assert error_of(lambda params=huge: gc.get(url, params)) == (
            400, f'limit and offset must be whole numbers from 0 to {sys.maxsize}')
    assert gc.get(url, {'limit': sys.maxsize, 'offset': 1}) == rows[1:]
    assert gc.get(url, {'offset': sys.maxsize}) == []
    answer = requests.get(f'{server.api_url}/{url}', params={'format': 'csv', 'limit': 2, 'offset': 2},
                          headers={'Girder-Token': server.token}, stream=True, timeout=30)
    assert answer.status_code == 200
    assert answer.headers.get('Transfer-Encoding') == 'chunked' and 'Content-Length' not in answer.headers
    table = list(csv.reader(io.StringIO(answer.text)))
    assert table[0] == COLUMNS + typed_columns(nuclei_doc)
    assert [r[2] for r in table[1:]] == [r['item_id'] for r in rows[2:4]]


# --------------------------------------------------------------------------- batches: log lines, models told apart


def test_a_slide_job_log_line_leaves_the_batch_alone(server, cli_id, slide_file):
    work = folder(server, server.folder_id, 'log-lines')
    slide_in(server, slide_file, work, 'l.tiff')
    parent, jobs = detect(server, work)
    play_worker(server, jobs[0]['_id'], 2)
    counted = server.client().get(f'job/{parent["_id"]}')
    time.sleep(0.05)
    for line in range(3):  # girder_worker sends each line of the task's output like this
        server.client().put(f'job/{jobs[0]["_id"]}', {'log': f'line {line}\n'})
    server.client().put(f'job/{jobs[0]["_id"]}', {'progressCurrent': 5, 'progressTotal': 10})
    after = server.client().get(f'job/{parent["_id"]}')
    assert after['updated'] == counted['updated'] and after['progress'] == counted['progress']
    play_worker(server, jobs[0]['_id'], 3)  # a change of status is counted
    ended = server.client().get(f'job/{parent["_id"]}')
    assert ended['status'] == 3 and ended['progress']['message'] == '1 of 1 slides done'


def test_models_are_told_apart_by_their_bytes(server, cli_id, slide_file, model_bytes):
    root = folder(server, server.folder_id, 'hashes')
    ids = {name: slide_in(server, slide_file, root, name)[0] for name in ('h1.tiff', 'h2.tiff', 'h3.tiff')}
    model_a, model_b = model_bytes('A'), model_bytes('B')
    # cellrcnn train always writes model.pt: these are different models of one name
    annotate(server, ids['h1.tiff'], nuclei(5, 'model.pt', sha=sha256(model_b)))
    annotate(server, ids['h2.tiff'], nuclei(6, 'model.pt', sha=sha256(model_a)))
    annotate(server, ids['h3.tiff'], nuclei(7, 'model.pt'))  # recorded before hashes were: known by its name
    assert result_of(server, ids['h2.tiff'])['model_sha256'] == sha256(model_a)
    assert result_of(server, ids['h3.tiff'])['model_sha256'] is None
    models = folder(server, server.folder_id, 'hashed-models')
    model_file = server.client().uploadStreamToFolder(models, io.BytesIO(model_a), 'model.pt', len(model_a))

    parent, jobs = detect(server, root, model=model_file['_id'])
    assert parent['cellrcnnBatch']['model_sha256'] == sha256(model_a) and parent['cellrcnnBatch']['finished'] == 2
    assert [j['cellrcnnSlide'] for j in jobs] == [ids['h1.tiff']]
    stored = in_database(server, "result = db['file'].find_one({'_id': ObjectId(args[0])})['cellrcnnSha256']",
                         model_file['_id'])
    assert stored['sha256'] == sha256(model_a)  # computed once, kept on the file
    play_worker(server, jobs[0]['_id'], 2, 4)

    # New content in the same file: it is another model now.
    server.client().uploadFileContents(model_file['_id'], io.BytesIO(model_b), len(model_b))
    parent, jobs = detect(server, root, model=model_file['_id'])
    assert parent['cellrcnnBatch']['model_sha256'] == sha256(model_b) and parent['cellrcnnBatch']['finished'] == 2
    assert [j['cellrcnnSlide'] for j in jobs] == [ids['h2.tiff']]
    play_worker(server, jobs[0]['_id'], 2, 4)


def test_the_request_only_starts_a_batch_whose_job_keeps_no_list_of_slides(server, cli_id, slide_file, model_bytes):
    """Hashing the model and walking the folder tree run in the batch's own thread, not in the request (a model of
    gigabytes, a tree of thousands of slides); the job document keeps counts, not an entry per slide (a document
    holds 16 MB: some 60 000 slides)."""
    root = folder(server, server.folder_id, 'no-list')
    for name in ('n1.tiff', 'n2.tiff'):
        slide_in(server, slide_file, root, name)
    data = model_bytes('C')
    models = folder(server, server.folder_id, 'no-list-models')
    model_file = server.client().uploadStreamToFolder(models, io.BytesIO(data), 'c.pt', len(data))
    answer = server.client().post(f'cellrcnn/folder/{root}/detect', {'model': model_file['_id']})
    assert answer['cellrcnnBatch'] == {'model': 'c.pt', 'scheduled': False}  # nothing hashed or counted yet
    parent, jobs = queued(server, answer)
    assert parent['cellrcnnBatch']['model_sha256'] == sha256(data)
    assert (parent['cellrcnnBatch']['total'], parent['cellrcnnBatch']['todo'], len(jobs)) == (2, 2, 2)
    stored = in_database(server, "result = db['job'].find_one({'_id': ObjectId(args[0])})['kwargs']", answer['_id'])
    assert sorted(json.loads(stored)) == ['choices', 'cliItemId', 'folderId', 'model', 'modelFileId',
                                          'regionAnnotation']  # JSON
    for job in jobs:
        play_worker(server, job['_id'], 2, 4)
