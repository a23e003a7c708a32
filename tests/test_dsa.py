"""The Digital Slide Archive's own job path, for real: the task image registered through slicer_cli_web, CellDetection
submitted through the endpoint HistomicsUI posts to, run by girder_worker in a Docker container, its annotations
ingested on the slide; cancelling, failing, and folder-wide detection on the same worker (the ``dsa`` fixture:
``cellrcnn.devstack.local_dsa.DSAStack``)."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from packaging.utils import canonicalize_name

from cellrcnn.__main__ import main as cellrcnn
from cellrcnn.annotation import DEFAULT_NAME
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.devstack.local_dsa import (
    JOB_CANCELED,
    JOB_ERROR,
    JOB_SUCCESS,
    TASK_IMAGE,
    cell_detection_params,
    check_free_disk,
)
from cellrcnn.devstack.local_girder import wait_for
from cellrcnn.errors import CellRCNNError
from cellrcnn.nuclei_map import MAP_NAME
from cellrcnn.nuclei_pixelmap import PIXELMAP_NAME
from cellrcnn.region import inside, region_settings
from cellrcnn.tissue_outline import TISSUE_NAME
from support import PINNED_LINE, image_pins

REGION = [0, 0, 1200, 1200]
RUNNING = 2


def job_log(dsa, job_id):
    return ''.join(dsa.client().get(f'job/{job_id}')['log'])


def annotations_of(dsa, item_id, count=2, timeout=120):
    """The documents of the item's annotations, once ``count`` of them are there (ingestion follows the job's end)."""
    wait_for(lambda: len(dsa.annotations(item_id)) >= count, timeout, f'{count} annotations on item {item_id}')
    return {doc['name']: doc for doc in dsa.annotation_documents(item_id)}


def boxes_of(doc):
    """x0, y0, x1, y1 of an annotation's rectangles, sorted."""
    rects = [el for el in doc['elements'] if el['type'] == 'rectangle']
    return np.array(sorted((e['center'][0] - e['width'] / 2, e['center'][1] - e['height'] / 2,
                            e['center'][0] + e['width'] / 2, e['center'][1] + e['height'] / 2) for e in rects))


@pytest.fixture(scope='module')
def folder(dsa):
    return dsa.client().createFolder(dsa.folder_id, 'test_dsa', reuseExisting=True)['_id']


@pytest.fixture(scope='module')
def sample(dsa, folder):
    """The bundled sample slide on the DSA: (item id, file id)."""
    return dsa.upload_slide(SAMPLE_SLIDE, folder_id=folder)


def test_the_task_image_is_registered_through_slicer_cli_web(dsa):
    assert set(dsa.tasks) == {'CellDetection', 'TrainCellDetector'}
    gc = dsa.client()
    task = gc.get(f'item/{dsa.tasks["CellDetection"]}')
    assert task['meta']['slicerCLIType'] == 'task' and task['meta']['image'] == TASK_IMAGE
    tag = gc.get(f'folder/{task["folderId"]}')
    image = gc.get(f'folder/{tag["parentId"]}')
    assert (image['name'], tag['name']) == ('cellrcnn', 'latest')
    # what HistomicsUI lists in its Analyses menu
    assert set(gc.get('slicer_cli_web/docker_image')['cellrcnn']['latest']) == {'CellDetection', 'TrainCellDetector'}


