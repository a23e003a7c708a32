"""Whole-slide detection: tissue-aware tiles, read ahead while the model works, merged exactly across seams.

The merged result equals one greedy NMS over every raw detection of every tile (``merge.StreamingNMS``), costs time
linear in the number of detections, and holds only about a tile row of boxes. Raw detections of each finished tile
row are saved under ``resume_dir``; a run that is interrupted and started again with the same slide, model and
settings re-reads them instead of running the model on those rows again.
"""

import hashlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from .adapt import batchnorm_stats, load_batchnorm_stats, reestimate_batchnorm
from .errors import CellRCNNError
from .merge import StreamingNMS
from .progress import Progress
from .slide import Slide, prefetch

#: nuclei are at most 15 um across; the merge's spatial hash uses cells of this many analysis px (at 20x).
MAX_NUCLEUS_PX = 64


@dataclass
class SlideDetections:
    """Merged detections of a slide (boxes in base pixels) and what it took to get them."""

    slide: Slide
    boxes: np.ndarray
    scores: np.ndarray
    roi: tuple
    stats: dict = field(default_factory=dict)


def file_stamp(path):
    """What identifies a file's version for :func:`run_key`: its absolute path, size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        raise CellRCNNError(f'not found: {path}') from None
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def run_key(source, model_path, settings):
    """Identity of a run, for resuming and for skipping finished work: the slide (a path, or any JSON-able
    identity such as a Girder file's), the model file and every setting that changes detections."""
    source = file_stamp(source) if isinstance(source, (str, os.PathLike)) else source
    text = json.dumps([source, file_stamp(model_path), settings], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class RowStore:
    """Raw detections of finished tile rows, one file per row, written atomically."""

    def __init__(self, folder, key):
        self.folder = folder
        self.enabled = folder is not None
        if not self.enabled:
            return
        manifest = os.path.join(folder, 'run.json')
        try:
            if os.path.exists(manifest):
                with open(manifest) as f:
                    if json.load(f).get('key') != key:  # another slide, model or settings: start over
                        shutil.rmtree(folder)
            os.makedirs(folder, exist_ok=True)
            with open(manifest, 'w') as f:
                json.dump({'key': key}, f)
        except (OSError, ValueError) as exc:
            raise CellRCNNError(f'cannot keep partial results in {folder}: {exc}') from None

    def done_rows(self):
        if not self.enabled:
            return {}
        rows = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith('row_') and name.endswith('.npz'):
                with np.load(os.path.join(self.folder, name)) as data:
                    rows[int(name[4:-4])] = (data['boxes'], data['scores'])
        return rows

    def save(self, row, boxes, scores):
        if self.enabled:
            path = os.path.join(self.folder, f'row_{row:05d}.npz')
            with open(path + '.tmp', 'wb') as f:
                np.savez(f, boxes=boxes, scores=scores)
            os.replace(path + '.tmp', path)


def detect_slide(slide, detector, roi=None, tile_size=1024, overlap=64, min_tissue=0.05, workers=2,
                 resume_dir=None, key='', progress='auto', scheduler=None, model_path=None, adapt_tiles=0):
    """Detect nuclei over a slide (or a base-pixel ROI ``(x, y, w, h)``) with an ``inference.Detector``.

    With ``adapt_tiles`` > 0 the model's BatchNorm statistics are first re-estimated on up to that many of the slide's
    own tissue tiles (:func:`adapt_to_slide`), and put back as they were when the slide is done.

    With ``scheduler`` (a dask.distributed address, or ``local:N`` for N local worker processes) batches of tiles
    run on the cluster's workers, each of which opens the slide and loads ``model_path`` once (with this detector's
    BatchNorm statistics, anchor density, thresholds and device); the merge and the resume files stay here.

    ``detector`` is anything with ``detect_tiles(images) -> [(boxes, scores), ...]`` (tile pixels), ``batch_size``,
    ``device`` and ``model`` (a ``model.CellRCNN``): an ``inference.Detector``, normally.

    Raw detections of finished tile rows stay in ``resume_dir`` (when given) until the caller has written its
    outputs and calls ``clear_partial(resume_dir)``.
    """
    started = time.perf_counter()
    if not 0 <= overlap < tile_size:
        raise CellRCNNError(f'overlap must be at least 0 and below the tile size {tile_size}, not {overlap}')
    if not 0 <= min_tissue <= 1:
        raise CellRCNNError(f'minimum tissue fraction must be between 0 and 1, not {min_tissue}')
    if adapt_tiles < 0:
        raise CellRCNNError(f'the number of tiles to adapt to the slide must be 0 (no adaptation) or more, '
                            f'not {adapt_tiles}')
    min_side = 2 ** (detector.model.config.backbone_stages + 1)
    if min(slide.size) < min_side:
        raise CellRCNNError(f'{slide.path} is {slide.size[0]}x{slide.size[1]} px at {slide.magnification:g}x; '
                            f'the model needs at least {min_side}x{min_side}')
    tiles = slide.tiles(tile_size, overlap, roi=roi, min_tissue=min_tissue)
    mask_seconds = time.perf_counter() - started
    unadapted = batchnorm_stats(detector.model)
    try:
        t0 = time.perf_counter()
        adapted = adapt_to_slide(slide, detector, tiles, adapt_tiles, workers)
        timing = {'adapt': time.perf_counter() - t0, 'read': 0.0, 'detect': 0.0, 'merge': 0.0}
        rows = sorted({t.row for t in tiles})
        row_top = {r: min(t.base_y for t in tiles if t.row == r) for r in rows}
        merger = StreamingNMS(detector.model.config.nms_thresh, MAX_NUCLEUS_PX * slide.scale)
        store = RowStore(resume_dir, key)
        resumed = store.done_rows()
        todo = [t for t in tiles if t.row not in resumed and not t.skipped]
        unread = {r: 0 for r in rows}
        for t in todo:
            unread[t.row] += 1
        raw = {r: ([], []) for r in rows}
        for r, (b, s) in resumed.items():  # rows finished by an earlier run: merged again from their raw detections
            merger.add(b, s)
        kept_boxes, kept_scores = [], []
        cursor = 0

        def close_finished_rows():
            """Promise the merge, in row order, that rows with every tile done get no more boxes."""
            nonlocal cursor
            while cursor < len(rows) and unread[rows[cursor]] == 0:
                row = rows[cursor]
                if row not in resumed:
                    boxes, scores = raw.pop(row)
                    store.save(row, np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                               np.concatenate(scores) if scores else np.zeros(0, np.float32))
                cursor += 1
                if cursor < len(rows):
                    b, s, _ = merger.complete_up_to(row_top[rows[cursor]])
                    kept_boxes.append(b)
                    kept_scores.append(s)

        close_finished_rows()
        bar = Progress(len(todo), name='cellrcnn', mode=progress)
        if resumed:
            bar.comment(f'resumed: {len(resumed)} of {len(rows)} tile rows already done')
        raw_count = sum(len(s) for _, s in resumed.values())
        if scheduler:
            batches = dask_batches(slide, detector, todo, scheduler, model_path, timing)
        else:
            batches = local_batches(slide, detector, todo, workers, timing)
        for batch, results in batches:
            t0 = time.perf_counter()
            for tile, (boxes, scores) in zip(batch, results):
                raw_count += len(scores)
                base = slide.to_base(boxes, tile).astype(np.float32)
                merger.add(base, scores)
                raw[tile.row][0].append(base)
                raw[tile.row][1].append(scores)
                unread[tile.row] -= 1
            close_finished_rows()
            timing['merge'] += time.perf_counter() - t0
            bar.update(len(batch))
        b, s, _ = merger.finish()
        kept_boxes.append(b)
        kept_scores.append(s)
        bar.close()
        boxes = np.concatenate(kept_boxes).reshape(-1, 4)
        scores = np.concatenate(kept_scores)
        order = np.lexsort((boxes[:, 0], boxes[:, 1]))  # reading order: top to bottom, left to right
        result = SlideDetections(slide, boxes[order], scores[order], slide.roi_to_analysis(roi))
        result.stats = _stats(slide, tiles, todo, resumed, result, timing, mask_seconds,
                              time.perf_counter() - started, detector)
        result.stats['raw_detections'] = raw_count
        result.stats['adapt_tiles'] = len(adapted)
        return result
    finally:
        load_batchnorm_stats(detector.model, unadapted)


#: adaptation uses this centre crop (analysis px) of each chosen tile, and runs the backbone on this many at a time
#: (as ``train.precise_bn`` does; fixed, so that the detector's batch size does not change the statistics)
ADAPT_CROP = 512
ADAPT_BATCH = 8


def adaptation_tiles(tiles, count):
    """Up to ``count`` tiles of a grid to adapt the model to, always the same for the same grid: of the tiles not
    skipped, those with at least the median tissue fraction (or more tiles, down to the ``count``-th most tissue), so
    that tiles on the tissue's edge do not skew the statistics; of these, ``count`` spread evenly in raster order."""
    candidates = [t for t in tiles if not t.skipped]
    ranked = sorted((t.tissue for t in candidates), reverse=True)
    if not ranked:
        return []
    floor = ranked[min(len(ranked), max(count, (len(ranked) + 1) // 2)) - 1]
    kept = [t for t in candidates if t.tissue >= floor]
    if len(kept) <= count:
        return kept
    return [kept[(2 * i + 1) * len(kept) // (2 * count)] for i in range(count)]


def adapt_to_slide(slide, detector, tiles, count, workers=2):
    """Test-time adaptation (AdaBN): re-estimate the detector's BatchNorm statistics on the centre crops
    (:data:`ADAPT_CROP`) of up to ``count`` tissue tiles of the slide (:func:`adaptation_tiles`), read at the analysis
    magnification. Only the backbone runs. :returns: the tiles used (none: the model is left as it was)."""
    chosen = adaptation_tiles(tiles, count)
    if chosen:
        images = [_centre_crop(image, ADAPT_CROP)
                  for _, image in prefetch(slide, chosen, workers=workers, queue=len(chosen))]
        reestimate_batchnorm(detector.model, images, detector.device, ADAPT_BATCH)
    return chosen


def _centre_crop(image, side):
    y, x = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[y:y + side, x:x + side]


def local_batches(slide, detector, todo, workers, timing):
    """(tiles, results) per batch, in order, reading the next tiles in threads while the model works."""
    stream = prefetch(slide, todo, workers=workers, queue=max(4, 2 * detector.batch_size))
    batch = []
    while True:
        t0 = time.perf_counter()
        item = next(stream, None)
        timing['read'] += time.perf_counter() - t0
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == detector.batch_size):
            t0 = time.perf_counter()
            results = detector.detect_tiles([image for _, image in batch])
            timing['detect'] += time.perf_counter() - t0
            yield [tile for tile, _ in batch], results
            batch = []
        if item is None:
            return


def dask_batches(slide, detector, todo, scheduler, model_path, timing):
    """(tiles, results) per batch, in order, computed on a dask.distributed cluster."""
    if model_path is None:
        raise CellRCNNError('running on a Dask cluster needs the model file, which its workers load')
    client = connect_dask(scheduler)
    model = detector.model
    spec = {'slide': slide.path, 'slide_args': slide.open_args, 'model': os.path.abspath(model_path),
            'device': str(detector.device), 'batch_size': detector.batch_size, 'score_thresh': detector.score_thresh,
            'nms_thresh': model.config.nms_thresh, 'anchor_upsample': model.config.anchor_upsample}
    batchnorm = batchnorm_stats(model)  # as adapted to this slide
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    for name, value in batchnorm.items():
        key.update(name.encode() + value.tobytes())
    spec.update(key=key.hexdigest(), batchnorm=batchnorm)
    batches = [todo[i:i + detector.batch_size] for i in range(0, len(todo), detector.batch_size)]
    try:
        futures = client.map(run_batch_on_worker, batches, spec=spec, pure=False)
        for batch, future in zip(batches, futures):
            t0 = time.perf_counter()
            results = future.result()
            timing['detect'] += time.perf_counter() - t0
            yield batch, results
    finally:
        close_dask(client, scheduler)


def connect_dask(scheduler):
    """A client for a scheduler address, or for a new LocalCluster of N single-threaded processes ('local:N')."""
    from distributed import Client, LocalCluster

    try:
        if scheduler.startswith('local'):
            n = int(scheduler.partition(':')[2] or os.cpu_count())
            return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None))
        return Client(scheduler, timeout='15s')
    except (OSError, TimeoutError, ValueError) as exc:
        raise CellRCNNError(f'cannot reach the Dask scheduler {scheduler!r}: {str(exc).splitlines()[0]}') from None


def close_dask(client, scheduler):
    """Close a client of :func:`connect_dask`, and the local cluster it started for 'local:N'."""
    cluster = client.cluster if scheduler.startswith('local') else None
    client.close()
    if cluster is not None:
        cluster.close()


_WORKER_STATE = {}


def run_batch_on_worker(tiles, spec):
    """On a Dask worker: read and detect a batch of tiles. The slide and the model (as :func:`dask_batches` describes
    it in ``spec``: file, BatchNorm statistics, anchor density, thresholds, device) are set up once per worker and
    spec ``key``."""
    from .checkpoint import load_model
    from .inference import Detector

    key = spec['key']
    if key not in _WORKER_STATE:
        _WORKER_STATE.clear()
        model = load_model(spec['model'])
        model.set_anchor_upsample(spec['anchor_upsample'])
        load_batchnorm_stats(model, spec['batchnorm'])
        model.set_thresholds(nms_thresh=spec['nms_thresh'])
        detector = Detector(model, device=spec['device'], batch_size=spec['batch_size'],
                            score_thresh=spec['score_thresh'])
        _WORKER_STATE[key] = (Slide(spec['slide'], **spec['slide_args']), detector)
    slide, detector = _WORKER_STATE[key]
    return detector.detect_tiles([slide.read(tile) for tile in tiles])


def clear_partial(resume_dir):
    """Remove the saved rows of a finished run."""
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)


def tissue_area_mm2(slide, roi_bounds):
    """Area of tissue inside analysis-pixel bounds (x0, y0, x1, y1), from the slide's tissue mask."""
    mask, factor = slide.tissue_mask()
    x0, y0, x1, y1 = (int(math.floor(v / factor)) for v in roi_bounds)
    inside = mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    return float(inside.sum()) * (factor * slide.mpp / 1000) ** 2


def _stats(slide, tiles, read, resumed, result, timing, mask_seconds, total, detector):
    megapixels = sum(t.width * t.height for t in read) / 1e6
    return {
        'slide': slide.path,
        'analysis_magnification': slide.magnification,
        'analysis_mpp': slide.mpp,
        'tiles': len(tiles),
        'tiles_read': len(read),
        'tiles_skipped': sum(t.skipped for t in tiles),
        'tile_rows_resumed': len(resumed),
        'tissue_mm2': tissue_area_mm2(slide, result.roi),
        'detections': int(len(result.boxes)),
        'megapixels': megapixels,
        'seconds': {'tissue_and_grid': mask_seconds, **timing, 'total': total},
        'megapixels_per_second': megapixels / total if total else 0.0,
        'device': str(detector.device),
        'batch_size': detector.batch_size,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
