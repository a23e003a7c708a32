"""Whole-slide input: open a slide with large_image, find the tissue, cut it into overlapping tiles and read them.

Coordinates
-----------
* **base pixels**: pixels of the slide's full-resolution level (what large_image calls ``base_pixels`` and what DSA
  annotations use), origin top-left.
* **analysis pixels**: pixels at the analysis magnification (default 20x, about 0.5 um/px, the scale the model
  works at).  ``Slide.scale`` is the number of base pixels per analysis pixel: 1 for a 20x slide analysed at 20x,
  2 for a 40x slide analysed at 20x (large_image then reads the 20x pyramid level directly, no resampling).
  Analysis pixel ``a`` covers base pixels ``[a * scale, (a + 1) * scale)``.

Scale
-----
The slide's native magnification comes from large_image (``getNativeMagnification``); when a slide states only a
pixel size, magnification = 10 / (um per pixel), large_image's own convention (0.5 um/px = 20x).  ``mpp`` (um per
base pixel, the command's ``--mpp``) overrides the slide's metadata and is required when the slide has neither.

Requests above the native magnification are refused (CellRCNNError): upsampling adds no detail, and a model
trained at 20x sees blurred, unfamiliar nuclei.  Requests at most 5% above native (a 0.2525 um/px scan called
"40x", asked for 40x) are analysed at the native scale (``Slide.scale == 1``); ``Slide.magnification`` and
``Slide.mpp`` always state the scale actually used.  ``allow_upsample=True`` lifts the refusal.

Reading
-------
Tiles are read with ``TileSource.getRegion`` (region in base pixels, ``output`` sized to the tile's analysis size),
which picks the pyramid level and resamples (Lanczos) only when the scale is not a power of two.  Output is RGB
uint8: grey slides are replicated to 3 channels, an alpha channel is composited onto white (transparent = glass).

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

Memory
------
large_image keeps decoded tiles in an in-process cache sized at 1/32 of the machine's memory by default (770 MB on
24 GB), which a streamed slide fills and never re-reads: peak memory then grows with the slide until the cache is
full.  Unless the process has set ``cache_tileCache_maximum`` itself, the first Slide caps it at
:data:`TILE_CACHE_ITEMS` tiles, enough to keep the source tiles under the overlap of neighbouring analysis tiles.
"""

import collections
import concurrent.futures
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import CellRCNNError, one_line

__all__ = ['Slide', 'Tile', 'prefetch', 'DEFAULT_MAGNIFICATION']

DEFAULT_MAGNIFICATION = 20.0
#: Requests up to this factor above the native magnification are analysed at the native scale.
MAG_TOLERANCE = 1.05
#: Tissue mask pixels are never finer than this (um): no need to resolve nuclei to find tissue.
MASK_MIN_PIXEL_UM = 4.0
#: Gaussian smoothing of the thumbnail before Otsu thresholding (histomicstk's ``sigma``), in mask pixels.
MASK_SIGMA = 1.5
#: Tissue pieces smaller than this (um^2; a 50 um square) are dropped (histomicstk's ``min_size``).
MIN_TISSUE_UM2 = 50.0 * 50.0
#: Absolute floor under histomicstk's (relative, Otsu) threshold: a mask pixel is tissue only when its smoothed grey
#: level is at least this much darker than white (255 - grey).  Glass is 235-250; pale eosin stroma is below 225.
#: Without it Otsu splits the noise of an all-glass slide into "tissue".
MIN_TISSUE_CONTRAST = 20


#: decoded source tiles large_image may keep in memory (see Memory above); about 64 MB of 256 px RGBA tiles
TILE_CACHE_ITEMS = 128


def _bound_tile_cache():
    """Cap large_image's tile cache before its first use, unless this process has capped it already."""
    from large_image import config

    if not int(config.getConfig('cache_tileCache_maximum', 0) or 0):
        config.setConfig('cache_tileCache_maximum', TILE_CACHE_ITEMS)


