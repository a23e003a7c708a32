"""CellDetection on every slide of a folder tree: one parent Girder job, one slicer_cli_web job per slide.

The parent is a local job (girder_jobs) of type :data:`JOB_TYPE`. Its function starts a thread that creates each
slide's job through slicer_cli_web's own run handler (``genHandlerToRunDockerCLI(...).subHandler``: the same job
HistomicsUI's *Submit* makes, queued for girder_worker), the way slicer_cli_web's own batch runs do. Each child job
records its slide (``cellrcnnSlide``) and its parent (``parentId``); as the children change status the parent's
progress counts the slides done, and when every child has ended it ends: success when all did, error otherwise.
Cancelling the parent cancels the children that have not ended (:func:`on_cancel`).

With a region annotation name (``regionAnnotation``) each slide is counted inside its annotations of that name: the
batch reads the areas they outline when it queues the slide (``results.slide_region``, :mod:`.regions`) and gives
the child job them as its region to analyse (``analysis_roi``) with the name (``region_annotation``), which the
result records: the task needs no access to Girder. Slides without such an annotation are left out and counted,
those whose annotation cannot be counted (no area, holes) are named in the log, and a slide is finished when it
holds a result of the model inside them saved since they last changed (``results.has_result``).

Slides that already hold a whole-slide result of the model, or have a CellDetection job of the model still waiting
or running (of a user who may write to the slide: only such a user's result counts), are skipped: starting again
after an interruption picks up where the last run stopped. A run may set the task's parameters that change what is
counted (:mod:`.run_choices`: the score threshold, the magnification, the cell types kept, the views per tile,
tissue out of focus left out, green and blue areas kept as tissue); only a result or a job made with the same
choices, the others at the task's defaults, counts. A model file is identified by the SHA-256 of its bytes
(:mod:`.model_files`), the bundled model by its name.

Scale: the request only checks and creates the parent job. Its thread hashes the model, walks the folder tree and
queues the slides; the job document holds the counts, not the list of slides (a document is limited to 16 MB).

Trust: the task run is one an administrator registered (:func:`trusted_task`), never an item any user may create;
the callback address is the administrator's ``worker.api_url`` setting, never taken from a request; the token that
queues the slides' jobs lives for a day at most and is deleted as soon as they are queued.
"""

import json
import os
import threading

import cherrypy
from girder import events, logger
from girder.api.rest import setCurrentUser
from girder.constants import AccessType
from girder.exceptions import RestException, ValidationException
from girder.models.folder import Folder
from girder.models.item import Item
from girder.models.setting import Setting
from girder.models.token import Token
from girder.models.user import User
from girder.settings import SettingDefault
from girder.utility import setting_utilities
from girder_jobs.constants import JobStatus
from girder_jobs.models.job import Job

from . import run_choices
from .model_files import model_sha256
from .regions import RegionError
from .results import (
    LABEL_IMAGES_FOLDER,
    LABEL_IMAGES_META,
    META_KEY,
    cached_user,
    folder_slides,
    has_result,
    is_label_images_folder,
    may_write,
    slide_region,
)

JOB_TYPE = 'cellrcnn_batch'
CLI_NAME = 'CellDetection'
#: the task's outputs a slide's job writes into the slide's folder: the nuclei, their map and pixelmap (what a whole
#: slide's result opens on, ``--display auto``), the density heatmap and the tissue outline
OUTPUTS = ('outputCellAnnotationFile', 'outputNucleiMapAnnotationFile', 'outputNucleiPixelmapAnnotationFile',
           'outputDensityAnnotationFile', 'outputTissueAnnotationFile')
#: the label image the pixelmap draws: an item of its own, written into the slide folder's subfolder of label images
#: (``results.LABEL_IMAGES_FOLDER``), where no folder run or results table takes it for a slide
LABEL_IMAGE_OUTPUT = ('outputNucleiLabelImage', '.tiff')
CLI_CATEGORY = 'cellrcnn'
#: admin-only plugin setting: the id of the slicer_cli_web task item folder-wide detection runs (default: the most
#: recently updated CellDetection task an administrator registered through slicer_cli_web)
TASK_SETTING = 'cellrcnn.task_item'
API_URL_SETTING = 'worker.api_url'
#: the slides whose region annotation cannot be counted that a batch's log names, one line each
UNUSABLE_SHOWN = 20
#: the longest name of a region annotation a folder run takes
REGION_NAME_MAX_CHARS = 200
TOKEN_DAYS = 1  # the batch's token only queues the slides' jobs (girder_worker gives each job its own)
ENDED = {JobStatus.SUCCESS, JobStatus.ERROR, JobStatus.CANCELED}
WAITING_OR_RUNNING = [JobStatus.INACTIVE, JobStatus.QUEUED, JobStatus.RUNNING,
                      820, 821, 822, 823, 824]  # girder_worker's fetching/converting/pushing/canceling

