"""The region a folder run counts a slide inside: the areas the slide's annotations of one name outline (a tumour a
pathologist drew), as the numbers CellDetection's *Region to analyse* takes (HistomicsTK's form: each polygon's
points, its first point again at its end, and ``-1, -1`` between polygons). The run reads them here, when it queues
the slide, and gives them to the slide's job: the task needs no access to Girder (a DSA may run task containers
without a network).

Rectangles (rotated or not), ellipses and circles (by :data:`ELLIPSE_POINTS` points) and closed polylines are
areas; points and open polylines are notes, left out; a polyline with holes cannot be counted. This is
``cellrcnn.region.element_polygon`` written again on purpose (the plugin imports nothing of cellrcnn);
tests/test_plugin_contract.py imports this module (pure Python, no Girder) by its path and compares the two.
"""

import math

#: the points of the polygon that stands for an ellipse or a circle
ELLIPSE_POINTS = 64
#: the element types that outline an area whatever their other fields (a polyline does when closed)
AREA_TYPES = ('rectangle', 'ellipse', 'circle')


class RegionError(ValueError):
    """Annotations that outline no area that can be counted; the message says why."""


def is_area(element):
    return isinstance(element, dict) and (element.get('type') in AREA_TYPES or
                                          element.get('type') == 'polyline' and element.get('closed') is True)


def element_points(element):
    """An area element's outline: a list of ``(x, y)`` base-pixel points. :raises RegionError: for one that
    cannot be counted (a polyline with holes, missing or non-numeric fields)."""
    kind = element.get('type')
    try:
        if kind == 'polyline':
            if element.get('holes'):
                raise RegionError('has a polygon with holes, which cannot be counted: draw the area without them')
            points = [(float(p[0]), float(p[1])) for p in element['points']]
            if len(points) < 3:
                raise RegionError('has a polygon of fewer than three points')
            return points
        cx, cy = float(element['center'][0]), float(element['center'][1])
        if kind == 'circle':
            w = h = 2 * float(element['radius'])
        else:
            w, h = float(element['width']), float(element['height'])
        if kind == 'rectangle':
            corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        else:
            steps = [2 * math.pi * k / ELLIPSE_POINTS for k in range(ELLIPSE_POINTS)]
            corners = [(math.cos(t) * w / 2, math.sin(t) * h / 2) for t in steps]
        rot = float(element.get('rotation') or 0)
        c, s = math.cos(rot), math.sin(rot)
        return [(x * c - y * s + cx, x * s + y * c + cy) for x, y in corners]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        if isinstance(exc, RegionError):
            raise
        raise RegionError(f'has a {kind!r} element without its size or position') from None


def region_values(elements):
    """The region numbers of the area elements among ``elements`` (every polygon closed by its first point, ``-1,
    -1`` between polygons). :raises RegionError: when they outline no area, or one that cannot be counted."""
    values = []
    for element in filter(is_area, elements):
        points = element_points(element)
        if values:
            values += [-1.0, -1.0]
        values += [v for point in points + points[:1] for v in point]
    if not values:
        raise RegionError('outlines no area (no rectangle, ellipse, circle or closed polygon)')
    return values
