"""Posting detection results straight to a Girder / Digital Slide Archive server, replacing the model's previous ones.

The normal DSA flow needs none of this: slicer_cli_web uploads the task's ``*AnnotationFile`` outputs and
HistomicsUI turns them into annotations. This module is for batch and REST use (``cellrcnn detect --girder-url``,
scripts) and for the task's ``post_to_girder`` option: it puts the annotation documents on a slide's item and
**replaces** the previous result of the same model there instead of adding another copy.

- The item must be a large image (``GET /item/{id}/tiles`` answers).
- Small documents are sent with ``POST /annotation?itemId=``. Large ones (over ``large_bytes`` of JSON or
  ``large_elements`` elements) are uploaded as a file into the item with the reference
  ``{"identifier": "LargeImageAnnotationUpload", "itemId", "fileId" (the item's image file), "userId"}``:
  girder_large_image_annotation ingests it in the background (chunked upload, no single huge request, no request
  time limit) and deletes the uploaded file; the annotation record is written after all its elements, so it
  appearing in ``GET /annotation?itemId=`` means the ingest is complete.
- Every posted document carries ``attributes.model``, ``attributes.cellrcnn`` (the marker every cellrcnn
  annotation has) and ``attributes.cellrcnn_post`` (this post's id). After the new documents are on the item, every
  other annotation on the item with the same model and the marker is deleted: a failed post never leaves the slide
  without a result.
- With cellrcnn's plugin on the server, only annotations made by writers of the item count as results
  (``GET /cellrcnn/item/{id}/results``): a look-alike made by a user who may only read the slide neither stops a
  post nor beats it, and is left alone. An upload withdrawn because its ingest did not finish in time is recorded
  with the plugin (``POST /cellrcnn/item/{id}/withdrawn``), which deletes its annotation whenever it lands.
- Annotation files over ``large_bytes`` are streamed from disk as they were written (only their header is read and
  re-encoded with this post's attributes; :mod:`cellrcnn.annotation_stream`): a slide's million nuclei are never
  held in memory to post them.
- Retries and errors are :class:`cellrcnn.girder_api.GirderConnection`'s. Every failure is one
  :class:`CellRCNNError` line that names the local annotation files, which stay in place.
"""

import datetime
import json
import math
import os
import time
import uuid

from . import __version__
from .annotation_stream import as_documents, documents_from_files
from .errors import CellRCNNError
from .girder_api import GirderConnection, server_message

MARKER = 'cellrcnn'
POST_KEY = 'cellrcnn_post'
#: the hex SHA-256 of the model's checkpoint file: what identifies "the same model" (``attributes.model`` is its name)
SHA_KEY = 'model_sha256'
LARGE_BYTES = 8 * 1024 ** 2
LARGE_ELEMENTS = 100_000
UPLOAD_IDENTIFIER = 'LargeImageAnnotationUpload'
INGESTED = object()
_WRITE = 1  # Girder's AccessType.WRITE, as listings give it in ``_accessLevel``
#: an uploaded document's ingest may take 600 s plus this much per thousand elements
INGEST_SECONDS_PER_1000 = 10
#: the REST path of cellrcnn's Girder plugin for an item (``girder_cellrcnn.rest``)
PLUGIN_ITEM = 'cellrcnn/item'


