"""Slide-level outputs besides the DSA annotation: a density overview, GeoJSON for QuPath, CSV.

* :func:`density_annotation` -- a DSA annotation document holding one ``griddata``
  element: nuclei per mm² on a square grid of ``cell_size_um`` (large_image
  annotation schema, ``girder_large_image_annotation/models/annotation.py``,
  ``griddataSchema``). Write it with :func:`cellrcnn.annotation.write_annotation`.
* :func:`write_geojson` -- a GeoJSON FeatureCollection that QuPath (v0.4 and later)
  imports as detection objects (File > Import objects from file, or drag and drop).
* :func:`write_csv` -- one row per nucleus.

All coordinates are base-level (full resolution) slide pixels, origin top-left,
boxes ``x1, y1, x2, y2``. Files are written to a temporary file beside the target
and moved into place with ``os.replace``, so a reader never sees half a file.
This module does not import torch.
"""

import contextlib
import csv
import json
import math
import os

import numpy as np

from .annotation import DEFAULT_CLASS, _check_color, _class_names, _to_numpy
from .errors import CellRCNNError

DENSITY_NAME = 'cellrcnn nuclei density'
QUPATH_CLASS = 'Nucleus'
SCORE_MEASUREMENT = 'score'

# Heatmap colour ramp, low to high: transparent where there are no nuclei.
DENSITY_COLORS = ('rgba(0,0,255,0)', 'rgba(0,0,255,0.5)', 'rgba(0,255,255,0.6)',
                  'rgba(0,255,0,0.7)', 'rgba(255,255,0,0.8)', 'rgba(255,0,0,0.9)')
# QuPath classification colours ([r, g, b]) given to classes in order of appearance.
_PALETTE = ((0, 255, 0), (255, 0, 0), (0, 128, 255), (255, 200, 0), (200, 0, 255),
            (0, 255, 255), (255, 128, 0), (128, 128, 128))
_INTERPRETATIONS = ('heatmap', 'contour')
_MAX_GRID_CELLS = 4_000_000
_CHUNK = 20_000  # features / rows formatted per write


# --------------------------------------------------------------------------- helpers

def _boxes(boxes):
    """Validated float64 (N, 4) boxes."""
    try:
        b = _to_numpy(boxes).astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise CellRCNNError('boxes must be an (N, 4) array of numbers x1,y1,x2,y2') from None
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise CellRCNNError(f'boxes must have shape (N, 4) as x1,y1,x2,y2; got shape {b.shape}')
    if not np.isfinite(b).all():
        raise CellRCNNError('boxes must be finite numbers')
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise CellRCNNError('boxes must be x1,y1,x2,y2 with x2 >= x1 and y2 >= y1')
    return b


def _detections(boxes, scores):
    """Validated float64 (N, 4) boxes and (N,) scores."""
    b = _boxes(boxes)
    try:
        s = _to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    except (TypeError, ValueError):
        raise CellRCNNError('scores must be numbers, one per box') from None
    if len(s) != len(b):
        raise CellRCNNError(f'got {len(s)} scores for {len(b)} boxes')
    if not np.isfinite(s).all():
        raise CellRCNNError('scores must be finite numbers')
    return b, s


def _positive(value, what):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CellRCNNError(f'{what} must be a number; got {value!r}') from None
    if not 0 < value < math.inf:
        raise CellRCNNError(f'{what} must be a positive number; got {value}')
    return value


def _mpp_pair(mpp):
    """(mpp_x, mpp_y) from a number or an (x, y) pair, microns per base pixel."""
    if isinstance(mpp, (list, tuple, np.ndarray)):
        if len(mpp) != 2:
            raise CellRCNNError(f'mpp must be a number or an (x, y) pair; got {mpp!r}')
        return _positive(mpp[0], 'mpp'), _positive(mpp[1], 'mpp')
    value = _positive(mpp, 'mpp')
    return value, value


