"""The detection loop over a slide: tissue-aware tiles, read ahead while the model works, merged exactly across seams.

The merged result equals one greedy NMS over every raw detection of every tile (``merge.StreamingNMS``), costs time
linear in the number of detections, and holds only about a tile row of boxes. Finished tile rows are saved by
``resume.RowStore``; tile batches run here or on a Dask cluster (``dask_cluster``).

Units: tiles are cut in analysis pixels; every box leaving this module is in base pixels (``Slide.to_base``).
"""

import resource
import time
from dataclasses import dataclass, field

import numpy as np

from .adapt import batchnorm_stats, load_batchnorm_stats
from .errors import CellRCNNError
from .merge import StreamingNMS
from .progress import Progress
from .resume import RowStore
from .slide import Slide
from .slide_adaptation import adapt_to_slide
from .tiling import prefetch, tile_grid
from .tissue import find_tissue

#: nuclei are at most 15 um across; the merge's spatial hash uses cells of this many analysis px (at 20x).
MAX_NUCLEUS_PX = 64


@dataclass
class SlideDetections:
    """Merged detections of a slide (boxes in base pixels) and what it took to get them."""

    slide: Slide
    boxes: np.ndarray
    scores: np.ndarray
    #: the analysed region in analysis pixels: (x0, y0, x1, y1)
    analysis_bounds: tuple
    stats: dict = field(default_factory=dict)


def detect_slide(slide, detector, *, tile_size, overlap, min_tissue, workers, roi=None, resume_dir=None, key='',
                 progress=None, scheduler=None, adapt_tiles=0):
    """Detect nuclei over a slide (or a base-pixel ROI ``(x, y, w, h)``) with an ``inference.Detector``: tiles of at
    most ``tile_size`` analysis pixels sharing ``overlap`` (``tiling.tile_grid``), those with less tissue than
    ``min_tissue`` skipped, read by ``workers`` threads (``tiling.prefetch``).

    With ``adapt_tiles`` > 0 the model's BatchNorm statistics are first re-estimated on up to that many of the slide's
    own tissue tiles (:func:`adapt_to_slide`), and put back as they were when the slide is done.

    With ``scheduler`` (a dask.distributed address, or ``local:N`` for N local worker processes) batches of tiles
    run on the cluster's workers, each of which rebuilds the detector once from its ``spec`` (with this detector's
    BatchNorm statistics); the merge and the resume files stay here.

    ``detector`` is anything with ``detect_tiles(images) -> [(boxes, scores), ...]`` (tile pixels), ``batch_size``,
    ``device``, ``model`` (a ``model.CellRCNN``) and ``spec``: an ``inference.Detector``, normally.
    ``progress``: a :class:`cellrcnn.progress.Progress` (default: none shown).

    Raw detections of finished tile rows stay in ``resume_dir/<key>/`` (when given; ``resume.RowStore``) until the
    caller has written its outputs and calls ``clear_partial(resume_dir, key)``. Rows of other keys there are neither
    read nor removed; the caller holds the output lock (``resume.output_lock``), so no other run writes them meanwhile.
    """
    started = time.perf_counter()
    coarsest = detector.model.config.fields[-1]  # the model pads tiles to multiples of it; tiles start on it
    if min(slide.size) < coarsest:
        raise CellRCNNError(f'{slide.path} is {slide.size[0]}x{slide.size[1]} px at {slide.magnification:g}x; '
                            f'the model needs at least {coarsest}x{coarsest}')
    tissue = find_tissue(slide)
    tiles = tile_grid(slide, tile_size, overlap, min_tissue, roi=roi, tissue=tissue, align=coarsest)
    mask_seconds = time.perf_counter() - started
    unadapted = batchnorm_stats(detector.model)
    try:
        t0 = time.perf_counter()
        adapted = adapt_to_slide(slide, detector, tiles, adapt_tiles, workers)
        timing = {'adapt': time.perf_counter() - t0, 'read': 0.0, 'detect': 0.0, 'merge': 0.0}
        rows = sorted({t.row for t in tiles})
        row_top = {r: min(t.base_y for t in tiles if t.row == r) for r in rows}
        merger = StreamingNMS(detector.model.config.nms_thresh, MAX_NUCLEUS_PX * slide.scale)
        # rows of this key and grid only; unreadable row files are computed again
        grid = {'rows': [[t.y, t.height] for t in tiles if t.col == 0],
                'cols': [[t.x, t.width] for t in tiles if t.row == 0]}
        store = RowStore(resume_dir, key, grid=grid)
        resumed = {r: done for r, done in store.done_rows().items() if r in row_top}
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
        bar = progress or Progress(mode='none')
        bar.start(len(todo))
        if resumed:
            bar.comment(f'resumed: {len(resumed)} of {len(rows)} tile rows already done')
        raw_count = sum(len(s) for _, s in resumed.values())
        if scheduler:
            from .dask_cluster import dask_batches

            batches = dask_batches(slide, detector, todo, scheduler, timing)
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
        bar.finish()
        boxes = np.concatenate(kept_boxes).reshape(-1, 4)
        scores = np.concatenate(kept_scores)
        order = np.lexsort((boxes[:, 0], boxes[:, 1]))  # reading order: top to bottom, left to right
        result = SlideDetections(slide, boxes[order], scores[order], slide.roi_to_analysis(roi))
        result.stats = _stats(slide, tissue, tiles, todo, resumed, result, timing, mask_seconds,
                              time.perf_counter() - started, detector)
        result.stats['raw_detections'] = raw_count
        result.stats['adapt_tiles'] = len(adapted)
        return result
    finally:
        load_batchnorm_stats(detector.model, unadapted)


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


def _stats(slide, tissue, tiles, read, resumed, result, timing, mask_seconds, total, detector):
    megapixels = sum(t.width * t.height for t in read) / 1e6
    return {
        'slide': slide.path,
        'analysis_magnification': slide.magnification,
        'analysis_mpp': slide.mpp,
        'tiles': len(tiles),
        'tiles_read': len(read),
        'tiles_skipped': sum(t.skipped for t in tiles),
        'tile_rows_resumed': len(resumed),
        'tissue_mm2': tissue.area_mm2(result.analysis_bounds),
        'detections': int(len(result.boxes)),
        'megapixels': megapixels,
        'seconds': {'tissue_and_grid': mask_seconds, **timing, 'total': total},
        'megapixels_per_second': megapixels / total if total else 0.0,
        'device': str(detector.device),
        'batch_size': detector.batch_size,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
