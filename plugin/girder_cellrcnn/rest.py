"""The ``/cellrcnn`` REST resource: a folder tree's results table, CellDetection on its slides, and what cellrcnn's
client asks about an item it posts to."""

import itertools
import sys
from collections.abc import Callable, Iterator

from girder.api import access
from girder.api.describe import Description, autoDescribeRoute
from girder.api.rest import Resource, setContentDisposition, setRawResponse, setResponseHeader
from girder.constants import AccessType
from girder.exceptions import RestException
from girder.models.folder import Folder
from girder.models.item import Item
from girder_jobs.models.job import Job

from . import batch, model_files, results, run_choices, withdrawn
from .cell_types import RATIO_KEY, SUFFIXES
from .results import DEFAULT_MODEL, DEFAULT_MODEL_CONFIG
from .table import COLUMNS, table_columns, table_csv_lines, table_rows


def _region_name(value):
    """A ``regionAnnotation`` parameter's name, stripped (None when blank); a 400 when it is too long."""
    name = (value or '').strip() or None
    if name is not None and len(name) > batch.REGION_NAME_MAX_CHARS:
        raise RestException(f'regionAnnotation is at most {batch.REGION_NAME_MAX_CHARS} characters', 400)
    return name


class CellRCNNResource(Resource):
    def __init__(self):
        super().__init__()
        self.resourceName = 'cellrcnn'
        self.route('GET', ('folder', ':id', 'results'), self.results)
        self.route('POST', ('folder', ':id', 'detect'), self.detect)
        self.route('GET', ('item', ':id', 'results'), self.item_results)
        self.route('POST', ('item', ':id', 'withdrawn'), self.withdraw)

    @access.user
    @autoDescribeRoute(
        Description('One row per slide in a folder and its subfolders with its cellrcnn result.')
        .notes('Columns: ' + ', '.join(COLUMNS) + '; then, for results of models with cell types, per type '
               + ', '.join(f'NAME{s}' for s in SUFFIXES) + f', and {RATIO_KEY} (lymphocytes per tumour cell), in '
               'every row and page. Slides without a result have empty result columns. Only '
               'subfolders you may read are included. Rows are in path order; limit and offset page them. The CSV '
               'is streamed, and its text cells that a spreadsheet would take for a formula (starting with = + - @, '
               "a tab or a carriage return) begin with a ' . Each row holds the slide's newest result, or with "
               'wholeSlide or regionAnnotation its newest one of the whole slide or inside that annotation.')
        .modelParam('id', model=Folder, level=AccessType.READ)
        .param('format', 'json (a list of rows) or csv (a download)', required=False, default='json',
               enum=['json', 'csv'])
        .param('wholeSlide', 'Each slide\'s newest whole-slide result', required=False, dataType='boolean',
               default=False)
        .param('regionAnnotation', 'Each slide\'s newest result counted inside its annotations of this name',
               required=False)
        .param('limit', 'At most this many rows (0: all)', required=False, dataType='integer', default=0)
        .param('offset', 'Skip this many rows first', required=False, dataType='integer', default=0)
        .errorResponse('Read access was denied on the folder.', 403)
    )
    def results(self, folder: dict, format: str, wholeSlide: bool, regionAnnotation: str | None, limit: int,
                offset: int) -> list | Callable[[], Iterator[bytes]]:
        if not (0 <= limit <= sys.maxsize and 0 <= offset <= sys.maxsize):
            raise RestException(f'limit and offset must be whole numbers from 0 to {sys.maxsize}')
        name = _region_name(regionAnnotation)
        if name and wholeSlide:
            raise RestException('give wholeSlide or regionAnnotation, not both')
        scope = results.WHOLE_SLIDE if wholeSlide else ('annotation', name) if name else None
        user = self.getCurrentUser()
        columns = table_columns(folder, user, scope)
        stop = min(offset + limit, sys.maxsize) if limit else None
        rows = itertools.islice(table_rows(folder, user, columns, scope), offset, stop)
        if format == 'json':
            return list(rows)
        setResponseHeader('Content-Type', 'text/csv; charset=utf-8')
        setContentDisposition(f'{folder["name"]}-cellrcnn.csv')
        setRawResponse()

        def stream():
            for text in table_csv_lines(rows, columns):
                yield text.encode('utf-8')
        return stream

    @access.user
    @autoDescribeRoute(
        Description('Detect nuclei with CellDetection on every slide of a folder and its subfolders that has no '
                    'result of the model yet.')
        .notes('Starts one job that queues a slicer_cli_web CellDetection job per slide (outputs into the slide\'s '
               'folder, annotations onto the slide) and counts them done. Slides that already hold a whole-slide '
               'result of the model, or have a CellDetection job of it waiting or running, are skipped: one made '
               'with the same choices of threshold, magnification, classes, views, leaveOutOfFocus and keepBlueGreen, '
               'those not given at the task\'s defaults.')
        .modelParam('id', model=Folder, level=AccessType.WRITE)
        .param('model', 'Id of a cellrcnn model file (.pt, as cellrcnn train writes one) to detect with; a file '
               'that is not one is refused. Default: the task\'s bundled model '
               f'({DEFAULT_MODEL})', required=False)
        .param('cli', 'Id of the slicer_cli_web CellDetection task item; default: the one the cellrcnn.task_item '
               'setting names, else the most recently registered one. Only tasks an administrator registered '
               '(PUT /slicer_cli_web/docker_image) or named in that setting are run.', required=False)
        .param('regionAnnotation', 'Count each slide only inside the areas its annotations of this name outline '
               '(rectangles, ellipses, circles, closed polygons, e.g. a tumour a pathologist drew); slides without '
               'one are left out, and a slide is done when it holds a result of the model inside them saved since '
               'they last changed. Default: whole slides.', required=False)
        .param('threshold', 'Keep nuclei scored at least this, 0 to 1 (the task\'s threshold). Default: the '
               f'threshold the model was calibrated with ({DEFAULT_MODEL_CONFIG["threshold"]:g} for the bundled '
               'model); naming a model\'s own threshold or magnification is the same as leaving it out.',
               required=False, dataType='number')
        .param('magnification', 'Analyse the slides at this magnification, above 0 and at most 100 (the task\'s '
               'analysis_mag). Default: the model\'s own (20x for the bundled model).', required=False,
               dataType='number')
        .param('classes', 'For a model with cell types: keep only nuclei of these types, their names separated by '
               f'commas, e.g. lymphocyte,tumour (the task\'s classes; the bundled model\'s are '
               f'{", ".join(DEFAULT_MODEL_CONFIG["cell_types"])}); a name the model lacks is refused. Default: every '
               'nucleus.', required=False)
        .param('views', 'See each tile in this many views, 1, 2, 4 or 8, and fuse what they find (the task\'s '
               'views): more accurate, as many times as long. Default: 1.', required=False, dataType='integer')
        .param('leaveOutOfFocus', 'Leave the tissue that looks out of focus out of the counts, with the nuclei '
               'found on it (the task\'s leave_out_of_focus): counts and densities are of the tissue in focus',
               required=False, dataType='boolean', default=False)
        .param('keepBlueGreen', 'Take large green or blue areas for tissue, not for pen ink (the task\'s '
               'keep_blue_green), for special stains such as Masson\'s trichrome', required=False,
               dataType='boolean', default=False)
        .errorResponse('Write access was denied on the folder, or the task is not one an administrator '
                       'registered.', 403)
        .errorResponse('The worker.api_url setting is not set (an administrator sets it).', 503)
    )
    def detect(self, folder: dict, model: str | None, cli: str | None, regionAnnotation: str | None,
               threshold: float | None, magnification: float | None, classes: str | None, views: int | None,
               leaveOutOfFocus: bool, keepBlueGreen: bool) -> dict:
        try:
            import girder_worker.girder_plugin  # noqa: F401  girder_worker's Girder side: what queues the jobs
        except ImportError:
            raise RestException("girder_worker's Girder plugin is not installed on this server (pip install "
                                "'girder-worker[girder]<5' for Girder 3): slicer_cli_web cannot queue tasks",
                                code=500) from None
        try:
            choices = run_choices.of_task({'threshold': threshold, 'analysis_mag': magnification, 'classes': classes,
                                           'views': views, 'leave_out_of_focus': leaveOutOfFocus,
                                           'keep_blue_green': keepBlueGreen})
        except ValueError as exc:
            raise RestException(str(exc), 400) from None
        batch.require_worker_api_url()
        user = self.getCurrentUser()
        task = batch.find_cli(user, cli)
        model_name, model_file_id, config = model_files.model_of(user, model)
        try:
            choices = run_choices.of_model(choices, config)
        except ValueError as exc:
            raise RestException(str(exc), 400) from None
        job = batch.start(folder, user, task, model_name, model_file_id, _region_name(regionAnnotation), choices)
        return Job().filter(job, user)

    @access.user
    @autoDescribeRoute(
        Description("The ids of the item's annotations that count as cellrcnn results.")
        .notes('Active annotations carrying the cellrcnn marker (nuclei and density) whose creator and last editor '
               "both have write access to the item. cellrcnn's client replaces only these; a look-alike made by "
               'a user who may only read the item is not among them.')
        .modelParam('id', model=Item, level=AccessType.READ)
        .errorResponse('Read access was denied on the item.', 403)
    )
    def item_results(self, item: dict) -> list:
        return results.writers_annotations(item)

    @access.user
    @autoDescribeRoute(
        Description("Withdraw a post of cellrcnn's client from the item: none of its annotations stays, whenever it "
                    'lands.')
        .notes('For an upload whose ingest did not finish in time: annotations carrying attributes.cellrcnn_post '
               'of this post, saved on the item from now on, are deleted as they are saved.')
        .modelParam('id', model=Item, level=AccessType.WRITE)
        .param('post', 'The id of the post (32 lowercase hex digits)')
        .errorResponse('Write access was denied on the item.', 403)
    )
    def withdraw(self, item: dict, post: str) -> dict:
        if not withdrawn.POST_ID.fullmatch(post):
            raise RestException('post must be 32 lowercase hex digits')
        withdrawn.withdraw(item, post)
        return {'withdrawn': post}
