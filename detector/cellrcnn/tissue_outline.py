"""The tissue a run analysed, and the marks it left out, as a DSA annotation: a pathologist sees in HistomicsUI where
the nuclei were looked for (the area ``tissue_mm2`` and the densities are counted over), which pen ink or black
fill was taken for glass (``ink_or_fill_mm2``) and which tissue looked out of focus (``out_of_focus_mm2``:
:mod:`cellrcnn.focus`), and can tell at a glance when the tissue mask went wrong or where a count is not to be trusted.

One closed polyline per piece of tissue, its holes as the element's ``holes``, outlined in :data:`TISSUE_COLOR`;
one per piece of a mark, outlined and lightly filled in :data:`MARKS_COLOR` (the overview PNG's magenta); one per
piece of tissue out of focus, likewise in :data:`BLURRED_COLOR` (the overview PNG's cyan). The
outlines follow the tissue mask (:class:`cellrcnn.tissue.TissueMask`: mask pixels of a few um, read from the
thumbnail) through the centres of its edge pixels, simplified by at most :data:`TOLERANCE` mask pixels, and are cut
to the analysed region.

The document's attributes carry ``density`` (``kind`` 'tissue outline'), as the nuclei map's do: the Girder plugin
never takes it for a nuclei result, and replaces it with the run that made it.

The same pieces go into the QuPath GeoJSON (:func:`qupath_regions`) as locked annotations of classes QuPath ignores
(names ending in ``*``: ``Region*`` for the tissue, ``Ignore*`` for the marks, ``Out of focus*``), so that QuPath
counts the nuclei inside each and no reader takes them for nuclei.
"""

import numpy as np

from .tissue import TissueMask

TISSUE_NAME = 'cellrcnn tissue'
TISSUE_COLOR = 'rgb(255,160,0)'
MARKS_COLOR = 'rgb(255,0,255)'
MARKS_FILL = 'rgba(255,0,255,0.25)'
BLURRED_COLOR = 'rgb(0,200,255)'
BLURRED_FILL = 'rgba(0,200,255,0.25)'
TISSUE_LABEL = 'tissue analysed'
MARKS_LABEL = 'pen ink or black fill, left out'
BLURRED_LABEL = 'tissue out of focus'
#: each layer: the ``TissueMask`` attribute it outlines, its label, its style in the DSA document and its class in
#: QuPath (an ignored class: the name ends in ``*``; ``Region*`` and ``Ignore*`` are QuPath's own)
LAYERS = (('mask', TISSUE_LABEL, {'lineColor': TISSUE_COLOR, 'lineWidth': 2}, 'Region*'),
          ('marks', MARKS_LABEL, {'lineColor': MARKS_COLOR, 'lineWidth': 2, 'fillColor': MARKS_FILL}, 'Ignore*'),
          ('blurred', BLURRED_LABEL, {'lineColor': BLURRED_COLOR, 'lineWidth': 2, 'fillColor': BLURRED_FILL},
           'Out of focus*'))
#: how far (mask pixels) a simplified outline may stray from the mask's edge
TOLERANCE = 0.75


