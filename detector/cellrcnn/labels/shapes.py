"""Drawn annotations, one file per image: Aperio ImageScope XML, QuPath GeoJSON, DSA annotation JSON.

Coordinates in all three are pixels of the image at full resolution, origin top-left, which for a labelled image
file are the pixels of the image as stored. An outline (polygon, rectangle, ellipse, circle) gives the nucleus its
axis-aligned bounding box and, as its point, the centre of that box; a dot (point, marker) gives a point and no
extent. Lines (arrows, rulers, open polylines, line strings) are not nuclei and are skipped.
"""

import math
from dataclasses import dataclass

from ..annotation import annotation_to_nuclei, read_annotation_file, read_json_file
from ..errors import CellRCNNError
from .record import Nuclei

try:  # defusedxml refuses entity-expansion bombs and external entities; without it the standard library's parser
    # (expat >= 2.4.1 limits entity expansion, external entities are never fetched) reads the same files
    from defusedxml.ElementTree import parse as _parse_xml
except ImportError:
    from xml.etree.ElementTree import parse as _parse_xml

#: ImageScope region types that outline an area: 0 freehand polygon, 1 rectangle, 2 ellipse (its two vertices are
#: the corners of its bounding box). 3 (arrow) and 4 (ruler) are lines. A region of one vertex is a dot, whatever its
#: type (a counter's or pin's marker).
IMAGESCOPE_AREAS = ('0', '1', '2')

#: QuPath 0.2 names the object type in the feature's id; later versions in properties.objectType
_QUPATH_LEGACY_TYPES = {'PathAnnotationObject': 'annotation', 'PathDetectionObject': 'detection',
                        'PathCellObject': 'cell'}


def read_imagescope(path, image, mpp=None):
    """Nuclei drawn in Aperio ImageScope, from its XML (``Annotations/Annotation/Regions/Region/Vertices/Vertex``).

    Regions of type 0 (polygon), 1 (rectangle) and 2 (ellipse) are outlines; a region of one vertex (or of
    several at one point: a click saved as an outline) is a dot;
    arrows, rulers and negative (excluded) regions are skipped. A nucleus' class is its region's ``Text``, else its
    annotation layer's ``Name``, else the name of the layer's first attribute other than ImageScope's default
    ``Description``; None when there is none. Vertex X, Y: pixels of the image at full resolution.

    :param mpp: um/px of the image: a number, ``'auto'`` (estimated from the outlines), or None: the file's
        ``MicronsPerPixel`` (on the root ``Annotations``), when it has one.
    """
    root, regions = imagescope_regions(path)
    file_mpp = _float(root.get('MicronsPerPixel'))
    nuclei = Nuclei()
    for region in regions:
        if region.negative:
            continue
        xs, ys = zip(*region.vertices)
        if len(set(region.vertices)) == 1:  # a marker, or a click saved as an outline of one point
            nuclei.dot(xs[0], ys[0], region.name)
        elif region.kind in IMAGESCOPE_AREAS:
            nuclei.box(min(xs), min(ys), max(xs), max(ys), region.name)
    return nuclei.record(image, path, mpp, file_mpp if file_mpp and file_mpp > 0 else None)


@dataclass(frozen=True)
class ImageScopeRegion:
    """One region of an ImageScope XML file: its ``Text``, else its layer's name (:func:`imagescope_regions`),
    its ``Type`` ('0' polygon, '1' rectangle, '2' ellipse: its two vertices are its box's corners, '3' arrow, '4'
    ruler), whether it is negative (``NegativeROA``: an area cut out of its layer's), its vertices, at least one, and
    which annotation layer of the file holds it (0 for the first)."""

    name: str | None
    kind: str
    negative: bool
    vertices: tuple
    layer: int


def imagescope_regions(path):
    """``(root element, [ImageScopeRegion, ...])`` of an ImageScope XML file. A region's name is its ``Text``, else
    its annotation layer's ``Name``, else the name of the layer's first attribute other than ImageScope's default
    ``Description``. One-line CellRCNNError for a file that is no ImageScope XML, or a region without numeric
    vertices."""
    try:
        root = _parse_xml(path).getroot()
    except OSError as exc:
        raise CellRCNNError(f'cannot read {path}: {exc.strerror or exc}') from None
    except (SyntaxError, ValueError) as exc:  # ParseError is a SyntaxError; defusedxml's refusals are ValueErrors
        raise CellRCNNError(f'{path} is not readable XML: {exc}') from None
    if root.tag != 'Annotations':
        raise CellRCNNError(f'{path} is not an ImageScope annotation file (its root is <{root.tag}>, '
                            'not <Annotations>)')
    regions = []
    for index, layer in enumerate(root.iter('Annotation')):
        names = [a.get('Name') for a in layer.iterfind('Attributes/Attribute') if a.get('Name') != 'Description']
        layer_name = layer.get('Name') or (names[0] if names else None)
        for region in layer.iterfind('Regions/Region'):
            vertices = tuple((_float(v.get('X')), _float(v.get('Y'))) for v in region.iterfind('Vertices/Vertex'))
            if not vertices or any(x is None or y is None for x, y in vertices):
                raise CellRCNNError(f'{path}: region {region.get("Id")} has no vertices or a non-numeric one')
            regions.append(ImageScopeRegion(region.get('Text') or layer_name, region.get('Type', '0'),
                                            region.get('NegativeROA') == '1', vertices, index))
    return root, regions


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def qupath_features(data, path):
    if isinstance(data, dict) and data.get('type') == 'FeatureCollection':
        data = data.get('features')
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) and f.get('type') == 'Feature' for f in data):
        raise CellRCNNError(f'{path} is not GeoJSON features (a FeatureCollection, a Feature or a list of Features)')
    return data


