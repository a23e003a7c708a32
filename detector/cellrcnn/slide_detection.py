"""The detection loop over a slide: tissue-aware tiles, read ahead while the model works, merged exactly across seams.

The merged result equals one greedy NMS over every raw detection of every tile (``merge.StreamingNMS``), costs time
linear in the number of detections, and holds only about a tile row of boxes (:class:`TileRows`); the model's
suppression by centre distance (``ModelConfig.centre_distance_um``) then runs once over the merged nuclei, as it runs
over each image that is detected whole. Finished tile rows are saved to the run's ``resume.RowStore``; tile batches
run here or on a Dask cluster (``dask_cluster``).

Units: tiles are cut in analysis pixels; every box leaving this module is in base pixels (``Slide.to_base``).
"""

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .adapt import batchnorm_stats, load_batchnorm_stats
from .boxes import box_centres, suppress_close_centres
from .errors import CellRCNNError
from .focus import NO_PATCHES, mark_blurred, patch_blur
from .merge import StreamingNMS
from .progress import Progress
from .region import inside, polygon_pixels
from .slide import Slide
from .slide_adaptation import adapt_to_slide, slide_stain
from .tiling import prefetch, tile_grid
from .tissue import TissueMask, find_tissue

if TYPE_CHECKING:  # a hint only: the loop runs any detector-like object (see detect_slide)
    from .inference import Detector
    from .resume import RowStore
    from .tiling import Tile

#: nuclei are at most 15 um across; the merge's spatial hash uses cells of this many analysis px (at 20x).
MAX_NUCLEUS_PX = 64


#: a nucleus's cell type on its way through the merge and the resume rows (``StreamingNMS.add``'s ``extra``): its index
#: into ``ModelConfig.cell_types`` and that type's probability
CELL_TYPE = np.dtype([('index', np.int64), ('score', np.float32)])


@dataclass
class SlideDetections:
    """Merged detections of a slide (boxes in base pixels) and what it took to get them. For a model with cell types,
    each nucleus's type (an index into ``cell_type_names``) and its probability; else those are None and ()."""

    slide: Slide
    boxes: np.ndarray
    scores: np.ndarray
    #: the analysed region in analysis pixels: (x0, y0, x1, y1)
    analysis_bounds: tuple
    stats: dict = field(default_factory=dict)
    #: int64 N: each nucleus's cell type, an index into ``cell_type_names`` (None: a model without cell types)
    cell_types: np.ndarray | None = None
    #: float32 N: the probability of that type
    cell_type_scores: np.ndarray | None = None
    #: the types reported, in the model's order: all of the model's, or those a ``classes`` filter keeps
    cell_type_names: tuple = ()
    #: their ``#rrggbb`` display colours (``ModelConfig.cell_type_colors``)
    cell_type_colors: tuple = ()
    #: where the slide's tissue and marks (black fill, pen ink) are (None: not known)
    tissue: TissueMask | None = None
    #: the polygons the region was cut to (base-pixel points; None: the whole slide or a rectangle)
    polygons: tuple | None = None

    def type_counts(self) -> dict[str, int]:
        """``{type name: nuclei}`` in the model's order; empty for a model without cell types."""
        if self.cell_types is None:
            return {}
        counts = np.bincount(self.cell_types, minlength=len(self.cell_type_names))
        return {name: int(n) for name, n in zip(self.cell_type_names, counts)}

    def keep(self, which: np.ndarray) -> None:
        """Keep only the nuclei where the boolean N array ``which`` is True (their types too)."""
        self.boxes, self.scores = self.boxes[which], self.scores[which]
        if self.cell_types is not None:
            self.cell_types, self.cell_type_scores = self.cell_types[which], self.cell_type_scores[which]


