"""The Girder plugin (plugin/, girder_cellrcnn) in a real DSA Girder: item metadata from cellrcnn annotations, the
folder results table, folder-wide CellDetection through slicer_cli_web, and Girder's access control.

Skipped unless the server's own virtualenv is there (see tests/test_girder.py). The server is the session's
(tests/conftest.py), this module's folders in a collection of its own. No RabbitMQ here: the server's
celery broker is kombu's in-process memory transport, so slicer_cli_web really creates and queues each slide's job
(girder_worker publishes its message) but no worker takes it; the tests play the worker's part through the same
``PUT /job/{id}`` calls girder_worker makes.
"""

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import requests

from cellrcnn import __version__
from cellrcnn.annotation import detections_to_annotation, read_annotation_file
from cellrcnn.checkpoint import BUNDLED_MODEL
from cellrcnn.devstack.local_girder import girder_python, wait_for
from cellrcnn.errors import CellRCNNError
from cellrcnn.girder_post import post_annotation_files, post_annotations
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
CANCELED, CANCELING = 5, 824


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


def active_annotations(server, item_id):
    return server.client().get('annotation', {'itemId': item_id, 'limit': 0})


def result_of(server, item_id):
    return (server.client().getItem(item_id).get('meta') or {}).get('cellrcnn')


def nuclei(n, model, seed=0, roi=None, sha=None):
    """A nuclei document with the attributes cellrcnn writes (model, version marker, parameters, run stats; the
    model's SHA-256 when given)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (n, 2))
    attributes = {'model': model, 'cellrcnn': __version__, 'params': {'roi': roi, 'tile_size': 1024},
                  'stats': {'detections': n, 'tissue_mm2': 0.04}}
    if sha:
        attributes['model_sha256'] = sha
    return detections_to_annotation(np.hstack([xy, xy + 8]), rng.uniform(0.5, 1, n), attributes=attributes)


def annotate(server, item_id, doc, token=None):
    """POST an annotation document to an item as the token's user (the admin's by default): the stored annotation."""
    return server.client(token).post('annotation', {'itemId': item_id}, json=doc)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


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
    assert result['model_sha256'] == doc['attributes'].get('model_sha256')


def register_task(server, parent_id, image, tag='latest', parent_type='collection', token=None):
    """What slicer_cli_web's ``PUT /slicer_cli_web/docker_image`` makes for an image ``image:tag`` holding
    CellDetection (image folder, tag folder, task item with the XML and what slicer_cli_web parses from it), made
    as the token's user (the admin's by default) without Docker: there is none here. Public, as in a DSA.
    :returns: (task item id, tag folder id)."""
    gc = server.client(token)
    image_folder = gc.createFolder(parent_id, image, parentType=parent_type, public=True, reuseExisting=True)
    gc.addMetadataToFolder(image_folder['_id'], {'slicerCLIType': 'image'})
    tag_folder = gc.createFolder(image_folder['_id'], tag, public=True, reuseExisting=True)
    gc.addMetadataToFolder(tag_folder['_id'], {'slicerCLIType': 'tag'})
    return task_item(server, tag_folder['_id'], f'{image}:{tag}', token), tag_folder['_id']


def task_item(server, folder_id, image, token=None):
    """A CellDetection task item of the image in a folder, as the token's user: its id."""
    gc = server.client(token)
    task = gc.createItem(folder_id, 'CellDetection', reuseExisting=True)
    xml = open(XML).read()
    root = ET.fromstring(xml)
    gc.addMetadataToItem(task['_id'], {'slicerCLIType': 'task', 'type': 'python', 'image': image,
                                       'digest': None, 'xml': xml, 'category': root.findtext('category'),
                                       'version': root.findtext('version')})
    return task['_id']


def register_cell_detection(server):
    """Register the CellDetection task of cellrcnn:latest as an administrator does, in the public Tasks
    collection of a DSA."""
    collection = server.client().createCollection('Tasks', public=True)
    return register_task(server, collection['_id'], 'cellrcnn')[0]


def set_setting(server, key, value):
    """Set (None: unset) a Girder setting as the admin."""
    server.client().put('system/setting', {'key': key, 'value': json.dumps(value)})


def get_setting(server, key):
    return server.client().get('system/setting', {'key': key})