def test_the_broker_refuses_clients_without_the_stacks_password(dsa):
    """A message on the broker runs code in girder_worker (as root; see cellrcnn.devstack.local_dsa), and any user
    of the machine can reach Redis's loopback port: without the stack's password (random, in a 0600 configuration
    file in the 0700 root, on no command line) Redis answers nothing, not even PING, and queues nothing. The worker,
    which has it, runs the jobs of every other test here."""
    port = re.fullmatch(r'redis://:[^@]+@127\.0\.0\.1:(\d+)/0', dsa.broker_url).group(1)
    env = {k: v for k, v in os.environ.items() if k != 'REDISCLI_AUTH'}

    def redis_cli(*command, password=None):
        auth = {'REDISCLI_AUTH': password} if password else {}  # redis-cli's way to take it off its command line
        return subprocess.run(['redis-cli', '-p', port, *command], capture_output=True, text=True, timeout=30,
                              env={**env, **auth}).stdout.strip()

    for password in (None, 'wrong'):
        for command in (['PING'], ['LPUSH', 'celery', '{}'], ['KEYS', '*'], ['CONFIG', 'GET', 'requirepass']):
            assert redis_cli(*command, password=password) == 'NOAUTH Authentication required.', (password, command)
    assert redis_cli('PING', password=dsa.broker_password) == 'PONG'
    config = os.path.join(dsa.root, 'redis.conf')
    assert (os.stat(config).st_mode & 0o777, os.stat(dsa.root).st_mode & 0o777) == (0o600, 0o700)
    for proc in dsa.procs:
        with open(f'/proc/{proc.pid}/cmdline', 'rb') as f:
            assert dsa.broker_password.encode() not in f.read()


def test_cell_detection_runs_in_its_container_and_lands_on_the_slide(dsa, folder, sample, tmp_path):
    item_id, file_id = sample
    job = dsa.run_task(dsa.tasks['CellDetection'], cell_detection_params(file_id, folder, 'region',
                                                                         analysis_roi=json.dumps(REGION)))
    job = dsa.wait_for_job(job['_id'], 600)
    log = ''.join(job['log'])
    assert job['status'] == JOB_SUCCESS, log[-3000:]
    assert job['type'] == f'{TASK_IMAGE}#CellDetection' and job['handler'] == 'celery_handler'
    # the task's progress lines became the job's progress; its summary is in the job's log
    assert job['progress']['current'] == job['progress']['total'] > 0
    summary = re.search(r'^(\d+) nuclei in CMU-1-Small-Region.svs at 20x', log, re.MULTILINE)
    assert summary, log[-3000:]

    docs = annotations_of(dsa, item_id, count=5)
    nuclei = docs[DEFAULT_NAME]
    density = next(d for name, d in docs.items() if 'density' in name.lower())
    assert density['elements'][0]['type'] == 'griddata'
    assert nuclei['attributes']['params']['roi'] == [0, 0, 1200, 1200]
    assert len(nuclei['attributes']['model_sha256']) == 64
    boxes = boxes_of(nuclei)
    assert len(boxes) == len(nuclei['elements']) == int(summary.group(1)) > 200
    # a small result opens on its boxes; the map holds every nucleus too, a dot per nucleus of each type
    assert nuclei['display'] == {'visible': True} and docs[MAP_NAME]['display'] == {'visible': False}
    assert sum(len(e['points']) for e in docs[MAP_NAME]['elements']) == len(boxes)
    # the pixelmap draws the label image the task uploaded as an output: large_image put its item in the element
    (pixels,) = docs[PIXELMAP_NAME]['elements']
    assert docs[PIXELMAP_NAME]['display'] == {'visible': False} and len(pixels['values']) == len(boxes) + 1
    gc = dsa.client()
    label_item = gc.get(f'item/{pixels["girderId"]}')
    assert (label_item['name'], label_item['folderId']) == ('region-outputNucleiLabelImage.tiff', folder)
    labels, tiles = gc.get(f'item/{label_item["_id"]}/tiles'), gc.get(f'item/{item_id}/tiles')
    assert (labels['sizeX'], labels['sizeY']) == (tiles['sizeX'], tiles['sizeY'])  # the slide's own size
    # every nucleus is centred in the region asked for (read in the whole slide's tiles that reach into it)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert (centres >= 0).all() and (centres < 1200).all() and (boxes[:, :2] >= -1).all()
    assert tiles['sizeX'] >= 1200 and tiles['sizeY'] >= 1200
    # the tissue outline, cut to the region, hidden until asked for
    outline = docs[TISSUE_NAME]
    points = np.array([p for e in outline['elements'] for p in e['points']])
    assert outline['display'] == {'visible': False} and len(points) and (points[:, :2] <= 1200).all()

    # the same detection run directly, outside Docker, finds the same nuclei
    assert cellrcnn(['detect', SAMPLE_SLIDE, '-o', str(tmp_path), '--roi', '0,0,1200,1200', '--progress', 'none',
                     '--no-resume']) == 0
    local = json.load(open(tmp_path / 'CMU-1-Small-Region.anot.json'))
    np.testing.assert_allclose(boxes, boxes_of(local[0] if isinstance(local, list) else local), atol=0.01)


