"""The Girder plugin (plugin/, girder_cellrcnn) in a real DSA Girder: item metadata from cellrcnn annotations, the
folder results table, folder-wide CellDetection through slicer_cli_web, and Girder's access control.

Skipped unless the server's own virtualenv is there (see tests/test_girder.py). The server is the session's
(tests/conftest.py), this module's folders in a collection of its own. No RabbitMQ here: the server's
celery broker is kombu's in-process memory transport, so slicer_cli_web really creates and queues each slide's job
(girder_worker publishes its message) but no worker takes it; the tests play the worker's part through the same
``PUT /job/{id}`` calls girder_worker makes.
"""

import csv
import datetime
import io
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cellrcnn import __version__
from cellrcnn.annotation import detections_to_annotation, read_annotation_file
from cellrcnn.checkpoint import BUNDLED_MODEL
from cellrcnn.girder_post import post_annotation_files, post_annotations
from cellrcnn.local_girder import girder_python, wait_for
from cellrcnn.job import detect_to_files, output_paths
from cellrcnn.settings import DetectionSettings

PYTHON, WHY_NOT = girder_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT or '')

XML = os.path.join(os.path.dirname(__file__), '..', 'cli', 'CellDetection', 'CellDetection.xml')
DEFAULT_MODEL = os.path.basename(BUNDLED_MODEL)
FAST = {'retries': 2, 'backoff': 0.01}
COLUMNS = ['name', 'path', 'item_id', 'cells', 'tissue_mm2', 'cells_per_mm2', 'score_mean', 'score_median', 'model',
           'cellrcnn_version', 'roi', 'annotation_id', 'date']
READ, WRITE = 0, 1
QUEUED_OR_RUNNING = {0, 1, 2}


@pytest.fixture(scope='module')
def slide_file(synthetic_slide):
    return synthetic_slide(512, 384, seed=5)[0]


@pytest.fixture(scope='module')
def result_files(slide_file, tmp_path_factory):
    """The bundled model's real outputs for the slide: {'annotation': nuclei file, 'density': density file}."""
    paths = output_paths(str(tmp_path_factory.mktemp('result')), 'slide')
    paths = {key: paths[key] for key in ('annotation', 'density')}
    detect_to_files(str(slide_file), paths, DetectionSettings(device='cpu', tile_size=256, progress='none'))
    return paths


@pytest.fixture(scope='module')
def nuclei_doc(result_files):
    doc = read_annotation_file(result_files['annotation'])
    assert doc['attributes']['model'] == DEFAULT_MODEL and len(doc['elements']) > 10
    return doc


def folder(server, parent_id, name):
    return server.client().createFolder(parent_id, name, reuseExisting=True)['_id']


def slide_in(server, slide_file, folder_id, name):
    """A large-image item of the slide in a folder: (item id, file id)."""
    gc = server.client()
    file = gc.uploadFileToFolder(folder_id, str(slide_file), filename=name)
    wait_for(lambda: gc.getItem(file['itemId']).get('largeImage', {}).get('fileId'), 30, f'large image {name}')
    return file['itemId'], file['_id']


def result_of(server, item_id):
    return (server.client().getItem(item_id).get('meta') or {}).get('cellrcnn')


