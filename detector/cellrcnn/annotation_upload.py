"""Large annotation documents uploaded into the slide's item as files for girder_large_image_annotation to ingest,
waited for, and withdrawn when the ingest does not finish in time (:func:`cellrcnn.girder_post.post_annotations`'
route for documents over its size limits).

The upload carries the reference ``{"identifier": "LargeImageAnnotationUpload", "itemId", "fileId" (the item's
image file), "userId"}``: the server ingests it in the background (chunked upload, no single huge request, no
request time limit) and deletes the uploaded file; the annotation record is written after all its elements, so it
appearing on the item means the ingest is complete. A withdrawn upload never lands as a result, whatever the timing
(:func:`_abandon`).
"""

import json
import time

from .errors import CellRCNNError
from .girder_target import PLUGIN_ITEM

UPLOAD_IDENTIFIER = 'LargeImageAnnotationUpload'
INGESTED = object()
#: an uploaded document's ingest may take 600 s plus this much per thousand elements
INGEST_SECONDS_PER_1000 = 10
#: seconds between the lines that say an ingest is still under way
INGEST_REPORT_SECONDS = 30


def upload(server, target, name, size, body, key, what, ingest_timeout, timing, elements, say=None):
    from girder_client import HttpError

    reference = json.dumps({'identifier': UPLOAD_IDENTIFIER, 'itemId': target.item_id, 'fileId': target.file_id,
                            'userId': target.user_id})
    label = name
    name = f'{label or "annotation"}.{key.replace("/", "-")}.anot.json'

    def send():
        return server.gc.uploadFile(target.item_id, body(), name, size, parentType='item',
                                    reference=reference, mimeType='application/json')['_id']

    def landed():  # a lost answer: is the file there, or already ingested?
        if target.find(key):
            return INGESTED
        for file in server.get('looking for the uploaded file', f'item/{target.item_id}/files', {'limit': 0},
                               item_id=target.item_id):
            if file['name'] == name:
                return file['_id']
        return INGESTED if target.find(key) else None

    file_id = server.call(what, send, landed=landed, item_id=target.item_id)
    timing['sent'] = time.perf_counter()
    # Wait for girder_large_image_annotation's ingest: the annotation shows up once all its elements are stored,
    # then the handler deletes the uploaded file (it deletes it on failure too).
    started = time.monotonic()
    deadline, pause, report = started + ingest_timeout, 0.1, started + INGEST_REPORT_SECONDS
    while True:
        if say and time.monotonic() >= report:
            say(f'the server is storing the {elements} elements of {label!r}: {time.monotonic() - started:.0f} s '
                'so far')
            report += INGEST_REPORT_SECONDS
        found = target.find(key)
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
            found = target.find(key)
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
        late = target.posted(key)
        for annotation_id in late:
            target.delete(annotation_id)
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