SettingDefault.defaults[TASK_SETTING] = None


@setting_utilities.validator(TASK_SETTING)
def _validate_task_setting(doc):
    if doc['value'] in (None, ''):
        doc['value'] = None
        return
    item = Item().load(doc['value'], force=True, exc=False)
    if item is None or (item.get('meta') or {}).get('slicerCLIType') != 'task':
        raise ValidationException(f'{TASK_SETTING} must be the id of a slicer_cli_web task item', 'value')
    doc['value'] = str(item['_id'])


def _is_admin(user_id, users):
    user = cached_user(user_id, users)
    return bool(user and user.get('admin'))


def only_admins_write(folder, users=None):
    """Whether no one but site administrators may write to a folder (and so change the items in it): every user
    entry of its access list with write access or more is an administrator, and so is every member of every group
    entry with it."""
    users = {} if users is None else users
    access = folder.get('access') or {}
    for entry in access.get('users') or ():
        if entry.get('level', -1) >= AccessType.WRITE and not _is_admin(entry.get('id'), users):
            return False
    for entry in access.get('groups') or ():
        if entry.get('level', -1) >= AccessType.WRITE and User().findOne(
                {'groups': entry.get('id'), 'admin': {'$ne': True}}, fields=['_id']):
            return False
    return True


def registered_by_admin(item, users=None):
    """Whether a task item is where and as slicer_cli_web's admin-only ``PUT /slicer_cli_web/docker_image`` puts
    it: made by an administrator, in a tag folder (``meta.slicerCLIType`` "tag") of an image folder ("image") that
    an administrator made, and no one but administrators may change it (write to its folder)."""
    users = {} if users is None else users
    if (item.get('meta') or {}).get('slicerCLIType') != 'task' or not _is_admin(item.get('creatorId'), users):
        return False
    tag = Folder().load(item['folderId'], force=True, exc=False)
    if (tag is None or (tag.get('meta') or {}).get('slicerCLIType') != 'tag' or tag.get('parentCollection') != 'folder'
            or not _is_admin(tag.get('creatorId'), users) or not only_admins_write(tag, users)):
        return False
    image = Folder().load(tag['parentId'], force=True, exc=False)
    return image is not None and (image.get('meta') or {}).get('slicerCLIType') == 'image'


def trusted_task(item):
    """Whether folder-wide detection may run this task item: the one an administrator named in the
    :data:`TASK_SETTING` setting, or one an administrator registered through slicer_cli_web
    (:func:`registered_by_admin`)."""
    named = Setting().get(TASK_SETTING)
    if named and str(item['_id']) == str(named):
        return (item.get('meta') or {}).get('slicerCLIType') == 'task'
    return registered_by_admin(item)


def find_cli(user, cli_id=None):
    """The CellDetection task registered in slicer_cli_web (a ``CLIItem``) that ``user`` may read and that an
    administrator registered (:func:`trusted_task`): the one with id ``cli_id``, else the one the
    :data:`TASK_SETTING` setting names, else the most recently updated one."""
    try:
        from slicer_cli_web.models import CLIItem
    except ImportError:
        raise RestException('slicer_cli_web is not installed on this Girder server', code=500) from None

    if cli_id:
        item = Item().load(cli_id, user=user, level=AccessType.READ, exc=False)
        if item is None or (item.get('meta') or {}).get('slicerCLIType') != 'task':
            raise RestException(f'no slicer_cli_web task with id {cli_id} that you may read')
        if not trusted_task(item):
            raise RestException(f'the slicer_cli_web task {cli_id} was not registered by an administrator '
                                f'(PUT /slicer_cli_web/docker_image) nor named in the {TASK_SETTING} setting: '
                                'folder-wide detection runs only those', code=403)
        if item['name'] != CLI_NAME:
            raise RestException(f'the slicer_cli_web task {cli_id} is {item["name"]}, not {CLI_NAME}')
        return CLIItem(item)
    named = Setting().get(TASK_SETTING)
    if named:
        item = Item().load(named, user=user, level=AccessType.READ, exc=False)
        if item is None or not trusted_task(item):
            raise RestException(f'the {CLI_NAME} task {named} that the {TASK_SETTING} setting names is gone or you '
                                'may not read it: ask an administrator')
        return CLIItem(item)
    items = Item().findWithPermissions({'meta.slicerCLIType': 'task', 'name': CLI_NAME,
                                        'meta.category': CLI_CATEGORY}, sort=[('updated', -1)], user=user,
                                       level=AccessType.READ)
    for item in items:
        if trusted_task(item):
            return CLIItem(item)
    raise RestException(f'no {CLI_NAME} task of cellrcnn that an administrator registered in slicer_cli_web (or you '
                        'may not read it): an administrator adds the cellrcnn image (docs/deploy.md)')