class _Target:
    """The checked destination: the user, the slide's item and its image file."""

    def __init__(self, server, item_id):
        self.server = server
        if not isinstance(item_id, str) or not item_id.strip():
            raise server.fail('no Girder item id given: give the id of the slide\'s item')
        item_id = item_id.strip()
        self.user_id = server.user(' and post again')['_id']
        self.item = self._item(item_id)
        self.item_id = self.item['_id']
        name = self.item.get('name')
        large = self.item.get('largeImage') or {}
        if large.get('expected'):
            raise server.fail(f'item {self.item_id} ({name}) is still being converted to a large image; post '
                              'again when it is done')
        from girder_client import HttpError
        try:
            server.get('checking that the item is an image', f'item/{self.item_id}/tiles', item_id=self.item_id,
                       passthrough=(400, 404))
        except HttpError as exc:
            raise server.fail(f'item {self.item_id} ({name}) is not a large image that Girder can tile '
                              f'({server_message(exc)}): post to the slide\'s item') from None
        self.file_id = large.get('fileId')

    def _item(self, item_id):
        """The item with this id, or the item of the file with this id (what a DSA image parameter holds)."""
        from girder_client import HttpError

        server = self.server
        try:
            return server.get('reading the item', f'item/{item_id}', item_id=item_id, passthrough=(400, 404))
        except HttpError as exc:
            missing = exc
        try:  # the id of the slide's file?
            file = server.get('reading the item', f'file/{item_id}', item_id=item_id, passthrough=(400, 404))
        except HttpError:
            file = None
        if not file or not file.get('itemId'):
            raise server.http_error(missing, 'reading the item', item_id)
        return server.get('reading the item', f'item/{file["itemId"]}', item_id=file['itemId'])

    def annotations(self):
        return self.server.get('listing the item\'s annotations', 'annotation',
                               {'itemId': self.item_id, 'limit': 0, 'sort': 'created', 'sortdir': 1},
                               item_id=self.item_id)

    def writers_annotations(self):
        """The ids of the item's cellrcnn annotations that the server's cellrcnn plugin counts as results (made by
        writers of the item: ``GET /cellrcnn/item/{id}/results``), or None when the server has no such plugin."""
        from girder_client import HttpError

        try:
            return set(self.server.get('asking which annotations count as results',
                                       f'{PLUGIN_ITEM}/{self.item_id}/results', item_id=self.item_id,
                                       passthrough=(400, 404)))
        except HttpError:
            return None

    def mine(self, annotation):
        """Whether this user made the annotation (a post's own documents are those carrying its id made by it)."""
        return annotation.get('creatorId') == self.user_id


def _model_of(documents, model_name):
    """``(name, sha256 or None)`` of the model that made the documents: the name for people, the hash of its
    checkpoint (``attributes.model_sha256``) what identifies it."""
    attributes = [d.header.get('attributes') or {} for d in documents]
    shas = {a.get(SHA_KEY) for a in attributes} - {None}
    if len(shas) > 1:
        raise CellRCNNError('these annotations were made by different models (several model_sha256): post them '
                            'separately')
    sha = shas.pop() if shas else None
    if model_name:
        return str(model_name), sha
    models = {a.get('model') for a in attributes} - {None}
    if len(models) != 1:
        raise CellRCNNError('cannot tell which model made these annotations '
                            f'({"none named" if not models else ", ".join(sorted(map(str, models)))}): '
                            'give model_name')
    return models.pop(), sha


def _attributes(annotation):
    return (annotation.get('annotation') or {}).get('attributes') or {}


def _is_result_of(annotation, model, sha=None):
    """Whether an annotation is a cellrcnn result of this model: the same checkpoint hash when both have one, else
    (results posted before hashes were recorded) the same model name."""
    attributes = _attributes(annotation)
    if MARKER not in attributes:
        return False
    if sha and attributes.get(SHA_KEY):
        return attributes[SHA_KEY] == sha
    return attributes.get('model') == model


def _post_key(annotation):
    return _attributes(annotation).get(POST_KEY)


def _post_of(annotation):
    """The post an annotation belongs to: its post id, or (posted another way) the annotation itself."""
    key = _post_key(annotation)
    return str(key).split('/')[0] if key else f'annotation {annotation["_id"]}'


def _age(annotations):
    """When a post began landing: its first document's creation time (ties: the lower id, as ObjectIds grow); None
    when its first document is gone (a post being taken back, or the remains of one: it claims nothing)."""
    first = [a for a in annotations if (str(_post_key(a) or '').split('/') + ['0'])[1] == '0']
    if not first:
        return None
    try:
        created = datetime.datetime.fromisoformat(str(first[0].get('created'))).timestamp()
    except ValueError:
        created = math.inf  # no time: as if just now
    return created, str(first[0]['_id'])