def _to_rgb(im):
    """RGB uint8 H x W x 3 from what large_image returns (grey, grey+alpha, RGB, RGBA; uint8/uint16/float)."""
    im = np.asarray(im)
    if im.ndim == 2:
        im = im[..., None]
    if im.dtype != np.uint8:
        if im.dtype == np.uint16:
            im = (im >> 8).astype(np.uint8)
        elif np.issubdtype(im.dtype, np.floating) and im.size and np.nanmax(im) <= 1.0:
            im = np.clip(np.nan_to_num(im) * 255 + 0.5, 0, 255).astype(np.uint8)
        else:
            im = np.clip(np.nan_to_num(im), 0, 255).astype(np.uint8)
    bands = im.shape[2]
    alpha = None
    if bands in (2, 4):
        alpha = im[..., -1]
        im = im[..., :-1]
    elif bands > 4:
        im = im[..., :3]
    if im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    if alpha is not None and (alpha < 255).any():
        a = alpha[..., None].astype(np.float32) / 255.0
        im = (im.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(im)


def _starts(origin, length, tile, overlap):
    """Tile start offsets covering [origin, origin + length): steps of ``tile - overlap``, last tile flush with the
    end (so the last two tiles may share more than ``overlap``); a single tile when ``length <= tile``."""
    if length <= tile:
        return [origin]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return [origin + s for s in starts]


def _coverage_weights(lo, hi, i0, i1, factor):
    """Lengths of [lo, hi) inside mask pixels i0 .. i1 - 1, pixel i covering [i * factor, (i + 1) * factor)."""
    edges = np.arange(i0, i1 + 1, dtype=np.float64) * factor
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)


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

    @property
    def base_region(self):
        """(x, y, width, height) in base pixels."""
        return self.base_x, self.base_y, self.base_width, self.base_height

    @property
    def region(self):
        """The large_image ``region`` argument of this tile."""
        return {'left': self.base_x, 'top': self.base_y, 'width': self.base_width, 'height': self.base_height,
                'units': 'base_pixels'}

    def __str__(self):
        return (f'tile row {self.row}, col {self.col} (base x={self.base_x}, y={self.base_y}, '
                f'{self.base_width}x{self.base_height})')


