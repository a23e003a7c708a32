"""girder_cellrcnn: cellrcnn's Girder plugin for the Digital Slide Archive.

- When a cellrcnn nuclei annotation is saved on an item (posted, uploaded, ingested from a CellDetection job, or
  edited) by someone who may write to the item, its summary goes into the item's metadata under ``meta.cellrcnn``
  (:mod:`.results`).
- A re-run of the same model (e.g. CellDetection run again from HistomicsUI) updates the earlier result in place,
  which keeps the earlier content as its history, instead of stacking another copy (:mod:`.rerun`).
- ``GET /cellrcnn/folder/{id}/results[?format=csv]``: one row per slide of a folder tree.
- ``POST /cellrcnn/folder/{id}/detect``: CellDetection on every slide of a folder tree without a result of the
  model, as one job (:mod:`.batch`).
- For cellrcnn's client: ``GET /cellrcnn/item/{id}/results`` (which annotations count as results: made by writers)
  and ``POST /cellrcnn/item/{id}/withdrawn`` (a post whose annotations are deleted whenever they land:
  :mod:`.withdrawn`).

- HistomicsUI ingests the task's per-cell-type heatmaps, a file holding a list of documents, which its own ingest
  cannot read (:func:`_repair_list_ingest`).

It needs large_image, large_image_annotation, jobs and slicer_cli_web, and neither torch nor the cellrcnn library.
"""

import importlib

import cherrypy
from bson import ObjectId
from girder import events, logger
from girder.api import access
from girder.constants import AccessType
from girder.plugin import GirderPlugin, getPlugin
from girder_jobs.constants import JobStatus
from girder_jobs.models.job import Job

from . import batch, rerun, results, withdrawn
from .rest import CellRCNNResource

__version__ = '0.1.0'


def _guarded(what):
    """An event handler that logs its failures instead of failing the request that fired it."""
    def wrap(handler):
        def guarded(event):
            try:
                handler(event)
            except Exception:
                logger.exception('cellrcnn: could not %s', what)
        return guarded
    return wrap


@_guarded('check whether a saved annotation belongs to a withdrawn post')
def _refuse_withdrawn(event):
    withdrawn.refuse(event)


@_guarded('update item metadata after saving an annotation')
def _on_annotation_saved(event):
    results.record(event.info)


def _on_annotation_arrived(event):
    try:
        rerun.queue_if_rerun(event.info)
    except Exception:
        logger.exception('cellrcnn: could not check whether an annotation re-runs an earlier one')


# Girder requires administrator access to a route for anyone when a ``rest.*.before`` handler of it declares no
# access level of its own. This one grants and checks nothing (the route's handler checks write access): public.
@access.public
@_guarded('update item metadata after deleting an annotation')
def _before_annotation_delete(event):
    """Note the item of an annotation about to be deleted, for :func:`_after_annotation_delete`."""
    from girder_large_image_annotation.models.annotation import Annotation

    try:
        annotation_id = ObjectId(event.info.get('id'))
    except Exception:
        return  # not an id: the route answers 400 itself
    annotation = Annotation().findOne({'_id': annotation_id}, fields=['itemId'])
    if annotation is not None:  # the item of an annotation about to go: for the after-event
        cherrypy.request.cellrcnn_item = annotation['itemId']


@_guarded('update item metadata after deleting an annotation')
def _after_annotation_delete(event):
    item_id = getattr(cherrypy.request, 'cellrcnn_item', None)
    if item_id is not None:
        results.resync(item_id)


@_guarded("update item metadata after deleting an item's annotations")
def _after_item_annotations_delete(event):
    results.resync(event.info['id'])


@_guarded("update item metadata after deleting a folder's annotations")
def _after_folder_annotations_delete(event):
    results.resync_folder(event.info['id'], str(event.info.get('params', {}).get('recurse')).lower() == 'true')


