"""Cohorts: nucleus detection over every slide of a folder (local, or a Girder folder tree), one result folder per
slide and one table for the whole cohort (``cellrcnn batch``).

- **Slides**: every file under a local folder (recursively; hidden files, the output folder and the files a run
  writes left out) whose extension one of the installed large_image tile sources reads; or every large-image item in
  a Girder folder and its subfolders (``girder_api.folder_slides``), downloaded into ``OUT/.girder-cache/`` (only there:
  ``girder_api.download_path`` and ``download_file``; a server's ids and names never make a path elsewhere) and, once
  its results are written, posted back to its item with ``girder_post.post_annotation_files`` (replacing this model's
  previous result there, as ``cellrcnn detect --girder-url`` does); the downloaded copy is then deleted.
- **One result per slide**: ``OUT/slides/<path of the slide, without its extension>/`` holds what ``cellrcnn
  detect`` writes (``job.output_paths`` and ``job.detect_to_files`` with the same ``DetectionSettings``) and
  ``<stem>.cohort.json``, the slide's table row and the fingerprint of what made it (slide, model, settings),
  written last. A Girder slide's folder is its folders' and its own names, each made one safe path component
  (:func:`cellrcnn.girder_api.safe_name`: a name holding "/" stays one), its own followed by ``-<item id>``, so that
  no two items share one, whatever their names. The per-slide folders live under ``OUT/slides/``, apart from the
  table, so that no slide (one named ``cohort.csv.svs``, say) can take the table's name.
- **Resumable**: a slide whose ``.cohort.json`` has the same fingerprint is not computed again (status
  ``skipped``; from Girder it is posted again only if its post had failed); a slide interrupted half-way resumes
  from its tile rows in ``OUT/slides/.../.<stem>.partial/``. The model is identified by the SHA-256 of its
  checkpoint's bytes (``checkpoint.model_sha256``), not by its name or place: a new ``model.pt`` recomputes every
  slide, the same model copied elsewhere skips them.
- **Regions**: with ``region_annotation`` (``--region-annotation NAME``) each slide is counted inside the areas its
  annotations of that name outline (``region.named_region``): a Girder slide's annotations (``region.girder_region``:
  rectangles, ellipses, circles and closed polygons), a local slide's ImageScope XML or QuPath GeoJSON beside it
  (``region.file_region``), as ``cellrcnn detect --roi`` counts inside polygons, so that a cohort's counts and
  densities are those of the tumour each slide's pathologist drew. The region is part of the fingerprint (a
  redrawn region recomputes) and the note names it; holes are cut out (``region.keyhole``); a slide without such an
  annotation gets a ``no region`` row and nothing else, one whose annotation cannot be counted a ``failed`` row.
  Its results go to ``OUT/slides-inside-NAME/`` and ``OUT/cohort-inside-NAME.csv`` (:func:`output_names`), beside a
  whole-slide run's in the same output folder.
- **Failures stay rows**: a slide that cannot be read, states no magnification, cannot be downloaded or posted,
  ... becomes a ``failed`` row with a one-line reason and the cohort goes on.
- **Scale-out**: with a dask.distributed scheduler (an address, or ``local:N`` for N local processes) each slide's
  detection runs on one of the cluster's workers; without one, one after another here. Downloads from Girder and
  posts to it stay in this process: the Girder token is never sent to the cluster. Workers must see the same file
  system paths (the slides and ``OUT``).

The table ``OUT/cohort.csv`` has one row per slide, in path order (:data:`COLUMNS`); its ``model`` column is the
model's file name, for people; ``magnification``, ``threshold`` and ``views`` are those the slide was analysed with
(the model's own magnification and calibrated threshold unless others were asked for), ``classes`` the cell types
kept (in name order; empty: all) and ``keep_blue_green`` whether large green or blue areas were taken for tissue. For
a model with cell types (its run's ``stats['cell_types']``: ``{name: count}`` in the model's order) each type adds
the columns ``<name>_count``, ``<name>_per_mm2`` (per mm² of tissue) and ``<name>_fraction`` (of the typed nuclei),
and a model with lymphocytes and tumour cells (:data:`LYMPHOCYTE_NAMES`, :data:`TUMOUR_NAMES`)
``lymphocyte_per_tumour`` (empty when it found no tumour cell): :func:`cell_type_columns`. A cohort of models with
different types has every type's columns (:func:`table_columns`), empty where a slide's model lacks the type; a
cohort without cell types has exactly :data:`COLUMNS`. A text cell that a spreadsheet would read as a formula
(starting with ``= + - @``, a tab or a carriage return: a slide named ``=cmd.tiff``, or a cell type ``=x``) is
written with a leading ``'`` (:func:`csv_safe`).
"""

