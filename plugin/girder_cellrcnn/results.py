"""A slide's cellrcnn result as item metadata, and the slides of a folder tree (the per-slide results table that
lists them is :mod:`girder_cellrcnn.table`).

A cellrcnn nuclei annotation is one whose ``attributes`` carry the ``cellrcnn`` marker (its version) and no
``attributes.density``, which every other annotation of a run carries (the density heatmaps, the nuclei map and
pixelmap, the tissue outline: its ``kind``). Its summary goes into the item's metadata under :data:`META_KEY`::

    {"cells", "tissue_mm2", "cells_per_mm2", "ink_or_fill_mm2", "out_of_focus_mm2", "cells_out_of_focus",
     "out_of_focus_left_out", "keep_blue_green", "threshold", "magnification", "classes", "views",
     "score": {"mean", "min", "max", "p5", "p25", "p50", "p75", "p95", "histogram": [counts of floor(10 * score) = 0,
     ..., 9]}, "model", "model_sha256", "cellrcnn_version", "roi", "region_annotation", "annotation_id", "date"}

and, for a model with cell types (the run's ``attributes.stats.cell_types``), ``cell_types`` (per type its count,
density per mm² and fraction) and ``lymphocyte_per_tumour``: see :mod:`girder_cellrcnn.cell_types`. They are the
counts the run recorded: an annotation edited by hand keeps them, while ``cells`` counts its elements.

``roi`` is the analysed region (left, top, width, height; the bounding box of a region drawn as polygons, which the
run's ``params.polygons`` hold) of a run on part of the slide, None for the whole slide; ``region_annotation`` the
name of the slide's annotations that outlined the region, for a run counted inside them (None otherwise);
``tissue_mm2`` and ``cells_per_mm2`` are those of the region analysed, ``ink_or_fill_mm2`` the pen ink and black
fill the run left out there, ``out_of_focus_mm2`` the part of its tissue that looked out of focus and
``cells_out_of_focus`` how many of the run's nuclei lie on it, ``out_of_focus_left_out`` whether the run left that
tissue out of its counts (``cellrcnn detect --leave-out-of-focus``: then ``tissue_mm2`` is the tissue in focus and
``cells_out_of_focus`` the nuclei found there and dropped; each None on results made before the library recorded
it). ``keep_blue_green`` says whether the run took large green or blue areas for tissue, not for pen ink (its
``params``; False for runs that did not record it, made before the choice existed or without it). ``threshold``,
``magnification``, ``classes`` and ``views`` are what the run used of the choices a folder run may make
(:mod:`.run_choices`): the score threshold it kept nuclei at and the magnification it analysed at (the model's own
unless chosen; None where the run did not record them), the cell types kept, in name order (None: all), the views
per tile (1: the tile as it is). ``model`` is the
checkpoint's file name (for people), ``model_sha256`` the SHA-256 of its bytes (what identifies the model; None on
results made before the library recorded it).

The metadata follows the most recently saved nuclei annotation of the item; when that one is deleted it falls back
to the newest remaining one, or goes away.

Only results someone who may change the slide made count (:func:`from_writer`): an annotation counts when its creator
and its last editor both have write access to its item. Anyone who may merely read a slide (and create annotations
on it) can post an annotation that looks like a result; it stays an ordinary annotation: it neither becomes the
item's metadata nor makes the slide count as done. A result's ``model`` must be a short printable string
(:data:`MODEL_MAX_CHARS`) and its ``model_sha256``, when present, 64 lowercase hex digits.
"""

import datetime
import json
import re
import threading

import cachetools
from bson import ObjectId
from girder.constants import AccessType
from girder.models.folder import Folder
from girder.models.item import Item
from girder.models.user import User

from . import cell_types, regions, run_choices

