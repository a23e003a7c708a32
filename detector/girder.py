"""Posting detection results straight to a Girder / Digital Slide Archive server.

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
- Connection errors, time-outs, HTTP 429 and 5xx are retried with exponential back-off (``Retry-After`` is
  honoured); a retried create first checks whether the lost attempt landed, so a retry never duplicates.
  4xx answers are never retried.
- Every failure is one :class:`CellRCNNError` line that names the local annotation files, which stay in place.
"""

import io
import json
import os
import time
import uuid

from . import __version__
from .errors import CellRCNNError

MARKER = 'cellrcnn'
POST_KEY = 'cellrcnn_post'
LARGE_BYTES = 8 * 1024 ** 2
LARGE_ELEMENTS = 100_000
UPLOAD_IDENTIFIER = 'LargeImageAnnotationUpload'
INGESTED = object()


def _transient(status):
    return status == 429 or 500 <= status < 600


def _server_message(exc):
    try:
        message = json.loads(exc.responseText).get('message')
    except (ValueError, AttributeError, TypeError):
        message = None
    text = message or (exc.responseText or '').strip().replace('\n', ' ')[:200] or 'no message'
    return f'HTTP {exc.status}: {text}'


def _retry_after(response):
    try:
        return min(float(response.headers.get('Retry-After')), 60.0)
    except (AttributeError, TypeError, ValueError):
        return None


def _timeout_session(timeout):
    import requests

    class Session(requests.Session):
        def request(self, *args, **kwargs):
            kwargs.setdefault('timeout', timeout)
            return super().request(*args, **kwargs)

    return Session()


class _Server:
    """A girder_client.GirderClient with time-outs, retries and one-line errors that name the kept files."""

    def __init__(self, api_url, token, retries, backoff, timeout, saved):
        import girder_client

        if not api_url or not str(api_url).startswith(('http://', 'https://')):
            raise CellRCNNError(f'the Girder API URL must start with http:// or https:// (got {api_url!r}); '
                                f'e.g. https://dsa.example.org/api/v1{self._kept(saved)}')
        self.api_url = str(api_url).rstrip('/')
        self.gc = girder_client.GirderClient(apiUrl=self.api_url)
        self.gc.setToken(token or '')
        self.token = token
        self.retries, self.backoff, self.timeout = max(0, int(retries)), float(backoff), timeout
        self.saved = [os.fspath(p) for p in saved or () if p]

    @staticmethod
    def _kept(saved):
        saved = [os.fspath(p) for p in saved or () if p]
        return f'; the annotations are kept in {", ".join(saved)}' if saved else ''

    def fail(self, message):
        return CellRCNNError(message + self._kept(self.saved))

    def http_error(self, exc, what, item_id=None):
        status, detail = exc.status, _server_message(exc)
        if status == 401:
            return self.fail(f'Girder at {self.api_url} refused the token while {what} ({detail}): it is invalid or '
                             'expired; get a new token (or API key) and post again')
        if status == 403:
            return self.fail(f'Girder at {self.api_url} denied access while {what} ({detail}): the token is '
                             f'expired, or its user may not add annotations to item {item_id}')
        if item_id and status in (400, 404) and ('item' in detail.lower() or 'objectid' in detail.lower()):
            return self.fail(f'no item {item_id} on Girder at {self.api_url} ({detail}); give the id of the '
                             "slide's item")
        if status == 404:
            return self.fail(f'{self.api_url} answered {detail} while {what}: is it a Girder API URL '
                             '(ending in /api/v1)?')
        return self.fail(f'Girder at {self.api_url} answered {detail} while {what}')

    def _wait(self, attempt, response=None):
        delay = _retry_after(response)
        time.sleep(self.backoff * 2 ** attempt if delay is None else delay)

    def call(self, what, fn, landed=None, item_id=None, passthrough=()):
        """``fn()`` with retries of transient failures. ``landed()``, if given, is asked before each retry whether
        the failed attempt took effect after all (a lost answer); its non-None answer is returned instead.
        HTTP errors with a status in ``passthrough`` are raised as they are, for the caller to explain."""
        import requests
        from girder_client import HttpError

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                return fn()
            except HttpError as exc:
                if exc.status in passthrough:
                    raise
                if not _transient(exc.status) or last:
                    raise self.http_error(exc, what, item_id) from None
                self._wait(attempt, exc.response)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    reason = 'timed out' if isinstance(exc, requests.Timeout) else 'connection failed'
                    raise self.fail(f'cannot reach Girder at {self.api_url} while {what} ({reason} after '
                                    f'{self.retries + 1} tries): is the server up and the URL right?') from None
                self._wait(attempt)
            except ValueError:  # a 2xx answer that is not JSON
                raise self.fail(f'{self.api_url} did not answer with JSON while {what}: is it a Girder API URL '
                                '(ending in /api/v1)?') from None
            except requests.RequestException as exc:
                raise self.fail(f'cannot talk to Girder at {self.api_url} while {what}: '
                                f'{type(exc).__name__}: {exc}') from None
            if landed is not None:
                found = self.call(f'{what} (checking a lost answer)', landed, item_id=item_id)
                if found is not None:
                    return found

    def user(self, then=''):
        """The token's user; a one-line error (ending in ``then``) when Girder does not accept the token."""
        me = self.get('checking the token', 'user/me')
        if not me:
            raise self.fail(f'Girder at {self.api_url} does not accept the token '
                            f'({"none given" if not self.token else "invalid or expired"}): get a new token '
                            f'(or API key){then}')
        return me

    def get(self, what, path, params=None, item_id=None, passthrough=()):
        return self.call(what, lambda: self.gc.get(path, parameters=params), item_id=item_id,
                         passthrough=passthrough)


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
                              f'({_server_message(exc)}): post to the slide\'s item') from None
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


