"""The region a run analyses: the whole slide, a rectangle, or polygons, such as a tumour area a pathologist drew in
HistomicsUI's analysis panel.

A region is given as HistomicsTK's tasks take it (``histomicstk.cli.utils.get_region_polygons``), in base pixels:
``left, top, width, height``; ``-1, -1, -1, -1`` for the whole slide; ``x, y, z, rx, ry, rz`` for a rectangle by
centre and half sides; or the points of polygons, ``x1, y1, x2, y2, ...`` (at least four points), ``-1, -1`` between
two polygons. A rectangle is the run's ``roi``. Polygons are its ``polygons`` and their bounding box its ``roi``. A
region is read in the whole slide's tiles that reach into its box (``tiling.tile_grid``'s ``slide_grid``) and
normalised from the whole slide's stain, so that its nuclei are those the slide's own run finds there. For polygons
the tissue mask is cut to them (:func:`polygon_pixels`), so that tiles outside them are never read and the tissue
area, the densities and the tissue outline are the polygons', and only nuclei centred inside a polygon are kept
(:func:`inside`). Overlapping polygons count once.

An area with holes (a tumour drawn around its necrotic centre: HistomicsUI's holes, a QuPath polygon's interior
rings, ImageScope's negative regions) is one polygon still (:func:`keyhole`): its outline, then each hole joined to
the outline's first point by a cut walked out and back. The pixels and points inside it are counted by the even-odd
rule (``skimage``'s, as :func:`polygon_pixels` and :func:`inside` count them), in which the cut's two crossings
cancel: the area less its holes. So a region with holes keeps HistomicsTK's form, and the numbers
CellDetection's *Region to analyse* takes carry it.
"""

import math
import os

import numpy as np

from .errors import CellRCNNError, histomicstk

#: the points of the polygon that stands for an ellipse or a circle
ELLIPSE_POINTS = 64
#: the element types that outline an area whatever their other fields (a polyline does when closed)
AREA_TYPES = ('rectangle', 'ellipse', 'circle')
#: what a region's values look like, for error lines and help texts
REGION_FORMS = 'X,Y,W,H, or the points of polygons x1,y1,x2,y2,... (at least four points; -1,-1 between polygons)'