#: a region drawn as a polygon in HistomicsUI's panel, as the panel sends it: x1,y1,x2,y2,... in base pixels
POLYGON = [600, 400, 1800, 700, 1500, 1900, 700, 1500]


def test_a_region_drawn_as_a_polygon_keeps_the_nuclei_inside_it(dsa, folder, tmp_path):
    item_id, file_id = dsa.upload_slide(SAMPLE_SLIDE, name='polygon.svs', folder_id=folder)
    job = dsa.run_task(dsa.tasks['CellDetection'], cell_detection_params(file_id, folder, 'polygon',
                                                                         analysis_roi=json.dumps(POLYGON)))
    job = dsa.wait_for_job(job['_id'], 600)
    assert job['status'] == JOB_SUCCESS, ''.join(job['log'])[-3000:]
    nuclei = annotations_of(dsa, item_id, count=5)[DEFAULT_NAME]
    assert nuclei['attributes']['params']['polygons'] == [[[600, 400], [1800, 700], [1500, 1900], [700, 1500]]]
    boxes = boxes_of(nuclei)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert len(boxes) > 500 and inside(region_settings(POLYGON)['polygons'], centres[:, 0], centres[:, 1]).all()
    # the same region given to cellrcnn detect outside Docker finds the same nuclei
    assert cellrcnn(['detect', SAMPLE_SLIDE, '-o', str(tmp_path), '--roi', ','.join(map(str, POLYGON)),
                     '--progress', 'none', '--no-resume']) == 0
    local = json.load(open(tmp_path / 'CMU-1-Small-Region.anot.json'))
    np.testing.assert_allclose(boxes, boxes_of(local[0] if isinstance(local, list) else local), atol=0.01)


def test_a_cancelled_job_stops_its_container(dsa, folder, sample):
    _, file_id = sample
    job = dsa.run_task(dsa.tasks['CellDetection'], cell_detection_params(file_id, folder, 'cancelled'))
    containers = lambda: dsa.engine.docker('ps', '-q', '--filter', f'ancestor={TASK_IMAGE}').stdout.split()  # noqa

    def reporting():  # running in its container, with the task's progress reaching the job while it runs
        now = dsa.client().get(f'job/{job["_id"]}')
        progress = now.get('progress') or {}
        return now['status'] == RUNNING and containers() and 0 < progress.get('current', 0) < progress.get('total', 0)

    wait_for(reporting, 180, 'the job to run its container and report progress')
    for container in containers():  # the task runs as the image's own user, not as root, and without a network
        assert dsa.engine.docker('exec', container, 'id', '-un').stdout.strip() == 'cellrcnn'
        mode = dsa.engine.docker('inspect', '--format', '{{.HostConfig.NetworkMode}}', container).stdout.strip()
        assert mode == 'none'
    dsa.client().put(f'job/{job["_id"]}/cancel')
    assert dsa.wait_for_job(job['_id'], 120)['status'] == JOB_CANCELED
    wait_for(lambda: not containers(), 60, 'the container to stop')


def test_the_task_image_holds_the_pinned_versions(dsa):
    frozen = dsa.engine.docker('run', '--rm', '--entrypoint', 'pip', TASK_IMAGE, 'freeze', '--exclude-editable')
    installed = {canonicalize_name(name): version for name, version in PINNED_LINE.findall(frozen.stdout)}
    pins = image_pins()
    assert {name: installed.get(name) for name in pins} == pins
    assert 'torch' in installed and 'torchvision' in installed  # unpinned, from the registry


