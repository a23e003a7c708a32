"""Posting detection results straight to a Girder / Digital Slide Archive server, replacing the model's previous ones
of the same region.

The normal DSA flow needs none of this: slicer_cli_web uploads the task's ``*AnnotationFile`` outputs and
HistomicsUI turns them into annotations. This module is for batch and REST use (``cellrcnn detect --girder-url``,
scripts) and for the task's ``post_to_girder`` option: it puts the annotation documents on a slide's item and
**replaces** the previous result of the same model there instead of adding another copy.

A result replaces only the model's result of the same region (:func:`result_region`): a whole-slide result the
whole-slide one, a result inside the slide's annotations named ``tumour`` the one inside ``tumour`` (drawn again or
not), and one inside a rectangle or polygons given for the run (``--roi``, *Region to analyse*) the one of the same
rectangle or polygons. So a slide keeps its whole-slide count beside its count inside the tumour a pathologist drew,
and counts in several hotspots side by side. HistomicsUI's re-runs are folded in by the same rule (the plugin's
``girder_cellrcnn.rerun``).

- The item must be a large image (``GET /item/{id}/tiles`` answers).
- Small documents are sent with ``POST /annotation?itemId=``. Large ones (over ``large_bytes`` of JSON or
  ``large_elements`` elements) are uploaded as a file into the item for girder_large_image_annotation to ingest
  (:mod:`cellrcnn.annotation_upload`).
- Every posted document carries ``attributes.model``, ``attributes.cellrcnn`` (the marker every cellrcnn
  annotation has) and ``attributes.cellrcnn_post`` (this post's id). After the new documents are on the item, every
  other annotation on the item with the same model, region and the marker is deleted: a failed post never leaves
  the slide without a result.
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
from .annotation_upload import INGEST_SECONDS_PER_1000, upload
from .errors import CellRCNNError
from .girder_api import GirderConnection
from .girder_target import POST_KEY, Target, annotation_attributes, post_key
from .job import POSTED_OUTPUTS

MARKER = 'cellrcnn'
#: the hex SHA-256 of the model's checkpoint file: what identifies "the same model" (``attributes.model`` is its name)
SHA_KEY = 'model_sha256'
LARGE_BYTES = 8 * 1024 ** 2
LARGE_ELEMENTS = 100_000
_WRITE = 1  # Girder's AccessType.WRITE, as listings give it in ``_accessLevel``


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


def _plain(value):
    """Nested lists of floats, whether the numbers came as tuples or lists, ints or floats."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def result_region(attributes):
    """Which region a result's annotation attributes say the run counted (its ``params``): ``('annotation', NAME)``
    inside the slide's annotations named NAME (``region_annotation``), else ``('area', ROI, POLYGONS)``, the
    rectangle and polygons given for the run as JSON text (``null`` both for the whole slide). Annotations without
    ``params`` (posted by other tools) are whole-slide ones."""
    params = attributes.get('params') if isinstance(attributes.get('params'), dict) else {}
    if params.get('region_annotation'):
        return 'annotation', str(params['region_annotation'])
    return 'area', json.dumps(_plain(params.get('roi') or None)), json.dumps(_plain(params.get('polygons') or None))


def _region_of(documents):
    regions = {result_region(d.header.get('attributes') or {}) for d in documents}
    if len(regions) > 1:
        raise CellRCNNError('these annotations were counted in different regions (their params): post them '
                            'separately')
    return regions.pop()


def _is_result_of(annotation, model, sha, region):
    """Whether an annotation is a cellrcnn result of this model (the same checkpoint hash when both have one, else,
    for results posted before hashes were recorded, the same model name) counted in ``region``
    (:func:`result_region`)."""
    attributes = annotation_attributes(annotation)
    if MARKER not in attributes or result_region(attributes) != region:
        return False
    if sha and attributes.get(SHA_KEY):
        return attributes[SHA_KEY] == sha
    return attributes.get('model') == model


def _post_of(annotation):
    """The post an annotation belongs to: its post id, or (posted another way) the annotation itself."""
    key = post_key(annotation)
    return str(key).split('/')[0] if key else f'annotation {annotation["_id"]}'


