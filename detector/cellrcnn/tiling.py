"""The tile grid over a slide (or a base-pixel region of it), each tile's tissue fraction, and reading the tiles
ahead of the consumer.

A tile has its place twice: ``x, y, width, height`` in analysis pixels (what the model sees) and ``base_*`` in base
pixels (what is read, and where its detections go); see :mod:`cellrcnn.slide` for the two units.

Prefetch
--------
large_image's ``eagerIterator`` (present in 1.35) was evaluated and is not used: it reads in a forked process pool
(at least 2 processes; forking a process that holds CUDA/torch state is unsafe), takes the scale only from the
slide's metadata (no ``--mpp`` override), pads edge tiles instead of placing the last tile flush with the edge,
drops masked tiles (and raises when none are left) instead of reporting them, returns fixed-size shared-memory
batches, and needs ``pykdtree`` (not a dependency) as soon as tiles overlap.  :func:`prefetch` is a small thread
pool instead.
Measured on JPEG TIFFs: large_image's tiff source decodes YCbCr JPEG tiles in libtiff under its per-file lock, so
reads of one slide do not run in parallel with each other; what prefetch buys is reading the next tiles while the
consumer (the GPU) works on the current one, since libtiff (ctypes) releases the GIL.
"""

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CellRCNNError, one_line
from .tissue import TissueMask, find_tissue

if TYPE_CHECKING:
    from .slide import Slide

#: the most tiles a grid may have (about 130 MB of :class:`Tile` objects): counted from the region and the step
#: before any is made, so that a tiny step over a large region is refused instead of filling the memory
MAX_TILES = 250_000


@dataclass
class Tile:
    """One tile of the grid.  ``x, y, width, height`` in analysis pixels (slide coordinates, not ROI-relative);
    ``base_*`` the base-level region read for it (integers, clipped to the slide)."""

    x: int
    y: int
    width: int
    height: int
    row: int
    col: int
    base_x: int
    base_y: int
    base_width: int
    base_height: int
    tissue: float = 1.0
    skipped: bool = False
    index: int = 0
    #: cut to where its little tissue lies (:func:`tile_grid`'s ``min_tissue``)
    cut: bool = False

    def __str__(self):
        return (f'tile row {self.row}, col {self.col} (base x={self.base_x}, y={self.base_y}, '
                f'{self.base_width}x{self.base_height})')