def outlines(pixels, window):
    """The pieces of the boolean mask-pixel array ``pixels`` inside ``window`` (``(i0, i1, j0, j1)``: its columns and
    rows) as ``[(outline, [hole, ...]), ...]``; each ring a K x 2 float array of mask-pixel centres (column, row) in
    the whole array's coordinates, K >= 3."""
    import cv2

    i0, i1, j0, j1 = window
    part = np.zeros((j1 - j0 + 2, i1 - i0 + 2), np.uint8)  # a border of zeros closes the pieces the window cuts
    part[1:-1, 1:-1] = pixels[j0:j1, i0:i1]
    contours, hierarchy = cv2.findContours(part, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []

    def ring(k):
        points = cv2.approxPolyDP(contours[k], TOLERANCE, True).reshape(-1, 2)
        return points.astype(np.float64) + [i0 - 1, j0 - 1] if len(points) >= 3 else None

    pieces = []
    for k, (_, _, child, parent) in enumerate(hierarchy[0]):
        outline = ring(k) if parent < 0 else None
        if outline is None:
            continue
        holes = []
        while child >= 0:  # RETR_CCOMP: an outer ring's first hole, and each hole's next
            hole = ring(child)
            if hole is not None:
                holes.append(hole)
            child = hierarchy[0][child][0]
        pieces.append((outline, holes))
    return pieces


def pieces(tissue: TissueMask, pixels, bounds):
    """The pieces of ``pixels`` (``tissue.mask``, ``.marks`` or ``.blurred``; None: none) inside the analysed region
    ``bounds`` (``(x0, y0, x1, y1)``, analysis pixels) as :func:`outlines` gives them, each ring in analysis pixels
    and cut to ``bounds``: what the annotation and the overview PNG draw."""
    x0, y0, x1, y1 = bounds
    window = tissue.window(x0, y0, x1 - x0, y1 - y0)
    if pixels is None or window is None:
        return []

    def analysis(ring):
        return np.column_stack([np.clip((ring[:, 0] + 0.5) * tissue.fx, x0, x1),
                                np.clip((ring[:, 1] + 0.5) * tissue.fy, y0, y1)])

    return [(analysis(outline), [analysis(hole) for hole in holes]) for outline, holes in outlines(pixels, window)]


def blurred_nuclei(stats):
    """What the nuclei on tissue out of focus may be, besides missed, and how many of the run's they are (its
    ``stats``), as words that follow "nuclei there may be missed" in the run's summary line and the annotation."""
    count, total = stats.get('detections_out_of_focus'), stats.get('detections')
    words = ' or mistyped' if 'cell_types' in stats else ''
    if count is not None and total:
        words += f'; {count} of the {total} found ({100 * count / total:.0f} %) lie there'
    return words


def tissue_outline_annotation(tissue: TissueMask, bounds, scale, attributes=None, visible=False, stats=None,
                              decimals=1):
    """The tissue and marks of ``tissue`` inside the analysed region as a DSA annotation document.

    :param bounds: the analysed region ``(x0, y0, x1, y1)`` in analysis pixels
        (``SlideDetections.analysis_bounds``); the outlines are cut to it.
    :param scale: base pixels per analysis pixel (``Slide.scale``): the document is in base pixels.
    :param attributes: the run's attributes (model, marker, params, ...); ``density`` is added with the areas (mm^2)
        of the tissue, the marks and the tissue out of focus, and how many pieces of each.
    :param visible: whether HistomicsUI shows it when the slide is opened.
    :param stats: the run's figures (``SlideDetections.stats``): how many of the nuclei found lie on the tissue out
        of focus (``cells_out_of_focus``), and the description says so as the run's summary line does; whether that
        tissue was left out (``out_of_focus_left_out``: then the tissue analysed is the tissue in focus).
    """
    elements, counts = [], {}

    def base(ring):
        return [[float(px), float(py), 0] for px, py in np.round(ring * scale, decimals)]

    for name, label, style, _ in LAYERS:
        found = pieces(tissue, getattr(tissue, name), bounds)
        counts[label] = len(found)
        for outline, holes in found:
            element = {'type': 'polyline', 'closed': True, 'points': base(outline), **style,
                       'label': {'value': label}}
            if holes:
                element['holes'] = [base(hole) for hole in holes]
            elements.append(element)
    tissue_mm2 = tissue.area_mm2(bounds)
    marks_mm2 = tissue.marks_mm2(bounds)
    blurred_mm2 = tissue.blurred_mm2(bounds)
    description = (f'{tissue_mm2:.2f} mm² of tissue analysed in {counts[TISSUE_LABEL]} piece(s)'
                   if counts[TISSUE_LABEL] else 'no tissue found')
    if counts[MARKS_LABEL]:
        description += f'; {marks_mm2:.2f} mm² of pen ink or black fill left out (magenta)'
    info = {'kind': 'tissue outline', 'tissue_mm2': round(tissue_mm2, 4), 'ink_or_fill_mm2': round(marks_mm2, 4),
            'out_of_focus_mm2': round(blurred_mm2, 4), 'tissue_pieces': counts[TISSUE_LABEL],
            'mark_pieces': counts[MARKS_LABEL], 'out_of_focus_pieces': counts[BLURRED_LABEL]}
    stats = stats or {}
    if stats.get('detections_out_of_focus') is not None:
        info['cells_out_of_focus'] = int(stats['detections_out_of_focus'])
        info['out_of_focus_left_out'] = bool(stats.get('out_of_focus_left_out'))
    if counts[BLURRED_LABEL] and stats.get('out_of_focus_left_out'):
        description += (f'; {blurred_mm2:.2f} mm² more out of focus (cyan) and left out, with the '
                        f'{stats["detections_out_of_focus"]} nuclei found there')
    elif counts[BLURRED_LABEL]:
        description += (f'; {blurred_mm2:.2f} mm² of it out of focus (cyan): nuclei there may be missed'
                        + blurred_nuclei(stats))
    return {'name': TISSUE_NAME, 'description': description,
            'attributes': {**(attributes or {}), 'density': info}, 'display': {'visible': bool(visible)},
            'elements': elements}


def qupath_regions(tissue: TissueMask, bounds, scale, decimals=1):
    """The pieces of the tissue, the marks and the tissue out of focus inside the analysed region ``bounds``
    (analysis pixels) as QuPath GeoJSON features in base pixels (``scale`` base pixels per analysis pixel): each a
    locked annotation, a ``Polygon`` with its holes, named by its layer's label and classified by its layer's ignored
    class (:data:`LAYERS`) in the layer's colour."""
    from .colors import rgb_tuple

    def ring(points):
        coords = np.round(points * scale, decimals).tolist()
        return coords + coords[:1]  # GeoJSON rings are closed

    features = []
    for name, label, style, cls in LAYERS:
        classification = {'name': cls, 'color': list(rgb_tuple(style['lineColor']))}
        for outline, holes in pieces(tissue, getattr(tissue, name), bounds):
            features.append({'type': 'Feature',
                             'geometry': {'type': 'Polygon', 'coordinates': [ring(outline), *map(ring, holes)]},
                             'properties': {'objectType': 'annotation', 'name': label, 'isLocked': True,
                                            'classification': classification}})
    return features