def _age(annotations):
    """When a post began landing: its first document's creation time (ties: the lower id, as ObjectIds grow); None
    when its first document is gone (a post being taken back, or the remains of one: it claims nothing)."""
    first = [a for a in annotations if (str(post_key(a) or '').split('/') + ['0'])[1] == '0']
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
    """Put annotation documents on a slide's Girder item, replacing that model's previous cellrcnn result of the same
    region there (:func:`result_region`: the whole slide, the annotations of one name, or the rectangle or polygons
    given for the run).

    Replacement is "newest wins": once this post's documents are on the item, the results of the same model and region
    that landed before it are deleted; if another post of the same model landed after it meanwhile (two runs racing),
    that one stays and this post takes its own documents back. Either way exactly one result of the model and region
    remains.
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
    :param progress: a :class:`cellrcnn.progress.Progress` that is told what is sent, and how far the post is as a
        stage of its own: the share of the elements stored, a line every half minute of an ingest (default: silent).
    :returns: one dict per document: ``_id``, ``name``, ``elements``, ``route`` (``'post'`` or ``'upload'``),
        ``seconds``, ``sent_seconds`` (until the server had it; the rest is waiting for its ingest); and, in the
        first, ``replaced``: the ids of the deleted earlier annotations, and ``superseded``: true when a newer post
        of the same model won and this one was taken back.
    """
    documents = as_documents(documents)
    if not documents:
        raise CellRCNNError('no annotation documents to post')
    model, sha = _model_of(documents, model_name)
    region = _region_of(documents)
    server = GirderConnection(api_url, token, retries, backoff, timeout, saved)
    say = progress.log if progress else (lambda line: None)
    if progress:  # a stage of its own: the share of the elements stored so far
        progress.start(sum(max(doc.count, 1) for doc in documents), unit='element')
    with server.session():
        target = Target(server, item_id)
        _check_replaceable(server, target, model, sha, region)
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
                if progress:
                    progress.comment(f'{what} ({doc.count} elements)')
                timing = {}
                if large:
                    wait = ingest_timeout or 600 + INGEST_SECONDS_PER_1000 * doc.count / 1000
                    annotation_id = upload(server, target, doc.name, size, body, key, what, wait, timing,
                                            doc.count, say)
                else:
                    annotation_id = _post(server, target, body().read(), key, what)
                if progress:
                    progress.update(max(doc.count, 1))
                done = time.perf_counter()
                results.append({'_id': annotation_id, 'name': doc.name, 'elements': doc.count,
                                'route': 'upload' if large else 'post', 'seconds': done - start,
                                'sent_seconds': timing.get('sent', done) - start})
            results[0].update(_replace_earlier(target, model, sha, region, post_id, results, say))
        except CellRCNNError:
            # All or nothing: take this post's documents off again, leaving the earlier result as it was.
            _take_back(target, results)
            raise
        finally:
            if progress:
                progress.finish()
    return results


def _results_by_post(target, model, sha, region, post_id=None):
    """This model's results of ``region`` on the item, grouped by the post they came with: this post's own documents
    (``post_id``, made by this user), and the others that count as results (:meth:`Target.writers_annotations`: made by
    writers of the item, or all of them on a server without cellrcnn's plugin)."""
    annotations = target.annotations()
    counted = target.writers_annotations()  # asked after the listing: it knows every annotation listed
    posts = {}
    for annotation in annotations:
        if not _is_result_of(annotation, model, sha, region):
            continue
        post = _post_of(annotation)
        if target.mine(annotation) if post == post_id else counted is None or annotation['_id'] in counted:
            posts.setdefault(post, []).append(annotation)
    return posts


def _check_replaceable(server, target, model, sha, region):
    """Fail before posting when an earlier result of the model and region is one the user may read but not delete."""
    locked = [a['_id'] for docs in _results_by_post(target, model, sha, region).values() for a in docs
              if a.get('_accessLevel', _WRITE) < _WRITE]
    if locked:
        raise server.fail(f'item {target.item_id} holds an earlier result of model {model} that this user may not '
                          f'replace (no write access to annotation(s) {", ".join(locked)}): ask their owner for '
                          'write access, or post as a user who has it; nothing was posted')


def _replace_earlier(target, model, sha, region, post_id, results, say):
    """Newest wins: delete the model's other results of the region on the item, unless another post of the model began
    landing after this one (its first document is younger than this post's first), or one of this post's documents was
    deleted meanwhile (by such a newer post): then take this post back. A post is aged by its first document, which
    exists before its check and before any younger post's check, so racing posts agree on the winner whatever order
    their checks run in. :returns: ``{"replaced": [...], "superseded": bool}``."""
    posts = _results_by_post(target, model, sha, region, post_id)
    ours = posts.pop(post_id, [])
    mine = _age(ours)
    newer = [docs for docs in posts.values() if mine and (_age(docs) or mine) > mine]
    if newer or {a['_id'] for a in ours} != {r['_id'] for r in results}:
        _take_back(target, results)
        say(f'a newer result of model {model} landed on item {target.item_id} while this one was posted: it stays, '
            'and this post was taken back')
        return {'replaced': [], 'superseded': True}
    replaced = []
    for docs in posts.values():
        for annotation in docs:
            target.delete(annotation['_id'])
            replaced.append(annotation['_id'])
    if replaced:
        say(f'replaced {len(replaced)} earlier annotation(s) of model {model} on item {target.item_id}')
    return {'replaced': replaced, 'superseded': False}


def _take_back(target, results):
    for result in results:
        try:
            target.delete(result['_id'])
        except CellRCNNError:
            pass


def _post(server, target, body, key, what):
    def create():
        answer = server.gc.post('annotation', parameters={'itemId': target.item_id}, data=body,
                                headers={'Content-Type': 'application/json'}, jsonResp=False)
        return json.loads(answer.content)['_id']

    return server.call(what, create, landed=lambda: target.find(key), item_id=target.item_id)


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
        return Target(server, item_id).item_id


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
    :returns: a callable taking a run's output ``paths`` (``job.output_paths``) that posts its annotations (the
    nuclei, their map, the density heatmaps and the tissue outline: ``job.POSTED_OUTPUTS``) to the item and returns a
    line per posted document (``progress`` is told what is sent)."""
    item_id = check_target(api_url, token, item_id)

    def post(paths):
        files = [paths.get(key) for key in POSTED_OUTPUTS]
        return format_results(post_annotation_files(api_url, token, item_id, files, progress=progress), item_id)

    return post