def require_worker_api_url():
    """The ``worker.api_url`` setting: the address girder_worker's tasks call back to with their tokens. Only an
    administrator sets it; a request never does (its Host header is the caller's to choose)."""
    url = Setting().get(API_URL_SETTING)
    if not url:
        raise RestException(f'this server\'s {API_URL_SETTING} setting is not set, so its jobs would not know where '
                            'to send their results: an administrator sets it to the Girder API URL that the '
                            'workers reach (Admin console > Plugins > Worker, or PUT /system/setting with key '
                            f'{API_URL_SETTING}, e.g. https://dsa.example.org/api/v1)', code=503)
    return url


def active_job(item, model_file_id, region_annotation=None, choices=None, users=None):
    """A CellDetection job of this model on this slide's file (counting inside its annotations named
    ``region_annotation``, when given; made with ``choices``, :mod:`.run_choices`) that is still waiting or running,
    or None. Only a job of a user who may write to the item counts, as only such a user's result does
    (:func:`.results.from_writer`): a reader's run of the slide is no reason to leave it out. ``users``: a dict
    caching users by id."""
    users = {} if users is None else users
    query = {'_original_name': CLI_NAME, '_original_params.inputImageFile': str(item['largeImage']['fileId']),
             'status': {'$in': WAITING_OR_RUNNING}}
    if region_annotation:
        query['_original_params.region_annotation'] = region_annotation
    if model_file_id:
        query['_original_params.model_file'] = model_file_id
    else:
        query['$or'] = [{'_original_params.model_file': {'$exists': False}}, {'_original_params.model_file': ''}]
    for job in Job().find(query, fields=['_id', '_original_params', 'userId']):
        try:  # the parameters as HistomicsUI or a folder run gave them
            if run_choices.of_task(job.get('_original_params') or {}) != (choices or {}):
                continue
        except ValueError:
            continue  # a job the task refuses: not a run of these choices
        if may_write(job.get('userId'), item, users):
            return job
    return None


def plan(folder, user, model, model_file_id, sha=None, region_annotation=None, choices=None):
    """Which slides of the folder tree to run: ``{"slides": [...], "finished": n, "running": n, "total": n,
    "no_write_folders": n, "no_region": n, "unusable_regions": [line, ...]}``. Each slide is ``{"itemId",
    "fileId", "folderId", "name", "path", "region"}``, its region the numbers of :func:`results.slide_region`.
    With ``region_annotation`` each slide is counted inside its annotations of that name that ``user`` may read;
    a slide without one is left out (``no_region``), one with a result of the model inside them saved since they
    last changed is finished (``results.has_result``). A slide is finished, or running, only by a result or a job
    made with ``choices`` (:mod:`.run_choices`)."""
    found, denied = folder_slides(folder, user, level=AccessType.WRITE)
    todo, finished, running, no_region, unusable, users = [], 0, 0, 0, [], {}
    for path, item, parent in found:
        region = values = None
        if region_annotation:
            try:
                found_region = slide_region(item, user, region_annotation)
            except RegionError as exc:
                unusable.append(f'{path}: its annotation {region_annotation!r} {exc}')
                continue
            if found_region is None:
                no_region += 1
                continue
            values, since = found_region
            region = (region_annotation, since)
        if has_result(item, model, sha, region, choices):
            finished += 1
        elif active_job(item, model_file_id, region_annotation, choices, users):
            running += 1
        else:
            todo.append({'itemId': str(item['_id']), 'fileId': str(item['largeImage']['fileId']),
                         'folderId': str(parent['_id']), 'name': item['name'], 'path': path, 'region': values})
    return {'slides': todo, 'finished': finished, 'running': running, 'total': len(found),
            'no_write_folders': denied, 'no_region': no_region, 'unusable_regions': unusable}


