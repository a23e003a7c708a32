"""The density heatmap: a DSA annotation document holding one ``griddata`` element, nuclei per mm² on a square grid of
``cell_size_um`` (large_image annotation schema, ``girder_large_image_annotation/models/annotation.py``,
``griddataSchema``). Write it with :func:`cellrcnn.annotation.write_annotation`.

Coordinates are base-level (full resolution) slide pixels; ``mpp`` is micrometres per base pixel.
This module does not import torch.
"""

import math

import numpy as np

from .annotation import _check_color
from .boxes import as_boxes
from .errors import CellRCNNError

DENSITY_NAME = 'cellrcnn nuclei density'
# Heatmap colour ramp, low to high: transparent where there are no nuclei.
DENSITY_COLORS = ('rgba(0,0,255,0)', 'rgba(0,0,255,0.5)', 'rgba(0,255,255,0.6)',
                  'rgba(0,255,0,0.7)', 'rgba(255,255,0,0.8)', 'rgba(255,0,0,0.9)')
_INTERPRETATIONS = ('heatmap', 'contour')
_MAX_GRID_CELLS = 4_000_000


def _positive(value, what):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CellRCNNError(f'{what} must be a number; got {value!r}') from None
    if not 0 < value < math.inf:
        raise CellRCNNError(f'{what} must be a positive number; got {value}')
    return value


def micrometres_per_pixel(mpp):
    """(mpp_x, mpp_y) from a number or an (x, y) pair, microns per base pixel."""
    if isinstance(mpp, (list, tuple, np.ndarray)):
        if len(mpp) != 2:
            raise CellRCNNError(f'mpp must be a number or an (x, y) pair; got {mpp!r}')
        return _positive(mpp[0], 'mpp'), _positive(mpp[1], 'mpp')
    value = _positive(mpp, 'mpp')
    return value, value


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
    _check_document(interpretation, name, attributes)
    width, height = _slide_size(slide_size)
    mpp_x, mpp_y = micrometres_per_pixel(mpp)
    cell_size_um = _positive(cell_size_um, 'cell_size_um')
    colors = _checked_colors(colors, max_color)

    dx, dy, (nx, wx), (ny, wy) = _grid(width, height, mpp_x, mpp_y, cell_size_um)

    b = as_boxes(boxes)
    counts = _cell_counts(b, width, height, dx, dy, nx, ny)
    area_mm2 = np.outer(wy * mpp_y, wx * mpp_x) / 1e6
    density = counts / area_mm2

    occupied = density[counts > 0]
    max_density = _colour_scale_top(occupied, max_density)

    element = _griddata(density, dx, dy, interpretation, max_density, colors, max_color, scale_with_zoom)
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


def _check_document(interpretation, name, attributes):
    if interpretation not in _INTERPRETATIONS:
        raise CellRCNNError(
            f'interpretation must be one of {", ".join(_INTERPRETATIONS)}; got {interpretation!r}'
            + (' (large_image does not draw choropleth grids)' if interpretation == 'choropleth'
               else ''))
    if not isinstance(name, str) or not name:
        raise CellRCNNError('the annotation name must be a non-empty string')
    if attributes is not None and not isinstance(attributes, dict):
        raise CellRCNNError('attributes must be a dict')


def _slide_size(slide_size):
    """``(width, height)`` of the base level, positive numbers."""
    try:
        width, height = slide_size
    except (TypeError, ValueError):
        raise CellRCNNError(
            f'slide_size must be (width, height) in base pixels; got {slide_size!r}') from None
    return _positive(width, 'slide width'), _positive(height, 'slide height')


def _checked_colors(colors, max_color):
    """The heatmap colour ramp as a list, after checking it and the contour's ``max_color``."""
    colors = list(colors)
    if len(colors) < 2:
        raise CellRCNNError('colors must hold at least two colours')
    for c in colors:
        _check_color(c, 'density colour')
    _check_color(max_color, 'max_color')
    return colors


def _grid(width, height, mpp_x, mpp_y, cell_size_um):
    """``(dx, dy, (nx, widths), (ny, heights))`` of the grid in base pixels (:func:`_grid_edges`), at most
    ``_MAX_GRID_CELLS`` cells."""
    dx, dy = cell_size_um / mpp_x, cell_size_um / mpp_y
    nx, wx = _grid_edges(width, dx)
    ny, wy = _grid_edges(height, dy)
    if nx * ny > _MAX_GRID_CELLS:
        raise CellRCNNError(
            f'a {cell_size_um:g} µm grid over a {width:.0f} x {height:.0f} px slide at '
            f'{mpp_x:g} µm/px has {nx * ny} cells (limit {_MAX_GRID_CELLS}); '
            'use a larger cell_size_um or check mpp')
    return dx, dy, (nx, wx), (ny, wy)


def _colour_scale_top(occupied, max_density):
    """The density given the heatmap's top colour: ``max_density`` when given, else the 99th percentile of the
    non-empty cells' densities (``occupied``) to three significant digits, 1.0 when there are none."""
    if max_density is None:
        top = float(np.percentile(occupied, 99)) if occupied.size else 0.0
        return float(f'{top:.3g}') if top > 0 else 1.0
    return _positive(max_density, 'max_density')


def _cell_counts(b, width, height, dx, dy, nx, ny):
    """Box centres per grid cell (ny x nx); a centre more than a pixel outside the slide is an error (boxes not in
    base pixels, or a wrong slide size)."""
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
    return np.bincount(row * nx + col, minlength=nx * ny).reshape(ny, nx)


def _griddata(density, dx, dy, interpretation, max_density, colors, max_color, scale_with_zoom):
    """The ``griddata`` element of a density grid (ny x nx, nuclei/mm²), values at the cell centres."""
    element = {
        'type': 'griddata',
        'interpretation': interpretation,
        'origin': [dx / 2, dy / 2, 0],
        'dx': dx,
        'dy': dy,
        'gridWidth': density.shape[1],
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
    return element


def class_density_annotations(boxes, classes, class_names, slide_size, mpp, attributes=None, **options):
    """One :func:`density_annotation` per class, in the order of ``class_names``: the density of the nuclei of
    ``classes`` (N indices into ``class_names``) equal to its index, named ``'<name> (<class>)'`` (``name``: an option,
    :data:`DENSITY_NAME` by default) with the class under ``attributes['cell_type']``; each has its own colour scale
    unless ``max_density`` is given. ``options``: those of :func:`density_annotation`."""
    b = as_boxes(boxes)
    classes = np.asarray(classes)
    if classes.shape != (len(b),):
        raise CellRCNNError(f'expected {len(b)} classes (one per box), got shape {classes.shape}')
    name = options.pop('name', DENSITY_NAME)
    return [density_annotation(b[classes == i], slide_size, mpp, name=f'{name} ({cls})',
                               attributes={**(attributes or {}), 'cell_type': cls}, **options)
            for i, cls in enumerate(class_names)]
