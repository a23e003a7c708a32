"""A slide's cellrcnn result as item metadata, and the per-slide results table of a folder tree.

A cellrcnn nuclei annotation is one whose ``attributes`` carry the ``cellrcnn`` marker (its version) and that is not
the density annotation (``attributes.density``, one ``griddata`` element). Its summary goes into the item's
metadata under :data:`META_KEY`::

    {"cells", "tissue_mm2", "cells_per_mm2", "score": {"mean", "min", "max", "p5", "p25", "p50", "p75", "p95",
     "histogram": [counts of floor(10 * score) = 0, ..., 9]}, "model", "cellrcnn_version", "roi", "annotation_id",
     "date"}

``roi`` is the analysed region (left, top, width, height) of a run on part of the slide, None for the whole slide;
``tissue_mm2`` and ``cells_per_mm2`` are those of the region analysed.

The metadata follows the most recently saved nuclei annotation of the item; when that one is deleted it falls back
to the newest remaining one, or goes away.
"""

import csv
import datetime
import io

from bson import ObjectId
from girder.constants import AccessType
from girder.models.folder import Folder
from girder.models.item import Item

META_KEY = 'cellrcnn'
MARKER = 'cellrcnn'
DENSITY_TYPES = {'griddata', 'heatmap'}
QUANTILES = (5, 25, 50, 75, 95)
HISTOGRAM_BINS = 10
COLUMNS = ('name', 'path', 'item_id', 'cells', 'tissue_mm2', 'cells_per_mm2', 'score_mean', 'score_median',
           'model', 'cellrcnn_version', 'roi', 'annotation_id', 'date')


def is_nuclei_result(annotation):
    """Whether an annotation document (Girder's form, ``{"annotation": {...}}``) is a cellrcnn nuclei result."""
    body = annotation.get('annotation') or {}
    attributes = body.get('attributes') or {}
    if not isinstance(attributes, dict) or MARKER not in attributes or 'density' in attributes:
        return False
    return not any(isinstance(e, dict) and e.get('type') in DENSITY_TYPES for e in body.get('elements') or ())


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


def result_summary(annotation):
    """The metadata entry of one nuclei annotation (Girder's form, with its elements)."""
    body = annotation['annotation']
    attributes = body.get('attributes') or {}
    elements = body.get('elements') or []
    scores = [e['user']['score'] for e in elements
              if isinstance(e.get('user'), dict) and isinstance(e['user'].get('score'), (int, float))]
    stats = attributes.get('stats') if isinstance(attributes.get('stats'), dict) else {}
    params = attributes.get('params') if isinstance(attributes.get('params'), dict) else {}
    tissue = stats.get('tissue_mm2')
    tissue = float(tissue) if isinstance(tissue, (int, float)) else None
    return {
        'cells': len(elements),
        'tissue_mm2': round(tissue, 6) if tissue is not None else None,
        'cells_per_mm2': round(len(elements) / tissue, 3) if tissue else None,
        'score': score_summary(scores),
        'model': attributes.get('model'),
        'cellrcnn_version': attributes.get(MARKER),
        'roi': list(params['roi']) if isinstance(params.get('roi'), (list, tuple)) else None,
        'annotation_id': str(annotation['_id']),
        'date': _iso(annotation.get('updated') or annotation.get('created')),
    }


def record(annotation):
    """Put a just-saved nuclei annotation's summary on its item (``model.annotation.save.after``)."""
    if annotation.get('_active') is False or annotation.get('annotation', {}).get('elements') is None:
        return None  # a save without its elements (access or metadata changes): nothing to recount
    if not is_nuclei_result(annotation):
        return None
    item = Item().load(annotation['itemId'], force=True)
    if item is None:
        return None
    return Item().setMetadata(item, {META_KEY: result_summary(annotation)})