def nuclei(n, model, seed=0, roi=None):
    """A nuclei document with the attributes cellrcnn writes (model, version marker, parameters, run stats)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (n, 2))
    return detections_to_annotation(np.hstack([xy, xy + 8]), rng.uniform(0.5, 1, n), attributes={
        'model': model, 'cellrcnn': __version__, 'params': {'roi': roi, 'tile_size': 1024},
        'stats': {'detections': n, 'tissue_mm2': 0.04}})


def expected_summary(doc):
    scores = np.array([e['user']['score'] for e in doc['elements']])
    tissue = doc['attributes']['stats']['tissue_mm2']
    return {'cells': len(scores), 'tissue_mm2': tissue, 'cells_per_mm2': len(scores) / tissue,
            'mean': scores.mean(), **{f'p{q}': np.percentile(scores, q) for q in (5, 25, 50, 75, 95)},
            'histogram': np.bincount(np.clip((scores * 10).astype(int), 0, 9), minlength=10).tolist()}


def check_summary(result, doc, annotation_id):
    want = expected_summary(doc)
    assert result['cells'] == want['cells']
    assert result['tissue_mm2'] == pytest.approx(want['tissue_mm2'], rel=1e-5)
    assert result['cells_per_mm2'] == pytest.approx(want['cells_per_mm2'], rel=1e-3)
    for key in ('mean', 'p5', 'p25', 'p50', 'p75', 'p95'):
        assert result['score'][key] == pytest.approx(want[key], abs=1e-4), key
    assert result['score']['histogram'] == want['histogram']
    assert (result['model'], result['cellrcnn_version'], result['roi'], result['annotation_id']) == \
        (doc['attributes']['model'], __version__, doc['attributes']['params']['roi'], annotation_id)


def register_cell_detection(server):
    """Register the CellDetection task the way slicer_cli_web does after reading a Docker image (image folder, tag
    folder, task item with the XML and what slicer_cli_web parses from it), without Docker: there is none here.
    The Tasks collection is public, as in a DSA."""
    gc = server.client()
    collection = gc.createCollection('Tasks', public=True)
    image = gc.createFolder(collection['_id'], 'cellrcnn', parentType='collection', public=True)
    gc.addMetadataToFolder(image['_id'], {'slicerCLIType': 'image'})
    tag = gc.createFolder(image['_id'], 'latest', public=True)
    gc.addMetadataToFolder(tag['_id'], {'slicerCLIType': 'tag'})
    task = gc.createItem(tag['_id'], 'CellDetection')
    xml = open(XML).read()
    root = ET.fromstring(xml)
    gc.addMetadataToItem(task['_id'], {'slicerCLIType': 'task', 'type': 'python', 'image': 'cellrcnn:latest',
                                       'digest': None, 'xml': xml, 'category': root.findtext('category'),
                                       'version': root.findtext('version')})
    return task['_id']


def children(server, parent):
    """The slide jobs of a batch job (they belong to the batch's user)."""
    return server.client().get('job', {'limit': 0, 'parentId': parent['_id'], 'userId': parent['userId']})


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


def detect(server, folder_id, token=None, **params):
    """Start a folder's detection; wait until its job has queued its slides: (the batch job, its slide jobs)."""
    job = server.client(token).post(f'cellrcnn/folder/{folder_id}/detect', params)

    def queued():
        parent = server.client().get(f'job/{job["_id"]}')
        return parent if parent['cellrcnnBatch']['scheduled'] or parent['status'] in (3, 4, 5) else None

    parent = wait_for(queued, 30, 'the batch job to queue its slides')
    return parent, children(server, parent)


def play_worker(server, job_id, *statuses):
    for status in statuses:
        server.client().put(f'job/{job_id}', {'status': status})


# --------------------------------------------------------------------------- the plugin


def test_the_plugin_loads_without_torch(server):
    plugins = server.client().get('system/plugins')
    assert 'cellrcnn' in plugins['all'] and 'cellrcnn' in plugins['loaded'], server.log_tail()
    check = subprocess.run([PYTHON, '-c', 'import sys, girder_cellrcnn; '
                                          'print(sorted(m for m in ("torch", "cellrcnn") if m in sys.modules))'],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == '[]', check.stderr


# --------------------------------------------------------------------------- metadata


def test_a_posted_result_becomes_item_metadata(server, slide_file, result_files, nuclei_doc):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'posted.tiff')
    posted = post_annotation_files(server.api_url, server.token, item_id,
                                   [result_files['annotation'], result_files['density']], **FAST)
    result = result_of(server, item_id)
    check_summary(result, nuclei_doc, posted[0]['_id'])  # the nuclei, not the density annotation posted after it
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(result['date'])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)