def _as_documents(documents):
    if isinstance(documents, dict):
        documents = [documents]
    out = []
    for doc in documents:
        if isinstance(doc, (list, tuple)):
            out.extend(_as_documents(doc))
            continue
        if isinstance(doc, dict) and isinstance(doc.get('annotation'), dict):
            doc = doc['annotation']
        if not isinstance(doc, dict) or not isinstance(doc.get('elements'), list):
            raise CellRCNNError('each annotation document must be a JSON object with an "elements" list')
        out.append(doc)
    return out


def _model_of(documents, model_name):
    if model_name:
        return str(model_name)
    models = {(d.get('attributes') or {}).get('model') for d in documents}
    models.discard(None)
    if len(models) != 1:
        raise CellRCNNError('cannot tell which model made these annotations '
                            f'({"none named" if not models else ", ".join(sorted(map(str, models)))}): '
                            'give model_name')
    return models.pop()


def _is_result_of(annotation, model):
    attributes = (annotation.get('annotation') or {}).get('attributes') or {}
    return MARKER in attributes and attributes.get('model') == model


def _post_key(annotation):
    return ((annotation.get('annotation') or {}).get('attributes') or {}).get(POST_KEY)


def post_annotations(api_url, token, item_id, documents, model_name=None, retries=4, backoff=1.0, timeout=600,
                     large_bytes=LARGE_BYTES, large_elements=LARGE_ELEMENTS, ingest_timeout=600, saved=None,
                     log=None):
    """Put annotation documents on a slide's Girder item, replacing that model's previous cellrcnn result there.

    :param api_url: Girder's API URL, e.g. ``https://dsa.example.org/api/v1``.
    :param token: a Girder token (``Girder-Token``), e.g. the one slicer_cli_web gives a task.
    :param item_id: the slide's item id (the id of its image file is accepted too).
    :param documents: an annotation document, or a list of them (the REST form ``{"annotation": {...}}`` too).
    :param model_name: the model that made them: stored as ``attributes.model`` and the key of replacement
        (default: the documents' own ``attributes.model``).
    :param retries: tries after the first for connection errors, time-outs, 429 and 5xx; waits are
        ``backoff * 2**n`` seconds (or the server's ``Retry-After``).
    :param timeout: seconds one request may take.
    :param large_bytes, large_elements: documents above either are uploaded as a file and ingested by the server.
    :param ingest_timeout: seconds to wait for the server to ingest an uploaded document.
    :param saved: paths of the local copies of the documents, named in every error message.
    :param log: optional callable given one progress line at a time.
    :returns: one dict per document: ``_id``, ``name``, ``elements``, ``route`` (``'post'`` or ``'upload'``),
        ``seconds``, ``sent_seconds`` (until the server had it; the rest is waiting for its ingest); and, in the
        first, ``replaced``: the ids of the deleted earlier annotations.
    """
    documents = _as_documents(documents)
    if not documents:
        raise CellRCNNError('no annotation documents to post')
    model = _model_of(documents, model_name)
    server = _Server(api_url, token, retries, backoff, timeout, saved)
    say = log or (lambda line: None)
    with server.gc.session(_timeout_session(timeout)):
        target = _Target(server, item_id)
        post_id = uuid.uuid4().hex
        results = []
        try:
            for index, doc in enumerate(documents):
                key = f'{post_id}/{index}'
                attributes = doc.get('attributes') or {}
                doc = {**doc, 'attributes': {**attributes, 'model': model,
                                             MARKER: attributes.get(MARKER, __version__), POST_KEY: key}}
                start = time.perf_counter()
                try:
                    body = json.dumps(doc, separators=(',', ':'), allow_nan=False).encode()
                except (TypeError, ValueError) as exc:
                    raise server.fail(f'annotation {doc.get("name")!r} is not plain JSON ({exc})') from None
                large = len(body) > large_bytes or len(doc['elements']) > large_elements
                what = f'{"uploading" if large else "posting"} annotation {doc.get("name")!r}'
                say(f'{what} ({len(doc["elements"])} elements, {len(body) / 1e6:.1f} MB) to item {target.item_id}')
                timing = {}
                if large:
                    annotation_id = _upload(server, target, doc, body, key, what, ingest_timeout, timing)
                else:
                    annotation_id = _post(server, target, body, key, what)
                done = time.perf_counter()
                results.append({'_id': annotation_id, 'name': doc.get('name'), 'elements': len(doc['elements']),
                                'route': 'upload' if large else 'post', 'seconds': done - start,
                                'sent_seconds': timing.get('sent', done) - start})
        except CellRCNNError:
            # All or nothing: take this post's documents off again, leaving the earlier result as it was.
            for result in results:
                try:
                    _delete(server, result['_id'], target.item_id)
                except CellRCNNError:
                    pass
            raise
        keep = {r['_id'] for r in results}
        replaced = []
        for annotation in target.annotations():
            if _is_result_of(annotation, model) and annotation['_id'] not in keep:
                _delete(server, annotation['_id'], target.item_id)
                if not str(_post_key(annotation)).startswith(post_id):  # else a stray copy of this post
                    replaced.append(annotation['_id'])
        if replaced:
            say(f'replaced {len(replaced)} earlier annotation(s) of model {model} on item {target.item_id}')
        results[0]['replaced'] = replaced
    return results