class TileRows:
    """The tile rows of a grid on their way through the merge. Each row's raw detections are held until its last tile
    is in; then, in row order, the row is saved (to ``store``, a ``resume.RowStore``, when given) and the merge is
    promised that no more boxes come above the next row (``StreamingNMS.complete_up_to``), which lets it give up the
    boxes it keeps there. With ``typed`` (a model with cell types) each box carries its :data:`CELL_TYPE` through.
    The blur of each tile's patches (``focus.patch_blur``) is saved with its row and gathered in :attr:`patches`.

    Rows that ``store`` holds from an earlier run of the same key and grid go to the merge first, from their raw
    detections, and are not read again: :attr:`todo` is the tiles left to read (skipped tiles are never read). A saved
    row without cell types in a typed run (or with them in an untyped one), or without its patches' blur, is read
    again."""

    def __init__(self, tiles: 'list[Tile]', merger: StreamingNMS, store: 'RowStore | None' = None,
                 typed: bool = False):
        self.merger, self.store, self.typed = merger, store, typed
        self.rows = sorted({t.row for t in tiles})
        self.top = {r: min(t.base_y for t in tiles if t.row == r) for r in self.rows}
        # rows of this grid only; unreadable row files are computed again
        grid = {'rows': [[t.y, t.height] for t in tiles if t.col == 0],
                'cols': [[t.x, t.width] for t in tiles if t.row == 0]}
        done = store.open(grid) if store is not None else {}
        self.resumed = {r: row for r, row in done.items() if r in self.top and _row_fits(row, typed)}
        self.todo = [t for t in tiles if t.row not in self.resumed and not t.skipped]
        self.unread = dict.fromkeys(self.rows, 0)
        for t in self.todo:
            self.unread[t.row] += 1
        self.raw = {r: ([], [], [], []) for r in self.rows}
        self.raw_count = sum(len(row[1]) for row in self.resumed.values())
        self.kept = ([], [], [])  # boxes, scores, cell types of the closed rows
        #: the blur of every patch of the tiles read and resumed (float32 arrays of ``focus.patch_blur``'s rows)
        self.patches = [row[3] for row in self.resumed.values()]
        self.cursor = 0  # rows before it are closed
        for boxes, scores, types, _ in self.resumed.values():
            merger.add(boxes, scores, types)
        self.close_finished()

    def add(self, tile: 'Tile', boxes: np.ndarray, scores: np.ndarray, types: np.ndarray | None,
            patches: np.ndarray) -> None:
        """A tile's raw detections: float32 boxes in base pixels, their scores and (``typed``) :data:`CELL_TYPE`s;
        and the blur of its patches (``focus.patch_blur``)."""
        self.raw_count += len(scores)
        self.merger.add(boxes, scores, types)
        for held, part in zip(self.raw[tile.row], (boxes, scores, types, patches)):
            held.append(part)
        self.patches.append(patches)
        self.unread[tile.row] -= 1

    def close_finished(self):
        """Close, in row order, the rows with every tile in: save them and promise the merge they get no more boxes."""
        while self.cursor < len(self.rows) and self.unread[self.rows[self.cursor]] == 0:
            row = self.rows[self.cursor]
            if row not in self.resumed:
                boxes, scores, types, patches = self.raw.pop(row)
                if self.store is not None:
                    self.store.save(row, np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                                    np.concatenate(scores) if scores else np.zeros(0, np.float32),
                                    self._types(types), np.concatenate([NO_PATCHES, *patches]))
            self.cursor += 1
            if self.cursor < len(self.rows):
                self._keep(self.merger.complete_up_to(self.top[self.rows[self.cursor]]))

    def finish(self) -> tuple:
        """``(boxes N x 4, scores N, CELL_TYPEs N or None)``: every detection the merge keeps, once every row is in."""
        self._keep(self.merger.finish())
        boxes, scores, types = self.kept
        return np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores), self._types(types)

    def _keep(self, kept):
        for held, part in zip(self.kept, kept):
            held.append(part)

    def _types(self, parts):
        """The :data:`CELL_TYPE`s of ``parts`` (None where the merge had none to give) as one array; None untyped."""
        if not self.typed:
            return None
        return np.concatenate([np.zeros(0, CELL_TYPE)] + [p for p in parts if p is not None])


def _row_fits(row, typed):
    """Whether a saved row (``RowStore.open``'s) has its patches' blur, and cell types (None: none) that a run
    with(out) cell types merges."""
    types, patches = row[2], row[3]
    fits = types is not None and types.dtype == CELL_TYPE if typed else types is None
    return fits and patches is not None