import csv
import dataclasses
import json
import os
import time

from .errors import CellRCNNError, one_line
from .files import atomic_write
from .focus import out_of_focus_noted
from .job import OUTPUT_SUFFIXES, POSTED_OUTPUTS

#: the columns of ``cohort.csv``
COLUMNS = ('slide', 'status', 'note', 'cells', 'tissue_mm2', 'cells_per_mm2', 'ink_or_fill_mm2', 'out_of_focus_mm2',
           'cells_out_of_focus', 'out_of_focus_left_out', 'keep_blue_green', 'mean_score', 'magnification',
           'threshold', 'classes', 'views', 'seconds', 'model', 'girder_item_id', 'output')
TABLE_NAME = 'cohort.csv'
#: the columns of each cell type: ``<name>`` and these (``<name>_type`` and these for a type whose columns would be
#: the table's own, a type named ``cells``)
CELL_TYPE_SUFFIXES = ('_count', '_per_mm2', '_fraction')
#: lymphocytes per tumour cell, the last column of a table with cell types
RATIO_COLUMN = 'lymphocyte_per_tumour'
#: the cell type names (any case) that count as lymphocytes and as tumour cells for :data:`RATIO_COLUMN`
LYMPHOCYTE_NAMES = ('lymphocyte', 'lymphocytes')
TUMOUR_NAMES = ('tumour', 'tumor', 'tumours', 'tumors', 'neoplastic')
#: the per-slide result folders are under ``OUT/SLIDES_FOLDER/``
SLIDES_FOLDER = 'slides'
#: what starts a formula in a spreadsheet
FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')
ROW_SUFFIX = '.cohort.json'
#: the status of a slide that lacks the cohort's region annotation (:func:`batch`'s ``region_annotation``)
NO_REGION = 'no region'
CACHE_NAME = '.girder-cache'


@dataclasses.dataclass
class CohortSlide:
    """One slide of a cohort: the name the table gives it, the local file read (absolute), the folder its results
    go to (absolute, and as the table names it: relative to the output folder), the name of its result files.
    For a Girder slide, ``path`` is where its download goes (inside ``cache``), and ``item_id`` / ``file_id`` /
    ``version`` (``girder_api.folder_slides``) say what it is."""

    name: str
    path: str
    folder: str
    output: str
    stem: str
    item_id: str = None
    file_id: str = None
    version: dict = None
    cache: str = None


@dataclasses.dataclass
class GirderFolder:
    """Where a cohort's slides come from on Girder and where their results go back to."""

    api_url: str
    token: str
    folder_id: str


def slide_extensions():
    """File extensions (lower case, no dot) that the installed large_image tile sources read."""
    from large_image.tilesource import listExtensions

    return {e.lower() for e in listExtensions()}


def _result_folders(relative_paths):
    """``<relative path without extension>`` per slide; two slides that would share one (``a.svs`` and
    ``a.tiff``) keep their extensions instead."""
    bare = [os.path.splitext(p)[0] for p in relative_paths]
    clash = {b for b in bare if bare.count(b) > 1}
    return [p if b in clash else b for p, b in zip(relative_paths, bare)]


def output_names(region_annotation=None):
    """``(slides folder, table name)`` of a cohort in its output folder: :data:`SLIDES_FOLDER` and
    :data:`TABLE_NAME`, or for one counted inside the slides' annotations named NAME ``slides-inside-NAME`` and
    ``cohort-inside-NAME.csv`` (NAME as one safe path component), so that one output folder keeps a whole-slide run's
    results beside a region run's, as a Girder slide keeps both."""
    from .girder_api import safe_name

    if not region_annotation:
        return SLIDES_FOLDER, TABLE_NAME
    suffix = f'-inside-{safe_name(region_annotation)}'
    return SLIDES_FOLDER + suffix, os.path.splitext(TABLE_NAME)[0] + suffix + os.path.splitext(TABLE_NAME)[1]