@contextlib.contextmanager
def _atomic_open(path, what, newline=None):
    """Open ``path.tmp<pid>`` for writing; move it onto ``path`` when the block succeeds.

    Any failure removes the temporary file; OS errors become one-line CellRCNNErrors.
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w', encoding='utf-8', newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CellRCNNError(
                f'cannot write {what} {path}: {exc.strerror or exc}') from None
        raise


# --------------------------------------------------------------------------- density

def _grid_edges(extent, step):
    """Cell count and per-cell extent along one axis.

    The grid has ``round(extent / step)`` cells (at least one) of ``step`` pixels, the
    last one absorbing the remainder, so no cell is a thin sliver whose density
    would be dominated by one nucleus: the last cell spans 0.5 to 1.5 steps.
    """
    n = max(1, int(round(extent / step)))
    sizes = np.full(n, step, dtype=np.float64)
    sizes[-1] = extent - (n - 1) * step
    return n, sizes


def density_annotation(boxes, slide_size, mpp, cell_size_um=100, name=DENSITY_NAME,
                       interpretation='heatmap', max_density=None, colors=DENSITY_COLORS,
                       max_color='rgb(255,0,0)', scale_with_zoom=True, description=None,
                       attributes=None):
    """A DSA annotation document with the nucleus density as one ``griddata`` element.

    Each grid cell's value is the number of box centres in it divided by the cell's
    area in mm² (nuclei per mm²). Cells are ``cell_size_um`` square, laid from the
    slide's top-left corner; the last column and row absorb the slide's remainder
    (they span 0.5 to 1.5 cells) and their densities use their true area.
    Grid values are listed row by row from the top-left (``gridWidth`` per row)
    and sit at the cell centres: ``origin = [dx / 2, dy / 2, 0]``.

    :param boxes: N x 4 boxes ``x1, y1, x2, y2`` in base-level slide pixels.
    :param slide_size: ``(width, height)`` of the base level in pixels (large_image's
        ``sizeX, sizeY``).
    :param mpp: microns per base pixel, a number or an ``(x, y)`` pair.
    :param cell_size_um: grid cell side in microns.
    :param name: the annotation's name in HistomicsUI.
    :param interpretation: ``'heatmap'`` (default: gaussian blobs, one per grid cell,
        ``radius`` one cell, coloured by ``colors``) or ``'contour'`` (a filled surface
        interpolated between cell centres, transparent at 0 to ``max_color`` at the
        slide's maximum; large_image ignores ``colorRange`` for contours).
        ``'choropleth'`` is in the schema but large_image's viewer draws nothing
        for it, so it is refused.
    :param max_density: nuclei/mm² given the top colour of the heatmap. Default: the
        99th percentile of the non-empty cells, so one outlier does not wash the map
        out; pass the same value for every slide of a cohort to compare them.
    :param colors: heatmap colour ramp (large_image colour strings) spread evenly
        from 0 to ``max_density``.
    :param scale_with_zoom: heatmap blob radius in slide pixels rather than screen
        pixels, so the map looks the same at every zoom. ``scaleWithZoom`` on
        ``griddata`` needs large_image >= 1.30.3 (older servers reject the key);
        pass False for those.
    :param description: document description (default: count, grid and colour scale).
    :param attributes: free-form dict stored as the document's ``attributes``; the grid
        parameters are added under ``attributes['density']``.
    :returns: the annotation document (a JSON-serialisable dict).
    """
    if interpretation not in _INTERPRETATIONS:
        raise CellRCNNError(
            f'interpretation must be one of {", ".join(_INTERPRETATIONS)}; got {interpretation!r}'
            + (' (large_image does not draw choropleth grids)' if interpretation == 'choropleth'
               else ''))
    if not isinstance(name, str) or not name:
        raise CellRCNNError('the annotation name must be a non-empty string')
    if attributes is not None and not isinstance(attributes, dict):
        raise CellRCNNError('attributes must be a dict')
    try:
        width, height = slide_size
    except (TypeError, ValueError):
        raise CellRCNNError(
            f'slide_size must be (width, height) in base pixels; got {slide_size!r}') from None
    width = _positive(width, 'slide width')
    height = _positive(height, 'slide height')
    mpp_x, mpp_y = _mpp_pair(mpp)
    cell_size_um = _positive(cell_size_um, 'cell_size_um')
    colors = list(colors)
    if len(colors) < 2:
        raise CellRCNNError('colors must hold at least two colours')
    for c in colors:
        _check_color(c, 'density colour')
    _check_color(max_color, 'max_color')

    dx, dy = cell_size_um / mpp_x, cell_size_um / mpp_y
    nx, wx = _grid_edges(width, dx)
    ny, wy = _grid_edges(height, dy)
    if nx * ny > _MAX_GRID_CELLS:
        raise CellRCNNError(
            f'a {cell_size_um:g} µm grid over a {width:.0f} x {height:.0f} px slide at '
            f'{mpp_x:g} µm/px has {nx * ny} cells (limit {_MAX_GRID_CELLS}); '
            'use a larger cell_size_um or check mpp')

    b = _boxes(boxes)
    cx = (b[:, 0] + b[:, 2]) / 2
    cy = (b[:, 1] + b[:, 3]) / 2
    outside = (cx < -1) | (cx > width + 1) | (cy < -1) | (cy > height + 1)
    if outside.any():
        raise CellRCNNError(
            f'{int(outside.sum())} of {len(b)} box centres lie outside the {width:.0f} x '
            f'{height:.0f} px slide: boxes must be in base-level pixels and slide_size '
            'must be (width, height)')
    col = np.clip(np.floor(cx / dx), 0, nx - 1).astype(np.int64)
    row = np.clip(np.floor(cy / dy), 0, ny - 1).astype(np.int64)
    counts = np.bincount(row * nx + col, minlength=nx * ny).reshape(ny, nx)
    area_mm2 = np.outer(wy * mpp_y, wx * mpp_x) / 1e6
    density = counts / area_mm2

    occupied = density[counts > 0]
    if max_density is None:
        top = float(np.percentile(occupied, 99)) if occupied.size else 0.0
        max_density = float(f'{top:.3g}') if top > 0 else 1.0
    else:
        max_density = _positive(max_density, 'max_density')

    element = {
        'type': 'griddata',
        'interpretation': interpretation,
        'origin': [dx / 2, dy / 2, 0],
        'dx': dx,
        'dy': dy,
        'gridWidth': nx,
        'values': np.round(density, 2).ravel().tolist(),
    }
    if interpretation == 'heatmap':
        element.update({
            'radius': max(dx, dy),
            'colorRange': colors,
            'rangeValues': np.round(np.linspace(0, max_density, len(colors)), 3).tolist(),
            'normalizeRange': False,
        })
        if scale_with_zoom:
            element['scaleWithZoom'] = True
    else:
        element['maxColor'] = max_color

    n = int(len(b))
    info = {
        'kind': 'density',
        'units': 'nuclei per mm²',
        'cell_size_um': cell_size_um,
        'mpp': [mpp_x, mpp_y],
        'slide_size': [width, height],
        'grid': [nx, ny],
        'nuclei': n,
        'max_density': max_density,
        'mean_density_occupied': round(float(occupied.mean()), 2) if occupied.size else 0.0,
    }
    attrs = dict(attributes) if attributes else {}
    attrs['density'] = info
    if description is None:
        description = (f'{n} nuclei; density per mm² on a {cell_size_um:g} µm grid '
                       f'({nx} x {ny}); colour scale 0-{max_density:g}/mm²')
    return {'name': name, 'description': description, 'attributes': attrs,
            'elements': [element]}


# --------------------------------------------------------------------------- GeoJSON

def _qupath_color(value, what):
    try:
        rgb = [int(v) for v in value]
    except (TypeError, ValueError):
        rgb = []
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise CellRCNNError(f'{what} must be [r, g, b] with values 0-255; got {value!r}')
    return rgb


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
            v = _to_numpy(values).astype(np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise CellRCNNError(f'property {key!r} must hold numbers') from None
        if len(v) != n:
            raise CellRCNNError(f'property {key!r} has {len(v)} values for {n} boxes')
        if not np.isfinite(v).all():
            raise CellRCNNError(f'property {key!r} holds non-finite values')
        out.append((key, np.round(v, 4).tolist()))
    return out


def write_geojson(path, boxes, scores, classes=None, properties=None, class_names=None,
                  class_colors=None, score_name=SCORE_MEASUREMENT, decimals=2):
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
    :param class_colors: optional dict ``class name -> [r, g, b]``; other classes get
        colours from a fixed palette in order of appearance (``Nucleus`` is green).
    :returns: the path written.
    """
    b, s = _detections(boxes, scores)
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
    colors = {k: _qupath_color(v, f'class colour of {k!r}')
              for k, v in (class_colors or {}).items()}

    # The classification JSON of each class, built once.
    fragments = {}

    def classification(cls):
        frag = fragments.get(cls)
        if frag is None:
            color = colors.get(cls)
            if color is None:
                if cls == QUPATH_CLASS:
                    color = _PALETTE[0]
                else:  # palette entries 1.. in order of appearance
                    k = sum(1 for c in fragments if c != QUPATH_CLASS and c not in colors)
                    color = _PALETTE[1 + k % (len(_PALETTE) - 1)]
            frag = json.dumps({'name': cls, 'color': list(color)}, separators=(',', ':'))
            fragments[cls] = frag
        return frag

    measure_keys = [json.dumps(score_name)] + [json.dumps(k) for k, _ in extra]
    head = '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[['
    props = ']]},"properties":{"objectType":"detection","classification":'
    with _atomic_open(path, 'GeoJSON file') as f:
        f.write('{"type":"FeatureCollection","features":[')
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

def write_csv(path, boxes, scores, classes=None, mpp=None, class_names=None):
    """Write one row per nucleus: ``x, y, x1, y1, x2, y2, [width_um, height_um,] score, class``.

    ``x, y`` is the box centre and ``x1..y2`` the box, in base-level pixels (2
    decimals); ``width_um``/``height_um`` (3 decimals) are present only when ``mpp``
    (microns per base pixel, a number or an ``(x, y)`` pair) is given. ``class`` is the
    class name (``classes`` as for :func:`cellrcnn.annotation.detections_to_annotation`;
    default ``'nucleus'``). An empty detection list gives a header-only file.

    :returns: the path written.
    """
    b, s = _detections(boxes, scores)
    n = len(b)
    names = _class_names(classes, n, class_names) if classes is not None else None
    mpp_xy = _mpp_pair(mpp) if mpp is not None else None
    header = ['x', 'y', 'x1', 'y1', 'x2', 'y2']
    if mpp_xy:
        header += ['width_um', 'height_um']
    header += ['score', 'class']
    with _atomic_open(path, 'CSV file', newline='') as f:
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
            writer.writerows(zip(*cols))
    return os.fspath(path)
