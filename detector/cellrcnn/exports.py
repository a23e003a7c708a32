"""Outputs besides the DSA documents (``annotation``, ``density``): GeoJSON for QuPath, CSV, an overview picture and
the run's summary.

* :func:`write_geojson` -- a GeoJSON FeatureCollection that QuPath (v0.4 and later)
  imports as detection objects (File > Import objects from file, or drag and drop), after the run's tissue as
  annotations.
* :func:`write_csv` -- one row per nucleus.
* :func:`write_overlay` -- an overview PNG of the analysed region with every detection drawn (in its cell type's
  colour for a model with cell types).
* :func:`write_summary` and :func:`detection_summary_lines` -- the run's figures as JSON, and as lines a person reads.

All coordinates are base-level (full resolution) slide pixels, origin top-left,
boxes ``x1, y1, x2, y2``. Files are written whole or not at all (``files.atomic_write``).
This module does not import torch.
"""

import csv
import itertools
import json
import os

import numpy as np

from .annotation import DEFAULT_CLASS, _class_names
from .boxes import as_detections, to_numpy
from .colors import rgb_tuple
from .density import micrometres_per_pixel
from .errors import CellRCNNError
from .files import atomic_write
from .focus import out_of_focus_noted, tissue_judged_mm2
from .region import cut_free_edges
from .tissue_outline import BLURRED_COLOR, MARKS_COLOR, blurred_nuclei, pieces

QUPATH_CLASS = 'Nucleus'
SCORE_MEASUREMENT = 'score'
#: the CSV column and QuPath measurement of the probability of a nucleus's class (cell type)
CLASS_PROBABILITY = 'class_probability'

# QuPath classification colours ([r, g, b]) given to classes in order of appearance.
_PALETTE = ((0, 255, 0), (255, 0, 0), (0, 128, 255), (255, 200, 0), (200, 0, 255),
            (0, 255, 255), (255, 128, 0), (128, 128, 128))
_CHUNK = 20_000  # features / rows formatted per write


# --------------------------------------------------------------------------- GeoJSON

