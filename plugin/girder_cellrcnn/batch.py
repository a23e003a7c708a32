"""CellDetection on every slide of a folder tree: one parent Girder job, one slicer_cli_web job per slide.

The parent is a local job (girder_jobs) of type :data:`JOB_TYPE`. Its function starts a thread that creates each
slide's job through slicer_cli_web's own run handler (``genHandlerToRunDockerCLI(...).subHandler``: the same job
HistomicsUI's *Submit* makes, queued for girder_worker), the way slicer_cli_web's own batch runs do. Each child job
records its slide (``cellrcnnSlide``) and its parent (``parentId``); as the children change status the parent's
progress counts the slides done, and when every child has ended it ends: success when all did, error otherwise.

Slides that already hold a whole-slide result of the model, or have a CellDetection job of the model still waiting
or running, are skipped: starting again after an interruption picks up where the last run stopped.
"""

import os
import threading

import cherrypy
from girder import events, logger
from girder.constants import AccessType
from girder.exceptions import RestException, ValidationException
from girder.models.setting import Setting
from girder.models.token import Token
from girder.models.user import User
from girder_jobs.constants import JobStatus
from girder_jobs.models.job import Job

from .results import folder_slides, has_result

JOB_TYPE = 'cellrcnn_batch'
CLI_NAME = 'CellDetection'
CLI_CATEGORY = 'cellrcnn'
DEFAULT_MODEL = 'cellrcnn-default.pt'  # the model CellDetection uses when no model file is given
ENDED = {JobStatus.SUCCESS, JobStatus.ERROR, JobStatus.CANCELED}
WAITING_OR_RUNNING = [JobStatus.INACTIVE, JobStatus.QUEUED, JobStatus.RUNNING,
                      820, 821, 822, 823, 824]  # girder_worker's fetching/converting/pushing/canceling


def find_cli(user, cli_id=None):
    """The CellDetection task registered in slicer_cli_web (a ``CLIItem``) that ``user`` may read: the one with id
    ``cli_id``, else the most recently updated one."""
    try:
        from slicer_cli_web.models import CLIItem
    except ImportError:
        raise RestException('slicer_cli_web is not installed on this Girder server', code=500) from None
    from girder.models.item import Item

    if cli_id:
        item = Item().load(cli_id, user=user, level=AccessType.READ, exc=False)
        if item is None or (item.get('meta') or {}).get('slicerCLIType') != 'task':
            raise RestException(f'no slicer_cli_web task with id {cli_id} that you may read')
        return CLIItem(item)
    items = Item().findWithPermissions({'meta.slicerCLIType': 'task', 'name': CLI_NAME,
                                        'meta.category': CLI_CATEGORY}, sort=[('updated', -1)], user=user,
                                       level=AccessType.READ, limit=1)
    for item in items:
        return CLIItem(item)
    raise RestException(f'no {CLI_NAME} task of cellrcnn is registered in slicer_cli_web (or you may not read it): '
                        'an administrator adds the cellrcnn image (docs/deploy.md)')


def model_of(user, model_file_id=None):
    """(model name as results record it, model file id or None for the task's bundled model)."""
    if not model_file_id:
        return DEFAULT_MODEL, None
    from girder.models.file import File

    model_file = File().load(model_file_id, user=user, level=AccessType.READ, exc=False)
    if model_file is None:
        raise RestException(f'no model file {model_file_id} that you may read')
    return model_file['name'], str(model_file['_id'])


def active_job(file_id, model_file_id):
    """A CellDetection job of this model on this slide file that is still waiting or running, or None."""
    query = {'_original_name': CLI_NAME, '_original_params.inputImageFile': str(file_id),
             'status': {'$in': WAITING_OR_RUNNING}}
    if model_file_id:
        query['_original_params.model_file'] = model_file_id
    else:
        query['$or'] = [{'_original_params.model_file': {'$exists': False}}, {'_original_params.model_file': ''}]
    return Job().findOne(query, fields=['_id'])


def plan(folder, user, model, model_file_id):
    """Which slides of the folder tree to run: ``{"slides": [...], "finished": n, "running": n, "total": n,
    "no_write_folders": n}``. Each slide is ``{"itemId", "fileId", "folderId", "name", "path"}``."""
    found, denied = folder_slides(folder, user, level=AccessType.WRITE)
    todo, finished, running = [], 0, 0
    for path, item, parent in found:
        if has_result(item, model):
            finished += 1
        elif active_job(item['largeImage']['fileId'], model_file_id):
            running += 1
        else:
            todo.append({'itemId': str(item['_id']), 'fileId': str(item['largeImage']['fileId']),
                         'folderId': str(parent['_id']), 'name': item['name'], 'path': path})
    return {'slides': todo, 'finished': finished, 'running': running, 'total': len(found),
            'no_write_folders': denied}