class Slide:
    """A whole-slide image opened with large_image, at an analysis magnification.

    :param path: slide file (anything large_image opens).
    :param magnification: analysis magnification (default 20x).
    :param mpp: micrometres per base-level pixel; overrides the slide's metadata; required when the slide states
        neither magnification nor pixel size.
    :param allow_upsample: analyse above the native magnification (refused by default).

    Attributes: ``path``, ``source`` (the large_image tile source), ``base_size`` (w, h), ``size`` (w, h at
    analysis scale), ``scale`` (base px per analysis px), ``mpp`` (um per analysis px), ``magnification``
    (analysis), ``native_magnification``, ``native_mpp``, ``scale_from`` ('metadata' or 'mpp').
    """

    def __init__(self, path, magnification=DEFAULT_MAGNIFICATION, mpp=None, allow_upsample=False):
        import large_image

        _bound_tile_cache()
        self.path = os.fspath(path)
        #: what reopens this slide the same way elsewhere (e.g. on a Dask worker): ``Slide(path, **open_args)``
        self.open_args = {'magnification': magnification, 'mpp': mpp, 'allow_upsample': allow_upsample}
        if not os.path.exists(self.path):
            raise CellRCNNError(f'slide not found: {self.path}')
        try:
            self.source = large_image.open(self.path)
            metadata = self.source.getMetadata()
            width, height = int(metadata['sizeX']), int(metadata['sizeY'])
            native = self.source.getNativeMagnification()
        except Exception as exc:  # large_image raises TileSourceError, IOTiffError, ValueError, ... on bad files
            reason = one_line(exc)
            if 'No available tilesource' in reason:
                reason = 'not a whole-slide image large_image can read (unknown format, truncated or damaged)'
            raise CellRCNNError(f'cannot open slide {self.path}: {reason}') from None
        if width < 1 or height < 1:
            raise CellRCNNError(f'cannot open slide {self.path}: it has no pixels ({width}x{height})')
        self.base_size = (width, height)

        try:
            magnification = float(magnification)
        except (TypeError, ValueError):
            raise CellRCNNError(f'magnification must be a number, not {magnification!r}') from None
        if not magnification > 0 or not math.isfinite(magnification):
            raise CellRCNNError(f'magnification must be positive, not {magnification:g}')
        if mpp is not None:
            try:
                mpp = float(mpp)
            except (TypeError, ValueError):
                raise CellRCNNError(f'--mpp must be a number of micrometres per pixel, not {mpp!r}') from None
            if not mpp > 0 or not math.isfinite(mpp):
                raise CellRCNNError(f'--mpp must be a positive number of micrometres per pixel, not {mpp:g}')
            native_mpp, native_mag, self.scale_from = mpp, 10.0 / mpp, 'mpp'
        else:
            mag, mm_x = native.get('magnification'), native.get('mm_x')
            if mag and mag > 0:
                native_mag = float(mag)
                native_mpp = float(mm_x) * 1000 if mm_x and mm_x > 0 else 10.0 / native_mag
            elif mm_x and mm_x > 0:
                native_mpp = float(mm_x) * 1000
                native_mag = 10.0 / native_mpp
            else:
                raise CellRCNNError(
                    f'{self.path} states no magnification or resolution; pass --mpp (micrometres per pixel of '
                    f'its full-resolution level: about 0.25 for a 40x scan, 0.5 for 20x)')
            self.scale_from = 'metadata'
        self.native_magnification, self.native_mpp = native_mag, native_mpp

        scale = native_mag / magnification
        if scale < 1:
            if magnification <= native_mag * MAG_TOLERANCE:
                scale = 1.0
            elif not allow_upsample:
                raise CellRCNNError(
                    f'{self.path} is scanned at {native_mag:.3g}x ({native_mpp:.3g} um/px); analysis at '
                    f'{magnification:g}x would only upsample it: use {native_mag:.3g}x or less')
        self.scale = float(scale)
        self.magnification = native_mag / self.scale
        self.mpp = native_mpp * self.scale
        self.size = (max(1, int(math.floor(width / self.scale + 1e-6))),
                     max(1, int(math.floor(height / self.scale + 1e-6))))
        self._masks = {}

    def __repr__(self):
        return (f'Slide({self.path!r}, base {self.base_size[0]}x{self.base_size[1]} at '
                f'{self.native_magnification:.3g}x, analysis {self.size[0]}x{self.size[1]} at '
                f'{self.magnification:.3g}x = {self.mpp:.3g} um/px, scale {self.scale:.4g})')

    # ----------------------------------------------------------------------------------------------------------
    # tissue
    # ----------------------------------------------------------------------------------------------------------

    def thumbnail(self, thumbnail_size=1024):
        """RGB uint8 thumbnail of the whole slide, longest side at most ``thumbnail_size`` and pixels no finer than
        MASK_MIN_PIXEL_UM (a small slide gets a smaller thumbnail)."""
        import large_image

        aw, ah = self.size
        longest_um = max(aw, ah) * self.mpp
        side = int(min(int(thumbnail_size), max(aw, ah), math.ceil(longest_um / MASK_MIN_PIXEL_UM)))
        side = max(side, 2)
        try:
            im, _ = self.source.getThumbnail(width=side, height=side,
                                             format=large_image.constants.TILE_FORMAT_NUMPY)
        except Exception as exc:
            raise CellRCNNError(f'cannot read a thumbnail of {self.path}: {one_line(exc)}') from None
        return _to_rgb(im)

    def tissue_mask(self, thumbnail_size=1024):
        """Tissue mask of the whole slide: (mask bool h x w, factor), ``factor`` = analysis px per mask px.

        histomicstk's ``get_tissue_mask`` on a thumbnail: Otsu threshold of the (inverted) grey level after
        Gaussian smoothing (MASK_SIGMA mask px), connected components smaller than MIN_TISSUE_UM2 dropped; all the
        remaining components are kept (histomicstk's second output, the largest piece only, would lose the other
        fragments of a multi-piece section).  No colour deconvolution: on H&E it keeps only haematoxylin-rich
        areas and loses eosin-only stroma.  An absolute floor (MIN_TISSUE_CONTRAST) keeps Otsu from calling glass
        noise tissue, so an all-glass slide gives an all-False mask.  Cached per ``thumbnail_size``; read-only."""
        key = int(thumbnail_size)
        if key < 2:
            raise CellRCNNError(f'thumbnail size must be at least 2, not {thumbnail_size}')
        if key in self._masks:
            return self._masks[key][:2]
        import cv2
        from scipy import ndimage

        rgb = self.thumbnail(key)
        mh, mw = rgb.shape[:2]
        fx, fy = self.size[0] / mw, self.size[1] / mh
        px_um = math.sqrt(fx * fy) * self.mpp
        min_size = max(4, int(round(MIN_TISSUE_UM2 / px_um ** 2)))
        contrast = 255.0 - cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0),
                                            MASK_SIGMA, borderType=cv2.BORDER_REPLICATE)
        candidate = contrast >= MIN_TISSUE_CONTRAST
        mask = np.zeros((mh, mw), bool)
        if candidate.sum() >= min_size:
            from histomicstk.saliency.tissue_detection import get_tissue_mask

            try:
                labeled, _ = get_tissue_mask(rgb, deconvolve_first=False, n_thresholding_steps=1,
                                             sigma=MASK_SIGMA, min_size=min_size)
            except ValueError:  # nothing above the threshold: histomicstk fails on an empty component list
                labeled = np.zeros((mh, mw), np.int32)
            mask = (labeled > 0) & candidate
            lab, n = ndimage.label(mask)
            if n:
                counts = np.bincount(lab.ravel())
                counts[0] = 0
                mask = counts[lab] >= min_size
        mask.setflags(write=False)
        self._masks[key] = (mask, fx, fy)
        return mask, fx

    def tissue_fraction(self, x, y, width, height, thumbnail_size=1024):
        """Fraction of the analysis-pixel rectangle covered by tissue (area-weighted over partial mask pixels)."""
        self.tissue_mask(thumbnail_size)
        mask, fx, fy = self._masks[int(thumbnail_size)]
        if width <= 0 or height <= 0:
            return 0.0
        i0, i1 = max(0, int(x // fx)), min(mask.shape[1], int(math.ceil((x + width) / fx)))
        j0, j1 = max(0, int(y // fy)), min(mask.shape[0], int(math.ceil((y + height) / fy)))
        if i1 <= i0 or j1 <= j0:
            return 0.0
        wx = _coverage_weights(x, x + width, i0, i1, fx)
        wy = _coverage_weights(y, y + height, j0, j1, fy)
        covered = wy @ mask[j0:j1, i0:i1].astype(np.float64) @ wx
        return float(min(1.0, covered / (width * height)))

    # ----------------------------------------------------------------------------------------------------------
    # tiles
    # ----------------------------------------------------------------------------------------------------------

    def roi_to_analysis(self, roi):
        """(x0, y0, x1, y1) analysis-pixel bounds covering a base-pixel ROI (x, y, w, h), clipped to the slide."""
        W, H = self.base_size
        if roi is None:
            return 0, 0, self.size[0], self.size[1]
        try:
            x, y, w, h = (float(v) for v in roi)
        except (TypeError, ValueError):
            raise CellRCNNError(f'ROI must be x, y, width, height in base pixels, not {roi!r}') from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise CellRCNNError(f'ROI {x:g}, {y:g}, {w:g}x{h:g} is empty (width and height must be positive)')
        bx0, by0, bx1, by1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
        if bx1 <= bx0 or by1 <= by0:
            raise CellRCNNError(f'ROI {x:g}, {y:g}, {w:g}x{h:g} lies outside the slide ({W}x{H} base pixels)')
        s = self.scale
        ax0, ay0 = int(math.floor(bx0 / s + 1e-6)), int(math.floor(by0 / s + 1e-6))
        ax1 = min(self.size[0], int(math.ceil(bx1 / s - 1e-6)))
        ay1 = min(self.size[1], int(math.ceil(by1 / s - 1e-6)))
        ax0, ay0 = min(ax0, ax1 - 1), min(ay0, ay1 - 1)
        return max(0, ax0), max(0, ay0), max(ax1, 1), max(ay1, 1)

    def tiles(self, tile_size=1024, overlap=64, roi=None, min_tissue=0.05, thumbnail_size=1024):
        """Row-major grid of tiles at analysis scale covering the ROI.

        :param tile_size: tile side in analysis pixels; tiles are smaller only where the ROI is.
        :param overlap: analysis pixels shared by neighbouring tiles (at least; the last tile of a row/column is
            flush with the ROI edge and may share more).
        :param roi: (x, y, width, height) in base pixels, clipped to the slide; None = the whole slide.
        :param min_tissue: tiles whose tissue fraction is below this are marked ``skipped`` (still listed).
        :returns: list of :class:`Tile`.
        """
        tile_size, overlap = int(tile_size), int(overlap)
        if tile_size < 1:
            raise CellRCNNError(f'tile size must be positive, not {tile_size}')
        if not 0 <= overlap < tile_size:
            raise CellRCNNError(f'tile overlap must be at least 0 and below the tile size {tile_size}, not {overlap}')
        if not 0 <= min_tissue <= 1:
            raise CellRCNNError(f'minimum tissue fraction must be between 0 and 1, not {min_tissue}')
        ax0, ay0, ax1, ay1 = self.roi_to_analysis(roi)
        xs = _starts(ax0, ax1 - ax0, tile_size, overlap)
        ys = _starts(ay0, ay1 - ay0, tile_size, overlap)
        W, H = self.base_size
        s = self.scale
        # a tile's base region is its analysis rectangle times the scale, rounded; tiles at the slide's right/bottom
        # edge reach the edge (the analysis size is floor(base / scale): the last fraction of a pixel is read too)
        tiles = []
        for row, y in enumerate(ys):
            h = min(tile_size, ay1 - y)
            by0 = int(round(y * s))
            by1 = H if y + h >= self.size[1] else min(H, int(round((y + h) * s)))
            for col, x in enumerate(xs):
                w = min(tile_size, ax1 - x)
                bx0 = int(round(x * s))
                bx1 = W if x + w >= self.size[0] else min(W, int(round((x + w) * s)))
                tissue = self.tissue_fraction(x, y, w, h, thumbnail_size)
                tiles.append(Tile(x=x, y=y, width=w, height=h, row=row, col=col, base_x=bx0, base_y=by0,
                                  base_width=max(1, bx1 - bx0), base_height=max(1, by1 - by0), tissue=tissue,
                                  skipped=tissue < min_tissue, index=len(tiles)))
        return tiles

    # ----------------------------------------------------------------------------------------------------------
    # pixels and coordinates
    # ----------------------------------------------------------------------------------------------------------

    def read(self, tile):
        """RGB uint8 ``tile.height x tile.width x 3`` image of a tile at analysis scale."""
        import large_image

        kwargs = {'region': {'left': tile.base_x, 'top': tile.base_y, 'right': tile.base_x + tile.base_width,
                             'bottom': tile.base_y + tile.base_height, 'units': 'base_pixels'},
                  'format': large_image.constants.TILE_FORMAT_NUMPY}
        if (tile.base_width, tile.base_height) != (tile.width, tile.height):
            kwargs['output'] = {'maxWidth': int(tile.width), 'maxHeight': int(tile.height)}
        try:
            im, _ = self.source.getRegion(**kwargs)
            im = _to_rgb(im)
        except Exception as exc:
            raise CellRCNNError(f'cannot read {tile} of {self.path}: {one_line(exc)}') from None
        if im.shape[:2] != (tile.height, tile.width):
            # large_image keeps the aspect ratio of the integer base region, which can differ from the tile's by
            # under a pixel at non-integer scales: stretch to the tile (to_base maps with the same per-axis scale)
            if abs(im.shape[0] - tile.height) > 2 or abs(im.shape[1] - tile.width) > 2 or not im.size:
                raise CellRCNNError(f'cannot read {tile} of {self.path}: got {im.shape[1]}x{im.shape[0]} pixels '
                                    f'for a {tile.width}x{tile.height} tile')
            import cv2

            im = cv2.resize(im, (tile.width, tile.height), interpolation=cv2.INTER_LINEAR)
        return im

    def overview(self, roi=None, max_side=2048):
        """RGB image of a base-pixel ROI (default: the whole slide) at most ``max_side`` px on its longest side, and
        the factor from base pixels to its pixels."""
        import large_image

        x0, y0, x1, y1 = self.roi_to_analysis(roi)
        s = self.scale
        region = {'left': x0 * s, 'top': y0 * s, 'right': min(x1 * s, self.base_size[0]),
                  'bottom': min(y1 * s, self.base_size[1]), 'units': 'base_pixels'}
        kwargs = {}
        if max(region['right'] - region['left'], region['bottom'] - region['top']) > max_side:
            kwargs['output'] = {'maxWidth': max_side, 'maxHeight': max_side}  # large_image would also enlarge
        try:
            im, _ = self.source.getRegion(region=region, format=large_image.constants.TILE_FORMAT_NUMPY, **kwargs)
        except Exception as exc:
            raise CellRCNNError(f'cannot read an overview of {self.path}: {one_line(exc)}') from None
        im = _to_rgb(im)
        return np.ascontiguousarray(im), im.shape[1] / (region['right'] - region['left'])

    def to_base(self, boxes, tile):
        """Boxes ``[x1, y1, x2, y2]`` in tile-local analysis pixels -> float64 base-level pixels (pixel-edge
        coordinates, as large_image and the DSA annotations use)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        sx, sy = tile.base_width / tile.width, tile.base_height / tile.height
        return b * np.array([sx, sy, sx, sy]) + np.array([tile.base_x, tile.base_y, tile.base_x, tile.base_y],
                                                          dtype=np.float64)


def prefetch(slide, tiles, workers=2, queue=4, skip=True):
    """Iterate ``(tile, image)`` over ``tiles`` in order, reading ahead in ``workers`` background threads.

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
    return _prefetch(slide, todo, workers, queue)


def _prefetch(slide, todo, workers, queue):
    if workers == 0:
        for tile in todo:
            yield tile, _read_checked(slide, tile)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix='cellrcnn-read')
    pending = collections.deque()
    try:
        it = iter(todo)
        for tile in it:
            pending.append((tile, pool.submit(_read_checked, slide, tile)))
            if len(pending) >= queue:
                break
        while pending:
            tile, future = pending.popleft()
            image = future.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_checked, slide, nxt)))
            yield tile, image
            del image
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _read_checked(slide, tile):
    try:
        return slide.read(tile)
    except CellRCNNError:
        raise
    except Exception as exc:  # anything read() did not wrap (e.g. MemoryError)
        raise CellRCNNError(f'cannot read {tile} of {slide.path}: {one_line(exc)}') from None