META_KEY = 'cellrcnn'
MARKER = 'cellrcnn'
SHA_KEY = 'model_sha256'
MODEL_MAX_CHARS = 200
SHA_PATTERN = re.compile(r'[0-9a-f]{64}')
DEFAULT_MODEL = 'cellrcnn-default.pt'  # the model CellDetection uses when no model file is given
#: the bundled model's configuration as a result records it (``model_config``), the parts a folder run uses
#: (``run_choices.of_model``; tests/test_plugin_contract.py compares them with the checkpoint): its cell types in its
#: order, its calibrated threshold and its µm per pixel
DEFAULT_MODEL_CONFIG = {'cell_types': ['lymphocyte', 'tumour', 'stromal'], 'threshold': 0.37, 'mpp': 0.5}
SUMMARY_FIELD = 'cellrcnnSummary'  # on an annotation document: its summary, for the version it was computed for
#: on an annotation document an upload's ingest made for a user other than the uploader: the uploader's id
CLAIMED_FIELD = 'cellrcnnMadeByUploader'
DENSITY_TYPES = {'griddata', 'heatmap'}
QUANTILES = (5, 25, 50, 75, 95)
HISTOGRAM_BINS = 10


def valid_model(attributes):
    """Whether a result's ``model`` is a short printable string and its ``model_sha256`` (if any) a hex SHA-256."""
    model = attributes.get('model')
    if not isinstance(model, str) or not 0 < len(model) <= MODEL_MAX_CHARS or not model.isprintable():
        return False
    sha = attributes.get(SHA_KEY)
    return sha is None or (isinstance(sha, str) and SHA_PATTERN.fullmatch(sha) is not None)


def run_params(attributes):
    """The settings a result's run recorded (its ``params``; ``cellrcnn.settings.ResultSettings.identity``), {} when
    it recorded none."""
    return attributes.get('params') if isinstance(attributes.get('params'), dict) else {}


def _marked(attributes):
    """Whether annotation attributes are those of a cellrcnn nuclei result (marker, no density, a valid model)."""
    return (isinstance(attributes, dict) and MARKER in attributes and 'density' not in attributes
            and valid_model(attributes))


def is_nuclei_result(annotation):
    """Whether an annotation document (Girder's form, ``{"annotation": {...}}``) is a cellrcnn nuclei result."""
    body = annotation.get('annotation') or {}
    if not _marked(body.get('attributes')):
        return False
    return not any(isinstance(e, dict) and e.get('type') in DENSITY_TYPES for e in body.get('elements') or ())


_ingest = threading.local()  # per thread: the claims (item id, user id, uploader) of the upload being ingested
#: claims by their upload's reference ``uuid``: HistomicsUI and large_image put off the ingest of an annotation whose
#: elements name a file not uploaded yet, and run it in the event of a later upload with the same ``uuid`` (they keep
#: what they put off a day, for at most 100 uuids: this keeps the claims at least as long)
_claims_by_uuid = cachetools.TTLCache(maxsize=10_000, ttl=2 * 86400)
_claims_lock = threading.Lock()


def note_ingest(event):
    """``data.process``, bound before HistomicsUI's and large_image's annotation ingest (they run in the same
    thread, one upload at a time): they make the annotations of an uploaded ``*AnnotationFile`` /
    ``LargeImageAnnotationUpload`` file as the user its reference names, whoever uploaded it. When that is not the
    uploader (and the uploader is not an administrator), note the item and the claimed user: annotations they make
    for it are not results (:func:`from_writer`). An upload's claim holds for the ingests they put off until a later
    upload with the same reference ``uuid``, which run in that upload's event."""
    reference = _reference(event.info or {})
    claimed = _claimed(event.info or {}, reference)
    uuid = str(reference['uuid']) if reference and reference.get('uuid') is not None else None
    claims = [claimed] if claimed else []
    if uuid is not None:
        with _claims_lock:
            if claimed:
                _claims_by_uuid[uuid] = _claims_by_uuid.get(uuid, ()) + (claimed,)
            claims += list(_claims_by_uuid.get(uuid, ()))
    _ingest.claimed = claims