def _stop_orphaned_batches():
    """Batches whose scheduling thread died with an earlier server process: say so, and end them."""
    for job in Job().find({'type': batch.JOB_TYPE, 'status': {'$in': [JobStatus.INACTIVE, JobStatus.QUEUED,
                                                                      JobStatus.RUNNING]},
                           'cellrcnnBatch.scheduled': False}):
        Job().updateJob(job, log='The server stopped while this job was queueing slides. Start the folder\'s '
                                 'detection again: finished and queued slides are skipped.\n',
                        status=JobStatus.ERROR if job['status'] != JobStatus.INACTIVE else JobStatus.CANCELED)


#: the annotation ingests of uploads (plugin, data.process handler name, module of its process_annotations)
_INGESTS = (('histomicsui', 'histomicsui.annotations', 'histomicsui.handlers'),
            ('large_image_annotation', 'large_image_annotation.annotations', 'girder_large_image_annotation.handlers'))


def _repair_list_ingest():
    """Let HistomicsUI ingest an uploaded ``*AnnotationFile`` that holds a list of annotation documents.

    HistomicsUI's ingest (``histomicsui.handlers.process_annotations``, as of 1.8.1) checks a list with
    ``girder_large_image_annotation.utilsisGeoJSON``, a misspelling of
    ``girder_large_image_annotation.utils.isGeoJSON``: the lookup fails and no document of the file lands.
    CellDetection's per-cell-type heatmaps (``outputClassDensityAnnotationFile``) are such a list. Give the
    misspelt name the function it means, while HistomicsUI still looks it up and large_image has no such name."""
    import girder_large_image_annotation
    from girder_large_image_annotation import utils

    try:
        from histomicsui import handlers
    except ImportError:
        return
    if ('utilsisGeoJSON' in handlers.process_annotations.__code__.co_names
            and not hasattr(girder_large_image_annotation, 'utilsisGeoJSON') and hasattr(utils, 'isGeoJSON')):
        girder_large_image_annotation.utilsisGeoJSON = utils.isGeoJSON


def _note_ingests_first(info):
    """Bind :func:`.results.note_ingest` before the annotation ingests of HistomicsUI and large_image (loading them
    first, so that their handlers are bound, then binding them again after it, in their order), and
    :func:`.results.end_ingest` after them."""
    handlers = []
    for name, handler_name, module in _INGESTS:
        plugin = getPlugin(name)
        if plugin is None:
            continue
        plugin.load(info)
        try:
            handlers.append((handler_name, importlib.import_module(module).process_annotations))
        except (ImportError, AttributeError):
            logger.warning('cellrcnn: no annotation ingest in %s', module)
    for handler_name, _ in handlers:
        events.unbind('data.process', handler_name)
    events.bind('data.process', 'cellrcnn.ingest', results.note_ingest)
    for handler_name, handler in handlers:
        events.bind('data.process', handler_name, handler)
    events.bind('data.process', 'cellrcnn.ingest_done', results.end_ingest)


class CellRCNNPlugin(GirderPlugin):
    DISPLAY_NAME = 'cellrcnn'

    def load(self, info):
        for name in ('jobs', 'large_image', 'large_image_annotation', 'slicer_cli_web'):
            getPlugin(name).load(info)
        info['apiRoot'].cellrcnn = CellRCNNResource()
        Job().exposeFields(level=AccessType.READ, fields={'cellrcnnBatch', 'cellrcnnSlide'})
        events.bind('model.annotation.save.after', 'cellrcnn.withdrawn', _refuse_withdrawn)  # before the others
        events.bind('model.annotation.save.after', 'cellrcnn', _on_annotation_saved)
        events.bind('model.annotation.save.after', 'cellrcnn.rerun', _on_annotation_arrived)
        events.bind('rest.delete.annotation/:id.before', 'cellrcnn', _before_annotation_delete)
        events.bind('rest.delete.annotation/:id.after', 'cellrcnn', _after_annotation_delete)
        events.bind('rest.delete.annotation/item/:id.after', 'cellrcnn', _after_item_annotations_delete)
        events.bind('rest.delete.annotation/folder/:id.after', 'cellrcnn', _after_folder_annotations_delete)
        batch.bind()
        rerun.bind()
        withdrawn.bind()
        _note_ingests_first(info)
        _repair_list_ingest()
        _stop_orphaned_batches()