def post_annotations(api_url, token, item_id, documents, model_name=None, retries=4, backoff=1.0, timeout=600,
                     large_bytes=LARGE_BYTES, large_elements=LARGE_ELEMENTS, ingest_timeout=None, saved=None,
                     progress=None):
    """Put annotation documents on a slide's Girder item, replacing that model's previous cellrcnn result there.

    Replacement is "newest wins": once this post's documents are on the item, the results of the same model that
    landed before it are deleted; if another post of the same model landed after it meanwhile (two runs racing),
    that one stays and this post takes its own documents back. Either way exactly one result of the model remains.
    Earlier results the token's user may not delete are found before anything is posted.

    :param api_url: Girder's API URL, e.g. ``https://dsa.example.org/api/v1``.
    :param token: a Girder token (``Girder-Token``), e.g. the one slicer_cli_web gives a task.
    :param item_id: the slide's item id (the id of its image file is accepted too).
    :param documents: an annotation document, or a list of them (the REST form ``{"annotation": {...}}`` too).
    :param model_name: the model that made them, for people: stored as ``attributes.model`` (default: the
        documents' own). The model is identified by ``attributes.model_sha256`` where the documents have it.
    :param retries: tries after the first for connection errors, time-outs, 429 and 5xx; waits are
        ``backoff * 2**n`` seconds (or the server's ``Retry-After``).
    :param timeout: seconds one request may take.
    :param large_bytes, large_elements: documents above either are uploaded as a file and ingested by the server.
    :param ingest_timeout: seconds to wait for the server to ingest an uploaded document (default: 600 s plus
        :data:`INGEST_SECONDS_PER_1000` per thousand elements).
    :param saved: paths of the local copies of the documents, named in every error message.
    :param progress: a :class:`cellrcnn.progress.Progress` that is told what is sent (default: nothing is said).
    :returns: one dict per document: ``_id``, ``name``, ``elements``, ``route`` (``'post'`` or ``'upload'``),
        ``seconds``, ``sent_seconds`` (until the server had it; the rest is waiting for its ingest); and, in the
        first, ``replaced``: the ids of the deleted earlier annotations, and ``superseded``: true when a newer post
        of the same model won and this one was taken back.
    """
    documents = as_documents(documents)
    if not documents:
        raise CellRCNNError('no annotation documents to post')
    model, sha = _model_of(documents, model_name)
    server = GirderConnection(api_url, token, retries, backoff, timeout, saved)
    say = progress.log if progress else (lambda line: None)
    with server.session():
        target = _Target(server, item_id)
        _check_replaceable(server, target, model, sha)
        post_id = uuid.uuid4().hex
        results = []
        try:
            for index, doc in enumerate(documents):
                key = f'{post_id}/{index}/{len(documents)}'
                attributes = doc.header.get('attributes') or {}
                size, body = doc.encode({**attributes, 'model': model, MARKER: attributes.get(MARKER, __version__),
                                         POST_KEY: key})
                start = time.perf_counter()
                large = size > large_bytes or doc.count > large_elements
                what = f'{"uploading" if large else "posting"} annotation {doc.name!r}'
                say(f'{what} ({doc.count} elements, {size / 1e6:.1f} MB) to item {target.item_id}')
                timing = {}
                if large:
                    wait = ingest_timeout or 600 + INGEST_SECONDS_PER_1000 * doc.count / 1000
                    annotation_id = _upload(server, target, doc.name, size, body, key, what, wait, timing,
                                            doc.count)
                else:
                    annotation_id = _post(server, target, body().read(), key, what)
                done = time.perf_counter()
                results.append({'_id': annotation_id, 'name': doc.name, 'elements': doc.count,
                                'route': 'upload' if large else 'post', 'seconds': done - start,
                                'sent_seconds': timing.get('sent', done) - start})
            results[0].update(_replace_earlier(server, target, model, sha, post_id, results, say))
        except CellRCNNError:
            # All or nothing: take this post's documents off again, leaving the earlier result as it was.
            _take_back(server, target, results)
            raise
    return results


def _results_by_post(target, model, sha, post_id=None):
    """This model's results on the item, grouped by the post they came with: this post's own documents (``post_id``,
    made by this user), and the others that count as results (:meth:`_Target.writers_annotations`: made by writers
    of the item, or all of them on a server without cellrcnn's plugin)."""
    annotations = target.annotations()
    counted = target.writers_annotations()  # asked after the listing: it knows every annotation listed
    posts = {}
    for annotation in annotations:
        if not _is_result_of(annotation, model, sha):
            continue
        post = _post_of(annotation)
        if target.mine(annotation) if post == post_id else counted is None or annotation['_id'] in counted:
            posts.setdefault(post, []).append(annotation)
    return posts


def _check_replaceable(server, target, model, sha):
    """Fail before posting when an earlier result of the model is one the user may read but not delete."""
    locked = [a['_id'] for docs in _results_by_post(target, model, sha).values() for a in docs
              if a.get('_accessLevel', _WRITE) < _WRITE]
    if locked:
        raise server.fail(f'item {target.item_id} holds an earlier result of model {model} that this user may not '
                          f'replace (no write access to annotation(s) {", ".join(locked)}): ask their owner for '
                          'write access, or post as a user who has it; nothing was posted')