def end_ingest(event):
    """``data.process``, bound after the annotation ingests: the upload's ingest is over in this thread."""
    _ingest.claimed = None


def _reference(info):
    """An upload's reference as a dict, or None."""
    reference = info.get('reference')
    try:
        reference = json.loads(reference) if isinstance(reference, (str, bytes)) else reference
    except ValueError:
        return None
    return reference if isinstance(reference, dict) else None


def _claimed(info, reference):
    identifier = reference.get('identifier') if reference else None
    if not isinstance(identifier, str) or not identifier.endswith(('AnnotationFile', 'LargeImageAnnotationUpload')):
        return None
    uploader = info.get('currentUser')
    if not uploader or uploader.get('admin'):
        return None  # server-side code, or an administrator
    claimed = reference.get('userId')
    if claimed and str(claimed) == str(uploader['_id']):
        return None
    uploader = str(uploader['_id'])
    item_id = reference.get('itemId')
    try:
        from girder.models.file import File

        image = File().load(reference['fileId'], force=True, exc=False) if reference.get('fileId') else None
        item_id = image['itemId'] if image else item_id
    except Exception:
        pass
    return str(item_id) if item_id else None, str(claimed) if claimed else None, uploader


def made_for_another(annotation):
    """The uploader's id when this thread's current upload ingest is making the annotation for another user (see
    :func:`note_ingest`), else None."""
    for item_id, user_id, uploader in getattr(_ingest, 'claimed', None) or ():
        if ((item_id is None or item_id == str(annotation.get('itemId')))
                and (user_id is None or user_id == str(annotation.get('creatorId')))):
            return uploader
    return None


def mark_made_for_another(annotation):
    """Record on an annotation an upload's ingest is making for another user who uploaded it
    (:data:`CLAIMED_FIELD`), for good: it never counts as a result (:func:`from_writer`). :returns: whether it
    was such an annotation."""
    from girder_large_image_annotation.models.annotation import Annotation

    uploader = made_for_another(annotation)
    if uploader is None or annotation.get('_id') is None:
        return False
    annotation[CLAIMED_FIELD] = uploader
    Annotation().update({'_id': annotation['_id']}, {'$set': {CLAIMED_FIELD: uploader}}, multi=False)
    return True


def from_writer(annotation, item, users=None):
    """Whether the annotation's creator and its last editor (``creatorId``, ``updatedId``) may both write to the
    item: only such annotations count as the slide's results. An annotation that an upload's ingest made for a user
    other than the uploader (:func:`note_ingest`, :data:`CLAIMED_FIELD`) does not. ``users``: a dict caching users
    by id."""
    if annotation.get(CLAIMED_FIELD) or made_for_another(annotation):
        return False
    users = {} if users is None else users
    ids = {annotation.get('creatorId'), annotation.get('updatedId') or annotation.get('creatorId')}
    return None not in ids and all(may_write(user_id, item, users) for user_id in ids)


def cached_user(user_id, users):
    """The user ``user_id`` (None when there is none, or no id), loaded once per id into ``users``, a dict."""
    key = str(user_id)
    if key not in users:
        users[key] = User().load(user_id, force=True) if user_id else None
    return users[key]


def may_write(user_id, item, users):
    """Whether the user ``user_id`` exists and may write to the item (``users``: :func:`cached_user`'s cache)."""
    user = cached_user(user_id, users)
    return user is not None and Item().hasAccess(item, user, AccessType.WRITE)


def same_model(attributes, model, sha):
    """Whether result attributes (or a metadata summary) are of this model: the bundled model (``sha`` None) by its
    name; a model file by its checkpoint's SHA-256 when the result records one, else (older results) by name."""
    if sha and attributes.get(SHA_KEY):
        return attributes[SHA_KEY] == sha
    return attributes.get('model') == model