def start(folder, user, cli, model, model_file_id, api_url):
    """Create and schedule the parent job; :returns: the job."""
    work = plan(folder, user, model, model_file_id)
    # girder_worker asks this setting for the URL its tasks call back to; outside a request (our thread) it has no
    # other way to know it. slicer_cli_web's own batch runs set it the same way.
    if not Setting().get('worker.api_url'):
        Setting().set('worker.api_url', api_url)
    job = Job().createLocalJob(
        module='girder_cellrcnn.batch', function='run', title=f'Cell detection on folder {folder["name"]}',
        type=JOB_TYPE, user=user, public=False, asynchronous=True,
        kwargs={'folderId': str(folder['_id']), 'cliItemId': str(cli._id), 'model': model,
                'modelFileId': model_file_id, 'slides': work['slides']},
        otherFields={'cellrcnnBatch': {k: work[k] for k in ('total', 'finished', 'running', 'no_write_folders')}
                     | {'todo': len(work['slides']), 'model': model, 'scheduled': False}})
    skipped = (f'{work["finished"]} already have a result of {model}, {work["running"]} have a {CLI_NAME} job of it '
               f'waiting or running')
    if work['no_write_folders']:
        skipped += f'; {work["no_write_folders"]} subfolders you may not write to were left out'
    job = Job().updateJob(job, log=f'{work["total"]} slides in the folder tree: {skipped}; '
                                   f'{len(work["slides"])} to detect with {model}\n',
                          progressTotal=len(work['slides']), progressCurrent=0)
    Job().scheduleJob(job)
    return job


def run(job):
    """The parent job's function (girder_jobs' local handler): schedule the slides in a thread of their own."""
    thread = threading.Thread(target=_schedule, args=(job,), daemon=True, name=f'cellrcnn-batch-{job["_id"]}')
    thread.start()
    return job, thread


def _schedule(job):
    from slicer_cli_web.models import CLIItem
    from slicer_cli_web.rest_slicer_cli import genHandlerToRunDockerCLI

    kwargs = job['kwargs']
    job = Job().updateJob(job, status=JobStatus.RUNNING)
    scheduled = 0
    try:
        user = User().load(job['userId'], force=True)
        cli = CLIItem.find(kwargs['cliItemId'], user)
        if cli is None:
            raise RestException(f'the {CLI_NAME} task {kwargs["cliItemId"]} is gone')
        handler = genHandlerToRunDockerCLI(cli)
        token = Token().createToken(user=user)
        for slide in kwargs['slides']:
            job = Job().load(job['_id'], force=True)
            if job['status'] in ENDED:
                return  # canceled: schedule no more
            child = _start_child(handler, cli, slide, kwargs['modelFileId'], user, token)
            Job().updateJob(child, otherFields={'parentId': job['_id'], 'cellrcnnSlide': slide['itemId']},
                            notify=False)
            scheduled += 1
            job = Job().updateJob(job, log=f'{scheduled}/{len(kwargs["slides"])}: job {child["_id"]} for '
                                           f'{slide["path"]}\n')
    except Exception as exc:
        logger.exception('cellrcnn batch %s failed', job['_id'])
        Job().updateJob(job, log=f'Stopped after scheduling {scheduled} slides: {exc}\n', status=JobStatus.ERROR)
        return
    Job().updateJob(job, otherFields={'cellrcnnBatch.scheduled': True}, notify=False)
    update_parent(job['_id'])


def _start_child(handler, cli, slide, model_file_id, user, token):
    """The slicer_cli_web job of one slide, as HistomicsUI's Submit makes it."""
    stem = os.path.splitext(slide['name'])[0]
    params = {'inputImageFile': slide['fileId'],
              'outputCellAnnotationFile': f'{stem}-outputCellAnnotationFile.anot',
              'outputCellAnnotationFile_folder': slide['folderId'],
              'outputDensityAnnotationFile': f'{stem}-outputDensityAnnotationFile.anot',
              'outputDensityAnnotationFile_folder': slide['folderId'],
              'girderApiUrl': '', 'girderToken': ''}  # empty: slicer_cli_web fills them in
    if model_file_id:
        params['model_file'] = model_file_id
    # girder_worker tells a Girder request from other code by cherrypy.request.app; this thread is Girder code
    # without a request, as in slicer_cli_web's batch runs, which set it the same way.
    before = cherrypy.request.app
    cherrypy.request.app = 'cellrcnn-batch'
    try:
        return handler.subHandler(cli, params, user, token).job
    finally:
        cherrypy.request.app = before


def update_parent(parent_id):
    """Count the parent's ended children into its progress; end it when every slide's job has ended."""
    parent = Job().load(parent_id, force=True)
    if parent is None or parent.get('type') != JOB_TYPE or parent['status'] in ENDED:
        return
    children = list(Job().find({'parentId': parent['_id']}, fields=['status', 'cellrcnnSlide']))
    ended = [c for c in children if c['status'] in ENDED]
    failed = [c for c in ended if c['status'] != JobStatus.SUCCESS]
    total = parent['cellrcnnBatch']['todo']
    update = {'progressCurrent': len(ended), 'progressTotal': total,
              'progressMessage': f'{len(ended)} of {total} slides done' + (f', {len(failed)} failed' if failed
                                                                          else '')}
    if parent['cellrcnnBatch'].get('scheduled') and len(ended) == len(children):
        update['status'] = JobStatus.ERROR if failed else JobStatus.SUCCESS
        update['log'] = (f'{len(failed)} of {total} slide jobs did not succeed: '
                         f'{", ".join(str(c["_id"]) for c in failed)}\n' if failed
                         else f'All {total} slides done\n')
    try:
        Job().updateJob(parent, **update)
    except ValidationException:
        pass  # the parent's status changed meanwhile (ended by a concurrent update, or canceled)


def on_job_update(event):
    """``jobs.job.update.after``: a slide job of a batch changed; update its parent."""
    job = event.info.get('job') or {}
    if job.get('cellrcnnSlide') and job.get('parentId'):
        try:
            update_parent(job['parentId'])
        except Exception:  # never fail the update of the slide's job (girder_worker's call) over its parent
            logger.exception('cellrcnn: could not update batch job %s', job['parentId'])


def bind():
    events.bind('jobs.job.update.after', 'cellrcnn', on_job_update)
