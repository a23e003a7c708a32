"""A re-run's result takes the place of the earlier result of the same model on a slide, keeping it as history.

Running CellDetection again from HistomicsUI makes the DSA ingest the task's outputs as new annotations: the slide
would hold one more pair (nuclei, density) per run. When a new cellrcnn annotation arrives (created, not edited)
that was not posted by cellrcnn's own client (that one replaces earlier results itself: ``attributes.cellrcnn_post``),
and the item already holds an active cellrcnn annotation of the same kind (nuclei or density), name, model (its
checkpoint's SHA-256 when both record one, else its name) and region, made by writers of the item, the earlier
annotation is updated in place with the new content, by the new annotation's creator, and the new one is deleted.
large_image keeps the earlier content as a version of that annotation (``GET /annotation/{id}/history``; with its
``large_image.annotation_history`` setting on, the default), and the new one among the deleted annotations. A
classified run has a heatmap per cell type (``attributes.cell_type``), each re-run by its own name; when the re-run's
nuclei annotation keeps fewer types (``classes``), the earlier run's heatmaps of the other types are deleted.

Only writers' results take part (:func:`.results.from_writer`), and only when the new annotation's creator may
write to the earlier annotation: a reader who may create annotations cannot overwrite anyone's result this way.

The save hook only decides and queues (large_image holds its write lock during the hook); the work runs in Girder's
events daemon thread (:func:`merge`), one arrival at a time. The new elements are moved in the database, never
loaded into the Girder process: a re-run of a million nuclei costs the server no more memory than one of ten. The newest
content wins: an arrival older than the content the earlier annotation already holds is left alone.
"""

from girder import events, logger
from girder.constants import AccessType
from girder.models.item import Item

from . import cell_types
from .results import (
    CLAIMED_FIELD,
    MARKER,
    SHA_KEY,
    from_writer,
    made_for_another,
    run_params,
    same_model,
    valid_model,
)

EVENT = 'cellrcnn.rerun'
POST_KEY = 'cellrcnn_post'  # set by cellrcnn's client (girder_post), which replaces earlier results itself
CONTENT_FIELD = 'cellrcnnContent'  # on an updated annotation: {"created": when its content arrived, "from": id}
FIELDS = ['_id', 'itemId', 'creatorId', 'updatedId', 'created', 'updated', '_version', '_active', 'annotation.name',
          'annotation.attributes', 'access', 'public', 'publicFlags', CONTENT_FIELD, CLAIMED_FIELD]


def _attributes(annotation):
    attributes = (annotation.get('annotation') or {}).get('attributes')
    return attributes if isinstance(attributes, dict) else {}


def _region(attributes):
    """The run's region: the name of the slide's annotations it was counted inside (a redrawn tumour is the same
    region), else its rectangle and, for a region drawn as polygons, the polygons (cellrcnn's client posts alike:
    ``cellrcnn.girder_post.result_region``)."""
    params = run_params(attributes)
    if params.get('region_annotation'):
        return str(params['region_annotation'])
    return params.get('roi') or None, params.get('polygons') or None


def queue_if_rerun(annotation):
    """``model.annotation.save.after``: queue :func:`merge` for a just-created cellrcnn annotation that cellrcnn's
    client did not post."""
    body = annotation.get('annotation') or {}
    attributes = _attributes(annotation)
    if (annotation.get('_active') is False or body.get('elements') is None or MARKER not in attributes
            or POST_KEY in attributes or not valid_model(attributes) or annotation.get(CLAIMED_FIELD)
            or made_for_another(annotation)):
        return
    if annotation.get('created') is None or annotation.get('created') != annotation.get('updated'):
        return  # an edit, a revert or this module's own update: not an arrival
    events.daemon.trigger(EVENT, {'id': annotation['_id'], 'version': annotation.get('_version')})


def _content_time(annotation):
    content = annotation.get(CONTENT_FIELD)
    if isinstance(content, dict) and content.get('created') is not None:
        return content['created']
    return annotation['created']


def _replaceable(other, attributes, item, users, user):
    """Whether an active annotation is of the same run as a new one with ``attributes`` (model, region), made by
    writers of the item, and ``user`` (the new one's creator) may write to it."""
    from girder_large_image_annotation.models.annotation import Annotation

    theirs = _attributes(other)
    return (valid_model(theirs) and same_model(theirs, attributes.get('model'), attributes.get(SHA_KEY))
            and _region(theirs) == _region(attributes) and from_writer(other, item, users)
            and Annotation().hasAccess(other, user, AccessType.WRITE))