def _measurement_columns(properties, n, reserved):
    """Validated extra per-detection measurements: list of (name, list of N floats)."""
    if properties is None:
        return []
    if not isinstance(properties, dict):
        raise CellRCNNError('properties must be a dict of name -> one number per box')
    out = []
    for key, values in properties.items():
        if not isinstance(key, str) or not key or key == reserved:
            raise CellRCNNError(
                f'property names must be non-empty strings other than {reserved!r}; got {key!r}')
        try:
            v = to_numpy(values).astype(np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise CellRCNNError(f'property {key!r} must hold numbers') from None
        if len(v) != n:
            raise CellRCNNError(f'property {key!r} has {len(v)} values for {n} boxes')
        if not np.isfinite(v).all():
            raise CellRCNNError(f'property {key!r} holds non-finite values')
        out.append((key, np.round(v, 4).tolist()))
    return out


def write_geojson(path, boxes, scores, classes=None, properties=None, class_names=None,
                  class_colors=None, score_name=SCORE_MEASUREMENT, decimals=2, annotations=()):
    """Write detections as a GeoJSON FeatureCollection that QuPath imports as detections.

    Each box becomes a Feature with a closed rectangular ``Polygon`` in base-level
    pixels and ``properties`` ``{"objectType": "detection", "classification":
    {"name": ..., "color": [r, g, b]}, "measurements": {score_name: score, ...}}``
    (the form QuPath v0.4+ writes and reads; a classification without ``color`` is
    rejected by QuPath's reader). Features are formatted and written in chunks, so
    10^6 boxes never become one giant string; the file appears atomically.

    :param classes: optional N class names (strings) or integer labels; integers are
        named through ``class_names`` (default ``{1: 'Nucleus'}``). Default: every
        detection is ``'Nucleus'``.
    :param properties: optional dict ``name -> N numbers`` written as extra QuPath
        measurements (e.g. ``{'area_um2': ...}``).
    :param class_colors: optional dict ``class name -> colour`` (``[r, g, b]``, ``'#rrggbb'``, any form of
        :mod:`.colors`); other classes get colours from a fixed palette in order of appearance (``Nucleus`` is
        green).
    :param annotations: GeoJSON features written before the detections, as they are (the run's tissue and the
        areas it left out or found out of focus: ``tissue_outline.qupath_regions``).
    :returns: the path written.
    """
    b, s = as_detections(boxes, scores)
    n = len(b)
    if not isinstance(score_name, str) or not score_name:
        raise CellRCNNError('score_name must be a non-empty string')
    if classes is None:
        names = None
    else:
        names = _class_names(classes, n, class_names if class_names is not None
                             else {1: QUPATH_CLASS})
    extra = _measurement_columns(properties, n, score_name)
    if class_colors is not None and not isinstance(class_colors, dict):
        raise CellRCNNError('class_colors must be a dict of class name -> [r, g, b]')
    colors = {k: rgb_tuple(v, f'the class colour of {k!r}') for k, v in (class_colors or {}).items()}
    # classes without a colour take palette entries 1.. that no given colour took, in order of appearance
    given = set(colors.values())
    free = [c for c in _PALETTE[1:] if c not in given] or list(_PALETTE[1:])

    # The classification JSON of each class, built once.
    fragments = {}

    def classification(cls):
        frag = fragments.get(cls)
        if frag is None:
            color = colors.get(cls)
            if color is None:
                if cls == QUPATH_CLASS:
                    color = _PALETTE[0]
                else:
                    k = sum(1 for c in fragments if c != QUPATH_CLASS and c not in colors)
                    color = free[k % len(free)]
            frag = json.dumps({'name': cls, 'color': list(color)}, separators=(',', ':'))
            fragments[cls] = frag
        return frag

    measure_keys = [json.dumps(score_name)] + [json.dumps(k) for k, _ in extra]
    head = '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[['
    props = ']]},"properties":{"objectType":"detection","classification":'
    with atomic_write(path, 'GeoJSON file') as f:
        f.write('{"type":"FeatureCollection","features":[')
        f.write(',\n'.join(json.dumps(feature, separators=(',', ':')) for feature in annotations))
        if annotations and n:
            f.write(',\n')
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            # Each number is formatted once (float repr dominates the cost).
            coords = np.round(b[start:stop], decimals).T.tolist()
            x1, y1, x2, y2 = (list(map(repr, c)) for c in coords)
            columns = [np.round(s[start:stop], 4).tolist()] + [v[start:stop] for _, v in extra]
            measurements = [','.join(m) for m in zip(*(
                [f'{k}:{v!r}' for v in c] for k, c in zip(measure_keys, columns)))]
            parts = []
            for i in range(stop - start):
                cls = names[start + i] if names is not None else QUPATH_CLASS
                a, b1, c, d = x1[i], y1[i], x2[i], y2[i]
                parts.append(f'{head}[{a},{b1}],[{c},{b1}],[{c},{d}],[{a},{d}],[{a},{b1}]{props}'
                             f'{classification(cls)},"measurements":{{{measurements[i]}}}}}}}')
            if start:
                f.write(',')
            f.write(',\n'.join(parts))
        f.write(']}\n')
    return os.fspath(path)


# --------------------------------------------------------------------------- CSV

def write_csv(path, boxes, scores, classes=None, mpp=None, class_names=None, class_scores=None):
    """Write one row per nucleus: ``x, y, x1, y1, x2, y2, [width_um, height_um,] score, class[,
    class_probability]``.

    ``x, y`` is the box centre and ``x1..y2`` the box, in base-level pixels (2
    decimals); ``width_um``/``height_um`` (3 decimals) are present only when ``mpp``
    (microns per base pixel, a number or an ``(x, y)`` pair) is given. ``class`` is the
    class name (``classes`` as for :func:`cellrcnn.annotation.detections_to_annotation`;
    default ``'nucleus'``); ``class_probability`` (4 decimals) is present only when ``class_scores`` (N numbers:
    the probability of each nucleus's class) is given. An empty detection list gives a header-only file.

    :returns: the path written.
    """
    b, s = as_detections(boxes, scores)
    n = len(b)
    names = _class_names(classes, n, class_names) if classes is not None else None
    mpp_xy = micrometres_per_pixel(mpp) if mpp is not None else None
    header = ['x', 'y', 'x1', 'y1', 'x2', 'y2']
    if mpp_xy:
        header += ['width_um', 'height_um']
    header += ['score', 'class']
    if class_scores is not None:
        class_scores = _measurement_columns({CLASS_PROBABILITY: class_scores}, n, None)[0][1]  # checked, rounded
        header.append(CLASS_PROBABILITY)
    with atomic_write(path, 'CSV file', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(header)
        for start in range(0, n, _CHUNK):
            c = b[start:start + _CHUNK]
            cols = [np.round((c[:, 0] + c[:, 2]) / 2, 2), np.round((c[:, 1] + c[:, 3]) / 2, 2)]
            cols += list(np.round(c, 2).T)
            if mpp_xy:
                cols += [np.round((c[:, 2] - c[:, 0]) * mpp_xy[0], 3),
                         np.round((c[:, 3] - c[:, 1]) * mpp_xy[1], 3)]
            cols.append(np.round(s[start:start + _CHUNK], 4))
            cols = [col.tolist() for col in cols]
            cols.append(names[start:start + _CHUNK] if names is not None
                        else [DEFAULT_CLASS] * len(c))
            if class_scores is not None:
                cols.append(class_scores[start:start + _CHUNK])
            writer.writerows(zip(*cols))
    return os.fspath(path)


# --------------------------------------------------------------------------- overview and summary

#: the colour (BGR) of every box in the overview of a result without cell types
OVERLAY_COLOR = (0, 255, 0)
#: the colour (BGR: the tissue outline annotation's) and width (px) of the outline of the black fill and pen ink left
#: out, in the overview
MARKS_BGR, MARKS_WIDTH = rgb_tuple(MARKS_COLOR)[::-1], 2
#: the colour (BGR: the tissue outline annotation's) of the outline of the tissue out of focus, drawn MARKS_WIDTH wide
BLURRED_BGR = rgb_tuple(BLURRED_COLOR)[::-1]
#: the colour (BGR) of a region's polygons in the overview, drawn MARKS_WIDTH wide
REGION_BGR = (255, 128, 0)


def _overlay_colors(result):
    """The BGR colour of each box in the overview: its cell type's (``cell_type_colors``), else green."""
    if result.cell_types is None:
        return itertools.repeat(OVERLAY_COLOR)
    bgr = [rgb_tuple(c, f'the colour of cell type {name!r}')[::-1]
           for name, c in zip(result.cell_type_names, result.cell_type_colors)]
    return (bgr[t] for t in result.cell_types)


def write_overlay(result, path, max_side=2048):
    """An overview PNG of the analysed region (at most ``max_side`` px) with every detection drawn: in its cell
    type's colour for a model with cell types, else green; the black fill and pen ink left out (``result.tissue``'s
    marks) are outlined in magenta, the tissue out of focus (its ``blurred``) in cyan, and a region's polygons
    (``result.polygons``, their holes too) in blue."""
    import cv2

    slide = result.slide
    ax0, ay0, ax1, ay1 = result.analysis_bounds
    x0, y0 = ax0 * slide.scale, ay0 * slide.scale
    image, factor = slide.overview((x0, y0, (ax1 - ax0) * slide.scale, (ay1 - ay0) * slide.scale), max_side)
    overlay = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    tissue = result.tissue

    def draw(rings, color, closed=True):  # rings (or edges, not closed) in base pixels
        points = [np.round((np.asarray(ring, np.float64) - [x0, y0]) * factor).astype(np.int32) for ring in rings]
        cv2.polylines(overlay, points, closed, color, MARKS_WIDTH)

    if tissue is not None:  # the marks and the blur as the tissue outline annotation draws them
        for pixels, color in ((tissue.marks, MARKS_BGR), (tissue.blurred, BLURRED_BGR)):
            for outline, holes in pieces(tissue, pixels, result.analysis_bounds):
                draw([ring * slide.scale for ring in (outline, *holes)], color)
    edges = [cut_free_edges(polygon) for polygon in result.polygons or ()]
    draw(np.concatenate(edges) if edges else (), REGION_BGR, closed=False)
    boxes = np.round((result.boxes - [x0, y0, x0, y0]) * factor).astype(int)
    for (x1, y1, x2, y2), color in zip(boxes, _overlay_colors(result)):
        cv2.rectangle(overlay, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, 1)
    ok, png = cv2.imencode('.png', overlay)
    if not ok:
        raise CellRCNNError(f'cannot encode the overview {path}')
    with atomic_write(path, 'overview', binary=True) as f:
        f.write(png.tobytes())


def write_summary(path, stats):
    """The run's figures (``SlideDetections.stats``) as JSON."""
    with atomic_write(path, 'summary') as f:
        json.dump(stats, f, indent=2)


def detection_summary_lines(result):
    """The closing summary a person reads: what was found, where, what each stage cost and, for a model with cell
    types, how many nuclei of each."""
    st, sec = result.stats, result.stats['seconds']
    lines = []
    if st['tiles_read'] == 0 and not st['tile_rows_resumed']:
        lines.append(f'no tissue found in {st["slide"]} (none on its thumbnail in any of its {st["tiles"]} tiles): '
                     'the annotation is empty')
    adapt = f'adapt {sec["adapt"]:.1f} on {st["adapt_tiles"]} tiles, ' if st['adapt_tiles'] else ''
    cut = f' ({st["tiles_cut"]} only where their little tissue lies)' if st.get('tiles_cut') else ''
    marks = st.get('ink_or_fill_mm2', 0.0)
    marks = f' ({marks:.2f} mm2 of pen ink or black fill left out)' if marks >= 0.005 else ''
    lines.append(
        f'{st["detections"]} nuclei in {os.path.basename(st["slide"])} at {st["analysis_magnification"]:g}x: '
        f'{st["tissue_mm2"]:.2f} mm2 of tissue{marks}, {st["tiles_read"]} tiles read{cut}, {st["tiles_skipped"]} '
        f'skipped as background; {sec["total"]:.1f} s (tissue {sec["tissue_and_grid"]:.1f}, {adapt}read wait '
        f'{sec["read"]:.1f}, detect {sec["detect"]:.1f}, merge {sec["merge"]:.2f}), '
        f'{st["megapixels_per_second"]:.2f} Mpx/s on {st["device"]}'
        + (f', each tile in {st["views"]} views' if st.get('views', 1) > 1 else '')
        + (f'; outputs written in {sec["write"]:.1f} s' if 'write' in sec else ''))
    if 'cell_types' in st:
        lines.append('cell types: ' + ', '.join(f'{name} {count}' for name, count in st['cell_types'].items()))
    if out_of_focus_noted(st):
        blurred = st['out_of_focus_mm2']
        where = (f'{blurred:.2f} mm2 of the tissue ({100 * blurred / tissue_judged_mm2(st):.0f} %) looks out of focus '
                 '(cyan in the overview and the tissue annotation)')
        if st.get('out_of_focus_left_out'):
            lines.append(f'{where} and is left out, with the {st["detections_out_of_focus"]} nuclei found there: the '
                         f'counts and densities are of the {st["tissue_mm2"]:.2f} mm2 in focus')
        else:
            lines.append(f'{where}: nuclei there may be missed' + blurred_nuclei(st))
    return lines
