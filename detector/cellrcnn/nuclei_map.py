"""The nuclei map: every nucleus as one point of a ``heatmap`` element (one element per cell type), the view of a
result that stays fast at a whole slide's hundreds of thousands of nuclei.

HistomicsUI draws a heatmap element's points as gaussian blobs, here :data:`DOT_RADIUS` screen pixels at every zoom:
at 10x each nucleus is a dot about its size in its type's colour, and zoomed out the dots add up to where each type
lies. A point is four numbers and an element is one database document however many points it holds (large_image
keeps big point lists in a file beside it), so the map is stored in seconds where the nuclei annotation, one document
per nucleus, takes minutes, and the browser reads it in one request instead of paging through elements
(docs/performance.md, "A whole slide's nuclei in HistomicsUI").

The map is a view: the nuclei annotation keeps every nucleus with its box, score and type for analysis and export.
Its attributes carry ``density`` (``kind`` 'nuclei map'), so the Girder plugin treats it as it treats the density
annotations: never a nuclei result, replaced with the run that made it.
"""

import numpy as np

from .boxes import as_boxes
from .colors import rgb_components
from .errors import CellRCNNError

MAP_NAME = 'cellrcnn nuclei map'
#: the blob of each nucleus, in screen pixels whatever the zoom: about a nucleus at 10x, a mark on it at 40x, and
#: zoomed out, where thousands share a blob's place, their sum makes the density
DOT_RADIUS = 4
#: the colour of an untyped model's nuclei on the map
UNTYPED_COLOR = 'rgb(0,160,0)'
#: opacity of the map where one nucleus lies (its blob's centre) and where blobs pile up: a lone nucleus shows as a
#: dot through which the tissue can still be seen, a crowd as the full colour
_ONE, _CROWD = 0.6, 0.9


def _element(boxes, color, label, decimals):
    """One heatmap element: the centres of ``boxes`` (N x 4, base pixels) with intensity 1, each a blob of
    :data:`DOT_RADIUS` screen pixels."""
    centres = np.round(np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2]), decimals)
    rgb = rgb_components(color)
    element = {'type': 'heatmap', 'points': [[x, y, 0, 1] for x, y in centres.tolist()],
               'radius': DOT_RADIUS, 'scaleWithZoom': False, 'normalizeRange': True,
               'colorRange': [f'rgba({rgb},0)', f'rgba({rgb},{_ONE})', f'rgba({rgb},{_CROWD})'],
               'rangeValues': [0, 0.5, 1]}
    if label:
        element['label'] = {'value': label}
    return element


def nuclei_map_annotation(boxes, classes=None, class_names=None, class_colors=None, attributes=None, visible=True,
                          decimals=1):
    """The nuclei map of a result as a DSA annotation document.

    :param boxes: N x 4 ``[x0, y0, x1, y1]`` in base pixels.
    :param classes: N indices into ``class_names`` (None: one untyped element).
    :param class_names, class_colors: the model's cell types and their ``rgb(r,g,b)`` colours (dict by name).
    :param attributes: the run's attributes (model, marker, params); ``density`` is added.
    :param visible: whether HistomicsUI shows the map when the slide is opened (``display.visible``).
    :returns: the document: one ``heatmap`` element per cell type that has nuclei (labelled with its name), or one
        for every nucleus without cell types.
    """
    b = as_boxes(boxes)
    counts = {}
    if classes is None:
        elements = [_element(b, UNTYPED_COLOR, None, decimals)] if len(b) else []
    else:
        classes = np.asarray(classes)
        if classes.shape != (len(b),) or class_names is None or class_colors is None:
            raise CellRCNNError('a typed nuclei map needs one class per box, the class names and their colours')
        elements = []
        for i, name in enumerate(class_names):
            mine = b[classes == i]
            counts[name] = int(len(mine))
            if len(mine):
                elements.append(_element(mine, class_colors[name], name, decimals))
    info = {'kind': 'nuclei map', 'nuclei': int(len(b))}
    if counts:
        info['cell_types'] = counts
    legend = '; '.join(f'{name} {color}' for name, color in (class_colors or {}).items() if counts.get(name))
    return {'name': MAP_NAME, 'description': f'{len(b)} nuclei, a dot each' + (f' ({legend})' if legend
                                                                                          else ''),
            'attributes': {**(attributes or {}), 'density': info}, 'display': {'visible': bool(visible)},
            'elements': elements}


#: the most nuclei whose boxes HistomicsUI shows when a slide opens under the 'auto' display; a larger result opens
#: on its pixelmap, or its map without one (the figures behind it: docs/performance.md, "A whole slide's nuclei in
#: HistomicsUI")
BOXES_SHOWN = 20_000


def shown_on_open(display, nuclei, has_map=True, has_pixelmap=False):
    """``(boxes, map, pixelmap)``: whether the nuclei annotation, the nuclei map and the nuclei pixelmap are shown
    when the slide is opened, for ``display`` 'boxes', 'map', 'pixelmap' or 'auto': the boxes up to
    :data:`BOXES_SHOWN` nuclei, else the pixelmap when the run wrote one (``has_pixelmap``), else the map when it
    wrote one (``has_map``), else the boxes, which a run always writes. Exactly one is; the others stay listed in
    HistomicsUI's annotation panel, one click away."""
    if display == 'auto':
        display = 'boxes' if nuclei <= BOXES_SHOWN else 'pixelmap' if has_pixelmap else 'map' if has_map else 'boxes'
    if display not in ('boxes', 'map', 'pixelmap'):
        raise CellRCNNError(f"display must be auto, boxes, map or pixelmap, not {display!r}")
    return display == 'boxes', display == 'map', display == 'pixelmap'