def local_slides(folder, output, slides_folder=SLIDES_FOLDER):
    """Every slide under ``folder`` (see the module's description), in path order, its results to go under
    ``OUT/slides_folder/``; ``output`` is left out, and so are the files a run writes (its overlay PNG and label
    TIFF are images large_image reads), which lie in the slide folder when ``output`` is it or a folder above it."""
    if not os.path.isdir(folder):
        raise CellRCNNError(f'slide folder not found: {folder}')
    extensions = slide_extensions()
    skip = os.path.realpath(output)
    own = tuple(OUTPUT_SUFFIXES.values())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and os.path.realpath(os.path.join(root, d)) != skip)
        for name in sorted(files):
            if (not name.startswith('.') and not name.endswith(own)
                    and os.path.splitext(name)[1][1:].lower() in extensions):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    found.sort()
    return [CohortSlide(name=os.path.join(folder, rel), path=os.path.abspath(os.path.join(folder, rel)),
                        folder=os.path.abspath(os.path.join(output, slides_folder, result)),
                        output=os.path.join(slides_folder, result), stem=os.path.splitext(os.path.basename(rel))[0])
            for rel, result in zip(found, _result_folders(found))]


def girder_slides(girder, output, slides_folder=SLIDES_FOLDER):
    """Every large-image item in the Girder folder tree, in path order, its results to go under
    ``OUT/slides_folder/``; downloads go to ``OUT/.girder-cache/``."""
    from .girder_api import download_path, folder_slides, safe_name

    cache = os.path.join(os.path.realpath(output), CACHE_NAME)
    slides = []
    for s in folder_slides(girder.api_url, girder.token, girder.folder_id):
        name = safe_name(s['name'])
        result = os.path.join(*map(safe_name, s['folders']), f'{os.path.splitext(name)[0]}-{s["item_id"]}')
        slides.append(CohortSlide(name=s['path'],
                                  path=download_path(cache, s['item_id'], s['file_id'], s['version'], s['name']),
                                  folder=os.path.abspath(os.path.join(output, slides_folder, result)),
                                  output=os.path.join(slides_folder, result), stem=os.path.splitext(name)[0],
                                  item_id=s['item_id'], file_id=s['file_id'], version=s['version'], cache=cache))
    return slides


def fingerprint(slide, settings):
    """What a slide's result depends on: the slide (its Girder file's id and version, or the local file's size and
    time), the model
    (the SHA-256 of its checkpoint's bytes, whatever its name and folder) and the settings'
    :class:`cellrcnn.settings.ResultSettings` as asked for."""
    from .inference import DetectorSpec
    from .resume import run_key

    return run_key(['girder', slide.file_id, slide.version] if slide.file_id else slide.path,
                   DetectorSpec.from_settings(settings).model_path, settings.result().identity())