def _spans(origin, length, tile, overlap, align):
    """``[(start, side), ...]``: the fewest tiles of at most ``tile`` pixels that cover [origin, origin + length),
    neighbours sharing at least ``overlap`` pixels, each starting a multiple of ``align`` from the origin; a single
    tile when ``length <= tile``. (When ``tile - overlap`` is not a multiple of ``align``, the step is at most that
    rounded down to one, which can take a tile more than steps of any length would.)

    The tiles shrink to fit: each is ``step + overlap`` pixels, the step the smallest multiple of ``align`` with
    which that many tiles cover the length, and the last one ends at the end. Tiles of the full side stepped by
    ``tile - overlap`` with the last one moved back to the end would share up to a whole tile of pixels read twice
    (docs/performance.md compares the two grids). With every start a
    multiple of ``align`` (the model's coarsest field) from the origin, every tile samples the slide in the same
    phase, so a nucleus that two tiles see gets the same features from both."""
    if length <= tile:
        return [(origin, length)]
    if tile - overlap < align:
        align = 1
    n = -(-(length - overlap) // (tile - overlap))
    step = min(-(-(length - overlap) // (n * align)) * align, (tile - overlap) // align * align)
    n = -(-(length - overlap) // step)
    return [(origin + i * step, min(step + overlap, length - i * step)) for i in range(n)]


def tile_grid(slide: 'Slide', tile_size: int, overlap: int, min_tissue: float, roi: tuple | None = None,
              tissue: TissueMask | None = None, align: int = 1, slide_grid: bool = False) -> list[Tile]:
    """Row-major grid of tiles at analysis scale covering the ROI.

    :param tile_size: the largest tile side in analysis pixels: each axis takes the fewest tiles of that side
        that cover the ROI, shrunk to fit it (:func:`_spans`).
    :param overlap: analysis pixels shared by neighbouring tiles, at least.
    :param min_tissue: a tile whose tissue fraction is below this is cut to where its tissue lies (the mask's
        tissue, grown by ``overlap`` on each side: :func:`_cut_to_tissue`), so that a small piece of tissue alone in
        a tile of glass is read and the glass around it is not; a tile without tissue is marked ``skipped`` (still
        listed). With 0, every tile is read whole.
    :param roi: (x, y, width, height) in base pixels, clipped to the slide; None = the whole slide.
    :param tissue: the slide's :class:`cellrcnn.tissue.TissueMask` (default: found now).
    :param align: tiles start at multiples of this many analysis pixels from the ROI's corner (the model's coarsest
        field), where the tile size and overlap allow.
    :param slide_grid: lay the grid over the whole slide and keep the tiles that reach into the ROI, each cut to
        the ROI grown by ``overlap`` on each side (on its own ``align`` phase), rows and columns numbered from 0: a
        nucleus in the ROI is then seen in the same tiles, at the same phase and with at least ``overlap`` of its
        surroundings, as in the whole slide's grid, so a region's nuclei are the whole slide's there (the
        detection loop keeps those centred in the ROI). Tiles are skipped or cut to their tissue as in the whole
        slide's grid.
    :returns: list of :class:`Tile`; more than :data:`MAX_TILES` is a CellRCNNError.
    """
    tile_size, overlap = int(tile_size), int(overlap)
    if tile_size < 1:
        raise CellRCNNError(f'tile size must be positive, not {tile_size}')
    if not 0 <= overlap < tile_size:
        raise CellRCNNError(f'tile overlap must be at least 0 and below the tile size {tile_size}, not {overlap}')
    if not 0 <= min_tissue <= 1:
        raise CellRCNNError(f'minimum tissue fraction must be between 0 and 1, not {min_tissue}')
    ax0, ay0, ax1, ay1 = slide.roi_to_analysis(roi)
    gx0, gy0, gx1, gy1 = (0, 0, *slide.size) if slide_grid else (ax0, ay0, ax1, ay1)
    xs = [(x, w) for x, w in _spans(gx0, gx1 - gx0, tile_size, overlap, align) if x < ax1 and x + w > ax0]
    ys = [(y, h) for y, h in _spans(gy0, gy1 - gy0, tile_size, overlap, align) if y < ay1 and y + h > ay0]
    if len(xs) * len(ys) > MAX_TILES:
        raise CellRCNNError(f'{len(xs)} x {len(ys)} tiles of {tile_size} px overlapping by {overlap} over '
                            f'{ax1 - ax0}x{ay1 - ay0} analysis px of {slide.path} are more than {MAX_TILES}: use '
                            'larger tiles, less overlap or a region of interest')
    tissue = tissue or find_tissue(slide)
    tiles = []
    for row, (y, h) in enumerate(ys):
        for col, (x, w) in enumerate(xs):
            fraction = tissue.fraction(x, y, w, h)
            tile = Tile(x=x, y=y, width=w, height=h, row=row, col=col, **_base_region(slide, x, y, x + w, y + h),
                        tissue=fraction, skipped=fraction < min_tissue, index=len(tiles))
            tile = _cut_to_tissue(tile, slide, tissue, overlap, align, (gx0, gy0)) if tile.skipped else tile
            if slide_grid:
                tile = _cut_to_region(tile, slide, tissue, (ax0 - overlap, ay0 - overlap, ax1 + overlap,
                                                            ay1 + overlap), align)
            tiles.append(tile)
    return tiles


def _cut_to_region(tile, slide, tissue, bounds, align):
    """A tile cut to the analysis-pixel rectangle ``bounds`` (x0, y0, x1, y1), starting on its own ``align`` phase
    (so that it samples the slide as the whole tile does); its ``skipped`` as it was."""
    if (bounds[0] <= tile.x and bounds[1] <= tile.y and tile.x + tile.width <= bounds[2]
            and tile.y + tile.height <= bounds[3]):
        return tile
    if (bounds[2] <= tile.x or bounds[3] <= tile.y or tile.x + tile.width <= bounds[0]
            or tile.y + tile.height <= bounds[1]):  # a tile cut to its tissue, all of it outside
        return dataclasses.replace(tile, skipped=True)
    return _cut(tile, slide, tissue, bounds, align, (tile.x, tile.y))


def _cut(tile, slide, tissue, bounds, align, origin):
    """``tile`` cut to the analysis-pixel rectangle ``bounds`` (x0, y0, x1, y1), its start moved back onto the
    ``align`` phase from ``origin`` and everything kept within the tile, with its base region and tissue fraction."""
    x0 = max(tile.x, origin[0] + math.floor((bounds[0] - origin[0]) / align) * align)
    y0 = max(tile.y, origin[1] + math.floor((bounds[1] - origin[1]) / align) * align)
    x1 = min(tile.x + tile.width, math.ceil(bounds[2]))
    y1 = min(tile.y + tile.height, math.ceil(bounds[3]))
    return dataclasses.replace(tile, x=x0, y=y0, width=x1 - x0, height=y1 - y0, **_base_region(slide, x0, y0, x1, y1),
                               tissue=tissue.fraction(x0, y0, x1 - x0, y1 - y0))


def _base_region(slide, x0, y0, x1, y1):
    """The base region (``Tile``'s ``base_*``) read for the analysis rectangle [x0, x1) x [y0, y1): times the scale,
    rounded; a rectangle at the slide's right or bottom edge reaches the edge (the analysis size is floor(base /
    scale): the last fraction of a pixel is read too)."""
    s, (W, H) = slide.scale, slide.base_size
    bx0, by0 = int(round(x0 * s)), int(round(y0 * s))
    bx1 = W if x1 >= slide.size[0] else min(W, int(round(x1 * s)))
    by1 = H if y1 >= slide.size[1] else min(H, int(round(y1 * s)))
    return {'base_x': bx0, 'base_y': by0, 'base_width': max(1, bx1 - bx0), 'base_height': max(1, by1 - by0)}


def _cut_to_tissue(tile, slide, tissue, margin, align, origin):
    """A tile with little tissue cut to the tissue's bounding rectangle grown by ``margin`` analysis pixels on each
    side (a nucleus at the mask's smoothed edge stays whole), starting on the grid's ``align`` phase from ``origin``
    and kept within the tile; the tile ``skipped`` when it holds no tissue."""
    found = tissue.bounds(tile.x, tile.y, tile.width, tile.height)
    if found is None:
        return tile
    x0, y0, x1, y1 = found
    return dataclasses.replace(_cut(tile, slide, tissue, (x0 - margin, y0 - margin, x1 + margin, y1 + margin), align,
                                    origin), skipped=False, cut=True)


def prefetch(slide: 'Slide', tiles: Sequence[Tile], workers: int, queue: int = 4,
             skip: bool = True, then=None) -> Iterator[tuple]:
    """Iterate ``(tile, image)`` over ``tiles`` in order, reading ahead in ``workers`` background threads; with
    ``then``, ``(tile, image, then(tile, image))``, ``then`` run in the reader thread too.

    At most ``queue`` images are read ahead of the consumer (memory bound: ``queue`` tiles, plus the one being
    consumed).  ``workers=0`` reads serially in the caller's thread.  Tiles marked ``skipped`` are not read unless
    ``skip=False``.  A failed read raises CellRCNNError (naming the tile) from the iterator at that tile's turn.
    Closing the iterator early (``break``) cancels the reads not started yet.
    """
    workers, queue = int(workers), int(queue)
    if workers < 0:
        raise CellRCNNError(f'reader threads must be 0 or more, not {workers}')
    if queue < 1:
        raise CellRCNNError(f'read-ahead queue must hold at least 1 tile, not {queue}')
    todo = [t for t in tiles if not (skip and t.skipped)]
    return _prefetch(slide, todo, workers, queue, then)


def _prefetch(slide, todo, workers, queue, then):
    if workers == 0:
        for tile in todo:
            yield (tile, *_read_checked(slide, tile, then))
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix='cellrcnn-read')
    pending = collections.deque()
    try:
        it = iter(todo)
        for tile in it:
            pending.append((tile, pool.submit(_read_checked, slide, tile, then)))
            if len(pending) >= queue:
                break
        while pending:
            tile, future = pending.popleft()
            read = future.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_checked, slide, nxt, then)))
            yield (tile, *read)
            del read
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _read_checked(slide, tile, then=None):
    """``(image,)``, or ``(image, then(tile, image))``."""
    try:
        image = slide.read(tile)
    except CellRCNNError:
        raise
    except Exception as exc:  # anything read() did not wrap (e.g. MemoryError)
        raise CellRCNNError(f'cannot read {tile} of {slide.path}: {one_line(exc)}') from None
    return (image,) if then is None else (image, then(tile, image))
