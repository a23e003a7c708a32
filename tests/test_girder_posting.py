"""cellrcnn posting its results to a real Girder with the Digital Slide Archive's plugins (cellrcnn.girder_post; see
cellrcnn.devstack.local_girder): replacing the earlier result, large results uploaded and streamed, retries, one clear
error for each fault, racing posts, results told apart by checkpoint hash, withdrawn uploads, readers' look-alikes.
The task and the ``cellrcnn detect`` command against Girder, and the local Girder itself: tests/test_girder_commands.py.

Skipped unless the server's own virtualenv is there (the DSA's Girder runs without torch): .venv-girder from
``./install.sh --with-girder``, or the python that CELLRCNN_GIRDER_PYTHON names. The server is the session's
(tests/conftest.py), this module's items in a collection of its own. Every check goes through Girder's REST API.
"""

import io
import json
import os
import threading
import time

import girder_client
import numpy as np
import pytest

from cellrcnn import annotation_upload, girder_post
from cellrcnn.annotation import write_detections_annotation
from cellrcnn.annotation_stream import streamed_document
from cellrcnn.annotation_upload import withdrawal_grace
from cellrcnn.devstack.local_girder import free_port, girder_python, wait_for
from cellrcnn.errors import CellRCNNError
from cellrcnn.girder_post import post_annotation_files, post_annotations
from cellrcnn.progress import Progress
from girder_proxy import FaultyProxy
from girder_support import cellrcnn_annotations, nuclei, saved

PYTHON, WHY_NOT = girder_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT or '')

FAST = {'retries': 3, 'backoff': 0.01}


@pytest.fixture(scope='module')
def slide_file(synthetic_slide):
    return synthetic_slide(640, 480, seed=21)[0]


def test_posting_twice_replaces_and_large_results_are_uploaded(server, slide, tmp_path, monkeypatch, capsys):
    item_id, _ = slide
    first = post_annotations(server.api_url, server.token, item_id, nuclei(300), **FAST)
    assert first[0]['route'] == 'post' and first[0]['replaced'] == []
    second = post_annotations(server.api_url, server.token, item_id, nuclei(200, seed=1), **FAST)
    assert second[0]['replaced'] == [first[0]['_id']]
    found = cellrcnn_annotations(server, item_id)
    assert [(a['_id'], a['_elementCount']) for a in found] == [(second[0]['_id'], 200)]
    # Over the size limit: uploaded into the item and ingested by girder_large_image_annotation. The post is a stage
    # of the job's progress (here every moment of the ingest is worth a line).
    monkeypatch.setattr(annotation_upload, 'INGEST_REPORT_SECONDS', 0)
    capsys.readouterr()
    third = post_annotation_files(server.api_url, server.token, item_id, saved(tmp_path, nuclei(250, seed=2)),
                                  large_elements=100, progress=Progress('slicer', name='CellDetection'), **FAST)
    assert third[0]['route'] == 'upload' and third[0]['replaced'] == [second[0]['_id']]
    said = capsys.readouterr().out
    assert said.startswith('<filter-start><filter-name>CellDetection</filter-name></filter-start>\n')
    assert "<filter-comment>uploading annotation 'cellrcnn nuclei' (250 elements)</filter-comment>" in said
    assert "the server is storing the 250 elements of 'cellrcnn nuclei'" in said
    assert said.index('storing') < said.index('<filter-progress>1.000</filter-progress>') < said.index('<filter-end>')
    found = cellrcnn_annotations(server, item_id)
    assert [(a['_id'], a['_elementCount']) for a in found] == [(third[0]['_id'], 250)]
    stored = server.client().get(f'annotation/{third[0]["_id"]}')['annotation']
    assert len(stored['elements']) == 250 and stored['attributes']['model'] == 'test.pt'
    assert len(list(server.client().listFile(item_id))) == 1  # the uploaded annotation file was removed: the slide only