def _read_done(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_done(path, record):
    with atomic_write(path, 'slide record') as f:
        json.dump(record, f, indent=2)


def _first_named(names, wanted):
    return next((n for n in names if n.strip().lower() in wanted), None)


def cell_type_columns(counts, tissue_mm2):
    """The cell-type columns of a slide's row (name: value; none for ``counts`` None or empty, a model without
    cell types) from its run's ``stats['cell_types']`` (``{name: count}``) and tissue area."""
    if not counts:
        return {}
    total = sum(counts.values())
    row = {}
    for name, count in counts.items():
        stem = f'{name}_type' if any(name + suffix in COLUMNS for suffix in CELL_TYPE_SUFFIXES) else name
        row.update(zip((stem + suffix for suffix in CELL_TYPE_SUFFIXES),
                       (count, round(count / tissue_mm2, 1) if tissue_mm2 > 0 else '',
                        round(count / total, 4) if total else '')))
    lymphocyte, tumour = _first_named(counts, LYMPHOCYTE_NAMES), _first_named(counts, TUMOUR_NAMES)
    if lymphocyte is not None and tumour is not None:
        row[RATIO_COLUMN] = round(counts[lymphocyte] / counts[tumour], 3) if counts[tumour] else ''
    return row


def _row(slide, result, settings, seconds):
    import numpy as np

    from .inference import DetectorSpec

    stats = result.stats
    cells, tissue = int(stats['detections']), float(stats['tissue_mm2'])
    resumed = stats.get('tile_rows_resumed', 0)
    return {'slide': slide.name, 'status': 'done',
            'note': f'resumed {resumed} tile rows of an interrupted run' if resumed else '',
            'cells': cells, 'tissue_mm2': round(tissue, 4),
            'cells_per_mm2': round(cells / tissue, 1) if tissue > 0 else '',
            'ink_or_fill_mm2': round(float(stats.get('ink_or_fill_mm2', 0.0)), 4),
            'out_of_focus_mm2': round(float(stats['out_of_focus_mm2']), 4),
            'cells_out_of_focus': int(stats['detections_out_of_focus']),
            'out_of_focus_left_out': bool(stats['out_of_focus_left_out']), 'keep_blue_green': settings.keep_blue_green,
            'mean_score': round(float(np.mean(result.scores)), 4) if len(result.scores) else '',
            'magnification': round(float(stats['analysis_magnification']), 3),
            'threshold': round(float(stats['threshold']), 4), 'classes': ','.join(settings.classes or ()),
            'views': stats['views'], 'seconds': round(seconds, 2),
            'model': os.path.basename(DetectorSpec.from_settings(settings).model_path),
            'girder_item_id': slide.item_id or '', 'output': slide.output,
            **cell_type_columns(stats.get('cell_types'), tissue)}


def process_slide(slide, settings, girder=None, detect=None, region_annotation=None):
    """Detect nuclei in one slide of a cohort unless an earlier run did; post its results (nuclei, map, density and,
    for a model with cell types, the per-type densities) to its Girder item when it came from one.
    ``detect(slide, paths, settings)`` is the detection step (default :func:`detect_row`, here); a Dask run passes
    one that runs it on a worker, so the Girder token never leaves this process. :returns: its table row (a dict of
    :data:`COLUMNS` and :func:`cell_type_columns`); problems with the slide, its files or the server become a
    ``failed`` row, not an exception."""
    from .job import output_paths

    started = time.perf_counter()
    base = {**dict.fromkeys(COLUMNS, ''), 'slide': slide.name, 'girder_item_id': slide.item_id or '',
            'output': slide.output}
    try:
        if not slide.item_id and not os.path.isfile(slide.path):
            raise CellRCNNError(f'slide not found: {slide.path}')
        if region_annotation:
            from .region import named_region
            region, base['note'] = named_region(region_annotation, slide.path, *(
                (girder.api_url, girder.token, slide.item_id, slide.name) if slide.item_id else ()))
            if region is None:
                return {**base, 'status': NO_REGION}
            settings = dataclasses.replace(settings, **region)
        paths = output_paths(slide.folder, slide.stem)
        done_path = os.path.join(slide.folder, slide.stem + ROW_SUFFIX)
        key = fingerprint(slide, settings)
        earlier = _read_done(done_path)
        earlier = earlier if earlier and earlier.get('fingerprint') == key else None
        if earlier and (not slide.item_id or earlier.get('posted')):
            return {**base, **earlier['row'], 'status': 'skipped',
                    'note': _notes(base['note'], 'done by an earlier run')}
        if earlier:  # detected by an earlier run whose post failed: only post
            row, note = earlier['row'], 'results of an earlier run'
        else:
            if slide.item_id:  # a download of this version that an earlier run left is used again
                from .girder_api import download_file
                download_file(girder.api_url, girder.token, slide.file_id, slide.path, slide.cache)
            row = {**(detect or detect_row)(slide, paths, settings),
                   'seconds': round(time.perf_counter() - started, 2)}
            note = row['note']
            _write_done(done_path, {'fingerprint': key, 'posted': False, 'row': row})
        if slide.item_id:
            from .girder_post import post_annotation_files
            try:
                posted = post_annotation_files(girder.api_url, girder.token, slide.item_id,
                                               [paths[key] for key in POSTED_OUTPUTS])
            except CellRCNNError as exc:
                raise CellRCNNError(f'results written to {slide.folder}, but posting them failed: {exc}') from None
            _write_done(done_path, {'fingerprint': key, 'posted': [r['_id'] for r in posted], 'row': row})
            note = _notes(note, f'posted to item {slide.item_id}')
            _remove_download(slide)
        return {**base, **row, 'status': 'done', 'note': _notes(base['note'], note)}
    except (CellRCNNError, OSError, MemoryError) as exc:  # one slide's failure is its row's; the cohort goes on
        # (anything else is a bug in cellrcnn, or a lost Dask worker: it is not hidden in a row here)
        try:
            os.rmdir(slide.folder)  # left only if empty: a slide that could not be read leaves no folder
        except OSError:
            pass
        return {**base, 'status': 'failed', 'note': one_line(exc),
                'seconds': round(time.perf_counter() - started, 2)}


def _notes(*notes):
    return '; '.join(n for n in notes if n)


def detect_row(slide, paths, settings):
    """The detection step of :func:`process_slide` (here, or on a Dask worker; it needs no Girder token): detect
    nuclei in the slide's file, write the outputs ``paths``. :returns: its table row."""
    from .job import detect_to_files

    started = time.perf_counter()
    result = detect_to_files(slide.path, paths, settings,
                             resume_dir=os.path.join(slide.folder, f'.{slide.stem}.partial'))
    return _row(slide, result, settings, time.perf_counter() - started)


def _remove_download(slide):
    """Delete a Girder slide's download once its results are posted: only a file inside the run's own cache, with no
    link on the way, is ever deleted."""
    from .girder_api import inside

    if inside(slide.path, slide.cache):
        try:
            os.remove(slide.path)
        except OSError:
            pass


def _lost_row(slide, exc):
    return {**dict.fromkeys(COLUMNS, ''), 'slide': slide.name, 'status': 'failed', 'output': slide.output,
            'note': f'lost on the Dask cluster: {one_line(exc)}', 'girder_item_id': slide.item_id or ''}


def run_cohort(slides, settings, scheduler=None, girder=None, region_annotation=None):
    """Every slide of the cohort through :func:`process_slide`: here one after another, or spread over a
    dask.distributed cluster (``scheduler``: an address, or ``local:N``). With a cluster, each slide's
    :func:`detect_row` runs on a worker while its checks, download and post run here, one thread per worker thread:
    the workers get slides, settings and paths, never the Girder token.
    :returns: an iterator of ``(index in slides, row)`` in the order the slides finish."""
    settings = dataclasses.replace(settings, progress='none')
    if not scheduler:
        for i, slide in enumerate(slides):
            yield i, process_slide(slide, settings, girder, region_annotation=region_annotation)
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    from .dask_cluster import close_dask, connect_dask

    # what losing a worker looks like; process_slide itself turns every problem of a slide into a row, so anything
    # else from a future is a bug in cellrcnn, raised with its traceback
    lost = (KilledWorker, CommClosedError, FutureCancelledError, TimeoutError, OSError, MemoryError)

    client = connect_dask(scheduler)

    def on_worker(slide, paths, settings):
        return client.submit(detect_row, slide, paths, settings, pure=False).result()

    threads = ThreadPoolExecutor(max(1, sum(client.nthreads().values())))
    try:
        futures = {threads.submit(process_slide, slide, settings, girder, on_worker, region_annotation): i
                   for i, slide in enumerate(slides)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                row = future.result()
            except lost as exc:  # the worker died (out of memory, killed, ...)
                row = _lost_row(slides[index], exc)
            yield index, row
    finally:  # an interrupted cohort starts no more slides
        threads.shutdown(wait=False, cancel_futures=True)
        close_dask(client, scheduler)


def csv_safe(value):
    """A table cell that no spreadsheet runs as a formula: text starting with ``= + - @``, a tab or a carriage return
    gets a leading ``'`` (OWASP's advice on CSV injection); anything else is left as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def table_columns(rows):
    """The columns of the table of these rows (None: not run yet): :data:`COLUMNS`, then the cell-type columns of
    every row, each once, in the order first met, :data:`RATIO_COLUMN` last."""
    extra = dict.fromkeys(c for r in rows if r is not None for c in r if c not in COLUMNS)
    return COLUMNS + tuple(c for c in extra if c != RATIO_COLUMN) + ((RATIO_COLUMN,) if RATIO_COLUMN in extra else ())


def write_table(rows, path):
    """The cohort table (:func:`table_columns`): one CSV row per slide (rows that are None, not run yet, are left
    out; a row without a cell type's columns has them empty); text cells, the header's too, made :func:`csv_safe`."""
    columns = table_columns(rows)
    with atomic_write(path, 'the cohort table', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval='')
        writer.writerow({c: csv_safe(c) for c in columns})
        writer.writerows({k: csv_safe(v) for k, v in r.items()} for r in rows if r is not None)


def _blurred_words(row):
    """What a row's tissue out of focus was: part of its tissue, or more of it that the run left out."""
    return 'more out of focus, left out' if row.get('out_of_focus_left_out') is True else 'of it out of focus'


def summary_line(rows):
    """One line on the whole cohort: slides by status, nuclei found, per cell type (if any) its nuclei, and how many
    slides had pen ink or black fill left out, and how many had tissue out of focus (at least
    ``focus.OUT_OF_FOCUS_NOTE`` of it), if any."""
    counts = {s: sum(r['status'] == s for r in rows) for s in ('done', 'skipped', 'failed', NO_REGION)}
    found = [r for r in rows if r['status'] in ('done', 'skipped')]
    cells = sum(int(r['cells']) for r in found)
    suffix = CELL_TYPE_SUFFIXES[0]
    types = [f'{sum(int(r.get(c) or 0) for r in found)} {c[:-len(suffix)]}'
             for c in table_columns(rows)[len(COLUMNS):] if c.endswith(suffix)]
    marked = sum(float(r.get('ink_or_fill_mm2') or 0) > 0 for r in found)
    blurred = sum(map(out_of_focus_noted, found))
    without = f', {counts[NO_REGION]} without the region annotation' if counts[NO_REGION] else ''
    return (f'{len(rows)} slides: {counts["done"]} done, {counts["skipped"]} skipped (done by an earlier run), '
            f'{counts["failed"]} failed{without}; {cells} nuclei in all' + (f' ({", ".join(types)})' if types else '')
            + (f'; {marked} with pen ink or black fill left out (ink_or_fill_mm2)' if marked else '')
            + (f'; {blurred} with tissue out of focus (out_of_focus_mm2)' if blurred else ''))


def batch(source, output, settings, scheduler=None, girder=None, progress=None, region_annotation=None):
    """``cellrcnn batch``: find the slides (a local folder ``source``, or a :class:`GirderFolder`), run them, write
    ``OUT/cohort.csv`` (with ``region_annotation``, ``OUT/cohort-inside-NAME.csv``: :func:`output_names`); ``progress``
    (a :class:`cellrcnn.progress.Progress`) is told each finished slide. :returns: the rows. :raises CellRCNNError: when
    the settings, the model or the Girder folder cannot be used, there are no slides, or any slide failed (after the
    table is written)."""
    from .inference import DetectorSpec

    log = progress.log if progress else (lambda line: None)
    settings.validate()
    # a bad checkpoint, override or cell type name fails once, here, not once per slide
    settings.type_indices(DetectorSpec.from_settings(settings).check().cell_types)
    if settings.model:  # Dask workers may run elsewhere than here
        settings = dataclasses.replace(settings, model=os.path.abspath(settings.model))
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        raise CellRCNNError(f'cannot create output folder {output}: {exc.strerror}') from None
    slides_folder, table_name = output_names(region_annotation)
    if girder is not None:
        slides = girder_slides(girder, output, slides_folder)
        where = f'Girder folder {girder.folder_id}'
    else:
        slides = local_slides(source, output, slides_folder)
        where = source
    if not slides:
        raise CellRCNNError(f'no slides found in {where}')
    log(f'{len(slides)} slides in {where}'
        + (f', each counted inside its annotation {region_annotation!r}' if region_annotation else '')
        + (f', spread over the Dask cluster {scheduler}' if scheduler else ''))
    table = os.path.join(output, table_name)
    rows = [None] * len(slides)
    try:
        for count, (index, row) in enumerate(run_cohort(slides, settings, scheduler, girder, region_annotation), 1):
            rows[index] = row
            what = row['note'] if row['status'] in ('failed', NO_REGION) else (
                f'{row["cells"]} nuclei, {row["tissue_mm2"]} mm2'
                + (f' ({row["out_of_focus_mm2"]} mm2 {_blurred_words(row)})' if out_of_focus_noted(row) else '')
                + f', {row["seconds"]} s' + (f' ({row["note"]})' if row['note'] else ''))
            log(f'[{count}/{len(slides)}] {row["slide"]}: {row["status"]}: {what}')
    finally:  # an interrupted cohort still leaves the table of the slides that finished
        write_table(rows, table)
    log(summary_line(rows))
    log(f'table: {table}')
    failed = sum(r['status'] == 'failed' for r in rows)
    if failed:
        raise CellRCNNError(f'{failed} of {len(rows)} slides failed (see the note column of {table})')
    return rows
