"""The Girder plugin (plugin/, girder_cellrcnn) in a real DSA Girder against users who try to borrow others' rights
(issue 11): only tasks an administrator registered run, the plugin never sets ``worker.api_url``, results count only
from writers with a plain model (not uploads ingested for another user), and a batch leaves no token behind.

Set up as tests/test_plugin_folders.py says: the session's server, this module's items in a collection of its own.
"""

import io
import json

import numpy as np
import pytest
import requests

from cellrcnn.devstack.local_girder import wait_for
from plugin_support import (
    DEFAULT_MODEL,
    NEEDS_GIRDER,
    READ,
    WRITE,
    active_annotations,
    annotate,
    detect,
    error_of,
    folder,
    grant,
    in_database,
    nuclei,
    play_worker,
    register_task,
    result_of,
    set_setting,
    slide_in,
    task_item,
)

pytestmark = NEEDS_GIRDER


def get_setting(server, key):
    return server.client().get('system/setting', {'key': key})


def new_user(server, login):
    """A user who is not an administrator, made by the admin: (id, token)."""
    user = server.client().post('user', {'login': login, 'email': f'{login}@example.org', 'firstName': login,
                                         'lastName': 'User', 'password': f'{login}-password'})
    client = server.client(token='')
    client.authenticate(login, f'{login}-password')
    return user['_id'], client.token


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


def test_a_folder_run_counts_inside_only_regions_its_user_may_read(server, cli_id, runner, slide_file):
    """A region annotation whose access the administrator has narrowed to themselves is no region to the runner's
    folder run: the slide is left out, and nothing of the annotation reaches a job."""
    runner_id, runner_token = runner
    work, items = writable_folder(server, 'hidden-region', runner_id, slide_file, slides=('open.tiff', 'closed.tiff'))
    area = {'type': 'rectangle', 'center': [200, 200, 0], 'width': 100, 'height': 100, 'rotation': 0}
    annotate(server, items['open.tiff'], {'name': 'tumour', 'elements': [area]})
    hidden = annotate(server, items['closed.tiff'], {'name': 'tumour', 'elements': [area]})
    admin_only = {'users': [{'id': server.user_id, 'level': 2}], 'groups': []}
    server.client().put(f'annotation/{hidden["_id"]}/access', {'access': json.dumps(admin_only), 'public': False})
    assert server.client(runner_token).get('annotation', {'itemId': items['closed.tiff']}) == []
    parent, jobs = detect(server, work, token=runner_token, regionAnnotation='tumour')
    assert (parent['cellrcnnBatch']['todo'], parent['cellrcnnBatch']['no_region']) == (1, 1)
    assert [j['cellrcnnSlide'] for j in jobs] == [items['open.tiff']]
    play_worker(server, jobs[0]['_id'], 2, 4)


def test_a_folder_run_counts_inside_only_regions_writers_drew(server, cli_id, runner, reader, slide_file):
    """A reader who may annotate the slides draws a region of the name a writer's folder run counts inside: on a
    slide without the writer's own, the slide is left out; where both are, only the writer's reaches the job."""
    runner_id, runner_token = runner
    reader_id, reader_token = reader
    work, items = writable_folder(server, 'readers-region', runner_id, slide_file, slides=('theirs.tiff', 'both.tiff'))
    access = server.client().get(f'folder/{work}/access')
    access['users'].append({'id': reader_id, 'level': READ, 'flags': ['large_image_create_annotations']})
    server.client().put(f'folder/{work}/access', {'access': json.dumps(access)})

    def area(x):
        return {'type': 'rectangle', 'center': [x, 200, 0], 'width': 100, 'height': 100, 'rotation': 0}

    for name in items:
        annotate(server, items[name], {'name': 'tumour', 'elements': [area(600)]}, token=reader_token)
    annotate(server, items['both.tiff'], {'name': 'tumour', 'elements': [area(200)]}, token=runner_token)
    parent, jobs = detect(server, work, token=runner_token, regionAnnotation='tumour')
    assert (parent['cellrcnnBatch']['todo'], parent['cellrcnnBatch']['no_region']) == (1, 1)
    assert [j['cellrcnnSlide'] for j in jobs] == [items['both.tiff']]
    args = server.client().get(f'job/{jobs[0]["_id"]}')['kwargs']['container_args']
    corners = np.array([float(v) for v in args[args.index('--analysis_roi') + 1].split(',')]).reshape(-1, 2)
    assert corners.min(axis=0).tolist() == [150, 150] and corners.max(axis=0).tolist() == [250, 250]  # the runner's
    play_worker(server, jobs[0]['_id'], 2, 4)


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


def slide_a_reader_may_read(server, reader, slide_file, name):
    """A slide of the admin's that the reader may read, and the reader's own public folder: (item id, file id,
    folder id)."""
    reader_id, reader_token = reader
    shared = folder(server, server.folder_id, name)
    grant(server, shared, reader_id, READ)
    return (*slide_in(server, slide_file, shared, f'{name}.tiff'), public_folder_of(server, reader_id, reader_token))