def test_a_large_annotation_file_is_streamed_as_written(server, slide, tmp_path):
    """A file over large_bytes is never loaded whole: its header is re-encoded and its elements sent from disk."""
    item_id, _ = slide
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 600, (2500, 2))
    path = str(tmp_path / 'big.anot.json')
    write_detections_annotation(path, np.hstack([xy, xy + 9]), rng.uniform(0.5, 1, 2500), chunk=700,
                                attributes={'model': 'big.pt', 'cellrcnn': '0.1.0', 'note': 'x' * 50})
    outgoing = streamed_document(path)
    assert outgoing is not None and outgoing.count == 2500 and outgoing.path == path
    size, body = outgoing.encode({'model': 'big.pt', 'post': 'p'})
    stream, pieces = body(), []
    while piece := stream.read(4096):
        pieces.append(piece)
    sent = b''.join(pieces)
    assert len(sent) == size
    with open(path) as f:
        assert json.loads(sent) == {**json.load(f), 'attributes': {'model': 'big.pt', 'post': 'p'}}
    posted = post_annotation_files(server.api_url, server.token, item_id, [path], large_bytes=50_000, **FAST)
    assert posted[0]['route'] == 'upload' and posted[0]['elements'] == 2500
    stored = server.client().get(f'annotation/{posted[0]["_id"]}')['annotation']
    assert len(stored['elements']) == 2500 and stored['attributes']['model'] == 'big.pt'
    assert stored['attributes']['note'] == 'x' * 50 and 'cellrcnn_post' in stored['attributes']


def test_a_failed_post_leaves_the_earlier_result(server, slide, tmp_path):
    item_id, _ = slide
    earlier = post_annotations(server.api_url, server.token, item_id, nuclei(20), **FAST)[0]['_id']
    broken = nuclei(3, name='density')
    del broken['elements'][0]['width']  # not a valid rectangle: Girder refuses the document
    files = saved(tmp_path, nuclei(30, seed=4), broken)
    with pytest.raises(CellRCNNError, match=r"answered HTTP 400: Validation Error.* while posting annotation "
                                            rf"'density'; the annotations are kept in {files[0]}, {files[1]}$"):
        post_annotation_files(server.api_url, server.token, item_id, files, **FAST)
    assert [(a['_id'], a['_elementCount']) for a in cellrcnn_annotations(server, item_id)] == [(earlier, 20)]


@pytest.mark.parametrize('large', [False, True], ids=['post', 'upload'])
def test_transient_failures_are_retried_without_duplicates(server, slide, large):
    item_id, _ = slide
    create = ('POST', '/file/chunk') if large else ('POST', '/annotation')
    faults = [('GET', '/user/me', 503, False), ('GET', '/tiles', 429, False),
              (*create, 502, True),  # the server acts, then the answer is lost
              ('GET', '/annotation', 500, False)]
    old = post_annotations(server.api_url, server.token, item_id, nuclei(30), **FAST)[0]['_id']
    with FaultyProxy(server.api_url, faults) as proxy:
        result = post_annotations(proxy.api_url, server.token, item_id, nuclei(40, seed=3),
                                  large_elements=10 if large else 10 ** 6, **FAST)
    assert not proxy.faults  # every fault was met
    creates = ('POST', '/api/v1/file' if large else '/api/v1/annotation')
    assert [(method, path) for method, path, _ in proxy.seen].count(creates) == 1  # the lost answer was found
    assert {status for _, _, status in proxy.seen} >= {503, 429, 502, 500, 200}
    found = cellrcnn_annotations(server, item_id)
    assert [(a['_id'], a['_elementCount']) for a in found] == [(result[0]['_id'], 40)]
    assert result[0]['replaced'] == [old]


def test_auth_errors_are_not_retried(server, slide, tmp_path):
    item_id, _ = slide
    files = saved(tmp_path, nuclei(10))
    with FaultyProxy(server.api_url, [('GET', f'/item/{item_id}', 401, False)]) as proxy:
        with pytest.raises(CellRCNNError) as err:
            post_annotation_files(proxy.api_url, server.token, item_id, files, **FAST)
    assert [path for _, path, _ in proxy.seen].count(f'/api/v1/item/{item_id}') == 1
    assert 'refused the token' in str(err.value) and str(err.value).endswith(f'the annotations are kept in {files[0]}')
    assert cellrcnn_annotations(server, item_id) == []