def _find(target, key):
    """The id of the annotation that post ``key`` created on the item, or None."""
    for annotation in target.annotations():
        if _post_key(annotation) == key:
            return annotation['_id']
    return None


def _post(server, target, body, key, what):
    def create():
        answer = server.gc.post('annotation', parameters={'itemId': target.item_id}, data=body,
                                headers={'Content-Type': 'application/json'}, jsonResp=False)
        return json.loads(answer.content)['_id']

    return server.call(what, create, landed=lambda: _find(target, key), item_id=target.item_id)


def _upload(server, target, doc, body, key, what, ingest_timeout, timing):
    from girder_client import HttpError

    reference = json.dumps({'identifier': UPLOAD_IDENTIFIER, 'itemId': target.item_id, 'fileId': target.file_id,
                            'userId': target.user_id})
    name = f'{doc.get("name") or "annotation"}.{key.replace("/", "-")}.anot.json'

    def upload():
        return server.gc.uploadFile(target.item_id, io.BytesIO(body), name, len(body), parentType='item',
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
                              f'{doc.get("name")!r} (see the server log: too large for its '
                              'max_annotation_input_file_length setting, or not a valid annotation?)')
        if time.monotonic() > deadline:
            raise server.fail(f'Girder at {server.api_url} did not finish ingesting the uploaded annotation '
                              f'{doc.get("name")!r} in {ingest_timeout:g} s (a slow database, or no '
                              'large_image_annotation plugin?); earlier results were not replaced; the upload is '
                              f'file {file_id} on item {target.item_id}')
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)


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
    from .annotation import read_annotation_file

    paths = [os.fspath(p) for p in paths if p]
    documents = []
    for path in paths:
        doc = read_annotation_file(path)
        documents.extend(doc if isinstance(doc, list) else [doc])
    options.setdefault('saved', paths)
    return post_annotations(api_url, token, item_id, documents, model_name=model_name, **options)


def check_target(api_url, token, item_id, retries=4, backoff=1.0, timeout=60):
    """Fail early, before hours of detection: the server answers, the token is good, the item is a large image.
    :returns: the item's id (``item_id`` may be the id of the item's file)."""
    server = _Server(api_url, token, retries, backoff, timeout, None)
    with server.gc.session(_timeout_session(timeout)):
        return _Target(server, item_id).item_id


def format_results(results, item_id):
    """One line per posted document, for a person."""
    lines = [f'posted {r["name"]!r} ({r["elements"]} elements) to item {item_id} as annotation {r["_id"]} '
             f'in {r["seconds"]:.1f} s' for r in results]
    if results and results[0].get('replaced'):
        lines.append(f'replaced {len(results[0]["replaced"])} earlier annotation(s) of the same model')
    return lines


# --------------------------------------------------------------------------- folders of slides