def test_a_result_ingested_by_the_dsa_becomes_item_metadata(server, slide_file, result_files, nuclei_doc):
    item_id, file_id = slide_in(server, slide_file, server.folder_id, 'ingested.tiff')
    server.upload_as_dsa(result_files['annotation'], item_id, file_id, 'outputCellAnnotationFile')
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')
    result = wait_for(lambda: result_of(server, item_id), 30, 'metadata from the ingested annotation')
    annotations = server.client().get('annotation', {'itemId': item_id})
    nuclei_id = next(a['_id'] for a in annotations if a['annotation']['name'] == nuclei_doc['name'])
    check_summary(result, nuclei_doc, nuclei_id)


def test_the_metadata_follows_replacement_edits_and_deletion(server, slide_file):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'replaced.tiff')
    gc = server.client()
    other = post_annotations(server.api_url, server.token, item_id, nuclei(30, 'other.pt'), **FAST)[0]['_id']
    assert result_of(server, item_id)['annotation_id'] == other
    first = post_annotations(server.api_url, server.token, item_id, nuclei(50, DEFAULT_MODEL), **FAST)[0]['_id']
    # cellrcnn replaces a model's result: the new one lands, then the old one is deleted. The new one stays.
    second_doc = nuclei(40, DEFAULT_MODEL, seed=1)
    second = post_annotations(server.api_url, server.token, item_id, second_doc, **FAST)
    assert second[0]['replaced'] == [first]
    check_summary(result_of(server, item_id), second_doc, second[0]['_id'])
    # An edit in HistomicsUI (cells removed) is counted again.
    stored = gc.get(f'annotation/{second[0]["_id"]}')['annotation']
    stored['elements'] = stored['elements'][:25]
    gc.put(f'annotation/{second[0]["_id"]}', json=stored)
    assert result_of(server, item_id)['cells'] == 25
    # Deleting the result described falls back to the newest remaining one, then to none.
    gc.delete(f'annotation/{second[0]["_id"]}')
    assert result_of(server, item_id)['annotation_id'] == other
    assert result_of(server, item_id)['model'] == 'other.pt'
    gc.delete(f'annotation/item/{item_id}')
    assert result_of(server, item_id) is None


def test_annotations_that_are_not_nuclei_results_leave_no_metadata(server, slide_file, result_files):
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'others.tiff')
    gc = server.client()
    gc.post('annotation', {'itemId': item_id}, json={'name': 'drawn by a person', 'elements': []})
    gc.post('annotation', {'itemId': item_id}, json=read_annotation_file(result_files['density']))
    assert result_of(server, item_id) is None


# --------------------------------------------------------------------------- the results table