def _replace_earlier(server, target, model, sha, post_id, results, say):
    """Newest wins: delete the model's other results on the item, unless another post of the model began landing
    after this one (its first document is younger than this post's first), or one of this post's documents was
    deleted meanwhile (by such a newer post): then take this post back. A post is aged by its first document, which
    exists before its check and before any younger post's check, so racing posts agree on the winner whatever
    order their checks run in. :returns: ``{"replaced": [...], "superseded": bool}``."""
    posts = _results_by_post(target, model, sha, post_id)
    ours = posts.pop(post_id, [])
    mine = _age(ours)
    newer = [docs for docs in posts.values() if mine and (_age(docs) or mine) > mine]
    if newer or {a['_id'] for a in ours} != {r['_id'] for r in results}:
        _take_back(server, target, results)
        say(f'a newer result of model {model} landed on item {target.item_id} while this one was posted: it stays, '
            'and this post was taken back')
        return {'replaced': [], 'superseded': True}
    replaced = []
    for docs in posts.values():
        for annotation in docs:
            _delete(server, annotation['_id'], target.item_id)
            replaced.append(annotation['_id'])
    if replaced:
        say(f'replaced {len(replaced)} earlier annotation(s) of model {model} on item {target.item_id}')
    return {'replaced': replaced, 'superseded': False}


def _take_back(server, target, results):
    for result in results:
        try:
            _delete(server, result['_id'], target.item_id)
        except CellRCNNError:
            pass


def _made(target, key):
    """The ids of the annotations on the item that carry the post key ``key`` and were made by this user."""
    return [a['_id'] for a in target.annotations() if _post_key(a) == key and target.mine(a)]


def _find(target, key):
    """The id of the annotation that this user's post ``key`` created on the item, or None."""
    return next(iter(_made(target, key)), None)


def _post(server, target, body, key, what):
    def create():
        answer = server.gc.post('annotation', parameters={'itemId': target.item_id}, data=body,
                                headers={'Content-Type': 'application/json'}, jsonResp=False)
        return json.loads(answer.content)['_id']

    return server.call(what, create, landed=lambda: _find(target, key), item_id=target.item_id)


def _upload(server, target, name, size, body, key, what, ingest_timeout, timing, elements):
    from girder_client import HttpError

    reference = json.dumps({'identifier': UPLOAD_IDENTIFIER, 'itemId': target.item_id, 'fileId': target.file_id,
                            'userId': target.user_id})
    label = name
    name = f'{label or "annotation"}.{key.replace("/", "-")}.anot.json'

    def upload():
        return server.gc.uploadFile(target.item_id, body(), name, size, parentType='item',
                                    reference=reference, mimeType='application/json')['_id']

    def landed():  # a lost answer: is the file there, or already ingested?
        if _find(target, key):
            return INGESTED
        for file in server.get('looking for the uploaded file', f'item/{target.item_id}/files', {'limit': 0},
                               item_id=target.item_id):
            if file['name'] == name:
                return file['_id']
        return INGESTED if _find(target, key) else None

    file_id = server.call(what, upload, landed=landed, item_id=target.item_id)
    timing['sent'] = time.perf_counter()
    # Wait for girder_large_image_annotation's ingest: the annotation shows up once all its elements are stored,
    # then the handler deletes the uploaded file (it deletes it on failure too).
    deadline, pause = time.monotonic() + ingest_timeout, 0.1
    while True:
        found = _find(target, key)
        if found is not None:
            return found
        try:
            if file_id != INGESTED:
                server.get('waiting for the ingest', f'file/{file_id}', item_id=target.item_id,
                           passthrough=(400, 404))
            gone = file_id == INGESTED
        except HttpError:
            gone = True
        if gone:
            found = _find(target, key)
            if found is not None:
                return found
            raise server.fail(f'Girder at {server.api_url} could not ingest the uploaded annotation '
                              f'{label!r} (see the server log: too large for its '
                              'max_annotation_input_file_length setting, or not a valid annotation?)')
        if time.monotonic() > deadline:
            _abandon(server, target, key, file_id, grace=withdrawal_grace(ingest_timeout, elements))
            raise server.fail(f'Girder at {server.api_url} did not finish ingesting the uploaded annotation '
                              f'{label!r} in {ingest_timeout:g} s (a slow database, or no '
                              'large_image_annotation plugin?); the upload was withdrawn and earlier results were '
                              'not replaced')
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)