def folder_slides(api_url, token, folder_id, retries=4, backoff=1.0, timeout=60):
    """Every large-image item in a Girder folder and its subfolders, in path order.

    :returns: a list of dicts ``{"item_id", "file_id" (the image file), "name", "path" (folder names and the item
        name joined by "/", relative to the folder), "meta"}``."""
    server = _Server(api_url, token, retries, backoff, timeout, None)
    slides = []
    with server.gc.session(_timeout_session(timeout)):
        server.user()
        server.get('reading the folder', f'folder/{folder_id}', item_id=folder_id)
        todo = [(folder_id, '')]
        while todo:
            fid, prefix = todo.pop()
            items = server.get('listing the folder', 'item', {'folderId': fid, 'limit': 0, 'sort': 'name'})
            for item in items:
                large = item.get('largeImage') or {}
                if large.get('fileId') and not large.get('expected'):
                    slides.append({'item_id': item['_id'], 'file_id': large['fileId'], 'name': item['name'],
                                   'path': prefix + item['name'], 'meta': item.get('meta') or {}})
            subfolders = server.get('listing the folder', 'folder',
                                    {'parentType': 'folder', 'parentId': fid, 'limit': 0, 'sort': 'name'})
            todo.extend((sub['_id'], f'{prefix}{sub["name"]}/') for sub in reversed(subfolders))
    return sorted(slides, key=lambda s: s['path'])


def download_file(api_url, token, file_id, path, retries=4, backoff=1.0, timeout=600):
    """Download a Girder file to ``path`` (written whole or not at all)."""
    server = _Server(api_url, token, retries, backoff, timeout, None)
    partial = f'{path}.part'
    with server.gc.session(_timeout_session(timeout)):
        server.call(f'downloading file {file_id}', lambda: server.gc.downloadFile(file_id, partial))
    os.replace(partial, path)
    return path


def upload_files(api_url, token, folder_id, paths, retries=4, backoff=1.0, timeout=600):
    """Upload local files into a Girder folder, each as a new item named after the file (Girder renames it
    ``NAME (1)`` when the name is taken). A retried upload first looks for the file the lost attempt made.
    :returns: the Girder file documents (``_id``, ``itemId``, ``name``, ``size``)."""
    server = _Server(api_url, token, retries, backoff, timeout, None)
    uploaded = []
    with server.gc.session(_timeout_session(timeout)):
        server.get('reading the output folder', f'folder/{folder_id}', item_id=folder_id)
        for path in paths:
            path = os.fspath(path)
            name, size = os.path.basename(path), os.path.getsize(path)
            before = {item['_id'] for item in server.get('listing the output folder', 'item',
                                                         {'folderId': folder_id, 'limit': 0})}

            def landed():
                for item in server.get('listing the output folder', 'item', {'folderId': folder_id, 'limit': 0}):
                    if item['_id'] not in before and item['name'].startswith(name):
                        files = server.get('listing the uploaded item', f'item/{item["_id"]}/files')
                        if len(files) == 1 and files[0]['size'] == size:
                            return files[0]
                return None

            uploaded.append(server.call(f'uploading {path}', lambda: server.gc.uploadFileToFolder(folder_id, path),
                                        landed=landed))
    return uploaded


# --------------------------------------------------------------------------- `cellrcnn detect` hook

def add_server_options(group, url_help='Girder API URL, e.g. https://dsa.example.org/api/v1', required=False):
    """``--girder-url`` and ``--girder-token`` (default: the GIRDER_TOKEN environment variable) of a command."""
    group.add_argument('--girder-url', dest='girder_url', required=required, help=url_help)
    group.add_argument('--girder-token', dest='girder_token', default=os.environ.get('GIRDER_TOKEN'),
                       help='Girder token (default: the GIRDER_TOKEN environment variable)')


def add_detect_options(parser):
    """The posting options of ``cellrcnn detect``: ``--girder-url``, ``--girder-token``, ``--item``."""
    group = parser.add_argument_group('posting to Girder / the Digital Slide Archive')
    add_server_options(group, 'post the annotations to this Girder API (e.g. https://dsa.example.org/api/v1), '
                              "replacing this model's previous result on the item; the files are written first")
    group.add_argument('--item', dest='girder_item', help="id of the slide's item on Girder")
    return group


def detect_target(args):
    """Check the posting options of ``cellrcnn detect`` before detection. :returns: a callable taking the run's
    output ``paths`` (``pipeline.output_paths``) that posts the nuclei and density annotations, or None when no
    posting was asked for."""
    url, item = getattr(args, 'girder_url', None), getattr(args, 'girder_item', None)
    if not url and not item:
        return None
    if not url or not item:
        raise CellRCNNError('posting to Girder needs both --girder-url and --item')
    token = getattr(args, 'girder_token', None)
    item_id = check_target(url, token, item)

    def post(paths):
        files = [paths.get('annotation'), paths.get('density')]
        return format_results(post_annotation_files(url, token, item_id, files, log=print), item_id)

    return post