def start(folder, user, cli, model, model_file_id, region_annotation=None, choices=None):
    """Create and schedule the parent job; :returns: the job. Its thread (:func:`_schedule`) hashes the model, walks
    the folder tree and queues the slides: the request does none of that, and the job document holds no list of
    slides, whatever the folder's size. ``choices``: the task's parameters each slide's job is made with
    (:mod:`.run_choices`; None: the task's defaults). girder_worker's tasks call back to the ``worker.api_url`` setting
    (:func:`require_worker_api_url`): outside a request (our thread) it has no other way to know the address, and
    this plugin never sets it."""
    require_worker_api_url()
    job = Job().createLocalJob(
        module='girder_cellrcnn.batch', function='run', title=f'Cell detection on folder {folder["name"]}',
        type=JOB_TYPE, user=user, public=False, asynchronous=True,
        kwargs={'folderId': str(folder['_id']), 'cliItemId': str(cli._id), 'model': model,
                'modelFileId': model_file_id, 'regionAnnotation': region_annotation, 'choices': choices or {}},
        otherFields={'cellrcnnBatch': {'model': model, 'scheduled': False,
                                       **({'region_annotation': region_annotation} if region_annotation else {}),
                                       **({'choices': choices} if choices else {})}})
    Job().scheduleJob(job)
    return job


def _record_plan(job, work, model, sha, region_annotation=None, choices=None):
    """Put the plan's counts on the batch job (``cellrcnnBatch``, its log and its progress)."""
    inside = f' inside their annotation {region_annotation!r}' if region_annotation else ''
    if choices:
        inside += f' with {run_choices.describe(choices)}'
    skipped = (f'{work["finished"]} already have a result of {model}{inside}, {work["running"]} have a {CLI_NAME} '
               f'job of it waiting or running')
    unusable = work['unusable_regions']
    if region_annotation:
        skipped += f', {work["no_region"]} have no annotation named {region_annotation!r}'
        if unusable:
            skipped += f', {len(unusable)} have one that cannot be counted'
    if work['no_write_folders']:
        skipped += f'; {work["no_write_folders"]} subfolders you may not write to were left out'
    counts = {k: work[k] for k in ('total', 'finished', 'running', 'no_write_folders')}
    if region_annotation:
        counts.update(no_region=work['no_region'], unusable_region=len(unusable))
    shown = unusable[:UNUSABLE_SHOWN] + ([f'... and {len(unusable) - UNUSABLE_SHOWN} more'] if len(unusable) >
                                         UNUSABLE_SHOWN else [])
    return Job().updateJob(job, log=f'{work["total"]} slides in the folder tree: {skipped}; '
                                    f'{len(work["slides"])} to detect with {model}{inside}\n' +
                                    ''.join(f'left out: {line}\n' for line in shown),
                           progressTotal=len(work['slides']), progressCurrent=0,
                           otherFields={f'cellrcnnBatch.{k}': v for k, v in
                                        {**counts, 'todo': len(work['slides']), 'model_sha256': sha}.items()})


def run(job):
    """The parent job's function (girder_jobs' local handler): schedule the slides in a thread of their own."""
    thread = threading.Thread(target=_schedule, args=(job,), daemon=True, name=f'cellrcnn-batch-{job["_id"]}')
    thread.start()
    return job, thread