def detect_slide(slide: Slide, detector: 'Detector', *, tile_size: int, overlap: int, min_tissue: float, workers: int,
                 roi: tuple | None = None, resume: 'RowStore | None' = None, progress: Progress | None = None,
                 scheduler: str | None = None, adapt_tiles: int = 0,
                 keep_types: tuple | None = None, polygons: tuple | None = None, ink: bool = True,
                 leave_out_of_focus: bool = False) -> SlideDetections:
    """Detect nuclei over a slide (or a base-pixel ROI ``(x, y, w, h)``) with an ``inference.Detector``: tiles of at
    most ``tile_size`` analysis pixels sharing ``overlap`` (``tiling.tile_grid``), those with less tissue than
    ``min_tissue`` skipped, read by ``workers`` threads (``tiling.prefetch``). A ROI is read in the whole slide's
    tiles that reach into it, cut to it grown by ``overlap`` (``tile_grid``'s ``slide_grid``), and the nuclei
    centred in it are kept: a region's nuclei are the slide's there. With ``polygons`` (base-pixel points; ``roi``
    their bounding box) the tissue is cut to them too and only nuclei centred inside one are kept
    (:mod:`cellrcnn.region`). ``ink``: large green or blue areas are pen ink, left out (``tissue.find_tissue``).
    ``leave_out_of_focus``: the tissue out of focus (``focus.mark_blurred``, known once its tiles are read) is left out
    of the result's tissue (``TissueMask.without_blurred``) and the nuclei centred on it are dropped, after the merge
    and any ``keep_types`` filter; ``stats['detections_out_of_focus']`` then counts those dropped.

    With ``adapt_tiles`` > 0 the model's BatchNorm statistics are first re-estimated on up to that many of the slide's
    own tissue tiles (:func:`adapt_to_slide`), and put back as they were when the slide is done.

    With ``scheduler`` (a dask.distributed address, or ``local:N`` for N local worker processes) batches of tiles
    run on the cluster's workers, each of which rebuilds the detector once from its ``spec`` (with this detector's
    BatchNorm statistics); the merge and the resume files stay here.

    ``detector`` is anything with ``detect_tiles_with_types(images, parts=True, stain=...) -> [{'boxes', 'scores',
    ...}, ...]`` (tile pixels), ``batch_size``, ``device``, ``views``, ``normaliser`` (None: no stain statistics are
    read), ``model`` (a ``model.CellRCNN``) and ``spec``: an ``inference.Detector``, normally. A model with a stain
    reference sees every tile normalised from the slide's stain (``slide_adaptation.slide_stain``). For a model with
    cell types (``model.config.cell_types``) each kept nucleus keeps the type and probability of its own raw
    detection; ``keep_types`` (indices into those types, in their order; None: all) keeps only nuclei of those types,
    after the merge, and the result reports only them (``SlideDetections.cell_type_names``, ``stats['cell_types']``:
    ``{name: count}``).
    ``progress``: a :class:`cellrcnn.progress.Progress` (default: none shown).

    ``resume``: the run's ``resume.RowStore`` (None: nothing is kept). The loop opens it for its tile grid, merges the
    rows it holds instead of reading them again, and saves each row it finishes; the rows stay until the caller has
    written its outputs and clears them (``RowStore.clear``). The caller holds the output lock
    (``resume.output_lock``), so no other run writes them meanwhile.
    """
    started = time.perf_counter()
    coarsest = detector.model.config.fields[-1]  # the model pads tiles to multiples of it; tiles start on it
    if min(slide.size) < coarsest:
        raise CellRCNNError(f'{slide.path} is {slide.size[0]}x{slide.size[1]} px at {slide.magnification:g}x; '
                            f'the model needs at least {coarsest}x{coarsest}')
    tissue = whole = find_tissue(slide, ink=ink)
    if polygons:
        tissue = whole.within(polygon_pixels(polygons, whole.mask.shape, whole.fx, whole.fy, slide.scale))
    tiles = tile_grid(slide, tile_size, overlap, min_tissue, roi=roi, tissue=tissue, align=coarsest,
                      slide_grid=roi is not None)
    mask_seconds = time.perf_counter() - started
    unadapted = batchnorm_stats(detector.model)
    try:
        t0 = time.perf_counter()
        stain = slide_stain(slide, detector, whole, workers)
        adapted = adapt_to_slide(slide, detector, tiles, adapt_tiles, workers, stain)
        timing = {'adapt': time.perf_counter() - t0, 'read': 0.0, 'detect': 0.0, 'merge': 0.0}
        config = detector.model.config
        rows = TileRows(tiles, StreamingNMS(config.nms_thresh, MAX_NUCLEUS_PX * slide.scale), resume,
                        typed=bool(config.cell_types))
        boxes, scores, types = _detect_rows(slide, detector, rows, workers, scheduler, timing, progress, stain,
                                            tissue)
        tissue = mark_blurred(tissue, np.concatenate([NO_PATCHES, *rows.patches]))
        t0 = time.perf_counter()
        keep = suppress_close_centres(boxes, scores, config.centre_distance_px * slide.scale)
        suppressed = int(len(keep) - keep.sum())
        if roi is not None:  # the region's tiles reach past it (``tile_grid``'s slide_grid)
            keep &= _centred_in(boxes, roi, polygons)
        boxes, scores, types = boxes[keep], scores[keep], None if types is None else types[keep]
        timing['merge'] += time.perf_counter() - t0
        order = np.lexsort((boxes[:, 0], boxes[:, 1]))  # reading order: top to bottom, left to right
        result = SlideDetections(slide, boxes[order], scores[order], slide.roi_to_analysis(roi), tissue=tissue,
                                 polygons=polygons)
        if types is not None:
            _add_cell_types(result, types[order], config, keep_types)
        on_blurred = tissue.on_blurred(*(box_centres(result.boxes) / slide.scale).T)
        if leave_out_of_focus:
            result.keep(~on_blurred)
            result.tissue = tissue = tissue.without_blurred()
        result.stats = _stats(slide, tissue, tiles, rows, result, timing, mask_seconds,
                              time.perf_counter() - started, detector)
        result.stats['detections_out_of_focus'] = int(on_blurred.sum())
        result.stats['out_of_focus_left_out'] = leave_out_of_focus
        result.stats['raw_detections'] = rows.raw_count
        result.stats['centre_suppressed'] = suppressed
        result.stats['adapt_tiles'] = len(adapted)
        if stain is not None:
            result.stats['stain'] = {'lab_mean': list(stain.mean), 'lab_std': list(stain.std)}
        if types is not None:
            result.stats['cell_types'] = result.type_counts()
        return result
    finally:
        load_batchnorm_stats(detector.model, unadapted)