def withdrawal_grace(ingest_timeout, elements):
    """Seconds a withdrawn upload is watched for an ingest already under way: a tenth of the time the ingest was
    given, and at least a tenth of what an ingest of ``elements`` may take (:data:`INGEST_SECONDS_PER_1000`), so a
    short time-out does not stop the watch before a large document can land; at least 5 s, at most 120 s."""
    return min(120.0, max(5.0, ingest_timeout / 10, INGEST_SECONDS_PER_1000 * elements / 10_000))


def _abandon(server, target, key, file_id, grace):
    """Withdraw an upload whose ingest did not finish in time, so that it never lands as a result.

    First the post is recorded as withdrawn with the server's cellrcnn plugin, which from then on deletes any of its
    annotations as it is saved (``girder_cellrcnn.withdrawn``); then the uploaded file is deleted (an ingest not
    started yet never lands); then the annotation is deleted if it landed before the record. That closes the race
    with an ingest already under way: it lands either before the record (and is found here) or after it (and the
    plugin deletes it). On a server without the plugin, the annotation is watched for ``grace`` seconds instead."""
    from girder_client import HttpError

    recorded = _record_withdrawal(server, target, key)
    if file_id != INGESTED:
        try:
            server.call('withdrawing the upload', lambda: server.gc.delete(f'file/{file_id}'),
                        item_id=target.item_id, passthrough=(400, 404))
        except HttpError:
            pass  # already taken by the ingest
    deadline = time.monotonic() + (0 if recorded else grace)
    while True:
        late = _made(target, key)
        for annotation_id in late:
            _delete(server, annotation_id, target.item_id)
        if late or time.monotonic() >= deadline:
            return
        time.sleep(1.0)


def _record_withdrawal(server, target, key):
    """Record the post of ``key`` as withdrawn from the item with the server's cellrcnn plugin. :returns: whether
    it was recorded (False on a server without the plugin, or when the server would not record it)."""
    from girder_client import HttpError

    post_id = key.split('/')[0]
    try:
        server.call('recording the withdrawal', lambda: server.gc.post(f'{PLUGIN_ITEM}/{target.item_id}/withdrawn',
                                                                      parameters={'post': post_id}),
                    item_id=target.item_id, passthrough=(400, 404))
    except (HttpError, CellRCNNError):
        return False
    return True


def _delete(server, annotation_id, item_id):
    from girder_client import HttpError

    try:
        server.call(f'deleting the earlier annotation {annotation_id}',
                    lambda: server.gc.delete(f'annotation/{annotation_id}'), item_id=item_id, passthrough=(400, 404))
    except HttpError:
        pass  # already gone


def post_annotation_files(api_url, token, item_id, paths, model_name=None, **options):
    """:func:`post_annotations` with the documents of annotation JSON files (each a document or a list of them);
    errors name the files, which are left as they are."""
    paths = [os.fspath(p) for p in paths if p]
    documents = documents_from_files(paths, options.get('large_bytes', LARGE_BYTES))
    options.setdefault('saved', paths)
    return post_annotations(api_url, token, item_id, documents, model_name=model_name, **options)


def check_target(api_url, token, item_id, retries=4, backoff=1.0, timeout=60):
    """Fail early, before hours of detection: the server answers, the token is good, the item is a large image.
    :returns: the item's id (``item_id`` may be the id of the item's file)."""
    server = GirderConnection(api_url, token, retries, backoff, timeout, None)
    with server.session():
        return _Target(server, item_id).item_id


def format_results(results, item_id):
    """One line per posted document, for a person."""
    lines = [f'posted {r["name"]!r} ({r["elements"]} elements) to item {item_id} as annotation {r["_id"]} '
             f'in {r["seconds"]:.1f} s' for r in results]
    if results and results[0].get('replaced'):
        lines.append(f'replaced {len(results[0]["replaced"])} earlier annotation(s) of the same model')
    if results and results[0].get('superseded'):
        lines.append('a newer result of the same model landed meanwhile: it stays, and this post was taken back')
    return lines


def poster(api_url, token, item_id, progress=None):
    """Check a posting destination before hours of detection (server, token, item: :func:`check_target`).
    :returns: a callable taking a run's output ``paths`` (``job.output_paths``) that posts its nuclei and density
    annotations (the per-cell-type ones too) to the item and returns a line per posted document (``progress`` is told
    what is sent)."""
    item_id = check_target(api_url, token, item_id)

    def post(paths):
        files = [paths.get('annotation'), paths.get('density'), paths.get('class_density')]
        return format_results(post_annotation_files(api_url, token, item_id, files, progress=progress), item_id)

    return post