def _schedule(job):
    from slicer_cli_web.models import CLIItem
    from slicer_cli_web.rest_slicer_cli import genHandlerToRunDockerCLI

    # Girder, slicer_cli_web and girder_worker keep the current user, token and app on cherrypy's request. A thread
    # that serves none shares one default request with every other such thread (the server's events thread, other
    # batches), so this thread takes a request of its own: no other batch's user or token is ever this one's.
    cherrypy.serving.load(cherrypy._cprequest.Request(cherrypy.lib.httputil.Host('127.0.0.1', 80),
                                                      cherrypy.lib.httputil.Host('127.0.0.1', 1111)),
                          cherrypy._cprequest.Response())
    kwargs = job['kwargs']
    job = Job().updateJob(job, status=JobStatus.RUNNING)
    scheduled = 0
    token = None
    try:
        user = User().load(job['userId'], force=True)
        setCurrentUser(user)
        cli = CLIItem.find(kwargs['cliItemId'], user)
        if cli is None:
            raise RestException(f'the {CLI_NAME} task {kwargs["cliItemId"]} is gone')
        if not trusted_task(cli.item):  # checked again: the task may have changed since the request
            raise RestException(f'the {CLI_NAME} task {kwargs["cliItemId"]} is no longer one an administrator '
                                'registered')
        folder = Folder().load(kwargs['folderId'], user=user, level=AccessType.WRITE, exc=False)
        if folder is None:
            raise RestException(f'the folder {kwargs["folderId"]} is gone, or you may no longer write to it')
        sha = model_sha256(kwargs['modelFileId'])
        region_annotation, choices = kwargs.get('regionAnnotation'), kwargs.get('choices') or {}
        work = plan(folder, user, kwargs['model'], kwargs['modelFileId'], sha, region_annotation, choices)
        job = _record_plan(job, work, kwargs['model'], sha, region_annotation, choices)
        handler = genHandlerToRunDockerCLI(cli)
        # The current token of the scheduling below: slicer_cli_web's run handler reads the user from it and
        # girder_worker mints each job's own token then. It is needed only while queueing, so it lives a day at
        # most and is deleted as soon as the slides are queued (or queueing stops).
        token = Token().createToken(user=user, days=TOKEN_DAYS)
        for slide in work['slides']:
            if _ended(job):
                return  # canceled: schedule no more
            child = _start_child(handler, cli, slide, kwargs['modelFileId'], user, token,
                                 region_annotation and (region_annotation, slide['region']), choices)
            Job().updateJob(child, otherFields={'parentId': job['_id'], 'cellrcnnSlide': slide['itemId']},
                            notify=False)
            if _ended(job):  # canceled while this slide was queued, perhaps too late for on_cancel to see it
                _cancel(child)
                return
            scheduled += 1
            job = Job().updateJob(job, log=f'{scheduled}/{len(work["slides"])}: job {child["_id"]} for '
                                           f'{slide["path"]}\n')
    except Exception as exc:
        logger.exception('cellrcnn batch %s failed', job['_id'])
        _revoke(token)
        token = None
        Job().updateJob(job, log=f'Stopped after scheduling {scheduled} slides: {exc}\n', status=JobStatus.ERROR)
        return
    finally:
        _revoke(token)
    update_parent(job['_id'], scheduled=True)


def _ended(job):
    return Job().load(job['_id'], force=True, fields=['status'])['status'] in ENDED


def on_cancel(event):
    """``jobs.cancel``: cancelling a batch cancels its slides' jobs that have not ended. The batch is marked canceled
    first and its children are listed after: a child that its scheduling thread queues meanwhile is either listed
    here, or the thread, which looks at the batch's status after giving the child its parent, cancels it."""
    job = event.info
    if job.get('type') != JOB_TYPE:
        return
    event.preventDefault()  # this handler sets the status, before it looks for children
    if job['status'] not in ENDED:
        Job().updateJob(job, status=JobStatus.CANCELED)
    for child in Job().find({'parentId': job['_id'], 'status': {'$nin': sorted(ENDED)}}):
        _cancel(child)


def _cancel(child):
    """Cancel a slide's job (girder_worker marks a queued one canceling and revokes its task); a failure is logged
    and leaves the other slides' jobs to be cancelled."""
    try:
        Job().cancelJob(child)
    except Exception:
        logger.exception('cellrcnn: could not cancel slide job %s', child['_id'])


def _revoke(token):
    if token is not None:
        try:
            Token().remove(token)
        except Exception:
            logger.exception('cellrcnn: could not delete a batch token')


def _start_child(handler, cli, slide, model_file_id, user, token, region=None, choices=None):
    """The slicer_cli_web job of one slide, as HistomicsUI's Submit makes it; with ``region`` (the name of the
    slide's annotations and the region numbers they outline), counting inside them: the job gets the numbers as
    its region to analyse, and the name, which the result records; with ``choices``, the task's parameters that make
    them (:mod:`.run_choices`)."""
    stem = os.path.splitext(slide['name'])[0]
    params = {'inputImageFile': slide['fileId'], 'girderApiUrl': '', 'girderToken': ''}  # slicer_cli_web fills these
    for output in OUTPUTS:
        params.update({output: f'{stem}-{output}.anot', f'{output}_folder': slide['folderId']})
    output, extension = LABEL_IMAGE_OUTPUT
    params.update({output: f'{stem}-{output}{extension}', f'{output}_folder': label_images_folder(slide, user)})
    if model_file_id:
        params['model_file'] = model_file_id
    if region:
        params.update({'region_annotation': region[0], 'analysis_roi': json.dumps(region[1])})
    params.update(run_choices.task_params(choices or {}))
    # girder_worker tells a Girder request from other code by cherrypy.request.app; this thread is Girder code
    # serving no request (its request is its own, :func:`_schedule`), as in slicer_cli_web's batch runs, which set
    # it the same way.
    before = cherrypy.request.app
    cherrypy.request.app = 'cellrcnn-batch'
    try:
        return handler.subHandler(cli, params, user, token).job
    finally:
        cherrypy.request.app = before


