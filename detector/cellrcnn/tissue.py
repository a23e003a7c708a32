"""Where the tissue is: a mask of the whole slide from its thumbnail, so that tiles of glass are never read.

The mask is histomicstk's ``get_tissue_mask`` on a thumbnail: Otsu threshold of the (inverted) grey level after
Gaussian smoothing (MASK_SIGMA mask px), connected components smaller than MIN_TISSUE_UM2 dropped; all the remaining
components are kept (histomicstk's second output, the largest piece only, would lose the other fragments of a
multi-piece section).  No colour deconvolution: on H&E it keeps only haematoxylin-rich areas and loses eosin-only
stroma.  An absolute floor (MIN_TISSUE_CONTRAST) keeps Otsu from calling glass noise tissue, so an all-glass slide
gives an all-False mask.  Marks on the slide that are not tissue are shown to Otsu as glass: black fill, which some
scanners and converters write where nothing was scanned (MAX_FILL_LEVEL; left in, it is the darkest thing on the
slide, Otsu splits it from everything else, and the tissue is skipped as background while the fill is read as
tissue), and pen ink, green or blue (INK_HUES; read as tissue, two marker strokes beside the sample slide's tissue
added a quarter to its area and moved its stain statistics).

Units: a :class:`TissueMask` answers in **analysis pixels** (``Slide.size``); one mask pixel covers ``fx`` by ``fy``
analysis pixels.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from .errors import CellRCNNError, histomicstk

#: Tissue mask pixels are never finer than this (um): no need to resolve nuclei to find tissue.
MASK_MIN_PIXEL_UM = 4.0
#: Gaussian smoothing of the thumbnail before Otsu thresholding (histomicstk's ``sigma``), in mask pixels.
MASK_SIGMA = 1.5
#: Tissue pieces smaller than this (um^2; a 25 um square, a few cells) are dropped (histomicstk's ``min_size``): a
#: small cluster of cells alone on the glass is kept, and its tile read where it lies (``tiling.tile_grid``).
MIN_TISSUE_UM2 = 25.0 * 25.0
#: Absolute floor under histomicstk's (relative, Otsu) threshold: a mask pixel is tissue only when its smoothed grey
#: level is at least this much darker than white (255 - grey).  Glass is 235-250; pale eosin stroma is below 225.
#: Without it Otsu splits the noise of an all-glass slide into "tissue".
MIN_TISSUE_CONTRAST = 20
#: Black fill: thumbnail pixels whose brightest channel is at most MAX_FILL_LEVEL, in pieces of at least
#: MIN_FILL_UM2 (a 100 um square).  Tissue has such pixels only alone or in twos and threes (the darkest nuclei;
#: at most 80 um^2 on the sample slide, at 4 um a mask pixel).
MAX_FILL_LEVEL = 40
MIN_FILL_UM2 = 100.0 * 100.0
#: Pen ink: thumbnail pixels with a hue (degrees) in INK_HUES, yellow-green through blue, and an HSV saturation of at
#: least MIN_INK_SATURATION, in pieces of at least MIN_INK_UM2.  The hues stop 30 degrees short of the bluest
#: haematoxylin of BRCA-M2C's 90 breast fields (255), for stains bluer than theirs, and the saturation asks for a
#: marker's strong colour (three quarters ink over glass: 0.5-0.7): faint ink may stay tissue, so that no tissue is
#: taken for ink.  A marker's stroke is several hundred um wide and millimetres long; a piece that large is a whole
#: field of view of 250 um (500 px at 20x), so no image of one field loses tissue to the rule.  Of the tissue pixels
#: of the breast fields, of DSB 2018's 107 H&E images and of scikit-image's IHC field (DAB and a blue counterstain)
#: at 4 um a pixel, none, one and none have ink's colour; the green margin ink on the sample slide's tissue edges
#: lies in specks of at most 150 um^2, which stay tissue.
INK_HUES = (60, 225)
MIN_INK_SATURATION = 0.4
MIN_INK_UM2 = 250.0 * 250.0
#: Marks (fill and ink) and the mask pixels within MARK_MARGIN of them are taken for glass, so the rim where a mark
#: meets glass is not a dark line of "tissue".
MARK_MARGIN = 3


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask (read-only, h x w) of a whole slide; mask pixel ``(j, i)`` covers analysis pixels
    ``[i * fx, (i + 1) * fx) x [j * fy, (j + 1) * fy)``; ``mpp``: micrometres per analysis pixel; ``marks``: the
    mask pixels of black fill or pen ink (same shape), or None where there is neither; ``blurred``: the tissue mask
    pixels that look out of focus (same shape; :mod:`cellrcnn.focus`, known once the tiles are read), or None where
    there are none."""

    mask: np.ndarray
    fx: float
    fy: float
    mpp: float
    marks: np.ndarray = None
    blurred: np.ndarray = None

    @functools.cached_property
    def near_marks(self):
        """The mask pixels on a mark (black fill, pen ink) or next to it (sharing a side), or None where there is no
        mark. Where fill meets glass or tissue the JPEG rings, and the column or row of mask pixels that holds the
        seam is brighter than fill; the model still sees a dark edge there."""
        if self.marks is None:
            return None
        from scipy import ndimage

        near = ndimage.binary_dilation(self.marks)
        near.setflags(write=False)
        return near

    def on_marks(self, x, y):
        """Whether each analysis-pixel point ``(x[k], y[k])`` lies on a mark or in the mask pixel next to it
        (:attr:`near_marks`): no nucleus is kept there."""
        if self.marks is None:
            return np.zeros(len(x), bool)
        return self.near_marks[self._rows(y), self._cols(x)]

    def without_marks(self, image, x, y):
        """``image`` (RGB uint8 at analysis scale, its top left at analysis pixel ``(x, y)``) with every pixel on a
        mark or in the mask pixel next to it (:attr:`near_marks`) made white: glass, which stain statistics leave
        out. ``image`` itself where the slide has no mark."""
        if self.marks is None:
            return image
        near = self.grid(self.near_marks, x + np.arange(image.shape[1]), y + np.arange(image.shape[0]))
        return np.where(near[..., None], np.uint8(255), image)

    def within(self, inside):
        """This mask with tissue, marks and blurred tissue only where ``inside`` (a boolean array of the mask's
        shape, such as a region's polygons: ``region.polygon_pixels``) is True."""
        return TissueMask(_read_only(self.mask & inside), self.fx, self.fy, self.mpp,
                          _some(self.marks, inside), _some(self.blurred, inside))

    def without_blurred(self):
        """This mask with the tissue out of focus taken out of the tissue (and kept as :attr:`blurred`): what a run
        that leaves it out counts over."""
        if self.blurred is None:
            return self
        return dataclasses.replace(self, mask=_read_only(self.mask & ~self.blurred))

    def with_blurred(self, blurred):
        """This mask with ``blurred`` (an array of the mask's shape, or None) as the tissue out of focus."""
        return dataclasses.replace(self, blurred=_some(blurred, self.mask))

    def grid(self, pixels, x, y):
        """``pixels`` (an array of the mask's shape: :attr:`mask`, :attr:`marks`, ...) at the analysis-pixel columns
        ``x`` and rows ``y``: a ``len(y)`` x ``len(x)`` array."""
        return pixels[self._rows(y)][:, self._cols(x)]

    def _rows(self, y):
        """The mask rows of analysis-pixel ``y`` values (clipped to the mask)."""
        return np.clip((np.asarray(y) // self.fy).astype(np.int64), 0, self.mask.shape[0] - 1)

    def _cols(self, x):
        """The mask columns of analysis-pixel ``x`` values (clipped to the mask)."""
        return np.clip((np.asarray(x) // self.fx).astype(np.int64), 0, self.mask.shape[1] - 1)

    def window(self, x, y, width, height):
        """``(i0, i1, j0, j1)``: the mask pixels (columns, rows) the analysis-pixel rectangle touches; None when it
        touches none."""
        mask, fx, fy = self.mask, self.fx, self.fy
        i0, i1 = max(0, int(x // fx)), min(mask.shape[1], int(math.ceil((x + width) / fx)))
        j0, j1 = max(0, int(y // fy)), min(mask.shape[0], int(math.ceil((y + height) / fy)))
        return None if i1 <= i0 or j1 <= j0 else (i0, i1, j0, j1)

    def fraction(self, x, y, width, height, of=None):
        """Fraction of the analysis-pixel rectangle covered by tissue (or by the mask pixels ``of``, an array of the
        mask's shape), area-weighted over partial mask pixels."""
        window = self.window(x, y, width, height) if width > 0 and height > 0 else None
        if window is None:
            return 0.0
        i0, i1, j0, j1 = window
        wx = _coverage_weights(x, x + width, i0, i1, self.fx)
        wy = _coverage_weights(y, y + height, j0, j1, self.fy)
        covered = wy @ (self.mask if of is None else of)[j0:j1, i0:i1].astype(np.float64) @ wx
        return float(min(1.0, covered / (width * height)))

    def bounds(self, x, y, width, height):
        """``(x0, y0, x1, y1)``: the analysis-pixel rectangle of the mask pixels with tissue that the rectangle
        touches, cut to it; None when it holds no tissue."""
        window = self.window(x, y, width, height)
        if window is None:
            return None
        i0, i1, j0, j1 = window
        part = self.mask[j0:j1, i0:i1]
        cols, rows = np.flatnonzero(part.any(axis=0)), np.flatnonzero(part.any(axis=1))
        if not len(cols):
            return None
        fx, fy = self.fx, self.fy
        return (max(x, (i0 + cols[0]) * fx), max(y, (j0 + rows[0]) * fy),
                min(x + width, (i0 + cols[-1] + 1) * fx), min(y + height, (j0 + rows[-1] + 1) * fy))

    def area_mm2(self, bounds, of=None):
        """Area of tissue (or of the mask pixels ``of``: :meth:`fraction`) in mm^2 inside analysis-pixel bounds
        ``(x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = bounds
        return self.fraction(x0, y0, x1 - x0, y1 - y0, of) * (x1 - x0) * (y1 - y0) * (self.mpp / 1000) ** 2

    def marks_mm2(self, bounds):
        """Area of black fill and pen ink (mm^2) inside analysis-pixel bounds ``(x0, y0, x1, y1)``."""
        return 0.0 if self.marks is None else self.area_mm2(bounds, self.marks)

    def blurred_mm2(self, bounds):
        """Area of tissue out of focus (mm^2) inside analysis-pixel bounds ``(x0, y0, x1, y1)``."""
        return 0.0 if self.blurred is None else self.area_mm2(bounds, self.blurred)

    def on_blurred(self, x, y):
        """Whether each analysis-pixel point ``(x[k], y[k])`` lies on tissue out of focus (:attr:`blurred`)."""
        if self.blurred is None:
            return np.zeros(len(x), bool)
        return self.blurred[self._rows(y), self._cols(x)]


def _read_only(pixels):
    pixels.setflags(write=False)
    return pixels


def _some(pixels, inside):
    """``pixels & inside``, read-only, or None where ``pixels`` is None or that holds no pixel."""
    if pixels is None:
        return None
    pixels = pixels & inside
    return _read_only(pixels) if pixels.any() else None


def _coverage_weights(lo, hi, i0, i1, factor):
    """Lengths of [lo, hi) inside mask pixels i0 .. i1 - 1, pixel i covering [i * factor, (i + 1) * factor)."""
    edges = np.arange(i0, i1 + 1, dtype=np.float64) * factor
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)


def find_tissue(slide, thumbnail_size=2048, ink=True):
    """The :class:`TissueMask` of a :class:`cellrcnn.slide.Slide`, from a thumbnail whose longest side is at most
    ``thumbnail_size`` and whose pixels are no finer than MASK_MIN_PIXEL_UM. ``ink``: large green or blue areas are
    pen ink, left out (False: they are tissue, for special stains that colour tissue so; black fill is left out
    either way)."""
    if int(thumbnail_size) < 2:
        raise CellRCNNError(f'thumbnail size must be at least 2, not {thumbnail_size}')
    import cv2
    from scipy import ndimage

    rgb = slide.thumbnail(int(thumbnail_size), min_pixel_um=MASK_MIN_PIXEL_UM)
    mh, mw = rgb.shape[:2]
    fx, fy = slide.size[0] / mw, slide.size[1] / mh
    px_um = math.sqrt(fx * fy) * slide.mpp
    min_size = max(4, int(round(MIN_TISSUE_UM2 / px_um ** 2)))
    marks = _large_pieces(rgb.max(axis=2) <= MAX_FILL_LEVEL, max(4, int(round(MIN_FILL_UM2 / px_um ** 2))))
    if ink:
        marks |= _large_pieces(_ink(rgb), max(4, int(round(MIN_INK_UM2 / px_um ** 2))))
    has_marks = bool(marks.any())
    if has_marks:
        rgb = np.where(ndimage.binary_dilation(marks, iterations=MARK_MARGIN)[..., None], np.uint8(255), rgb)
    contrast = 255.0 - cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0),
                                        MASK_SIGMA, borderType=cv2.BORDER_REPLICATE)
    candidate = contrast >= MIN_TISSUE_CONTRAST
    mask = np.zeros((mh, mw), bool)
    if candidate.sum() >= min_size:
        get_tissue_mask = histomicstk('histomicstk.saliency.tissue_detection').get_tissue_mask
        try:
            labeled, _ = get_tissue_mask(rgb, deconvolve_first=False, n_thresholding_steps=1,
                                         sigma=MASK_SIGMA, min_size=min_size)
        except ValueError:  # nothing above the threshold: histomicstk fails on an empty component list
            labeled = np.zeros((mh, mw), np.int32)
        mask = _large_pieces((labeled > 0) & candidate, min_size)
    mask.setflags(write=False)
    marks.setflags(write=False)
    return TissueMask(mask, fx, fy, slide.mpp, marks if has_marks else None)


def _ink(rgb):
    """The pixels of an RGB uint8 image whose colour is pen ink's (INK_HUES, MIN_INK_SATURATION), not fill's."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # uint8: hue in degrees / 2, saturation * 255
    hue = hsv[..., 0].astype(np.int32) * 2
    return ((hue >= INK_HUES[0]) & (hue < INK_HUES[1]) & (hsv[..., 1] >= MIN_INK_SATURATION * 255)
            & (rgb.max(axis=2) > MAX_FILL_LEVEL))


def _large_pieces(mask, min_size):
    """``mask`` without its connected pieces (4-connected) of fewer than ``min_size`` pixels."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if not n:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return counts[lab] >= min_size