def in_database(server, code, *args):
    """Run ``code`` in the server's virtualenv (pymongo is there, not here) with ``db`` (the server's database:
    what REST does not show, such as tokens and private fields), ``ObjectId`` and ``args``; it sets ``result``,
    returned here through JSON."""
    script = ('import json, os, sys\nimport pymongo\nfrom bson import ObjectId\n'
              'db = pymongo.MongoClient(os.environ["GIRDER_MONGO_URI"])["girder"]\nargs = json.loads(sys.argv[1])\n'
              f'result = None\n{textwrap.dedent(code)}\nprint(json.dumps(result, default=str))\n')
    # the database's address holds its password: in the environment, not on the command line
    env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, 'GIRDER_MONGO_URI': server.db_uri}
    run = subprocess.run([PYTHON, '-c', script, json.dumps(args)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def new_user(server, login):
    """A user who is not an administrator, made by the admin: (id, token)."""
    user = server.client().post('user', {'login': login, 'email': f'{login}@example.org', 'firstName': login,
                                         'lastName': 'User', 'password': f'{login}-password'})
    client = server.client(token='')
    client.authenticate(login, f'{login}-password')
    return user['_id'], client.token


def error_of(call):
    """(HTTP status, message) of a REST call that fails."""
    with pytest.raises(Exception) as err:
        call()
    return err.value.status, json.loads(err.value.responseText)['message']


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
def worker_api_url(server):
    """The worker.api_url setting an administrator sets: folder-wide detection needs it, and never sets it."""
    set_setting(server, 'worker.api_url', server.api_url)
    return server.api_url


@pytest.fixture(scope='module')
def cli_id(server, worker_api_url):
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


# --------------------------------------------------------------------------- trust (issue 11)


@pytest.fixture(scope='module')
def mallory(server):
    """A user who is not an administrator and tries to borrow others' rights: (id, token)."""
    return new_user(server, 'mallory')


@pytest.fixture(scope='module')
def runner(server):
    """A user who is not an administrator and runs folder-wide detection in a folder of theirs: (id, token)."""
    return new_user(server, 'runner')


def writable_folder(server, name, user_id, slide_file, slides=('s.tiff',)):
    """A folder under the module's cohort that the user may write to, with slides: (folder id, {name: item id})."""
    folder_id = folder(server, server.folder_id, name)
    grant(server, folder_id, user_id, WRITE)
    return folder_id, {n: slide_in(server, slide_file, folder_id, n)[0] for n in slides}


def public_folder_of(server, user_id, token):
    return next(f for f in server.client(token).get('folder', {'parentType': 'user', 'parentId': user_id})
                if f['name'] == 'Public')['_id']


def test_detect_runs_only_tasks_an_administrator_registered(server, cli_id, mallory, runner, slide_file):
    mallory_id, mallory_token = mallory
    runner_id, runner_token = runner
    # Mallory plants a CellDetection task of her own image in her public folder, laid out as slicer_cli_web does
    # it, and newer than the administrator's.
    planted, _ = register_task(server, public_folder_of(server, mallory_id, mallory_token), 'evil',
                               parent_type='folder', token=mallory_token)
    assert server.client(runner_token).getItem(planted)['meta']['image'] == 'evil:latest'  # the runner may read it
    work, slides = writable_folder(server, 'runner-work', runner_id, slide_file)

    parent, jobs = detect(server, work, token=runner_token)
    assert [(j['cellrcnnSlide'], server.client().get(f'job/{j["_id"]}')['type']) for j in jobs] == \
        [(slides['s.tiff'], 'cellrcnn:latest#CellDetection')]  # the administrator's task, not Mallory's
    play_worker(server, jobs[0]['_id'], 2, 4)
    gc = server.client(runner_token)
    status, message = error_of(lambda: gc.post(f'cellrcnn/folder/{work}/detect', {'cli': planted}))
    assert status == 403 and message.startswith(f'the slicer_cli_web task {planted} was not registered by an '
                                                'administrator')

    # A task an administrator registered, in a tag folder Mallory may write to (so she could change its image):
    # refused too.
    shared, tag = register_task(server, server.folder_id, 'shared', parent_type='folder')
    grant(server, tag, mallory_id, WRITE)
    status, _ = error_of(lambda: gc.post(f'cellrcnn/folder/{work}/detect', {'cli': shared}))
    assert status == 403

    # A task the administrator names in the plugin's setting is the default, wherever it is.
    pinned_folder = folder(server, server.folder_id, 'pinned')
    grant(server, pinned_folder, runner_id, READ)
    pinned = task_item(server, pinned_folder, 'cellrcnn:pinned')
    assert error_of(lambda: set_setting(server, 'cellrcnn.task_item', work))[0] == 400  # not a task item
    status, _ = error_of(lambda: gc.put('system/setting', {'key': 'cellrcnn.task_item', 'value': json.dumps(planted)}))
    assert status == 403  # only an administrator sets it
    set_setting(server, 'cellrcnn.task_item', pinned)
    try:
        _, jobs = detect(server, work, token=runner_token)
        assert [server.client().get(f'job/{j["_id"]}')['type'] for j in jobs] == ['cellrcnn:pinned#CellDetection']
        play_worker(server, jobs[0]['_id'], 2, 4)
    finally:
        set_setting(server, 'cellrcnn.task_item', None)


def test_detect_never_sets_the_worker_api_url(server, cli_id, runner, slide_file):
    runner_id, runner_token = runner
    work = folder(server, server.folder_id, 'host-header')
    grant(server, work, runner_id, WRITE)
    set_setting(server, 'worker.api_url', None)
    try:
        answer = requests.post(f'{server.api_url}/cellrcnn/folder/{work}/detect', timeout=30,
                               headers={'Girder-Token': runner_token, 'Host': 'attacker.example.org:8080'})
        assert answer.status_code == 503, answer.text
        assert 'worker.api_url' in answer.json()['message'] and 'administrator' in answer.json()['message']
        assert get_setting(server, 'worker.api_url') is None
        assert 'Cell detection on folder host-header' not in [
            j['title'] for j in server.client().get('job', {'userId': runner_id, 'limit': 0})]  # no job either
    finally:
        set_setting(server, 'worker.api_url', server.api_url)
    parent, jobs = detect(server, work, token=runner_token)  # once the administrator has set it
    assert parent['status'] == 3 and jobs == []
    assert get_setting(server, 'worker.api_url') == server.api_url


def test_results_count_only_from_writers_with_a_plain_model(server, cli_id, reader, slide_file):
    reader_id, reader_token = reader
    forged = folder(server, server.folder_id, 'forged')
    item_id = slide_in(server, slide_file, forged, 'f.tiff')[0]
    access = {'users': [{'id': server.user_id, 'level': 2},
                        {'id': reader_id, 'level': READ, 'flags': ['large_image_create_annotations']}], 'groups': []}
    server.client().put(f'folder/{forged}/access', {'access': json.dumps(access)})
    # The reader may create annotations, and makes one that looks like a result of the bundled model.
    fake = annotate(server, item_id, nuclei(25, DEFAULT_MODEL, sha='0' * 64), token=reader_token)
    assert fake['annotation']['attributes']['model'] == DEFAULT_MODEL
    assert result_of(server, item_id) is None
    assert [r['model'] for r in server.client(reader_token).get(f'cellrcnn/folder/{forged}/results')] == [None]
    parent, jobs = detect(server, forged)  # the slide does not count as done
    assert parent['cellrcnnBatch']['finished'] == 0 and [j['cellrcnnSlide'] for j in jobs] == [item_id]
    play_worker(server, jobs[0]['_id'], 2, 4)

    # Results whose model is not a short plain string are not results, whoever posts them.
    for model, sha in (('x' * 201, None), ('two\nlines.pt', None), ('=cmd|calc.pt\x07', None),
                       ('fine.pt', 'not-a-sha')):
        annotate(server, item_id, nuclei(5, model, sha=sha))
        assert result_of(server, item_id) is None, model

    # The owner's result counts; deleting it falls back to no result, not to the reader's annotation.
    real = annotate(server, item_id, nuclei(30, 'x' * 200))
    assert result_of(server, item_id)['annotation_id'] == real['_id']
    server.client().delete(f'annotation/{real["_id"]}')
    assert result_of(server, item_id) is None


def upload_ingest(server, token, folder_id, doc, reference):
    """Upload an annotation document as the token's user with a reference that makes the DSA ingest it."""
    data = json.dumps(doc).encode()
    return server.client(token).uploadStreamToFolder(folder_id, io.BytesIO(data), 'result.anot', len(data),
                                                     reference=json.dumps(reference))


def test_an_upload_made_for_another_user_records_no_result(server, reader, slide_file):
    """HistomicsUI and large_image ingest an uploaded annotation file as the user its reference names, whoever
    uploads it: such annotations are not results."""
    reader_id, reader_token = reader
    shared = folder(server, server.folder_id, 'claimed')
    grant(server, shared, reader_id, READ)
    item_id, file_id = slide_in(server, slide_file, shared, 'claimed.tiff')
    marker_item, marker_file = slide_in(server, slide_file, server.folder_id, 'marker.tiff')
    own_folder = public_folder_of(server, reader_id, reader_token)
    for identifier in ('LargeImageAnnotationUpload', 'outputCellAnnotationFile'):
        upload_ingest(server, reader_token, own_folder, nuclei(20, DEFAULT_MODEL, seed=7),
                      {'identifier': identifier, 'userId': server.user_id, 'fileId': file_id, 'itemId': item_id})
    # Girder's events thread takes its work in order: once two uploads of the admin's after them count (the
    # second one queued after whatever the first ingests queued), they and what they queued have been handled.
    for seed in (1, 2):
        upload_ingest(server, server.token, server.folder_id, nuclei(9, f'marker{seed}.pt'),
                      {'identifier': 'LargeImageAnnotationUpload', 'userId': server.user_id, 'fileId': marker_file,
                       'itemId': marker_item})
        wait_for(lambda: (result_of(server, marker_item) or {}).get('model') == f'marker{seed}.pt', 60,  # noqa: B023
                 "the admin's upload to be ingested")
    made = [a for a in active_annotations(server, item_id) if a['annotation']['name'] == 'cellrcnn nuclei']
    assert len(made) == 2 and {a['creatorId'] for a in made} == {server.user_id}  # (large_image's and HistomicsUI's)
    assert result_of(server, item_id) is None
    # Nor are they results later: not the slide's result after the admin's own result is deleted.
    real = annotate(server, item_id, nuclei(11, DEFAULT_MODEL))
    assert result_of(server, item_id)['annotation_id'] == real['_id']
    server.client().delete(f'annotation/{real["_id"]}')
    assert result_of(server, item_id) is None


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


def test_the_results_table_pages_and_streams(server, study):
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
    assert table[0] == COLUMNS and [r[2] for r in table[1:]] == [r['item_id'] for r in rows[2:4]]


#: the cell-type columns of the table below, in the order its slides bring them, the ratio last
TYPED = [f'{name}{suffix}' for name in ('lymphocyte', 'tumour', 'stromal', '=macrophage', 'secret')
         for suffix in ('_count', '_per_mm2', '_fraction')] + ['lymphocyte_per_tumour']


def classified(n, model, counts, seed=0):
    """A nuclei document of a model with cell types: its run's stats carry ``{type: count}``."""
    doc = nuclei(n, model, seed)
    doc['attributes']['stats']['cell_types'] = counts
    return doc


def test_cell_types_go_into_the_metadata_and_the_results_table(server, slide_file, reader):
    root = folder(server, server.folder_id, 'typed')
    hidden = folder(server, root, 'hidden')
    ids = {name: slide_in(server, slide_file, hidden if name == 'h.tiff' else root, name)[0]
           for name in ('a.tiff', 'b.tiff', 'c.tiff', 'd.tiff', 'e.tiff', 'h.tiff')}
    first = annotate(server, ids['a.tiff'], classified(40, 'typed.pt', {'lymphocyte': 24, 'tumour': 8, 'stromal': 8}))
    annotate(server, ids['b.tiff'], classified(10, 'other.pt', {'tumour': 0, '=macrophage': 10}))  # no lymphocytes
    annotate(server, ids['c.tiff'], classified(6, 'typed.pt', {'lymphocyte': 6, 'tumour': 0, 'stromal': 0}))
    annotate(server, ids['d.tiff'], nuclei(5, 'plain.pt'))  # a model without cell types
    annotate(server, ids['e.tiff'], classified(5, 'odd.pt', {'x': -1}))  # not counts: a result without types
    annotate(server, ids['h.tiff'], classified(5, 'secret.pt', {'secret': 5}))

    a = result_of(server, ids['a.tiff'])  # tissue 0.04 mm2
    assert a['cells'] == 40 and a['cell_types'] == [
        {'name': 'lymphocyte', 'count': 24, 'per_mm2': 600.0, 'fraction': 0.6},
        {'name': 'tumour', 'count': 8, 'per_mm2': 200.0, 'fraction': 0.2},
        {'name': 'stromal', 'count': 8, 'per_mm2': 200.0, 'fraction': 0.2}]
    assert a['lymphocyte_per_tumour'] == 3.0
    assert result_of(server, ids['c.tiff'])['lymphocyte_per_tumour'] is None  # no tumour cell: no ratio, no error
    assert 'lymphocyte_per_tumour' not in result_of(server, ids['b.tiff'])
    for plain in ('d.tiff', 'e.tiff'):
        assert set(result_of(server, ids[plain])) == set(result_of(server, ids['a.tiff'])) - {
            'cell_types', 'lymphocyte_per_tumour'}

    rows = {r['name']: r for r in server.client().get(f'cellrcnn/folder/{root}/results')}
    assert all(set(r) == set(COLUMNS + TYPED) for r in rows.values())  # every row has every type's columns

    def types(row, **values):
        return {k: row[k] for k in TYPED} == {**dict.fromkeys(TYPED), **values}

    assert types(rows['a.tiff'], lymphocyte_count=24, lymphocyte_per_mm2=600.0, lymphocyte_fraction=0.6,
                 tumour_count=8, tumour_per_mm2=200.0, tumour_fraction=0.2, stromal_count=8,
                 stromal_per_mm2=200.0, stromal_fraction=0.2, lymphocyte_per_tumour=3.0)
    assert types(rows['b.tiff'], tumour_count=0, tumour_per_mm2=0.0, tumour_fraction=0.0,
                 **{'=macrophage_count': 10, '=macrophage_per_mm2': 250.0, '=macrophage_fraction': 1.0})
    assert types(rows['c.tiff'], lymphocyte_count=6, lymphocyte_per_mm2=150.0, lymphocyte_fraction=1.0,
                 tumour_count=0, tumour_per_mm2=0.0, tumour_fraction=0.0, stromal_count=0, stromal_per_mm2=0.0,
                 stromal_fraction=0.0)
    assert types(rows['d.tiff']) and types(rows['e.tiff']) and rows['e.tiff']['cells'] == 5
    assert types(rows['h.tiff'], secret_count=5, secret_per_mm2=125.0, secret_fraction=1.0)

    text = server.client().sendRestRequest('GET', f'cellrcnn/folder/{root}/results', {'format': 'csv'},
                                           jsonResp=False).text
    header, *table = csv.reader(io.StringIO(text))
    assert header == COLUMNS + [f"'{c}" if c.startswith('=') else c for c in TYPED]  # a type's name is text too
    assert table == [['' if r[k] is None else str(r[k]) for k in COLUMNS + TYPED] for r in rows.values()]

    # A reader who may not see the hidden folder sees neither its slide nor the cell types only it has.
    reader_id, token = reader
    grant(server, root, reader_id, READ, recurse=True)
    grant(server, hidden, reader_id, None)
    seen = server.client(token).get(f'cellrcnn/folder/{root}/results')
    assert [r['name'] for r in seen] == ['a.tiff', 'b.tiff', 'c.tiff', 'd.tiff', 'e.tiff']
    assert all(set(r) == set(COLUMNS + TYPED) - {c for c in TYPED if c.startswith('secret')} for r in seen)
    text = server.client(token).sendRestRequest('GET', f'cellrcnn/folder/{root}/results', {'format': 'csv'},
                                                jsonResp=False).text
    assert 'secret' not in text

    # Deleting a newer result falls back to the classified one, cell types and all, whether the plugin remembered
    # its summary or computes it again from the stored annotation.
    for forget in (False, True):
        if forget:
            in_database(server, "db['annotation'].update_one({'_id': ObjectId(args[0])}, "
                                "{'$unset': {'cellrcnnSummary': ''}})", first['_id'])
        newer = annotate(server, ids['a.tiff'], nuclei(12, 'plain.pt'))
        assert 'cell_types' not in result_of(server, ids['a.tiff'])
        server.client().delete(f'annotation/{newer["_id"]}')
        assert result_of(server, ids['a.tiff']) == {**a, 'date': result_of(server, ids['a.tiff'])['date']}


# --------------------------------------------------------------------------- classified results end to end

TYPES = ('lymphocyte', 'tumour', 'stromal')
TYPE_COLORS = {'lymphocyte': '#0000ff', 'tumour': '#ff0000', 'stromal': '#00ff00'}


def class_density_names(types):
    return [f'cellrcnn nuclei density ({name})' for name in types]


def detect_typed(checkpoint, slide_file, out, *options, env=None):
    """``cellrcnn detect`` with the typed model (``options``: ``--classes``, posting); its output files by key."""
    run = subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', str(slide_file), '-o', str(out), '--model',
                          str(checkpoint), '--threshold', '0.05', '--tile-size', '256', '--min-tissue', '0',
                          '--device', 'cpu', '--progress', 'none', '--no-resume', *options],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return output_paths(str(out), os.path.splitext(os.path.basename(slide_file))[0])


def by_name(server, item_id):
    """The item's active annotations (their whole documents), by name; each name once."""
    stored = active_annotations(server, item_id)
    names = [a['annotation']['name'] for a in stored]
    assert len(names) == len(set(names)), names  # no result is there twice
    return {a['annotation']['name']: server.client().get(f'annotation/{a["_id"]}') for a in stored}


def check_typed_result(server, item_id, paths, types):
    """The item holds exactly the run of ``paths``: the nuclei with each type's label, group and colour, the
    density, one density per type; its metadata is that nuclei annotation's, with the run's counts per type."""
    local = read_annotation_file(paths['annotation'])
    counts = local['attributes']['stats']['cell_types']
    assert list(counts) == list(types)
    stored = by_name(server, item_id)
    assert sorted(stored) == sorted([local['name'], 'cellrcnn nuclei density', *class_density_names(types)])
    nuclei_ = stored[local['name']]['annotation']
    assert nuclei_['description'] == local['description'] and all(f'{t}: {TYPE_COLORS[t]}' in nuclei_['description']
                                                                  for t in types)
    styles = [(e['group'], e['label']['value'], e['lineColor']) for e in nuclei_['elements']]
    assert sorted(styles) == sorted((t, t, TYPE_COLORS[t]) for t in types for _ in range(counts[t]))
    for name, cell_type in zip(class_density_names(types), types):
        heatmap = stored[name]['annotation']
        assert heatmap['elements'][0]['type'] == 'griddata'
        assert (heatmap['attributes']['cell_type'], heatmap['attributes']['density']['nuclei']) == \
            (cell_type, counts[cell_type])
    result = result_of(server, item_id)
    assert (result['annotation_id'], result['cells']) == (stored[local['name']]['_id'], len(local['elements']))
    assert [(t['name'], t['count']) for t in result['cell_types']] == list(counts.items())
    return {name: doc['_id'] for name, doc in stored.items()}


def test_a_classified_run_posted_to_girder_replaces_the_models_earlier_run(server, slide_file, typed_checkpoint,
                                                                        tmp_path):
    root = folder(server, server.folder_id, 'typed_posts')
    item_id, _ = slide_in(server, slide_file, root, 'typed.tiff')
    env = {**os.environ, 'GIRDER_TOKEN': server.token}
    post = ('--girder-url', server.api_url, '--item', item_id)

    first = detect_typed(typed_checkpoint, slide_file, tmp_path / 'first', *post, env=env)
    ids = check_typed_result(server, item_id, first, TYPES)
    before = result_of(server, item_id)
    assert sum(1 for t in before['cell_types'] if t['count']) > 1  # more than one type to tell apart
    row = server.client().get(f'cellrcnn/folder/{root}/results')[0]
    assert [row[f'{t["name"]}_count'] for t in before['cell_types']] == [t['count'] for t in before['cell_types']]
    assert row['lymphocyte_per_tumour'] == before['lymphocyte_per_tumour']

    # Deleting a per-type heatmap leaves the result alone: it is no nuclei result.
    server.client().delete(f'annotation/{ids[class_density_names(TYPES)[2]]}')
    assert result_of(server, item_id) == before

    # The same run again replaces every annotation of the earlier one, heatmaps too; none is there twice.
    again = detect_typed(typed_checkpoint, slide_file, tmp_path / 'again', *post, env=env)
    ids_again = check_typed_result(server, item_id, again, TYPES)
    assert not set(ids.values()) & set(ids_again.values())

    # A run keeping one type leaves no heatmap of the others behind.
    tumour = detect_typed(typed_checkpoint, slide_file, tmp_path / 'tumour', *post, '--classes', 'tumour', env=env)
    kept = check_typed_result(server, item_id, tumour, ('tumour',))
    assert 'lymphocyte_per_tumour' not in result_of(server, item_id)

    # A post that fails part way (the server refuses its last heatmap) takes itself back: the earlier run stays whole.
    broken = tmp_path / 'broken.class-density.anot.json'
    heatmaps = json.loads(open(again['class_density']).read())
    heatmaps[-1]['elements'][0]['values'] = 'not numbers'
    broken.write_text(json.dumps(heatmaps))
    with pytest.raises(CellRCNNError, match='broken.class-density.anot.json'):
        post_annotation_files(server.api_url, server.token, item_id, [again['annotation'], again['density'], broken],
                              **FAST)
    assert check_typed_result(server, item_id, tumour, ('tumour',)) == kept


@pytest.fixture(scope='module')
def typed_outputs(slide_file, typed_checkpoint, tmp_path_factory):
    """The typed model's outputs for the slide as the CellDetection task writes them: every type, and tumour only."""
    settings = DetectionSettings(model=str(typed_checkpoint), threshold=0.05, tile_size=256, min_tissue=0.0,
                                 device='cpu', progress='none')
    runs = {}
    for name, classes in (('all', None), ('tumour', ('tumour',))):
        runs[name] = output_paths(str(tmp_path_factory.mktemp(f'typed_{name}')), 'slide')
        detect_to_files(str(slide_file), runs[name], dataclasses.replace(settings, classes=classes))
    return runs


def test_a_classified_run_ingested_by_the_dsa_folds_into_the_earlier_run(server, slide_file, typed_outputs):
    item_id, file_id = slide_in(server, slide_file, server.folder_id, 'typed_dsa.tiff')
    outputs = (('annotation', 'outputCellAnnotationFile'), ('density', 'outputDensityAnnotationFile'),
               ('class_density', 'outputClassDensityAnnotationFile'))

    def run_task(paths, count, histories):
        """The task's outputs uploaded as slicer_cli_web uploads them; once ``count`` annotations are left, each
        with ``histories`` versions (the re-runs folded into them), what the item holds."""
        for key, identifier in outputs:
            server.upload_as_dsa(paths[key], item_id, file_id, identifier)

        def landed():
            now = active_annotations(server, item_id)
            return len(now) == count and all(
                len(server.client().get(f'annotation/{a["_id"]}/history')) == histories for a in now)

        wait_for(landed, 60, f'{count} annotations with {histories} versions each')
        return check_typed_result(server, item_id, paths, list(read_annotation_file(paths['annotation'])[
            'attributes']['stats']['cell_types']))

    ids = run_task(typed_outputs['all'], 5, 1)
    assert run_task(typed_outputs['all'], 5, 2) == ids  # a re-run updates each annotation in place
    kept = run_task(typed_outputs['tumour'], 3, 3)  # the heatmaps of the types this run left out are gone
    assert kept == {name: ids[name] for name in kept}


def user_tokens(server, user_id):
    """The ids of a user's full-scope tokens (what logs in as the user), from the database."""
    return set(in_database(server, """
        result = [t['_id'] for t in db['token'].find({'userId': ObjectId(args[0])})
                  if 'core.user_auth' in (t.get('scope') or [])]
        """, user_id))


def test_the_batch_token_is_gone_once_the_batch_has_queued_its_slides(server, cli_id, runner, slide_file):
    runner_id, runner_token = runner
    work, _ = writable_folder(server, 'token-work', runner_id, slide_file, ('t1.tiff', 't2.tiff'))
    before = user_tokens(server, runner_id)
    assert runner_token in before
    parent, jobs = detect(server, work, token=runner_token)
    assert len(jobs) == 2
    assert user_tokens(server, runner_id) == before  # no token of the batch is left behind
    for job in jobs:
        play_worker(server, job['_id'], 2, 3)
    assert server.client().get(f'job/{parent["_id"]}')['status'] == 3
    assert user_tokens(server, runner_id) == before


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


DELETE_WITHOUT_ELEMENTS = textwrap.dedent('''
    import json, sys
    from girder_large_image_annotation.models.annotation import Annotation
    from girder_large_image_annotation.models.annotationelement import Annotationelement

    def refuse(*args, **kwargs):
        raise AssertionError('the elements of an annotation were read')

    Annotationelement.getElements = Annotationelement.yieldElements = refuse
    from girder_cellrcnn import results

    annotation_id, item_id = sys.argv[1:]
    Annotation().remove(Annotation().load(annotation_id, force=True, getElements=False))
    print(json.dumps(results.resync(item_id)['meta'].get('cellrcnn'), default=str))
''')


def test_deleting_a_result_reads_no_elements(server, slide_file):
    """The fallback after a deletion, run in the server's code against its database with element reads refused:
    once with the summary the plugin remembered for the older result, once computing it from scores alone."""
    item_id, _ = slide_in(server, slide_file, server.folder_id, 'fallback.tiff')
    older_doc = nuclei(40, 'other.pt', seed=3)
    older = annotate(server, item_id, older_doc)
    for round_, forget in ((0, False), (1, True)):
        newer = annotate(server, item_id, nuclei(12, DEFAULT_MODEL, seed=round_))
        assert result_of(server, item_id)['annotation_id'] == newer['_id']
        if forget:  # an older result saved before the plugin remembered summaries
            in_database(server, "db['annotation'].update_one({'_id': ObjectId(args[0])}, "
                                "{'$unset': {'cellrcnnSummary': ''}})", older['_id'])
        env = {**os.environ, 'GIRDER_MONGO_URI': server.db_uri}
        env.pop('PYTHONPATH', None)
        run = subprocess.run([PYTHON, '-c', DELETE_WITHOUT_ELEMENTS, newer['_id'], item_id], capture_output=True,
                             text=True, timeout=120, env=env, cwd=server.root)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        check_summary(summary, older_doc, older['_id'])
        check_summary(result_of(server, item_id), older_doc, older['_id'])


def test_models_are_told_apart_by_their_bytes(server, cli_id, slide_file):
    root = folder(server, server.folder_id, 'hashes')
    ids = {name: slide_in(server, slide_file, root, name)[0] for name in ('h1.tiff', 'h2.tiff', 'h3.tiff')}
    model_a, model_b = b'model A bytes', b'model B bytes'
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


def test_a_rerun_updates_the_earlier_result_and_keeps_it_as_history(server, slide_file, result_files, nuclei_doc,
                                                                    reader, tmp_path):
    reader_id, reader_token = reader
    root = folder(server, server.folder_id, 'reruns')
    access = {'users': [{'id': server.user_id, 'level': 2},
                        {'id': reader_id, 'level': READ, 'flags': ['large_image_create_annotations']}], 'groups': []}
    server.client().put(f'folder/{root}/access', {'access': json.dumps(access)})
    item_id, file_id = slide_in(server, slide_file, root, 'rerun.tiff')
    for path, identifier in ((result_files['annotation'], 'outputCellAnnotationFile'),
                             (result_files['density'], 'outputDensityAnnotationFile')):
        server.upload_as_dsa(path, item_id, file_id, identifier)
    first = wait_for(lambda: len(active_annotations(server, item_id)) == 2 and active_annotations(server, item_id),
                     60, 'the first run ingested')
    ids = {a['annotation']['name']: a['_id'] for a in first}
    nuclei_id = ids[nuclei_doc['name']]
    assert result_of(server, item_id)['annotation_id'] == nuclei_id

    # The task runs again (from HistomicsUI): the DSA ingests its outputs as new annotations; this run found fewer.
    second_doc = dict(nuclei_doc, elements=nuclei_doc['elements'][:40])
    second = tmp_path / os.path.basename(result_files['annotation'])
    second.write_text(json.dumps(second_doc))
    server.upload_as_dsa(second, item_id, file_id, 'outputCellAnnotationFile')
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')

    def folded():
        now = active_annotations(server, item_id)
        histories = [server.client().get(f'annotation/{i}/history') for i in ids.values()]
        return (now if sorted(a['_id'] for a in now) == sorted(ids.values()) and all(len(h) == 2 for h in histories)
                else None)

    wait_for(folded, 60, 'the second run folded into the first one\'s annotations')
    result = result_of(server, item_id)
    assert (result['annotation_id'], result['cells']) == (nuclei_id, 40)
    versions = server.client().get(f'annotation/{nuclei_id}/history')
    earlier = server.client().get(f'annotation/{nuclei_id}/history/{versions[-1]["_version"]}')
    assert len(earlier['annotation']['elements']) == len(nuclei_doc['elements'])  # the first run, kept
    assert len(server.client().get(f'annotation/{nuclei_id}')['annotation']['elements']) == 40

    # Another model's result, and the reader's look-alike, stay annotations of their own; the result is untouched.
    other = annotate(server, item_id, nuclei(10, 'other.pt'))
    fake = annotate(server, item_id, dict(nuclei_doc, elements=nuclei_doc['elements'][:3]), token=reader_token)
    # Girder's events thread takes its work in order: once a third density run uploaded after them has been folded
    # in, those two arrivals have been looked at.
    server.upload_as_dsa(result_files['density'], item_id, file_id, 'outputDensityAnnotationFile')
    density_id = ids[next(name for name in ids if name != nuclei_doc['name'])]
    wait_for(lambda: len(server.client().get(f'annotation/{density_id}/history')) == 3
             and len(active_annotations(server, item_id)) == 4, 60, 'the third density run folded in')
    assert sorted(a['_id'] for a in active_annotations(server, item_id)) == sorted([*ids.values(), other['_id'],
                                                                                     fake['_id']])
    assert len(server.client().get(f'annotation/{nuclei_id}')['annotation']['elements']) == 40