def _active_results(item_id):
    """Active cellrcnn nuclei annotations of an item, newest first, without their elements."""
    from girder_large_image_annotation.models.annotation import Annotation

    query = {'itemId': item_id, f'annotation.attributes.{MARKER}': {'$exists': True},
             'annotation.attributes.density': {'$exists': False}, '_active': {'$ne': False}}
    return Annotation().find(query, sort=[('updated', -1)], fields=['_id', 'annotation.attributes', 'updated'])


def resync(item_id):
    """After annotations of an item were deleted: if its metadata described one of them, describe the newest
    remaining nuclei annotation instead, or remove the entry."""
    from girder_large_image_annotation.models.annotation import Annotation

    item = Item().load(item_id, force=True)
    current = ((item or {}).get('meta') or {}).get(META_KEY)
    if not isinstance(current, dict) or not current.get('annotation_id'):
        return item
    query = {'_id': ObjectId(current['annotation_id']), '_active': {'$ne': False}}
    if Annotation().findOne(query, fields=['_id']):
        return item
    for candidate in _active_results(item['_id']):
        annotation = Annotation().load(candidate['_id'], force=True)
        if annotation is not None and is_nuclei_result(annotation):
            return Item().setMetadata(item, {META_KEY: result_summary(annotation)})
    return Item().deleteMetadata(item, [META_KEY])


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


def _whole_slide_result_of(attributes, model):
    params = attributes.get('params') if isinstance(attributes.get('params'), dict) else {}
    return attributes.get('model') == model and not params.get('roi')


def has_result(item, model):
    """Whether a slide's item holds a whole-slide nuclei result of ``model`` (by its metadata, or by any of its
    annotations: one of another model may be newer, or saved before the plugin was installed)."""
    current = (item.get('meta') or {}).get(META_KEY)
    if isinstance(current, dict) and current.get('model') == model and not current.get('roi'):
        return True
    return any(_whole_slide_result_of(a['annotation'].get('attributes') or {}, model)
               for a in _active_results(item['_id']))


def is_slide(item):
    large = item.get('largeImage') or {}
    return bool(large.get('fileId')) and not large.get('expected')


def folder_slides(folder, user, level=AccessType.READ):
    """(path relative to ``folder``, item, folder holding it) of every large-image item in a folder tree that
    ``user`` may access at ``level``, in path order; and the number of subfolders left out for lack of access."""
    slides, denied = [], 0
    todo = [(folder, '')]
    while todo:
        current, prefix = todo.pop()
        for item in Folder().childItems(current, sort=[('lowerName', 1)]):
            if is_slide(item):
                slides.append((prefix + item['name'], item, current))
        subfolders = []
        for sub in Folder().childFolders(current, 'folder', user=user, sort=[('lowerName', 1)]):
            if Folder().hasAccess(sub, user, level):
                subfolders.append((sub, f'{prefix}{sub["name"]}/'))
            else:
                denied += 1
        todo.extend(reversed(subfolders))
    slides.sort(key=lambda entry: entry[0])
    return slides, denied


def table_rows(folder, user):
    """One row (a dict with :data:`COLUMNS`) per slide in the folder tree that ``user`` can read; the result
    columns are None for slides without a result."""
    rows = []
    for path, item, _ in folder_slides(folder, user)[0]:
        result = (item.get('meta') or {}).get(META_KEY)
        result = result if isinstance(result, dict) else {}
        score = result.get('score') if isinstance(result.get('score'), dict) else {}
        rows.append({
            'name': item['name'], 'path': path, 'item_id': str(item['_id']),
            'cells': result.get('cells'), 'tissue_mm2': result.get('tissue_mm2'),
            'cells_per_mm2': result.get('cells_per_mm2'), 'score_mean': score.get('mean'),
            'score_median': score.get('p50'), 'model': result.get('model'),
            'cellrcnn_version': result.get('cellrcnn_version'),
            'roi': ','.join(str(v) for v in result['roi']) if result.get('roi') else None,
            'annotation_id': result.get('annotation_id'), 'date': result.get('date'),
        })
    return rows


def table_csv(rows):
    """The rows as CSV text with a header line; empty cells for missing values."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: '' if row[k] is None else row[k] for k in COLUMNS})
    return out.getvalue()