def wait_for_the_ingests_before(server, slide_file, name):
    """Girder's events thread takes its work in order: once two uploads of the admin's after them count (the second
    one queued after whatever the first ingests queued), the uploads before and what they queued have been handled."""
    marker_item, marker_file = slide_in(server, slide_file, server.folder_id, f'{name}.tiff')
    for seed in (1, 2):
        upload_ingest(server, server.token, server.folder_id, nuclei(9, f'{name}{seed}.pt'),
                      {'identifier': 'LargeImageAnnotationUpload', 'userId': server.user_id, 'fileId': marker_file,
                       'itemId': marker_item})
        wait_for(lambda: (result_of(server, marker_item) or {}).get('model') == f'{name}{seed}.pt', 60,  # noqa: B023
                 "the admin's upload to be ingested")


def test_an_upload_made_for_another_user_records_no_result(server, reader, slide_file):
    """HistomicsUI and large_image ingest an uploaded annotation file as the user its reference names, whoever
    uploads it: such annotations are not results."""
    item_id, file_id, own_folder = slide_a_reader_may_read(server, reader, slide_file, 'claimed')
    for identifier in ('LargeImageAnnotationUpload', 'outputCellAnnotationFile'):
        upload_ingest(server, reader[1], own_folder, nuclei(20, DEFAULT_MODEL, seed=7),
                      {'identifier': identifier, 'userId': server.user_id, 'fileId': file_id, 'itemId': item_id})
    wait_for_the_ingests_before(server, slide_file, 'marker')
    made = [a for a in active_annotations(server, item_id) if a['annotation']['name'] == 'cellrcnn nuclei']
    assert len(made) == 2 and {a['creatorId'] for a in made} == {server.user_id}  # (large_image's and HistomicsUI's)
    assert result_of(server, item_id) is None
    # Nor are they results later: not the slide's result after the admin's own result is deleted.
    real = annotate(server, item_id, nuclei(11, DEFAULT_MODEL))
    assert result_of(server, item_id)['annotation_id'] == real['_id']
    server.client().delete(f'annotation/{real["_id"]}')
    assert result_of(server, item_id) is None


def test_an_upload_ingested_later_for_another_user_records_no_result(server, reader, slide_file):
    """large_image puts off the ingest of an annotation whose image element names a file not uploaded yet, and runs
    it when an upload with the same reference ``uuid`` arrives: made for another user, it is no result either."""
    reader_token = reader[1]
    item_id, file_id, own_folder = slide_a_reader_may_read(server, reader, slide_file, 'claimed-later')
    doc = nuclei(20, DEFAULT_MODEL, seed=8)
    doc['elements'].append({'type': 'image', 'girderId': 'outputLater'})  # resolved when that upload arrives
    upload_ingest(server, reader_token, own_folder, doc, {'identifier': 'LargeImageAnnotationUpload', 'uuid': 'z1',
                                                          'userId': server.user_id, 'fileId': file_id,
                                                          'itemId': item_id})
    data = b'the upload the annotation waits for'
    server.client(reader_token).uploadStreamToFolder(own_folder, io.BytesIO(data), 'later.txt', len(data),
                                                     reference=json.dumps({'identifier': 'outputLater',
                                                                           'uuid': 'z1'}))
    wait_for_the_ingests_before(server, slide_file, 'marker-later')
    made = [a for a in active_annotations(server, item_id) if a['annotation']['name'] == 'cellrcnn nuclei']
    assert len(made) == 1 and made[0]['creatorId'] == server.user_id  # made, in the admin's name
    assert result_of(server, item_id) is None


def user_tokens(server, user_id):
    """The ids of a user's full-scope tokens (what logs in as the user), from the database."""
    return set(in_database(server, """
        result = [t['_id'] for t in db['token'].find({'userId': ObjectId(args[0])})
                  if 'core.user_auth' in (t.get('scope') or [])]
        """, user_id))


def job_tokens(server):
    """How many of the tokens girder_worker attaches to queued jobs (scope ``jobs.rest.create_job``) each user has."""
    return in_database(server, """
        from collections import Counter
        result = Counter(str(t['userId']) for t in db['token'].find({'scope': 'jobs.rest.create_job'}))
        """)


def test_each_batchs_slide_jobs_carry_tokens_of_its_own_user(server, cli_id, runner, slide_file):
    """A batch's thread serves no request: what Girder and girder_worker keep on "the current request" there (the
    user, the token, the app) must be the thread's own, or one user's batch queues its jobs with tokens of the user
    whose batch ran before."""
    runner_id, runner_token = runner
    for i, (token, user_id) in enumerate(((runner_token, runner_id), (None, server.user_id),
                                          (runner_token, runner_id))):
        work, _ = writable_folder(server, f'token-users-{i}', runner_id, slide_file, ('u1.tiff', 'u2.tiff'))
        before = job_tokens(server)
        parent, jobs = detect(server, work, token=token)
        assert [j['userId'] for j in jobs] == [user_id] * 2
        after = job_tokens(server)
        assert {u: after[u] - before.get(u, 0) for u in after if after[u] != before.get(u, 0)} == {user_id: 2}


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