def label_images_folder(slide, user):
    """The id of the slide folder's subfolder of label images (:data:`results.LABEL_IMAGES_FOLDER`), made with the
    slide folder's access and marked when it is not there yet. The user must be able to write to it (the slide's
    job uploads there as the user)."""
    parent = Folder().load(slide['folderId'], user=user, level=AccessType.WRITE)
    folder = Folder().createFolder(parent, LABEL_IMAGES_FOLDER, parentType='folder', creator=user,
                                   reuseExisting=True)
    Folder().requireAccess(folder, user, AccessType.WRITE)
    if not is_label_images_folder(folder):
        folder = Folder().setMetadata(folder, {META_KEY: {LABEL_IMAGES_META: True}})
    return str(folder['_id'])


def update_parent(parent_id, scheduled=False):
    """Count the parent's ended children into its progress; end it when every slide's job has ended.
    ``scheduled``: the parent's thread has queued every slide (recorded in the same update)."""
    parent = Job().load(parent_id, force=True)
    if parent is None or parent.get('type') != JOB_TYPE or parent['status'] in ENDED:
        return
    children = list(Job().find({'parentId': parent['_id']}, fields=['status', 'cellrcnnSlide']))
    ended = [c for c in children if c['status'] in ENDED]
    failed = [c for c in ended if c['status'] != JobStatus.SUCCESS]
    total = parent['cellrcnnBatch'].get('todo', 0)
    update = {'progressCurrent': len(ended), 'progressTotal': total,
              'progressMessage': f'{len(ended)} of {total} slides done' + (f', {len(failed)} failed' if failed
                                                                          else '')}
    if scheduled:
        update['otherFields'] = {'cellrcnnBatch.scheduled': True}
    if (scheduled or parent['cellrcnnBatch'].get('scheduled')) and len(ended) == len(children):
        update['status'] = JobStatus.ERROR if failed else JobStatus.SUCCESS
        update['log'] = (f'{len(failed)} of {total} slide jobs did not succeed: '
                         f'{", ".join(str(c["_id"]) for c in failed)}\n' if failed
                         else f'All {total} slides done\n')
    try:
        Job().updateJob(parent, **update)
    except ValidationException:
        pass  # the parent's status changed meanwhile (ended by a concurrent update, or canceled)


_status_changes = threading.local()  # per thread: {slide job id: its new status} between the two job events


def _pending():
    if not hasattr(_status_changes, 'jobs'):
        _status_changes.jobs = {}
    return _status_changes.jobs


def _status(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def before_job_update(event):
    """``jobs.job.update``: note a slide job of a batch whose status is about to change (log lines and progress
    of the slide's job leave its parent alone)."""
    job = event.info.get('job') or {}
    status = (event.info.get('params') or {}).get('status')
    if job.get('cellrcnnSlide') and job.get('parentId') and status is not None and _status(status) != job.get(
            'status'):
        _pending()[str(job['_id'])] = _status(status)


def on_job_update(event):
    """``jobs.job.update.after``: a slide job of a batch changed status; update its parent."""
    job = event.info.get('job') or {}
    if not (job.get('cellrcnnSlide') and job.get('parentId')):
        return
    if _pending().pop(str(job.get('_id')), None) is None:
        return  # not a change of status: the parent's counts stay as they are
    try:
        update_parent(job['parentId'])
    except Exception:  # never fail the update of the slide's job (girder_worker's call) over its parent
        logger.exception('cellrcnn: could not update batch job %s', job['parentId'])


def bind():
    events.bind('jobs.job.update', 'cellrcnn', before_job_update)
    events.bind('jobs.job.update.after', 'cellrcnn', on_job_update)
    events.bind('jobs.cancel', 'cellrcnn', on_cancel)