def region_settings(values) -> dict:
    """``{'roi': ..., 'polygons': ...}`` (``ResultSettings``' fields) of a region's numbers; both None for the whole
    slide; ``polygons`` None for a rectangle. A one-line CellRCNNError for what is no region."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise CellRCNNError(f'a region is {REGION_FORMS}, not {",".join(map(str, values))[:80]}') from None
    if len(values) % 2 or len(values) < 4:
        raise CellRCNNError(f'a region is {REGION_FORMS}; got {len(values)} numbers')
    if not all(math.isfinite(v) for v in values):
        raise CellRCNNError(f'a region\'s numbers must be finite, not {", ".join(f"{v:g}" for v in values)[:80]}')
    if values == [-1.0] * 4:
        return {'roi': None, 'polygons': None}
    if len(values) == 4:
        return {'roi': tuple(values), 'polygons': None}
    polygons = histomicstk('histomicstk.cli.utils').get_region_polygons(values)
    if len(values) == 6:  # a rectangle by its centre and half sides
        if not polygons:
            raise CellRCNNError(f'a region\'s rectangle needs half sides above 0, not {values[3]:g} and {values[4]:g}')
        (left, top), _, (right, bottom), _ = polygons[0]
        return {'roi': (left, top, right - left, bottom - top), 'polygons': None}
    if not polygons:
        raise CellRCNNError('a region\'s polygons need at least three distinct points each')
    return polygons_region(polygons)


def polygons_region(polygons) -> dict:
    """``{'roi': their bounding box, 'polygons': ...}`` (``ResultSettings``' fields) of polygons, each a sequence of
    ``(x, y)`` base-pixel points; a one-line CellRCNNError for a polygon that encloses no area."""
    for p in polygons:
        if np.ndim(p) != 2 or np.shape(p)[1] != 2:
            raise CellRCNNError(f'a region\'s polygon must be a list of (x, y) points, not {str(p)[:60]}')
        x, y = np.asarray(p, np.float64).T
        if len(x) < 3 or abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) == 0:  # twice the area (shoelace)
            raise CellRCNNError(f'a region\'s polygon encloses no area (its points lie on a line): '
                                f'{tuple(map(float, p[0]))}, ...')
    points = np.concatenate([np.asarray(p, np.float64) for p in polygons])
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return {'roi': (float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
            'polygons': tuple(tuple((float(x), float(y)) for x, y in p) for p in polygons)}


def _open_ring(points):
    """A ring's points without its first point repeated at its end."""
    points = np.asarray(points, np.float64)
    return points[:-1] if len(points) > 1 and (points[0] == points[-1]).all() else points


def keyhole(outline, holes):
    """One K x 2 polygon whose inside by the even-odd rule is the area ``outline`` encloses less the ``holes``
    inside it: the outline, its first point again, then each hole and its first point again, each joined to the
    outline's first point by a cut walked out and back (the polygon closes along the last one). Without holes, the
    outline as it is."""
    if not len(holes):
        return np.asarray(outline, np.float64)
    outline = _open_ring(outline)
    parts = [outline, outline[:1]]
    for k, hole in enumerate(holes):
        hole = _open_ring(hole)
        parts += ([outline[:1]] if k else []) + [hole, hole[:1]]
    return np.concatenate(parts)


def cut_free_edges(polygon):
    """The E x 2 x 2 edges of a polygon (:func:`keyhole`'s among them) that are no cut: edges walked both ways are
    left out, so that drawing the rest outlines the area and its holes."""
    p = np.asarray(polygon, np.float64)
    edges = np.stack([p, np.roll(p, -1, axis=0)], axis=1)
    walked = {(tuple(a), tuple(b)) for a, b in edges}
    return edges[[(tuple(b), tuple(a)) not in walked for a, b in edges]]


def element_polygon(element, where):
    """A DSA annotation element that outlines an area (a rectangle, rotated or not, an ellipse, a circle or a closed
    polyline, its holes cut out: :func:`keyhole`) as a K x 2 polygon in base pixels (an ellipse or circle by
    :data:`ELLIPSE_POINTS` points); a one-line CellRCNNError for any other element."""
    try:
        kind = element['type']
        if kind in AREA_TYPES:
            cx, cy = (float(v) for v in element['center'][:2])
            if kind == 'circle':
                w = h = 2 * float(element['radius'])
            else:
                w, h = float(element['width']), float(element['height'])
            if kind == 'rectangle':
                corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
            else:
                t = np.linspace(0, 2 * math.pi, ELLIPSE_POINTS, endpoint=False)
                corners = np.column_stack([np.cos(t) * w, np.sin(t) * h]) / 2
            rot = float(element.get('rotation') or 0)
            c, s = math.cos(rot), math.sin(rot)
            return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        if kind == 'polyline' and element.get('closed'):
            points = np.asarray([p[:2] for p in element['points']], dtype=np.float64)
            holes = [np.asarray([p[:2] for p in hole], dtype=np.float64) for hole in element.get('holes') or ()]
            if len(points) >= 3 and all(len(hole) >= 3 for hole in holes):
                return keyhole(points, holes)
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    raise CellRCNNError(f'{where}: a region must be a rectangle, an ellipse, a circle or a closed polygon, not this '
                        f'{element.get("type")!r} element')


def annotation_region(docs, where) -> dict:
    """The region (:func:`polygons_region`) that DSA annotation documents (plain or the Girder REST form) outline:
    every rectangle, ellipse, circle and closed polyline in them; points and open polylines (notes) are left out.
    A one-line CellRCNNError when they outline nothing."""
    elements = [e for doc in docs for e in doc.get('annotation', doc).get('elements') or () if isinstance(e, dict)]
    polygons = [element_polygon(e, where) for e in elements
                if e.get('type') in AREA_TYPES or e.get('type') == 'polyline' and e.get('closed')]
    if not polygons:
        raise CellRCNNError(f'{where} outlines no area (no rectangle, ellipse, circle or closed polygon)')
    return polygons_region(polygons)


def imagescope_polygons(path, name):
    """The areas an ImageScope XML file's regions named ``name`` (their ``Text``, or their layer's name) outline:
    polygons and rectangles by their vertices, ellipses by :data:`ELLIPSE_POINTS` points; single vertices, arrows
    and rulers are notes, left out. Negative regions of that name, or in a layer that holds one of those areas
    (whatever their own text: ImageScope cuts a layer's negative regions out of its areas), are cut out of them
    (:func:`keyhole`); a one-line CellRCNNError when they cut out all of it."""
    from .labels.shapes import IMAGESCOPE_AREAS, imagescope_regions

    regions = [r for r in imagescope_regions(path)[1] if len(r.vertices) > 1 and r.kind in IMAGESCOPE_AREAS]
    layers = {r.layer for r in regions if r.name == name and not r.negative}
    areas = {False: [], True: []}
    for region in regions:
        if region.name != name and not (region.negative and region.layer in layers):
            continue
        if region.kind == '2':  # an ellipse: its vertices are its box's corners
            (x0, y0), (x1, y1) = np.min(region.vertices, axis=0), np.max(region.vertices, axis=0)
            polygon = element_polygon({'type': 'ellipse', 'center': [(x0 + x1) / 2, (y0 + y1) / 2],
                                       'width': x1 - x0, 'height': y1 - y0}, path)
        else:
            polygon = np.asarray(region.vertices, np.float64)
        areas[region.negative].append(polygon)
    polygons, negatives = areas[False], areas[True]
    if not (polygons and negatives):
        return polygons
    import shapely

    pieces = [g for g in shapely.get_parts(union_shape(polygons).difference(union_shape(negatives)))
              if g.geom_type == 'Polygon' and g.area > 0]
    if not pieces:
        raise CellRCNNError(f'{path}: the negative regions cut out all of the area named {name!r}')
    return [keyhole(piece.exterior.coords, [ring.coords for ring in piece.interiors]) for piece in pieces]


def qupath_polygons(path, name):
    """The areas a QuPath GeoJSON export's features classified or named ``name`` outline (Polygon and MultiPolygon
    geometries, their holes cut out: :func:`keyhole`; others are left out)."""
    from .annotation import read_json_file
    from .labels.shapes import qupath_class, qupath_features

    polygons = []
    for i, feature in enumerate(qupath_features(read_json_file(path, 'annotation file'), path)):
        properties = feature['properties'] if isinstance(feature.get('properties'), dict) else {}
        if name not in (qupath_class(properties), properties.get('name')):
            continue
        geometry = feature.get('geometry') if isinstance(feature.get('geometry'), dict) else {}
        rings = {'Polygon': [geometry.get('coordinates')],
                 'MultiPolygon': geometry.get('coordinates')}.get(geometry.get('type'), [])
        for polygon in rings or ():
            if not isinstance(polygon, list) or not polygon:
                raise CellRCNNError(f'{path}: feature {i}: malformed {geometry.get("type")}')
            try:
                outline, *holes = [_open_ring([p[:2] for p in ring]) for ring in polygon]
            except (TypeError, ValueError, IndexError):
                raise CellRCNNError(f'{path}: feature {i}: malformed {geometry.get("type")}') from None
            polygons.append(keyhole(outline, holes))
    return polygons


#: the annotation files beside a local slide its region is read from (``cellrcnn batch --region-annotation``), as
#: ``<slide path without its extension><suffix>``: Aperio ImageScope's XML (the file ImageScope saves next to a
#: slide) and a QuPath GeoJSON export
REGION_FILES = (('.xml', imagescope_polygons), ('.geojson', qupath_polygons))


def file_region(slide_path, name):
    """``(region, files)``: the region (:func:`polygons_region`) the annotation files beside a local slide
    (:data:`REGION_FILES`) outline under ``name``, all of them together, or None when none does; and the files
    looked at."""
    stem = os.path.splitext(slide_path)[0]
    files = [(stem + suffix, read) for suffix, read in REGION_FILES if os.path.isfile(stem + suffix)]
    polygons = [p for path, read in files for p in read(path, name)]
    return (polygons_region(polygons) if polygons else None), [path for path, _ in files]


def girder_region(api_url, token, slide_id, name, where):
    """The region outlined by the annotations named ``name`` on a Girder slide (its item's id, or its file's: what a
    DSA image parameter holds) (:func:`annotation_region`; all of them together), or None when it has none of that
    name."""
    from .girder_api import GirderConnection

    server = GirderConnection(api_url, token, retries=4, backoff=1.0, timeout=600, saved=None)
    with server.session():
        item_id = server.slide_item(slide_id)['_id']
        listing = server.get(f'listing the annotations of {where}', 'annotation',
                             {'itemId': item_id, 'name': name, 'limit': 0}, item_id=item_id)
        docs = [server.get(f'reading annotation {record["_id"]} of {where}', f'annotation/{record["_id"]}',
                           item_id=item_id)
                for record in listing if (record.get('annotation') or {}).get('name') == name]
    return annotation_region(docs, f'annotation {name!r} on {where}') if docs else None


def union_shape(polygons):
    """The union of polygons (K x 2 points each, a :func:`keyhole`'s too) as one shapely geometry, each made valid
    first (a keyhole's cuts, a hand-drawn ring that crosses itself)."""
    import shapely

    return shapely.union_all([shapely.make_valid(shapely.Polygon(p)) for p in polygons])


def polygon_pixels(polygons, shape, fx, fy, scale):
    """Which pixels of a mask of ``shape`` (each covering ``fx`` by ``fy`` analysis pixels, ``scale`` base pixels
    each; ``tissue.TissueMask``'s grid) have their centre inside a polygon (base pixels)."""
    from skimage.draw import polygon

    inside = np.zeros(shape, bool)
    for points in polygons:
        p = np.asarray(points, np.float64)
        rows, cols = polygon(p[:, 1] / (fy * scale) - 0.5, p[:, 0] / (fx * scale) - 0.5, shape)
        inside[rows, cols] = True
    return inside


def inside(polygons, x, y):
    """Whether each base-pixel point ``(x[k], y[k])`` lies inside a polygon."""
    from skimage.measure import points_in_poly

    points = np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    found = np.zeros(len(points), bool)
    for p in polygons:
        found |= points_in_poly(points, np.asarray(p, np.float64))
    return found


def named_region(name, slide_path, api_url=None, token=None, item_id=None, where='the slide'):
    """``(settings, note)``: the region the slide's annotations named ``name`` outline as ``ResultSettings``' fields
    (``roi``, ``polygons``, ``region_annotation``), from the Girder item ``item_id`` when given
    (:func:`girder_region`), else from the annotation files beside the local slide (:func:`file_region`); None
    when there is none. The note says where it came from, or where none was found."""
    if item_id:
        region = girder_region(api_url, token, item_id, name, where)
        place = 'on the slide'
    else:
        region, files = file_region(slide_path, name)
        place = 'in ' + (' or '.join(os.path.basename(f) for f in files) if files else
                         f'an annotation file beside the slide ({" or ".join(s for s, _ in REGION_FILES)})')
    if region is None:
        return None, f'no annotation named {name!r} {place}'
    return {**region, 'region_annotation': name}, f'inside annotation {name!r} ({len(region["polygons"])} area(s))'