def test_a_job_on_an_unreadable_slide_fails_with_one_line(dsa, folder, tmp_path):
    broken = tmp_path / 'broken.svs'
    broken.write_bytes(b'II*\x00' + os.urandom(4096))
    file = dsa.client().uploadFileToFolder(folder, str(broken))
    job = dsa.run_task(dsa.tasks['CellDetection'], cell_detection_params(file['_id'], folder, 'broken'))
    job = dsa.wait_for_job(job['_id'], 300)
    log = ''.join(job['log'])
    assert job['status'] == JOB_ERROR, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith('CellDetection: error:')]
    assert len(errors) == 1 and 'broken.svs' in errors[0], log[-3000:]
    assert 'Traceback' not in log.split('CellDetection: error:')[0]


def test_folder_detection_runs_every_slide_on_the_worker(dsa, synthetic_slide, tmp_path):
    gc = dsa.client()
    cohort = gc.createFolder(dsa.folder_id, 'cohort_run', reuseExisting=True)['_id']
    names, local = [], {}
    for seed in (1, 2):
        path, _ = synthetic_slide(700, 600, seed)
        name = f'slide{seed}.tiff'
        dsa.upload_slide(path, name=name, folder_id=cohort)
        names.append(name)
        out = tmp_path / name
        assert cellrcnn(['detect', str(path), '-o', str(out), '--progress', 'none', '--no-resume']) == 0
        local[name] = json.loads((out / 'slide.summary.json').read_text())['detections']
    batch = gc.post(f'cellrcnn/folder/{cohort}/detect')
    batch = dsa.wait_for_job(batch['_id'], 900)
    children = gc.get('job', {'limit': 0, 'parentId': batch['_id'], 'userId': batch['userId']})
    assert batch['status'] == JOB_SUCCESS, ''.join(batch['log'])[-3000:]
    assert len(children) == 2 and all(c['status'] == JOB_SUCCESS for c in children)
    rows = wait_for(lambda: (lambda rows: rows if all(r['cells'] for r in rows) else None)(
        gc.get(f'cellrcnn/folder/{cohort}/results')), 120, 'every slide in the results table')
    assert sorted(r['name'] for r in rows) == names
    (label_folder,) = [f for f in gc.listFolder(cohort) if f['name'] == 'cellrcnn label images']
    for row in rows:  # each slide's count, from the worker's run, is the one the same detection gives here
        assert row['model'] == 'cellrcnn-default.pt' and row['annotation_id']
        assert row['cells'] == local[row['name']] > 100, (row, local)
        # each slide has its nuclei map and pixelmap too: what a whole slide's result opens on
        docs = annotations_of(dsa, row['item_id'], count=5)
        assert sum(len(e['points']) for e in docs[MAP_NAME]['elements']) == row['cells']
        (pixels,) = docs[PIXELMAP_NAME]['elements']
        assert len(pixels['values']) == row['cells'] + 1
        # its label image is in the folder's subfolder of label images, where no run or table takes it for a slide
        label_item = gc.get(f'item/{pixels["girderId"]}')
        assert label_item['name'] == f'{row["name"][:-5]}-outputNucleiLabelImage.tiff'
        assert label_item['largeImage']['fileId'] and label_item['folderId'] == label_folder['_id']
    again = dsa.wait_for_job(gc.post(f'cellrcnn/folder/{cohort}/detect')['_id'], 120)
    assert again['cellrcnnBatch'] | {'scheduled': None} == {
        'total': 2, 'finished': 2, 'running': 0, 'todo': 0, 'no_write_folders': 0, 'model': 'cellrcnn-default.pt',
        'model_sha256': None, 'scheduled': None}


