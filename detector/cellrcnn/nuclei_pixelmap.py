"""The nuclei pixelmap: every nucleus' box as one large_image ``pixelmap`` element over a label image, the view of a
result that shows each nucleus at high zoom and stays fast at a whole slide's hundreds of thousands of nuclei.

The label image is a tiled pyramidal RGB TIFF the size of the slide's base image whose pixel ``R + 256 G + 65536 B``
is a label: nucleus k (from 1, in the result's order) is ``2k`` inside its box and ``2k + 1`` on the box's outermost
pixels (large_image's ``boundaries``), 0 is no nucleus. The element names the image's item (``girderId``), gives each
nucleus' cell type as its value and each type a category with its colour on the outline and a clear inside.
HistomicsUI draws it as a tile layer: one element, a label image uploaded in one request, tiles read as the user pans
(docs/performance.md, "The boxes as a pixelmap"). The image is at the base's scale, not the analysis scale:
HistomicsUI (girder-large-image-annotation 1.35's overlay layer) misplaces the levels of a smaller overlay scaled up
by a ``transform``; on a 40x slide it asked a 20x label image for levels it does not have and drew none zoomed in.

The levels at which a box is still a box (pixels of :data:`OUTLINED_MPP` or finer: 10x and up) outline each box;
on coarser levels each nucleus is a solid dot of its type's colour (its whole box labelled ``2k + 1``), so zoomed out
the pixelmap shows where each type lies, a dot per nucleus, instead of a carpet of outlines. Every level is drawn from
the boxes, never averaged (an average of labels is another nucleus). The pixelmap is a view: it holds no score and
boxes on whole pixels; the nuclei annotation, the CSV and the GeoJSON keep every nucleus exactly.
"""

import os

import numpy as np

from .boxes import as_boxes
from .colors import rgb_components
from .errors import CellRCNNError
from .files import atomic_write
from .nuclei_map import UNTYPED_COLOR

PIXELMAP_NAME = 'cellrcnn nuclei pixelmap'
#: the label image's tile side
TILE = 256
#: the coarsest pixel (um) of a pyramid level that outlines the nuclei's boxes: 10x, where a nucleus is 4 or more
#: pixels across; on coarser levels each nucleus is a solid dot
OUTLINED_MPP = 1.0
#: labels are 24 bits (an RGB pixel)
MOST_NUCLEI = (1 << 23) - 1