def _centred_in(boxes, roi, polygons):
    """Which base-pixel boxes are centred in the region: the rectangle ``roi`` (x, y, width, height) and, when
    given, one of the ``polygons``."""
    x, y = box_centres(boxes).T
    found = (x >= roi[0]) & (x < roi[0] + roi[2]) & (y >= roi[1]) & (y < roi[1] + roi[3])
    return found & inside(polygons, x, y) if polygons else found


def _detect_rows(slide, detector, rows, workers, scheduler, timing, progress, stain, tissue):
    """Detect the tiles ``rows`` has left to read, batch by batch, into ``rows``, normalised from the slide's
    ``stain``, leaving out boxes centred on or next to ``tissue``'s marks, black fill and pen ink (a tile that
    reaches the fill's edge finds dark "nuclei" along it); :returns: what the merge kept (``TileRows.finish``)."""
    bar = progress or Progress(mode='none')
    bar.start(len(rows.todo))
    if rows.resumed:
        bar.comment(f'resumed: {len(rows.resumed)} of {len(rows.rows)} tile rows already done')
    if scheduler:
        from .dask_cluster import dask_batches

        batches = dask_batches(slide, detector, rows.todo, scheduler, timing, stain)
    else:
        batches = local_batches(slide, detector, rows.todo, workers, timing, stain)
    for batch, results in batches:
        t0 = time.perf_counter()
        for tile, out in zip(batch, results):
            types = None
            if rows.typed:
                types = np.zeros(len(out['scores']), CELL_TYPE)
                types['index'], types['score'] = out['cell_types'], out['cell_type_scores']
            b = np.asarray(out['boxes']).reshape(-1, 4)
            centres = box_centres(b)
            keep = ~tissue.on_marks(tile.x + centres[:, 0], tile.y + centres[:, 1])
            rows.add(tile, slide.to_base(b[keep], tile).astype(np.float32), np.asarray(out['scores'])[keep],
                     None if types is None else types[keep], out['blur_patches'])
        rows.close_finished()
        timing['merge'] += time.perf_counter() - t0
        bar.update(len(batch))
    kept = rows.finish()
    bar.finish()
    return kept