def _earlier(new, item, users):
    """The active annotation on the item that the new one re-runs (see the module's notes), or None."""
    from girder_large_image_annotation.models.annotation import Annotation

    attributes = _attributes(new)
    user = users[str(new['creatorId'])]
    query = {'itemId': new['itemId'], '_id': {'$ne': new['_id']}, '_active': {'$ne': False},
             'annotation.name': new['annotation'].get('name'), f'annotation.attributes.{MARKER}': {'$exists': True}}
    for other in Annotation().find(query, sort=[('created', 1)], fields=FIELDS):
        if (('density' in _attributes(other)) == ('density' in attributes)
                and _replaceable(other, attributes, item, users, user)):
            return other
    return None


def _left_out_heatmaps(new, item, users):
    """The per-cell-type heatmaps (density annotations with ``attributes.cell_type``) of the earlier run that a
    re-run's nuclei annotation has no type for (a run with fewer ``classes``): none of the re-run's heatmaps takes
    their place."""
    from girder_large_image_annotation.models.annotation import Annotation

    attributes = _attributes(new)
    if 'density' in attributes:
        return []
    stats = attributes.get('stats') if isinstance(attributes.get('stats'), dict) else {}
    kept = set(stats['cell_types']) if cell_types.valid_counts(stats.get('cell_types')) else set()
    user = users[str(new['creatorId'])]
    query = {'itemId': new['itemId'], '_active': {'$ne': False}, f'annotation.attributes.{MARKER}': {'$exists': True},
             'annotation.attributes.density': {'$exists': True}, 'annotation.attributes.cell_type': {'$exists': True}}
    return [other for other in Annotation().find(query, fields=FIELDS)
            if _attributes(other).get('cell_type') not in kept and _replaceable(other, attributes, item, users, user)]


def merge(event):
    """Make the earlier annotation of a re-run carry the new content (an in-place update: large_image keeps the
    earlier content as its history) and delete the new one."""
    from girder_large_image_annotation.models.annotation import Annotation

    from . import results

    info = event.info or {}
    results._ingest.claimed = None  # this thread's next work is not an upload's ingest
    try:
        new = Annotation().findOne({'_id': info['id'], '_version': info['version'], '_active': {'$ne': False}},
                                   fields=FIELDS)
        if new is None:
            return  # deleted or edited since it arrived
        item = Item().load(new['itemId'], force=True)
        users = {}
        if item is None or not from_writer(new, item, users):
            return
        earlier = _earlier(new, item, users)
        if earlier is None or _content_time(earlier) >= new['created']:
            return
        target = Annotation().load(earlier['_id'], force=True, getElements=False)
        if target is None or target.get('_version') != earlier.get('_version') or target.get('_active') is False:
            return  # changed meanwhile: leave both
        if not _move_content(new, info['version'], target, users[str(new['creatorId'])]):
            return
        Annotation().remove(Annotation().load(new['_id'], force=True, getElements=False))
        for heatmap in _left_out_heatmaps(new, item, users):
            Annotation().remove(Annotation().load(heatmap['_id'], force=True, getElements=False))
        results.resync(new['itemId'])
        logger.info('cellrcnn: annotation %s of a re-run now updates annotation %s', new['_id'], target['_id'])
    except Exception:
        logger.exception('cellrcnn: could not fold re-run annotation %s into the earlier one', info.get('id'))


def _move_content(new, version, target, user):
    """Give ``target`` the content of the annotation ``new`` (at ``version``) without loading its elements here: they
    are moved in the database, to ``target`` at a version of their own, and the record is updated through
    large_image (which keeps the earlier record as history, with the earlier elements), then pointed at them (a reader
    between those two updates, which follow each other at once, finds no elements). :returns: False, and nothing is
    done, when ``new`` has changed since it arrived."""
    from girder_large_image_annotation.models.annotation import Annotation
    from girder_large_image_annotation.models.annotationelement import Annotationelement

    header = Annotation().collection.find_one({'_id': new['_id'], '_version': version, '_active': {'$ne': False}})
    if header is None:
        return False  # edited or deleted since it arrived: leave both
    moved = Annotationelement().getNextVersionValue()
    Annotationelement().collection.update_many({'annotationId': new['_id'], '_version': version},
                                               {'$set': {'annotationId': target['_id'], '_version': moved}})
    target['annotation'] = {k: v for k, v in header['annotation'].items() if k != 'elements'}
    target = Annotation().updateAnnotation(target, updateUser=user)  # a record without elements, for now
    Annotation().update({'_id': target['_id']}, {'$set': {
        '_version': moved, '_elementCount': header.get('_elementCount', 0),
        '_detailsCount': header.get('_detailsCount', 0), 'groups': header.get('groups') or [],
        CONTENT_FIELD: {'created': new['created'], 'from': new['_id']}}}, multi=False)
    return True


def bind():
    events.bind(EVENT, 'cellrcnn', merge)
