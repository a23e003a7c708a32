"""A whole-slide image opened with large_image at an analysis magnification: its scale, pixels and coordinates.

Finding tissue is :mod:`cellrcnn.tissue`; the tile grid and read-ahead are :mod:`cellrcnn.tiling`.

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
pixel size, magnification = 10 / (um per pixel), large_image's own convention (0.5 um/px = 20x;
:func:`magnification_from_mpp`).  ``mpp`` (um per
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

Memory
------
large_image keeps decoded tiles in an in-process cache sized at 1/32 of the machine's memory by default (770 MB on
24 GB), which a streamed slide fills and never re-reads: peak memory then grows with the slide until the cache is
full.  Unless the process has set ``cache_tileCache_maximum`` itself, the first Slide caps it at
:data:`TILE_CACHE_ITEMS` tiles, enough to keep the source tiles under the overlap of neighbouring analysis tiles.
Any read decodes every source tile it touches whole, so a slide whose own tiles are larger than
:data:`MAX_TILE_PIXELS` is refused when it is opened, before a pixel is decoded (a 3 MB TIFF can hold one 16384²
JPEG tile, 805 MB decoded).
"""

import math
import os

import numpy as np

from .errors import CellRCNNError, one_line

__all__ = ['Slide', 'DEFAULT_MAGNIFICATION', 'magnification_from_mpp']

DEFAULT_MAGNIFICATION = 20.0
#: Requests up to this factor above the native magnification are analysed at the native scale.
MAG_TOLERANCE = 1.05
#: decoded source tiles large_image may keep in memory (see Memory above); about 64 MB of 256 px RGBA tiles
TILE_CACHE_ITEMS = 128
#: the most pixels one of a slide's own tiles may have: 4096², large_image's limit on an image it opens as one tile
#: (64 MiB decoded as RGBA)
MAX_TILE_PIXELS = 4096 * 4096


def magnification_from_mpp(mpp):
    """The magnification of pixels ``mpp`` micrometres wide, by large_image's convention: 10 / mpp (0.5 um/px is
    20x). The relation is its own inverse: given a magnification, it returns the pixel size in micrometres."""
    return 10.0 / mpp


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
            tile_width, tile_height = int(metadata['tileWidth']), int(metadata['tileHeight'])
            native = self.source.getNativeMagnification()
        except Exception as exc:  # large_image raises TileSourceError, IOTiffError, ValueError, ... on bad files
            reason = one_line(exc)
            if 'No available tilesource' in reason:
                reason = 'not a whole-slide image large_image can read (unknown format, truncated or damaged)'
            raise CellRCNNError(f'cannot open slide {self.path}: {reason}') from None
        if width < 1 or height < 1:
            raise CellRCNNError(f'cannot open slide {self.path}: it has no pixels ({width}x{height})')
        dtype = str(metadata.get('dtype') or '')
        if dtype.startswith('float'):  # large_image's scaled reads and thumbnails of them are all zeros
            raise CellRCNNError(f'cannot open slide {self.path}: its pixels are {dtype}, which large_image cannot '
                                f'scale; save it as an 8-bit RGB image')
        if tile_width * tile_height > MAX_TILE_PIXELS:
            raise CellRCNNError(f'cannot open slide {self.path}: its tiles are {tile_width}x{tile_height} pixels, more '
                                f'than the {MAX_TILE_PIXELS} (4096x4096) a read may decode; save it as a tiled pyramid')
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
            native_mpp, native_mag, self.scale_from = mpp, magnification_from_mpp(mpp), 'mpp'
        else:
            mag, mm_x = native.get('magnification'), native.get('mm_x')
            if mag and mag > 0:
                native_mag = float(mag)
                # without a stated pixel size, the one of the magnification (the relation is its own inverse)
                native_mpp = float(mm_x) * 1000 if mm_x and mm_x > 0 else magnification_from_mpp(native_mag)
            elif mm_x and mm_x > 0:
                native_mpp = float(mm_x) * 1000
                native_mag = magnification_from_mpp(native_mpp)
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

    def __repr__(self):
        return (f'Slide({self.path!r}, base {self.base_size[0]}x{self.base_size[1]} at '
                f'{self.native_magnification:.3g}x, analysis {self.size[0]}x{self.size[1]} at '
                f'{self.magnification:.3g}x = {self.mpp:.3g} um/px, scale {self.scale:.4g})')

    def thumbnail(self, thumbnail_size=1024, min_pixel_um=0.0):
        """RGB uint8 thumbnail of the whole slide, longest side at most ``thumbnail_size`` and pixels no finer than
        ``min_pixel_um`` micrometres (a small slide then gets a smaller thumbnail)."""
        import large_image

        longest = max(self.size)
        side = min(int(thumbnail_size), longest)
        if min_pixel_um > 0:
            side = min(side, math.ceil(longest * self.mpp / min_pixel_um))
        side = max(side, 2)
        try:
            im, _ = self.source.getThumbnail(width=side, height=side,
                                             format=large_image.constants.TILE_FORMAT_NUMPY)
        except Exception as exc:
            raise CellRCNNError(f'cannot read a thumbnail of {self.path}: {one_line(exc)}') from None
        return _to_rgb(im)

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