def test_a_bad_token_is_one_clear_error(server, slide, tmp_path):
    item_id, _ = slide
    files = saved(tmp_path, nuclei(10), nuclei(5, name='density'))
    with pytest.raises(CellRCNNError) as err:
        post_annotation_files(server.api_url, 'not-a-token' * 6, item_id, files, **FAST)
    assert str(err.value) == (f'Girder at {server.api_url} does not accept the token (invalid or expired): get a new '
                              f'token (or API key) and post again; the annotations are kept in {", ".join(files)}')
    assert all(os.path.getsize(p) > 100 for p in files)
    # A valid token of a user without access to the slide's collection.
    gc = server.client()
    gc.post('user', {'login': 'guest', 'email': 'guest@example.org', 'firstName': 'G', 'lastName': 'Uest',
                     'password': 'guest-password'})
    guest = server.client(token='')
    guest.authenticate('guest', 'guest-password')
    with pytest.raises(CellRCNNError, match=r'denied access while reading the item \(HTTP 403: Read access denied'):
        post_annotation_files(server.api_url, guest.token, item_id, files, **FAST)
    assert cellrcnn_annotations(server, item_id) == []


def test_an_item_that_is_not_an_image_is_one_clear_error(server, tmp_path):
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a slide')
    item_id = server.client().uploadFileToFolder(server.folder_id, str(notes))['itemId']
    files = saved(tmp_path, nuclei(10))
    with pytest.raises(CellRCNNError) as err:
        post_annotation_files(server.api_url, server.token, item_id, files, **FAST)
    assert str(err.value).startswith(f'item {item_id} (notes.txt) is not a large image that Girder can tile (HTTP 400')
    assert str(err.value).endswith(f"post to the slide's item; the annotations are kept in {files[0]}")
    assert server.annotations(item_id) == []


def test_an_unknown_item_is_one_clear_error(server, tmp_path):
    files = saved(tmp_path, nuclei(10))
    for bad in ('0' * 24, 'nonsense'):
        with pytest.raises(CellRCNNError, match=rf"^no item {bad} on Girder at .*kept in {files[0]}$"):
            post_annotation_files(server.api_url, server.token, bad, files, **FAST)


def test_an_unreachable_server_is_one_clear_error(tmp_path):
    files = saved(tmp_path, nuclei(10))
    url = f'http://127.0.0.1:{free_port()}/api/v1'  # nothing listens there
    start = time.monotonic()
    with pytest.raises(CellRCNNError) as err:
        post_annotation_files(url, 'token', '0' * 24, files, retries=2, backoff=0.05)
    assert time.monotonic() - start < 5
    assert str(err.value) == (f'cannot reach Girder at {url} while checking the token (connection failed after 3 '
                              f'tries): is the server up and the URL right?; the annotations are kept in {files[0]}')


def result_posts(server, item_id):
    """The cellrcnn results on an item, as {post id: sorted document names}."""
    posts = {}
    for a in cellrcnn_annotations(server, item_id):
        key = a['annotation']['attributes'].get('cellrcnn_post', a['_id'])
        posts.setdefault(key.split('/')[0], []).append(a['annotation']['name'])
    return {k: sorted(v) for k, v in posts.items()}