def qupath_class(properties):
    classification = properties.get('classification')
    if isinstance(classification, dict):
        classification = classification.get('name')
    return str(classification) if classification else None


def read_qupath(path, image, mpp=None):
    """Nuclei from a QuPath GeoJSON export: a FeatureCollection, a Feature, or a list of Features.

    Point and MultiPoint geometries are dots, whatever their object type. Polygon and MultiPolygon geometries are
    outlines when they are detections or cells (a cell's nucleus: its ``nucleusGeometry`` when it has one); an
    annotation's polygon is read as a nucleus only when the file holds no detection or cell (then the annotations are
    hand-drawn nuclei; beside detections they are the regions detected in). Other geometries are skipped, and so is
    every feature of a class QuPath ignores (its name ends in ``*``: ``Region*``, ``Ignore*``, the tissue and the
    areas out of focus of a cellrcnn export). A nucleus' class is ``properties.classification.name`` (or
    ``properties.classification`` when it is a string, as older exports write it); None without one. Coordinates:
    pixels of the image at full resolution.

    :param mpp: um/px of the image (the format has none): a number, ``'auto'`` (estimated from the outlines), or None.
    """
    import shapely.errors
    import shapely.geometry

    features = qupath_features(read_json_file(path, 'label file'), path)
    properties = [f['properties'] if isinstance(f.get('properties'), dict) else {} for f in features]
    classes = [qupath_class(p) for p in properties]
    kinds = [None if (cls or '').endswith('*')  # a class QuPath ignores: a region, not a nucleus
             else str(p.get('objectType') or _QUPATH_LEGACY_TYPES.get(str(f.get('id')), 'annotation'))
             for f, p, cls in zip(features, properties, classes)]
    outlines = ('detection', 'cell') if {'detection', 'cell'} & set(kinds) else ('annotation',)
    nuclei = Nuclei()
    for i, (feature, kind, cls) in enumerate(zip(features, kinds, classes)):
        if kind is None:
            continue
        geometry = (kind == 'cell' and feature.get('nucleusGeometry')) or feature.get('geometry')
        gtype = geometry.get('type') if isinstance(geometry, dict) else None
        if gtype not in ('Point', 'MultiPoint') and not (gtype in ('Polygon', 'MultiPolygon') and kind in outlines):
            continue
        try:
            shape = shapely.geometry.shape(geometry)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, OverflowError,
                shapely.errors.ShapelyError) as exc:
            raise CellRCNNError(f'{path}: feature {i}: malformed {gtype} ({type(exc).__name__}: {exc})') from None
        if shape.is_empty:
            raise CellRCNNError(f'{path}: feature {i}: empty {gtype}')
        if gtype == 'Point':
            nuclei.dot(shape.x, shape.y, cls)
        elif gtype == 'MultiPoint':
            for point in shape.geoms:
                nuclei.dot(point.x, point.y, cls)
        else:
            nuclei.box(*shape.bounds, cls)
    return nuclei.record(image, path, mpp)


def read_dsa(path, image, mpp=None, annotation=None):
    """Nuclei from a DSA (large_image) annotation JSON file: a document, a list of documents, or the Girder REST form,
    read by :func:`cellrcnn.annotation.annotation_to_nuclei`. Rectangles (rotated ones give the box of the rotated
    shape), ellipses, circles and closed polylines are outlines; points are dots; open polylines are skipped. A
    nucleus' class is the element's ``user.class``, else its ``label.value``, else its ``group``; None without one.
    Coordinates: base-level (full resolution) pixels.

    :param annotation: read only the annotation documents of this name (None: all).
    :param mpp: um/px of the image (the format has none): a number, ``'auto'`` (estimated from the outlines), or None.
    """
    doc = read_annotation_file(path)
    try:
        found = annotation_to_nuclei(doc, name=annotation)
    except CellRCNNError as exc:
        raise CellRCNNError(f'{path}: {exc}') from None
    nuclei = Nuclei()
    for (x, y), box, cls in zip(found['points'].tolist(), found['boxes'].tolist(), found['classes']):
        if math.isnan(box[0]):
            nuclei.dot(x, y, cls)
        else:
            nuclei.box(*box, cls)
    return nuclei.record(image, path, mpp)