def _tile_boxes(boxes, rows, cols):
    """``{(tile row, tile column): sorted indices of the boxes touching that tile}``."""
    x0, y0 = (np.clip(boxes[:, k] // TILE, 0, n - 1).astype(int) for k, n in ((0, cols), (1, rows)))
    x1, y1 = (np.clip(np.ceil(boxes[:, k]) // TILE, 0, n - 1).astype(int) for k, n in ((2, cols), (3, rows)))
    one = (x0 == x1) & (y0 == y1)  # most boxes lie within one tile: grouped at once
    keys = y0[one] * cols + x0[one]
    order = np.argsort(keys, kind='stable')
    tiles, starts = np.unique(keys[order], return_index=True)
    index = {divmod(int(k), cols): list(part) for k, part in zip(tiles, np.split(np.flatnonzero(one)[order],
                                                                                  starts[1:]))}
    for i in np.flatnonzero(~one).tolist():
        for ty in range(y0[i], y1[i] + 1):
            for tx in range(x0[i], x1[i] + 1):
                index.setdefault((ty, tx), []).append(i)
    for ids in index.values():
        ids.sort()
    return index


def _label_tiles(boxes, width, height, outlined):
    """The RGB tiles, row by row, of the label image of ``boxes`` (in this level's pixels) on a width x height
    level, each box outlined or (not ``outlined``) solid; later boxes cover earlier ones."""
    rows, cols = -(-height // TILE), -(-width // TILE)
    index = _tile_boxes(boxes, rows, cols) if len(boxes) else {}
    corners = np.column_stack([np.floor(boxes[:, :2]), np.maximum(np.ceil(boxes[:, 2:]), np.floor(boxes[:, :2]) + 1)])
    corners = corners.astype(np.int64)
    empty = np.zeros((TILE, TILE, 3), np.uint8)
    for ty in range(rows):
        for tx in range(cols):
            mine = index.get((ty, tx))
            if not mine:
                yield empty
                continue
            label = np.zeros((TILE, TILE), np.int64)
            for i in mine:
                x0, y0, x1, y1 = corners[i] - [tx * TILE, ty * TILE, tx * TILE, ty * TILE]
                label[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 2 * i + 3
                if outlined:
                    label[max(y0 + 1, 0):max(y1 - 1, 0), max(x0 + 1, 0):max(x1 - 1, 0)] = 2 * i + 2
            yield np.stack([label & 255, label >> 8 & 255, label >> 16 & 255], axis=-1).astype(np.uint8)


def write_label_image(path, boxes, width, height, mpp):
    """The pixelmap's label image of ``boxes`` (N x 4, in the image's pixels) on a width x height image of ``mpp``
    um per pixel: a tiled RGB TIFF with a level per halving down to one tile; the levels whose pixels are at most
    :data:`OUTLINED_MPP` outline the boxes, the others fill them."""
    import tifffile

    b = as_boxes(boxes).astype(np.float64)
    if len(b) > MOST_NUCLEI:
        raise CellRCNNError(f'{len(b)} nuclei are more than a pixelmap holds ({MOST_NUCLEI}): leave out its output')
    with (atomic_write(path, "the pixelmap's label image", binary=True) as f,  # whole or not at all
          tifffile.TiffWriter(tifffile.FileHandle(f, 'wb', name=os.path.basename(path)), bigtiff=True) as tif):
        downsample = 1
        while True:
            w, h = -(-width // downsample), -(-height // downsample)
            outlined = mpp * downsample <= OUTLINED_MPP * 1.01
            tif.write(_label_tiles(b / downsample, w, h, outlined), shape=(h, w, 3), dtype=np.uint8,
                      tile=(TILE, TILE), photometric='rgb', compression='zlib', compressionargs={'level': 1},
                      subfiletype=0 if downsample == 1 else 1, metadata=None)
            if max(w, h) <= TILE:
                break
            downsample *= 2


def pixelmap_annotation(girder_id, count, classes=None, class_names=None, class_colors=None, attributes=None,
                        visible=True):
    """The pixelmap of a result's ``count`` nuclei as a DSA annotation document.

    :param girder_id: the label image's item id, or (in a DSA task) the name of the task output that uploads it,
        which large_image resolves to the item when both are uploaded.
    :param classes: the nuclei's ``count`` indices into ``class_names`` (None: one untyped category).
    :param class_colors: the types' colours (dict by name, ``#rrggbb`` or ``rgb(r,g,b)``).
    :param attributes: the run's attributes; ``density`` (``kind`` 'nuclei pixelmap') is added, so that, like the
        nuclei map, it is a view of a result and never a result itself.
    """
    if classes is None:
        names, colors, values = ['nucleus'], [UNTYPED_COLOR], np.ones(count, np.int64)
    else:
        values = np.asarray(classes, np.int64) + 1
        if values.shape != (count,) or class_names is None or class_colors is None:
            raise CellRCNNError('a typed pixelmap needs one class per nucleus, the class names and their colours')
        names, colors = list(class_names), [class_colors[name] for name in class_names]
    clear = 'rgba(0,0,0,0)'
    categories = [{'label': 'none', 'fillColor': clear, 'strokeColor': clear}]
    categories += [{'label': name, 'fillColor': f'rgba({rgb_components(color)},0)',
                    'strokeColor': f'rgba({rgb_components(color)},1)'} for name, color in zip(names, colors)]
    element = {'type': 'pixelmap', 'girderId': girder_id, 'boundaries': True, 'categories': categories,
               'values': [0] + values.tolist()}
    return {'name': PIXELMAP_NAME, 'description': f'{count} nuclei: each box outlined from 10x up, a dot below',
            'attributes': {**(attributes or {}), 'density': {'kind': 'nuclei pixelmap', 'nuclei': int(count)}},
            'display': {'visible': bool(visible)}, 'elements': [element]}