def test_racing_posts_of_one_model_leave_exactly_one_result(server, slide):
    """Two runs posting the same model to one slide at once: the newest complete post wins, never none or two."""
    item_id, _ = slide
    for round_ in range(8):
        pair = [[nuclei(30 + round_, seed=2 * round_ + k), nuclei(3, seed=k, name='density')] for k in range(2)]
        outcome = [None, None]

        def post(k):
            try:
                outcome[k] = post_annotations(server.api_url, server.token, item_id, pair[k], **FAST)
            except CellRCNNError as exc:  # recorded, then asserted below
                outcome[k] = exc

        threads = [threading.Thread(target=post, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(o, list) for o in outcome), outcome
        posts = result_posts(server, item_id)
        assert list(posts.values()) == [['cellrcnn nuclei', 'density']], (round_, posts)
        standing = {a['_id'] for a in cellrcnn_annotations(server, item_id)}
        kept = [o for o in outcome if {r['_id'] for r in o} == standing]
        assert len(kept) == 1 and not kept[0][0]['superseded']  # the one that stands is a whole post that won


def test_results_are_the_same_model_by_checkpoint_hash_not_by_file_name(server, slide):
    item_id, _ = slide

    def result(sha, model='model.pt', n=10):
        doc = nuclei(n, model=model)
        doc['attributes']['model_sha256'] = sha
        return doc

    first = post_annotations(server.api_url, server.token, item_id, result('a' * 64), **FAST)
    other = post_annotations(server.api_url, server.token, item_id, result('b' * 64, n=11), **FAST)
    assert other[0]['replaced'] == []  # another model that is also called model.pt: both results stay
    renamed = post_annotations(server.api_url, server.token, item_id, result('a' * 64, model='renamed.pt', n=12),
                               **FAST)
    assert renamed[0]['replaced'] == [first[0]['_id']]  # the same checkpoint under another name replaces it
    assert sorted(a['_elementCount'] for a in cellrcnn_annotations(server, item_id)) == [11, 12]


def test_each_region_keeps_its_own_result_of_a_model(server, slide):
    """A count inside the tumour a pathologist drew does not replace the slide's whole-slide count: a post replaces
    the model's result of the same region only (the whole slide, the annotations of one name however drawn, the same
    rectangle or polygons), so counts in two hotspots stand side by side."""
    item_id, _ = slide

    def post(n, **params):
        doc = nuclei(n)
        doc['attributes']['params'] = {'roi': None, **params}
        return post_annotations(server.api_url, server.token, item_id, doc, **FAST)[0]

    tumour = {'roi': [0, 0, 300, 300], 'polygons': [[[0, 0], [300, 0], [0, 300]]], 'region_annotation': 'tumour'}
    first = {'whole': post(10), 'tumour': post(11, **tumour), 'stroma': post(12, **{**tumour, 'region_annotation':
                                                                                       'stroma'}),
             'drawn': post(13, roi=[0, 0, 50, 50])}
    assert [r['replaced'] for r in first.values()] == [[]] * 4
    redrawn = {**tumour, 'polygons': [[[0, 0], [300, 0], [300, 300]]]}
    assert post(21, **redrawn)['replaced'] == [first['tumour']['_id']]
    assert post(22)['replaced'] == [first['whole']['_id']]
    assert post(23, roi=(0.0, 0.0, 50.0, 50.0))['replaced'] == [first['drawn']['_id']]  # the same rectangle
    hotspot = post(24, roi=[10, 10, 90, 90], polygons=[[[10, 10], [90, 10], [10, 90]]])
    assert hotspot['replaced'] == []
    assert sorted(a['_elementCount'] for a in cellrcnn_annotations(server, item_id)) == [12, 21, 22, 23, 24]
    mixed = [nuclei(3), nuclei(3, name='density')]
    mixed[1]['attributes']['params'] = tumour
    with pytest.raises(CellRCNNError, match='counted in different regions'):
        post_annotations(server.api_url, server.token, item_id, mixed, **FAST)


def test_a_result_the_user_may_not_delete_is_found_before_posting(server, slide):
    item_id, _ = slide
    gc = server.client()
    owner = post_annotations(server.api_url, server.token, item_id, nuclei(15), **FAST)[0]['_id']
    login = f'annotator{time.time_ns() % 10 ** 9}'
    user = gc.post('user', {'login': login, 'email': f'{login}@example.org', 'firstName': 'An', 'lastName': 'Notator',
                            'password': 'annotator-password'})
    folder_id = gc.getItem(item_id)['folderId']
    access = gc.get(f'folder/{folder_id}/access')
    access['users'].append({'id': user['_id'], 'level': 0, 'flags': ['large_image_create_annotations']})
    gc.put(f'folder/{folder_id}/access', {'access': json.dumps(access)})
    annotation_access = gc.get(f'annotation/{owner}/access')
    annotation_access['users'] = [u for u in annotation_access['users'] if u['id'] != user['_id']] + [
        {'id': user['_id'], 'level': 0}]
    gc.put(f'annotation/{owner}/access', {'access': json.dumps(annotation_access)})
    client = girder_client.GirderClient(apiUrl=server.api_url)
    client.authenticate(login, 'annotator-password')
    with pytest.raises(CellRCNNError, match=rf'item {item_id} holds an earlier result of model test.pt that this user '
                                            rf'may not replace .*{owner}.*nothing was posted'):
        post_annotations(server.api_url, client.token, item_id, nuclei(16, seed=1), **FAST)
    assert [a['_id'] for a in cellrcnn_annotations(server, item_id)] == [owner]


def test_a_withdrawn_upload_is_watched_as_long_as_its_ingest_may_take():
    # a short time-out must not cut the watch below what ingesting the document may take (the race in which an
    # ingest already under way landed after the watch had ended)
    assert withdrawal_grace(1e-6, 20_000) >= 20
    assert withdrawal_grace(1e-6, 10) == 5.0
    assert withdrawal_grace(3600, 10) == 120.0
    assert withdrawal_grace(1e-6, 10_000_000) == 120.0


def withdrawn_posts(monkeypatch):
    """The keys and the seconds of every withdrawal of an upload (``annotation_upload._abandon``) from now on."""
    seen = []
    abandon = annotation_upload._abandon

    def watched(server, target, key, *args, **kwargs):
        start = time.monotonic()
        abandon(server, target, key, *args, **kwargs)
        seen.append((key, time.monotonic() - start))

    monkeypatch.setattr(annotation_upload, '_abandon', watched)
    return seen


def ingest_upload(server, item_id, file_id, doc):
    """Upload a document into the slide's item for large_image to ingest, as the client does; wait until the ingest
    is over (it deletes the uploaded file whether the document lands or not)."""
    gc = server.client()
    data = json.dumps(doc).encode()
    reference = {'identifier': 'LargeImageAnnotationUpload', 'itemId': item_id, 'fileId': file_id,
                 'userId': server.user_id}
    gc.uploadFile(item_id, io.BytesIO(data), 'late.anot.json', len(data), parentType='item',
                  reference=json.dumps(reference), mimeType='application/json')
    wait_for(lambda: len(list(gc.listFile(item_id))) == 1, 120, 'the ingest of the late upload')


def test_an_ingest_that_does_not_finish_in_time_is_withdrawn(server, slide, monkeypatch):
    """A withdrawn upload never becomes a result, whatever the timing: the post is recorded as withdrawn with the
    plugin before the upload is deleted, and an ingest that lands after that (made to land here, by uploading the
    same document again) is deleted as it is saved."""
    item_id, file_id = slide
    earlier = post_annotations(server.api_url, server.token, item_id, nuclei(20), **FAST)[0]['_id']
    withdrawn = withdrawn_posts(monkeypatch)
    with pytest.raises(CellRCNNError, match='did not finish ingesting .* the upload was withdrawn and earlier '
                                            'results were not replaced'):
        post_annotations(server.api_url, server.token, item_id, nuclei(20000, seed=5), large_elements=10,
                         ingest_timeout=1e-6, **FAST)
    [(key, seconds)] = withdrawn
    assert seconds < withdrawal_grace(0, 0)  # the plugin took the withdrawal: no watching for a late ingest
    late = nuclei(30, seed=6)
    late['attributes']['cellrcnn_post'] = key
    ingest_upload(server, item_id, file_id, late)  # an ingest of the withdrawn upload, landing after the withdrawal
    server.client().post('annotation', {'itemId': item_id}, json=late)  # and a post of it
    assert [a['_id'] for a in cellrcnn_annotations(server, item_id)] == [earlier]
    assert server.client().getItem(item_id)['meta']['cellrcnn']['annotation_id'] == earlier
    assert len(list(server.client().listFile(item_id))) == 1  # the upload is gone
    # another post's document is not refused
    other = nuclei(31, seed=7)
    other['attributes']['cellrcnn_post'] = 'f' * 32 + '/0/1'
    ingest_upload(server, item_id, file_id, other)
    assert len(cellrcnn_annotations(server, item_id)) == 2


def test_a_withdrawal_never_deletes_an_annotation_saved_before_it(server, slide):
    """Withdrawing refuses the late ingest of a post, a new annotation: not one on the item already, whoever names
    its post (a writer who read its post id), when it is next saved."""
    item_id, _ = slide
    saved = nuclei(12, seed=8)
    saved['attributes']['cellrcnn_post'] = 'c' * 32 + '/0/1'
    annotation = server.client().post('annotation', {'itemId': item_id}, json=saved)
    server.client().post(f'cellrcnn/item/{item_id}/withdrawn', {'post': 'c' * 32})
    saved['name'] = 'renamed'
    server.client().put(f'annotation/{annotation["_id"]}', json=saved)  # its next save
    assert server.client().get(f'annotation/{annotation["_id"]}').get('_active') is not False
    assert annotation['_id'] in [a['_id'] for a in cellrcnn_annotations(server, item_id)]


def test_an_ingest_that_lands_before_the_withdrawal_is_recorded_is_deleted(server, slide, monkeypatch):
    item_id, _ = slide
    earlier = post_annotations(server.api_url, server.token, item_id, nuclei(20), **FAST)[0]['_id']
    record = annotation_upload._record_withdrawal

    def land_first(connection, target, key):  # the ingest lands between the time-out and the withdrawal
        late = nuclei(30, seed=6)
        late['attributes']['cellrcnn_post'] = key
        server.client().post('annotation', {'itemId': item_id}, json=late)
        return record(connection, target, key)

    monkeypatch.setattr(annotation_upload, '_record_withdrawal', land_first)
    with pytest.raises(CellRCNNError, match='did not finish ingesting'):
        post_annotations(server.api_url, server.token, item_id, nuclei(5000, seed=5), large_elements=10,
                         ingest_timeout=1e-6, **FAST)
    assert [a['_id'] for a in cellrcnn_annotations(server, item_id)] == [earlier]


def new_user(server, role):
    """A user who is not an administrator: (id, token)."""
    login = f'{role}{time.time_ns() % 10 ** 9}'
    user = server.client().post('user', {'login': login, 'email': f'{login}@example.org', 'firstName': role,
                                         'lastName': 'User', 'password': f'{login}-password'})
    client = girder_client.GirderClient(apiUrl=server.api_url)
    client.authenticate(login, f'{login}-password')
    return user['_id'], client.token


def test_a_readers_look_alike_neither_blocks_nor_beats_a_writers_post(server, slide_file, monkeypatch):
    """A user who may only read the slide (and create annotations on it) makes annotations that look like results
    of the writer's model, and leaves the writer only read access to them: the writer's posts go through, replace
    only the writer's own earlier result, and leave the look-alikes alone."""
    writer_id, writer = new_user(server, 'writer')
    reader_id, reader = new_user(server, 'reader')
    gc = server.client()
    folder_id = gc.createFolder(server.collection_id, 'look-alikes', parentType='collection')['_id']
    access = {'users': [{'id': server.user_id, 'level': 2}, {'id': writer_id, 'level': 1},
                        {'id': reader_id, 'level': 0, 'flags': ['large_image_create_annotations']}], 'groups': []}
    gc.put(f'folder/{folder_id}/access', {'access': json.dumps(access)})
    item_id, _ = server.upload_slide(slide_file, name='look-alikes.tiff', folder_id=folder_id)
    as_reader = server.client(reader)

    def look_alike(post=None):
        doc = nuclei(5, seed=9)  # the writer's model, marker and all
        if post:
            doc['attributes']['cellrcnn_post'] = post
        made = as_reader.post('annotation', {'itemId': item_id}, json=doc)['_id']
        acl = as_reader.get(f'annotation/{made}/access')
        acl['users'] = [u for u in acl['users'] if u['id'] != writer_id] + [{'id': writer_id, 'level': 0}]
        as_reader.put(f'annotation/{made}/access', {'access': json.dumps(acl)})
        return made

    fakes = [look_alike()]
    first = post_annotations(server.api_url, writer, item_id, nuclei(15), **FAST)
    assert first[0]['replaced'] == [] and not first[0]['superseded']
    replace = girder_post._replace_earlier

    def meanwhile(*args):  # a look-alike post begins landing after the writer's post, before its check
        fakes.append(look_alike(f'{"e" * 32}/0/1'))
        return replace(*args)

    monkeypatch.setattr(girder_post, '_replace_earlier', meanwhile)
    second = post_annotations(server.api_url, writer, item_id, nuclei(16, seed=1), **FAST)
    assert not second[0]['superseded'] and second[0]['replaced'] == [first[0]['_id']]
    assert sorted(a['_id'] for a in cellrcnn_annotations(server, item_id)) == sorted([*fakes, second[0]['_id']])
    assert gc.getItem(item_id)['meta']['cellrcnn']['annotation_id'] == second[0]['_id']
    with pytest.raises(girder_client.HttpError) as refused:  # nor may the reader withdraw the writer's posts
        as_reader.post(f'cellrcnn/item/{item_id}/withdrawn', {'post': 'a' * 32})
    assert refused.value.status == 403