def _quantile(ordered, q):
    """The q-th percentile of a sorted list, interpolated linearly (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def score_summary(scores):
    """Mean, extremes, percentiles and a 10-bin histogram over [0, 1] of detection scores (None without any)."""
    ordered = sorted(float(s) for s in scores)
    if not ordered:
        return None
    histogram = [0] * HISTOGRAM_BINS
    for s in ordered:
        histogram[min(max(int(s * HISTOGRAM_BINS), 0), HISTOGRAM_BINS - 1)] += 1
    summary = {'mean': round(sum(ordered) / len(ordered), 4), 'min': ordered[0], 'max': ordered[-1]}
    summary.update({f'p{q}': round(_quantile(ordered, q), 4) for q in QUANTILES})
    summary['histogram'] = histogram
    return summary


def _iso(value):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.isoformat()
    return value


def _summary(annotation, count, scores):
    """The metadata entry of one nuclei annotation from its attributes, element count and detection scores."""
    attributes = annotation['annotation'].get('attributes') or {}
    stats = attributes.get('stats') if isinstance(attributes.get('stats'), dict) else {}
    params = run_params(attributes)
    made = run_choices.recorded(params) or {}
    tissue, marks, blurred = (_rounded(stats.get(key)) for key in ('tissue_mm2', 'ink_or_fill_mm2', 'out_of_focus_mm2'))
    blurred_cells = stats.get('detections_out_of_focus')
    summary = {
        'cells': count,
        'tissue_mm2': tissue,
        'cells_per_mm2': round(count / tissue, 3) if tissue else None,
        'ink_or_fill_mm2': marks,
        'out_of_focus_mm2': blurred,
        'cells_out_of_focus': blurred_cells if cell_types.is_count(blurred_cells) else None,
        'out_of_focus_left_out': stats.get('out_of_focus_left_out') if isinstance(
            stats.get('out_of_focus_left_out'), bool) else None,
        'keep_blue_green': made.get('keep_blue_green', False),
        'threshold': _rounded(made.get('threshold')),
        'magnification': _rounded(made.get('magnification')),
        'classes': made.get('classes'),
        'views': made.get('views', 1),
        'score': score_summary(scores),
        'model': attributes.get('model'),
        SHA_KEY: attributes.get(SHA_KEY),
        'cellrcnn_version': attributes.get(MARKER),
        'roi': list(params['roi']) if isinstance(params.get('roi'), (list, tuple)) else None,
        'region_annotation': params['region_annotation'] if isinstance(params.get('region_annotation'), str) else None,
        'annotation_id': str(annotation['_id']),
        'date': _iso(annotation.get('updated') or annotation.get('created')),
    }
    if cell_types.valid_counts(stats.get('cell_types')):
        summary.update(cell_types.summarise(stats['cell_types'], tissue))
    return summary


def _rounded(value):
    """A recorded number (an area in mm^2, a threshold, a magnification) rounded to 6 places, or None when it is not a
    number."""
    return round(float(value), 6) if _is_number(value) else None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def result_summary(annotation):
    """The metadata entry of one nuclei annotation (Girder's form, with its elements)."""
    elements = annotation['annotation'].get('elements') or []
    scores = [e['user']['score'] for e in elements
              if isinstance(e.get('user'), dict) and _is_number(e['user'].get('score'))]
    return _summary(annotation, len(elements), scores)


def _remember_summary(annotation, summary):
    """Keep a result's summary on its annotation document, for the version it describes: when the item's current
    result is deleted, the one it falls back to is summarised without reading its elements."""
    from girder_large_image_annotation.models.annotation import Annotation

    if annotation.get('_version') is None:
        return
    Annotation().update({'_id': annotation['_id'], '_version': annotation['_version']},
                        {'$set': {SUMMARY_FIELD: {'version': annotation['_version'], 'summary': summary}}},
                        multi=False)


def record(annotation):
    """Put a just-saved nuclei annotation's summary on its item (``model.annotation.save.after``), when it is a
    result of someone who may write to the item (:func:`from_writer`)."""
    if mark_made_for_another(annotation):
        return None
    if annotation.get('_active') is False or annotation.get('annotation', {}).get('elements') is None:
        return None  # a save without its elements (access or metadata changes): nothing to recount
    if not is_nuclei_result(annotation):
        return None
    item = Item().load(annotation['itemId'], force=True)
    if item is None or not from_writer(annotation, item):
        return None
    summary = result_summary(annotation)
    _remember_summary(annotation, summary)
    return Item().setMetadata(item, {META_KEY: summary})


def _active_results(item_id, density=False):
    """Active cellrcnn nuclei annotations of an item (with ``density``, its density annotations too), newest first,
    without their elements."""
    from girder_large_image_annotation.models.annotation import Annotation

    query = {'itemId': item_id, f'annotation.attributes.{MARKER}': {'$exists': True}, '_active': {'$ne': False}}
    if not density:
        query['annotation.attributes.density'] = {'$exists': False}
    return Annotation().find(query, sort=[('updated', -1)],
                             fields=['_id', 'annotation.attributes', 'annotation.name', 'updated', 'created',
                                     'creatorId', 'updatedId', 'itemId', '_version', SUMMARY_FIELD, CLAIMED_FIELD])


def _summary_without_elements(annotation):
    """The summary of a stored nuclei annotation (read without its elements), or None when it is not a nuclei
    result after all (density elements). The summary remembered for its current version when there is one; else
    from the scores and types of its elements alone (a projection: no coordinates, no other element fields), then
    remembered for that version (a re-run folded into the annotation gives it a version no save summarised), so that
    the elements of one version are read once, not at each request of the results table."""
    from girder_large_image_annotation.models.annotationelement import Annotationelement

    remembered = annotation.get(SUMMARY_FIELD)
    if (isinstance(remembered, dict) and remembered.get('version') == annotation.get('_version')
            and isinstance(remembered.get('summary'), dict)):
        return remembered['summary']
    query = {'annotationId': annotation['_id'], '_version': annotation.get('_version')}
    elements = Annotationelement().collection
    if elements.find_one({**query, 'element.type': {'$in': sorted(DENSITY_TYPES)}}, {'_id': 1}):
        return None
    count, scores = 0, []
    for entry in elements.find(query, {'_id': 0, 'element.user.score': 1}):
        count += 1
        score = ((entry.get('element') or {}).get('user') or {}).get('score')
        if _is_number(score):
            scores.append(score)
    summary = _summary(annotation, count, scores)
    _remember_summary(annotation, summary)
    return summary


def resync(item_id):
    """After annotations of an item were deleted: if its metadata described one of them, describe the newest
    remaining nuclei annotation of a writer instead, or remove the entry. Reads annotations' attributes, never
    their elements (:func:`_summary_without_elements`)."""
    from girder_large_image_annotation.models.annotation import Annotation

    item = Item().load(item_id, force=True)
    current = ((item or {}).get('meta') or {}).get(META_KEY)
    if not isinstance(current, dict) or not current.get('annotation_id'):
        return item
    query = {'_id': ObjectId(current['annotation_id']), '_active': {'$ne': False}}
    if Annotation().findOne(query, fields=['_id']):
        return item
    summary = newest_summary(item)
    return Item().setMetadata(item, {META_KEY: summary}) if summary else Item().deleteMetadata(item, [META_KEY])


def newest_summary(item, scope=None):
    """The summary (as the item's metadata holds one) of the slide's newest nuclei result of a writer of the item
    (:func:`from_writer`), of those that counted ``scope`` (:func:`result_scope`) when given; None when there is
    none. Reads annotations' attributes, never their elements (:func:`_summary_without_elements`)."""
    users = {}
    for candidate in _active_results(item['_id']):
        attributes = candidate['annotation'].get('attributes')
        if (_marked(attributes) and (scope is None or result_scope(attributes) == scope)
                and from_writer(candidate, item, users)):
            summary = _summary_without_elements(candidate)
            if summary is not None:
                return summary
    return None


def resync_folder(folder_id, recurse):
    """:func:`resync` every item with a result in a folder (and its subfolders)."""
    folder_ids, todo = [], [ObjectId(folder_id)]
    while todo:
        folder_ids.append(todo.pop())
        if recurse:
            todo.extend(f['_id'] for f in Folder().find({'parentId': folder_ids[-1], 'parentCollection': 'folder'},
                                                         fields=['_id']))
    for item in Item().find({'folderId': {'$in': folder_ids}, f'meta.{META_KEY}': {'$exists': True}},
                            fields=['_id']):
        resync(item['_id'])


#: what a result counted (:func:`result_scope`): the whole slide
WHOLE_SLIDE = ('whole slide',)


def result_scope(attributes):
    """What a result's run counted (its ``params``): :data:`WHOLE_SLIDE`, ``('annotation', NAME)`` inside the slide's
    annotations named NAME, or ``('drawn',)`` inside a rectangle or polygons given for the run."""
    params = run_params(attributes)
    if isinstance(params.get('region_annotation'), str) and params['region_annotation']:
        return 'annotation', params['region_annotation']
    return ('drawn',) if params.get('roi') else WHOLE_SLIDE


def _made_with(attributes, choices):
    """Whether a result's run made a folder run's ``choices`` (:func:`.run_choices.same`)."""
    return run_choices.same(run_params(attributes), attributes.get('model_config'), choices)


def _whole_slide_result_of(attributes, model, sha, choices):
    return (_marked(attributes) and same_model(attributes, model, sha) and result_scope(attributes) == WHOLE_SLIDE
            and _made_with(attributes, choices))


def _region_result_of(annotation, model, sha, choices, name, since):
    attributes = annotation['annotation'].get('attributes') or {}
    made = annotation.get('updated') or annotation.get('created')
    return (_marked(attributes) and same_model(attributes, model, sha) and _made_with(attributes, choices)
            and run_params(attributes).get('region_annotation') == name
            and isinstance(made, datetime.datetime) and made >= since)


def slide_region(item, user, name):
    """The region a folder run counts the slide inside (``batch``): ``(numbers, since)``, the region numbers of the
    item's active annotations named ``name`` that ``user`` may read and writers of the item made
    (:func:`from_writer`: a reader who may annotate the slide cannot choose what a writer's run counts) and when they
    last changed (the latest of their ``updated`` times); None when it has none. :raises regions.RegionError: when
    they outline no area that can be counted (:func:`girder_cellrcnn.regions.region_values`)."""
    from girder_large_image_annotation.models.annotation import Annotation

    query = {'itemId': item['_id'], 'annotation.name': name, '_active': {'$ne': False}}
    listed = Annotation().findWithPermissions(query, sort=[('created', 1)], user=user, level=AccessType.READ,
                                              fields=['_id', 'creatorId', 'updatedId', '_elementCount', CLAIMED_FIELD])
    users = {}
    listed = [a for a in listed if from_writer(a, item, users)]
    if not listed:
        return None
    count = sum(a.get('_elementCount') or 0 for a in listed)
    if count > regions.MOST_ELEMENTS:  # counted before any is loaded: a name of a nuclei result, say
        raise regions.RegionError(f'has {count} elements, more than the {regions.MOST_ELEMENTS} a region may have '
                                  '(outlines of areas, not nuclei)')
    found = [Annotation().load(a['_id'], user=user, level=AccessType.READ) for a in listed]
    found = [a for a in found if a is not None]
    if not found:
        return None
    times = [t for t in (a.get('updated') or a.get('created') for a in found) if isinstance(t, datetime.datetime)]
    values = regions.region_values(e for a in found for e in a['annotation'].get('elements') or ())
    return values, max(times) if times else datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def has_result(item, model, sha=None, region=None, choices=None):
    """Whether a slide's item holds a whole-slide nuclei result of a model made with ``choices`` (a folder run's,
    :mod:`.run_choices`; None: the task's defaults) by a writer of the item: any of its active results, not
    only the newest (one of another model may be newer). The model is ``model`` (a name) and ``sha`` (the SHA-256 of
    its checkpoint; None for the bundled model, which is known by its name): see :func:`same_model`. With ``region``
    (``(name, since)``): a result counted inside the slide's annotations of that name (``params.region_annotation``),
    saved at or after ``since`` (:func:`slide_region`), instead: a region redrawn since is counted again."""
    users = {}
    for annotation in _active_results(item['_id']):
        if region is None:
            made = _whole_slide_result_of(annotation['annotation'].get('attributes') or {}, model, sha, choices)
        else:
            made = _region_result_of(annotation, model, sha, choices, *region)
        if made and from_writer(annotation, item, users):
            return True
    return False


def writers_annotations(item):
    """The ids of an item's active annotations that carry the cellrcnn marker (nuclei and density) and were made by
    writers of the item (:func:`from_writer`): those cellrcnn's client may take for results of its posts, and
    replace. A reader's look-alike is not among them."""
    users = {}
    return [str(a['_id']) for a in _active_results(item['_id'], density=True) if from_writer(a, item, users)]


#: the subfolder a folder run puts its slides' label images in (``batch``), marked by ``meta.cellrcnn.labelImages``:
#: a label image is a large image of the slide's size, and in the slide's own folder it would be listed (and run) as
#: one more slide, and HistomicsUI's next / previous would step onto it
LABEL_IMAGES_FOLDER = 'cellrcnn label images'
LABEL_IMAGES_META = 'labelImages'


def is_label_images_folder(folder):
    """A folder of label images (:data:`LABEL_IMAGES_FOLDER`): not searched for slides."""
    return ((folder.get('meta') or {}).get(META_KEY) or {}).get(LABEL_IMAGES_META) is True


def is_slide(item):
    large = item.get('largeImage') or {}
    return bool(large.get('fileId')) and not large.get('expected')


def iter_slides(folder, user, level=AccessType.READ, denied=None, fields=None):
    """(path relative to ``folder``, item, folder holding it) of every large-image item in a folder tree that
    ``user`` may access at ``level``, in path order, as a generator that holds one folder's listing at a time;
    folders of label images (:func:`is_label_images_folder`) are left out. ``denied``: a one-element list counting
    the subfolders left out for lack of access. ``fields``: the item fields to read (default: all)."""
    def entries(current, prefix):
        # Sorting siblings by name (items) and name + '/' (folders) and walking depth-first gives exactly the order
        # of the full paths: a name has no '/'.
        found = [(prefix + item['name'], item, None) for item in Folder().childItems(current, fields=fields)
                 if is_slide(item)]
        for sub in Folder().childFolders(current, 'folder', user=user):
            if is_label_images_folder(sub):
                continue
            if Folder().hasAccess(sub, user, level):
                found.append((f'{prefix}{sub["name"]}/', None, sub))
            elif denied is not None:
                denied[0] += 1
        found.sort(key=lambda entry: entry[0])
        return ((path, item, sub, current) for path, item, sub in found)

    stack = [entries(folder, '')]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        path, item, sub, parent = entry
        if item is not None:
            yield path, item, parent
        else:
            stack.append(entries(sub, path))


def folder_slides(folder, user, level=AccessType.READ):
    """(path relative to ``folder``, item, folder holding it) of every large-image item in a folder tree that
    ``user`` may access at ``level``, in path order; and the number of subfolders left out for lack of access."""
    denied = [0]
    slides = list(iter_slides(folder, user, level, denied))
    return slides, denied[0]