def test_folder_detection_counts_inside_each_slides_region_annotation(dsa, synthetic_slide):
    """``regionAnnotation=tumour`` on the worker: the job reads the slide's 'tumour' annotation from the private
    collection with the job's own token and counts inside it; the slide without one is left out. With
    ``leaveOutOfFocus``, a threshold and cell types to keep, which the task takes as the folder run gives them (the
    cell types as a JSON list, as HistomicsUI sends them) and the result records: the same run asked again finds
    the slide done."""
    gc = dsa.client()
    cohort = gc.createFolder(dsa.folder_id, 'region_run', reuseExisting=True)['_id']
    drawn, _ = dsa.upload_slide(synthetic_slide(700, 600, 5)[0], name='drawn.tiff', folder_id=cohort)
    dsa.upload_slide(synthetic_slide(700, 600, 6)[0], name='undrawn.tiff', folder_id=cohort)
    quad = [[50, 50, 0], [500, 80, 0], [450, 520, 0], [80, 450, 0]]
    gc.post('annotation', {'itemId': drawn}, json={'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': quad}]})
    asked = {'regionAnnotation': 'tumour', 'leaveOutOfFocus': 'true', 'threshold': 0.4, 'classes': 'tumour,stromal'}
    batch = dsa.wait_for_job(gc.post(f'cellrcnn/folder/{cohort}/detect', asked)['_id'], 600)
    (child,) = gc.get('job', {'limit': 0, 'parentId': batch['_id'], 'userId': batch['userId']})
    assert child['status'] == JOB_SUCCESS, job_log(dsa, child['_id'])[-3000:]
    assert batch['status'] == JOB_SUCCESS, ''.join(batch['log'])[-3000:]
    assert (batch['cellrcnnBatch']['todo'], batch['cellrcnnBatch']['no_region']) == (1, 1)
    nuclei = annotations_of(dsa, drawn, count=6)[f'{DEFAULT_NAME} inside tumour']  # named for its region
    assert nuclei['attributes']['params']['region_annotation'] == 'tumour'
    assert nuclei['attributes']['params']['leave_out_of_focus'] is True
    assert nuclei['attributes']['stats']['out_of_focus_left_out'] is True
    assert nuclei['attributes']['params']['threshold'] == 0.4
    assert nuclei['attributes']['params']['classes'] == ['stromal', 'tumour']  # in name order, as every table
    assert {e['group'] for e in nuclei['elements']} <= {'tumour', 'stromal'}
    centres = (boxes_of(nuclei)[:, :2] + boxes_of(nuclei)[:, 2:]) / 2
    assert len(centres) > 20 and inside([[p[:2] for p in quad]], centres[:, 0], centres[:, 1]).all()
    rows = wait_for(lambda: (lambda rows: rows if any(r['cells'] for r in rows) else None)(
        gc.get(f'cellrcnn/folder/{cohort}/results')), 120, 'the drawn slide in the results table')
    assert {r['name']: (r['region_annotation'], bool(r['cells']), r['threshold'], r['classes']) for r in rows} == {
        'drawn.tiff': ('tumour', True, 0.4, 'stromal,tumour'), 'undrawn.tiff': (None, False, None, None)}
    again = dsa.wait_for_job(gc.post(f'cellrcnn/folder/{cohort}/detect', asked)['_id'], 120)
    assert (again['cellrcnnBatch']['finished'], again['cellrcnnBatch']['todo']) == (1, 0)


def test_an_image_build_without_the_disk_it_needs_stops_in_one_line(tmp_path):
    more_than_the_disk = int(shutil.disk_usage(tmp_path).total / 1e9) + 1
    with pytest.raises(CellRCNNError, match=rf'^building {TASK_IMAGE} needs about {more_than_the_disk} GB free under '
                                            rf'{tmp_path}, and [0-9.]+ GB are: free some space') as refused:
        check_free_disk(str(tmp_path), more_than_the_disk, f'building {TASK_IMAGE}')
    assert '\n' not in str(refused.value)
    check_free_disk(str(tmp_path), 1, f'building {TASK_IMAGE}')  # this disk has 1 GB free: no complaint
