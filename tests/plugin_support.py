"""Helpers of the Girder plugin's tests (tests/test_plugin_*.py) and of their shared fixtures in tests/conftest.py.

Each takes the Girder (:class:`cellrcnn.devstack.local_girder.GirderServer`, the session's or a module's view of it,
see tests/conftest.py) and works through its REST API, as the administrator unless a token is given. ``PYTHON`` is the
server's own virtualenv (None when it is not installed: the modules are skipped, see ``NEEDS_GIRDER``).
"""

import json
import os
import subprocess
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cellrcnn import __version__
from cellrcnn.annotation import detections_to_annotation
from cellrcnn.checkpoint import BUNDLED_MODEL
from cellrcnn.devstack.local_girder import girder_python, wait_for

PYTHON, WHY_NOT = girder_python()
#: the plugin's modules are skipped without the server's virtualenv (their ``pytestmark``)
NEEDS_GIRDER = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT or '')

XML = os.path.join(os.path.dirname(__file__), '..', 'cli', 'CellDetection', 'CellDetection.xml')
DEFAULT_MODEL = os.path.basename(BUNDLED_MODEL)
FAST = {'retries': 2, 'backoff': 0.01}
COLUMNS = ['name', 'path', 'item_id', 'cells', 'tissue_mm2', 'cells_per_mm2', 'ink_or_fill_mm2', 'out_of_focus_mm2',
           'cells_out_of_focus', 'out_of_focus_left_out', 'keep_blue_green', 'threshold', 'magnification', 'classes',
           'views', 'score_mean', 'score_median', 'model', 'cellrcnn_version', 'roi', 'region_annotation',
           'annotation_id', 'date']
READ, WRITE = 0, 1


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


def nuclei(n, model, seed=0, roi=None, sha=None, **params):
    """A nuclei document with the attributes cellrcnn writes (model, version marker, parameters, with ``params`` too,
    run stats; the model's SHA-256 when given)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (n, 2))
    attributes = {'model': model, 'cellrcnn': __version__, 'params': {'roi': roi, 'tile_size': 1024, **params},
                  'stats': {'detections': n, 'tissue_mm2': 0.04, 'ink_or_fill_mm2': 0.01, 'out_of_focus_mm2': 0.02,
                            'detections_out_of_focus': n // 3, 'out_of_focus_left_out': True}}
    if sha:
        attributes['model_sha256'] = sha
    return detections_to_annotation(np.hstack([xy, xy + 8]), rng.uniform(0.5, 1, n), attributes=attributes)


def annotate(server, item_id, doc, token=None):
    """POST an annotation document to an item as the token's user (the admin's by default): the stored annotation."""
    return server.client(token).post('annotation', {'itemId': item_id}, json=doc)


def rounded(value):
    """A number of a result's params as the item's metadata gives it: 6 places."""
    return None if value is None else round(value, 6)


def expected_summary(doc):
    scores = np.array([e['user']['score'] for e in doc['elements']])
    tissue = doc['attributes']['stats']['tissue_mm2']
    return {'cells': len(scores), 'tissue_mm2': tissue, 'cells_per_mm2': len(scores) / tissue,
            'ink_or_fill_mm2': doc['attributes']['stats'].get('ink_or_fill_mm2'),
            'out_of_focus_mm2': doc['attributes']['stats'].get('out_of_focus_mm2'),
            'cells_out_of_focus': doc['attributes']['stats'].get('detections_out_of_focus'),
            'out_of_focus_left_out': doc['attributes']['stats'].get('out_of_focus_left_out'),
            'keep_blue_green': doc['attributes']['params'].get('keep_blue_green') is True,
            **{name: rounded(doc['attributes']['params'].get(name)) for name in ('threshold', 'magnification')},
            'classes': sorted(doc['attributes']['params']['classes']) if doc['attributes']['params'].get('classes')
            else None, 'views': doc['attributes']['params'].get('views', 1),
            'mean': scores.mean(), **{f'p{q}': np.percentile(scores, q) for q in (5, 25, 50, 75, 95)},
            'histogram': np.bincount(np.clip((scores * 10).astype(int), 0, 9), minlength=10).tolist()}


def grant(server, folder_id, user_id, level, recurse=False):
    access = {'users': [{'id': server.user_id, 'level': 2}] + ([{'id': user_id, 'level': level}] if level is not None
                                                                 else []), 'groups': []}
    server.client().put(f'folder/{folder_id}/access', {'access': json.dumps(access), 'recurse': recurse})


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


def in_database(server, code, *args):
    """Run ``code`` in the server's virtualenv (pymongo, Girder and the plugin are there, not here) with ``db`` (the
    server's database: what REST does not show, such as tokens and private fields), ``ObjectId`` and ``args``; it
    sets ``result``, returned here through JSON. Girder's models, imported there, use the same database."""
    script = ('import json, os, sys\nimport pymongo\nfrom bson import ObjectId\n'
              'db = pymongo.MongoClient(os.environ["GIRDER_MONGO_URI"])["girder"]\nargs = json.loads(sys.argv[1])\n'
              f'result = None\n{textwrap.dedent(code)}\nprint(json.dumps(result, default=str))\n')
    # the database's address holds its password: in the environment, not on the command line
    env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, 'GIRDER_MONGO_URI': server.db_uri}
    run = subprocess.run([PYTHON, '-c', script, json.dumps(args)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def error_of(call):
    """(HTTP status, message) of a REST call that fails."""
    with pytest.raises(Exception) as err:
        call()
    return err.value.status, json.loads(err.value.responseText)['message']


def children(server, parent):
    """The slide jobs of a batch job (they belong to the batch's user)."""
    return server.client().get('job', {'limit': 0, 'parentId': parent['_id'], 'userId': parent['userId']})


def detect(server, folder_id, token=None, **params):
    """Start a folder's detection; wait until its job has queued its slides: (the batch job, its slide jobs)."""
    return queued(server, server.client(token).post(f'cellrcnn/folder/{folder_id}/detect', params))


def queued(server, job):
    """Wait until a batch job has queued its slides: (the batch job, its slide jobs)."""
    def done():
        parent = server.client().get(f'job/{job["_id"]}')
        return parent if parent['cellrcnnBatch']['scheduled'] or parent['status'] in (3, 4, 5) else None

    parent = wait_for(done, 30, 'the batch job to queue its slides')
    return parent, children(server, parent)


def play_worker(server, job_id, *statuses):
    for status in statuses:
        server.client().put(f'job/{job_id}', {'status': status})
