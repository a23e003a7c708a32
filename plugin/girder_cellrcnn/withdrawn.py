"""Posts that cellrcnn's client withdrew: none of their annotations stays, whenever it lands.

cellrcnn's client (``girder_post``) uploads a large result as a file that large_image ingests in the background.
When the ingest does not finish in time, the client withdraws the post:

1. it records the post's id on the item (``POST /cellrcnn/item/{id}/withdrawn``: :func:`withdraw`);
2. it deletes the uploaded file (an ingest that has not read it yet never starts);
3. it deletes the post's annotation if it is on the item already.

An ingest that read the file before step 2 may still save the annotation at any time later. :func:`refuse`, bound
to ``model.annotation.save.after``, runs once the annotation is stored and reads the item then: an annotation of a
withdrawn post (``attributes.cellrcnn_post`` starting with its id) is deleted at once. Whatever the timing, one of
the two sees the other: either the hook's read of the item comes after step 1 (the hook deletes the annotation), or
before it, and then the annotation was stored before step 3 looked for it (the client deletes it).

Only writers of the item may withdraw a post (uploading the file needed write access too); a withdrawn post id is a
random 32-hex-digit id that no other post has. Only an annotation's first save is refused (a late ingest makes a new
annotation): one saved before the withdrawal, whoever names its post, stays when it is next saved. An item keeps the
last :data:`KEPT` withdrawn ids.
"""

import re

from bson import ObjectId
from girder import events, logger
from girder.models.item import Item

from .rerun import POST_KEY

FIELD = 'cellrcnnWithdrawn'  # on an item document: the ids of its withdrawn posts, the latest last
KEPT = 100
POST_ID = re.compile(r'[0-9a-f]{32}')
EVENT = 'cellrcnn.withdrawn'


def withdraw(item, post_id):
    """Record that the post ``post_id`` (32 lowercase hex digits) is withdrawn from the item."""
    Item().update({'_id': item['_id']}, {'$push': {FIELD: {'$each': [post_id], '$slice': -KEPT}}}, multi=False)


def _post_id(annotation):
    attributes = (annotation.get('annotation') or {}).get('attributes')
    key = attributes.get(POST_KEY) if isinstance(attributes, dict) else None
    return key.split('/')[0] if isinstance(key, str) else None


def refuse(event):
    """``model.annotation.save.after``, bound before the plugin's other save handlers: an active annotation of a
    withdrawn post is made inactive at once (large_image's own deletion while it keeps history; the handlers after
    this one see ``_active`` false and leave it alone), then removed for good by Girder's events thread
    (:func:`remove`; large_image holds its write lock during this hook)."""
    from girder_large_image_annotation.models.annotation import Annotation

    annotation = event.info
    post_id = _post_id(annotation)
    if post_id is None or annotation.get('_active') is False or annotation.get('_id') is None:
        return
    if annotation.get('updated') != annotation.get('created'):
        return  # saved before (large_image's createAnnotation stamps both alike): a late ingest is a new annotation
    if Item().findOne({'_id': annotation['itemId'], FIELD: post_id}, fields=['_id']) is None:
        return
    Annotation().update({'_id': annotation['_id']}, {'$set': {'_active': False}}, multi=False)
    annotation['_active'] = False
    events.daemon.trigger(EVENT, {'id': annotation['_id']})
    logger.info('cellrcnn: annotation %s belongs to the withdrawn post %s: deleted', annotation['_id'], post_id)


def remove(event):
    """Remove an annotation of a withdrawn post the way large_image deletes one (its elements too, when it keeps no
    history)."""
    from girder_large_image_annotation.models.annotation import Annotation

    annotation = Annotation().load(ObjectId(event.info['id']), force=True, getElements=False)
    if annotation is not None:
        Annotation().remove(annotation)


def bind():
    events.bind(EVENT, 'cellrcnn', remove)
