"""Adapting the model to a slide before the detection loop runs (``slide_detection``), from the slide's own tissue
tiles: its stain statistics, for a model with a stain reference (``stain``), and, when asked, test-time adaptation
(AdaBN): the model's BatchNorm statistics re-estimated on them. Which tiles, how they are read and cropped live here;
the statistics themselves are :mod:`cellrcnn.stain`'s and :mod:`cellrcnn.adapt`'s.
"""

from .adapt import reestimate_batchnorm
from .errors import CellRCNNError
from .stain import StainStats
from .tiling import prefetch, tile_grid

#: adaptation uses this centre crop (analysis px) of each chosen tile, and runs the backbone on this many at a time
#: (as ``train.precise_bn`` does; fixed, so that the detector's batch size does not change the statistics)
ADAPT_CROP = 512
ADAPT_BATCH = 8
#: a slide's stain statistics come from up to this many squares of this side (analysis px) of its tissue, on a grid
#: of their own: the same whatever the detection's tile size (:func:`slide_stain`)
STAIN_TILES = 8
STAIN_SIDE = 512


def adaptation_tiles(tiles, count):
    """Up to ``count`` tiles of a grid to adapt the model to, always the same for the same grid: of the tiles not
    skipped, those with at least the median tissue fraction (or more tiles, down to the ``count``-th most tissue), so
    that tiles on the tissue's edge do not skew the statistics, and, of more than ``count``, only those with some
    tissue (where most of a slide is glass or fill, the median is 0); of these, ``count`` spread evenly in raster
    order."""
    candidates = [t for t in tiles if not t.skipped]
    ranked = sorted((t.tissue for t in candidates), reverse=True)
    if not ranked:
        return []
    floor = ranked[min(len(ranked), max(count, (len(ranked) + 1) // 2)) - 1]
    kept = [t for t in candidates if t.tissue >= floor]
    if len(kept) > count:
        kept = [t for t in kept if t.tissue > 0] or kept
    if len(kept) <= count:
        return kept
    return [kept[(2 * i + 1) * len(kept) // (2 * count)] for i in range(count)]


def slide_stain(slide, detector, tissue, workers):
    """The stain statistics (:class:`cellrcnn.stain.StainStats`) of the slide's tissue (a ``tissue.TissueMask``, the
    whole slide's whatever region a run analyses, so that a region's nuclei are the whole slide's there): up to
    :data:`STAIN_TILES` squares of :data:`STAIN_SIDE` px of a grid without overlap (:func:`adaptation_tiles` of it),
    read at the analysis magnification by ``workers`` threads, black fill and pen ink left out
    (``TissueMask.without_marks``). An image of at most that many squares is counted whole. None, and nothing read,
    for a model without a stain reference."""
    if detector.normaliser is None:
        return None
    grid = tile_grid(slide, STAIN_SIDE, 0, 0.0, tissue=tissue)
    chosen = adaptation_tiles(grid, STAIN_TILES)
    return StainStats.of(tissue.without_marks(image, tile.x, tile.y)
                         for tile, image in prefetch(slide, chosen, workers=workers, queue=max(1, workers)))


def adapt_to_slide(slide, detector, tiles, count, workers, stain=None):
    """Re-estimate the detector's BatchNorm statistics on the centre crops (:data:`ADAPT_CROP`) of up to ``count``
    tissue tiles of the slide (:func:`adaptation_tiles`; 0: no adaptation), read at the analysis magnification by
    ``workers`` threads. Only the backbone runs. What it holds: the crops (copies, so that no whole tile stays alive
    behind one) and the few tiles read ahead. The crops are normalised from the slide's ``stain`` as the detector
    normalises its tiles (``Detector.model_input``). :returns: the tiles used (none: the model is left as it was)."""
    if count < 0:
        raise CellRCNNError(f'the number of tiles to adapt to the slide must be 0 (no adaptation) or more, not {count}')
    chosen = adaptation_tiles(tiles, count)
    if chosen:
        images = [_centre_crop(image, ADAPT_CROP)
                  for _, image in prefetch(slide, chosen, workers=workers, queue=max(1, workers))]
        reestimate_batchnorm(detector.model, images, detector.device, ADAPT_BATCH,
                             prepare=lambda image: detector.model_input(image, stain))
    return chosen


def _centre_crop(image, side):
    y, x = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[y:y + side, x:x + side].copy()