@pytest.fixture(scope='module')
def study(server, slide_file, nuclei_doc):
    """study/{a,b}.tiff, study/notes.txt, study/batch2/c.tiff, study/private/d.tiff; a and c have results."""
    root = folder(server, server.folder_id, 'study')
    ids = {'root': root, 'batch2': folder(server, root, 'batch2'), 'private': folder(server, root, 'private')}
    for name, where in (('b.tiff', 'root'), ('a.tiff', 'root'), ('c.tiff', 'batch2'), ('d.tiff', 'private')):
        ids[name] = slide_in(server, slide_file, ids[where], name)[0]
    server.client().uploadStreamToFolder(root, io.BytesIO(b'not a slide'), 'notes.txt', 11)
    ids['a_result'] = post_annotations(server.api_url, server.token, ids['a.tiff'], nuclei_doc, **FAST)[0]['_id']
    ids['c_result'] = post_annotations(server.api_url, server.token, ids['c.tiff'], nuclei(12, 'other.pt'),
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
    assert (c['cells'], c['model'], c['tissue_mm2']) == (12, 'other.pt', 0.04)
    assert set(b) == set(COLUMNS) and all(b[k] is None for k in COLUMNS[3:])

    response = server.client().sendRestRequest('GET', f'cellrcnn/folder/{study["root"]}/results',
                                               {'format': 'csv'}, jsonResp=False)
    assert response.headers['Content-Type'].startswith('text/csv')
    assert response.headers['Content-Disposition'] == 'attachment; filename="study-cellrcnn.csv"'
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == COLUMNS
    assert table[1:] == [['' if r[k] is None else str(r[k]) for k in COLUMNS] for r in rows]


# --------------------------------------------------------------------------- folder-wide detection


@pytest.fixture(scope='module')
def cli_id(server):
    return register_cell_detection(server)


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


def test_detect_queues_the_unfinished_slides_and_counts_them_done(server, cli_id, run_folder, nuclei_doc):
    ids = run_folder
    parent, jobs = detect(server, ids['root'])
    assert parent['type'] == 'cellrcnn_batch' and parent['status'] == 2
    assert parent['cellrcnnBatch'] | {'scheduled': None} == {'total': 4, 'finished': 1, 'running': 0, 'todo': 3,
                                                             'no_write_folders': 0, 'model': DEFAULT_MODEL,
                                                             'scheduled': None}
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
                                                                  f'{stem}-outputDensityAnnotationFile.anot'])

    # Started again while they wait: nothing new is queued.
    again, again_jobs = detect(server, ids['root'])
    assert again_jobs == [] and again['status'] == 3
    assert again['cellrcnnBatch']['running'] == 3 and again['cellrcnnBatch']['todo'] == 0

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


def test_detect_with_another_model(server, cli_id, run_folder, tmp_path):
    ids = run_folder
    model_path = tmp_path / 'other.pt'
    model_path.write_bytes(b'a model file')
    models = folder(server, server.folder_id, 'models')
    model_file = server.client().uploadFileToFolder(models, str(model_path))
    parent, jobs = detect(server, ids['root'], model=model_file['_id'])
    assert parent['cellrcnnBatch']['model'] == 'other.pt' and parent['cellrcnnBatch']['finished'] == 1
    inputs = {j['cellrcnnSlide']: child_inputs(server.client().get(f'job/{j["_id"]}')) for j in jobs}
    # r2 holds a result of other.pt, though its metadata now describes the newer one of the bundled model
    assert set(inputs) == {ids['r1.tiff'], ids['r3.tiff'], ids['r4.tiff']}
    assert inputs[ids['r1.tiff']][:2] == (ids['r1.tiff file'], model_file['_id'])


def test_detect_refuses_unknown_models_and_tasks(server, cli_id, run_folder):
    gc = server.client()
    for params, message in (({'model': '0' * 24}, f'no model file {"0" * 24} that you may read'),
                            ({'cli': run_folder['r1.tiff']}, f'no slicer_cli_web task with id {run_folder["r1.tiff"]} '
                                                           'that you may read')):
        with pytest.raises(Exception) as err:
            gc.post(f'cellrcnn/folder/{run_folder["root"]}/detect', params)
        assert err.value.status == 400 and json.loads(err.value.responseText)['message'] == message


# --------------------------------------------------------------------------- access control


@pytest.fixture(scope='module')
def reader(server):
    """A second user, not an administrator: (id, token)."""
    gc = server.client()
    user = gc.post('user', {'login': 'reader', 'email': 'reader@example.org', 'firstName': 'Re', 'lastName': 'Ader',
                            'password': 'reader-password'})
    client = server.client(token='')
    client.authenticate('reader', 'reader-password')
    return user['_id'], client.token


def grant(server, folder_id, user_id, level, recurse=False):
    access = {'users': [{'id': server.user_id, 'level': 2}] + ([{'id': user_id, 'level': level}] if level is not None
                                                                 else []), 'groups': []}
    server.client().put(f'folder/{folder_id}/access', {'access': json.dumps(access), 'recurse': recurse})


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
