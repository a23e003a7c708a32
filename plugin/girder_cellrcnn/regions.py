"""The region a folder run counts a slide inside: the areas the slide's annotations of one name outline (a tumour a
pathologist drew), as the numbers CellDetection's *Region to analyse* takes (HistomicsTK's form: each polygon's
points, its first point again at its end, and ``-1, -1`` between polygons). The run reads them here, when it queues
the slide, and gives them to the slide's job: the task needs no access to Girder (a DSA may run task containers
without a network).

Rectangles (rotated or not), ellipses and circles (by :data:`ELLIPSE_POINTS` points) and closed polylines are
areas; points and open polylines are notes, left out. A polyline's holes are cut out of it as the library cuts them
(``cellrcnn.region.keyhole``): its points, its first point again, then each hole's points and the hole's first
point again, each joined to the polyline's first point, one polygon whose inside by the even-odd rule is the area
less its holes. This is
``cellrcnn.region.element_polygon`` written again on purpose (the plugin imports nothing of cellrcnn);
tests/test_plugin_contract.py imports this module (pure Python, no Girder) by its path and compares the two.
"""

import math

#: the points of the polygon that stands for an ellipse or a circle
ELLIPSE_POINTS = 64
#: the most elements a slide's region annotations may hold together: a region is a few areas a pathologist drew;
#: a name that is a nuclei result's would load and hand each slide's job hundreds of thousands of boxes
MOST_ELEMENTS = 1000
#: the element types that outline an area whatever their other fields (a polyline does when closed)
AREA_TYPES = ('rectangle', 'ellipse', 'circle')


class RegionError(ValueError):
    """Annotations that outline no area that can be counted; the message says why."""


def is_area(element):
    return isinstance(element, dict) and (element.get('type') in AREA_TYPES or
                                          element.get('type') == 'polyline' and element.get('closed') is True)


def open_ring(points):
    """A ring's points without its first point repeated at its end."""
    return points[:-1] if len(points) > 1 and points[0] == points[-1] else points


def element_points(element):
    """An area element's outline, its holes cut out: a list of ``(x, y)`` base-pixel points. :raises RegionError:
    for one that cannot be counted (fewer than three points, missing or non-numeric fields)."""
    kind = element.get('type')
    try:
        if kind == 'polyline':
            points, *holes = [[(float(p[0]), float(p[1])) for p in ring]
                              for ring in [element['points'], *(element.get('holes') or ())]]
            if min(map(len, [points, *holes])) < 3:
                raise RegionError('has a polygon or a hole of fewer than three points')
            if holes:
                points = open_ring(points)
                for hole in map(open_ring, holes):
                    points += points[:1] + hole + hole[:1]
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