def local_batches(slide: Slide, detector: 'Detector', todo: 'list[Tile]', workers: int,
                  timing: dict, stain=None) -> Iterator[tuple]:
    """(tiles, results) per batch, in order, reading the next tiles in threads while the model works and measuring
    their blur there (each result's ``blur_patches``: ``focus.patch_blur``); ``stain``: the slide's stain statistics
    (``Detector.detect_tiles_with_types``)."""
    stream = prefetch(slide, todo, workers=workers, queue=max(4, 2 * detector.batch_size),
                      then=lambda tile, image: patch_blur(image, tile.x, tile.y, slide.mpp))
    batch = []
    while True:
        t0 = time.perf_counter()
        item = next(stream, None)
        timing['read'] += time.perf_counter() - t0
        if item is not None:
            batch.append(item)
        if batch and (item is None or len(batch) == detector.batch_size):
            t0 = time.perf_counter()
            results = detector.detect_tiles_with_types([image for _, image, _ in batch], parts=True, stain=stain)
            timing['detect'] += time.perf_counter() - t0
            yield [tile for tile, _, _ in batch], [{**out, 'blur_patches': patches}
                                                   for out, (_, _, patches) in zip(results, batch)]
            batch = []
        if item is None:
            return


def _add_cell_types(result, types, config, keep_types):
    """Give ``result`` its nuclei's cell types (:data:`CELL_TYPE`s, one per box) and the model's names and colours;
    with ``keep_types``, only the nuclei of those types stay, their indices counted among those types only."""
    names, colors = config.cell_types, config.cell_type_colors
    result.cell_types, result.cell_type_scores = types['index'].astype(np.int64), types['score'].astype(np.float32)
    if keep_types is not None:
        result.keep(np.isin(result.cell_types, keep_types))
        renumber = np.zeros(len(names), np.int64)
        renumber[list(keep_types)] = np.arange(len(keep_types))
        result.cell_types = renumber[result.cell_types]
        names, colors = tuple(names[i] for i in keep_types), tuple(colors[i] for i in keep_types)
    result.cell_type_names, result.cell_type_colors = tuple(names), tuple(colors)


def _stats(slide, tissue, tiles, rows, result, timing, mask_seconds, total, detector):
    megapixels = sum(t.width * t.height for t in rows.todo) / 1e6
    return {
        'slide': slide.path,
        'analysis_magnification': slide.magnification,
        'analysis_mpp': slide.mpp,
        'tiles': len(tiles),
        'tiles_read': len(rows.todo),
        'tiles_skipped': sum(t.skipped for t in tiles),
        'tiles_cut': sum(t.cut for t in rows.todo),
        'tile_rows_resumed': len(rows.resumed),
        'tissue_mm2': tissue.area_mm2(result.analysis_bounds),
        'ink_or_fill_mm2': tissue.marks_mm2(result.analysis_bounds),
        'out_of_focus_mm2': tissue.blurred_mm2(result.analysis_bounds),
        'detections': int(len(result.boxes)),
        'megapixels': megapixels,
        'seconds': {'tissue_and_grid': mask_seconds, **timing, 'total': total},
        'megapixels_per_second': megapixels / total if total else 0.0,
        'device': str(detector.device),
        'batch_size': detector.batch_size,
        'views': detector.views,
        'threshold': detector.threshold,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
