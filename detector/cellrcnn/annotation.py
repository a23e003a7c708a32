"""Digital Slide Archive annotation documents: detections to and from large_image JSON.

The documents follow girder_large_image_annotation's annotation schema
(``GET /annotation/schema`` on a DSA server; docs: "Annotation Schema" in
large_image): ``{"name", "description", "attributes", "elements"}`` where each
element is a shape. Detections are written as ``rectangle`` elements
(``center [x, y, 0]``, ``width``, ``height``, ``rotation``) or ``point`` elements
(``center``), with a per-element ``user`` dict ``{"score": ..., "class": ...}``.
Coordinates are base-level (full resolution) slide pixels, origin top-left.

Reading accepts a document, a list of documents, and the Girder REST form
``{"_id": ..., "annotation": {...}}`` returned by ``GET /annotation/{id}``: as boxes
(:func:`annotation_to_boxes`, points given a box size) or as nuclei (:func:`annotation_to_nuclei`, points kept as
points, for :mod:`cellrcnn.labels`).
"""

import json
import os
import re

import numpy as np

from .boxes import as_detections, to_numpy
from .errors import CellRCNNError
from .files import atomic_write

DEFAULT_NAME = 'cellrcnn nuclei'
DEFAULT_CLASS = 'nucleus'
DEFAULT_LINE_COLOR = 'rgb(0,255,0)'

# The colour pattern of the large_image annotation schema (colorSchema).
_COLOR_RE = re.compile(r'^(#[0-9a-fA-F]{3,6}|rgb\(\d+,\s*\d+,\s*\d+\)|'
                       r'rgba\(\d+,\s*\d+,\s*\d+,\s*(\d?\.|)\d+\))$')

_WRITE_TYPES = ('rectangle', 'point')
_READ_TYPES = ('rectangle', 'point', 'polyline', 'circle', 'ellipse')
#: where :func:`annotation_to_nuclei` takes a nucleus' class from
CLASS_SOURCES = ('label', 'group', 'annotation')


def _check_color(value, what):
    if value is not None and (not isinstance(value, str) or not _COLOR_RE.match(value)):
        raise CellRCNNError(
            f'{what} {value!r} is not a DSA colour (use #rrggbb, rgb(r,g,b) or rgba(r,g,b,a))')


def _class_names(labels, n, class_names):
    """One class-name string per detection."""
    if labels is None:
        return None  # every element gets DEFAULT_CLASS
    if isinstance(labels, str):
        raise CellRCNNError('labels must be one label per box, not a single string')
    if hasattr(labels, 'detach') or isinstance(labels, np.ndarray):
        labels = to_numpy(labels).tolist()
    labels = list(labels)
    if len(labels) != n:
        raise CellRCNNError(f'got {len(labels)} labels for {n} boxes')
    if class_names is None:
        class_names = {1: DEFAULT_CLASS}
    elif not isinstance(class_names, dict):
        class_names = dict(enumerate(class_names))
    cache = {}
    out = []
    for label in labels:
        name = cache.get(label)
        if name is None:
            if isinstance(label, str):
                name = label
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                name = class_names.get(int(label), f'class_{int(label)}')
            else:
                raise CellRCNNError(f'labels must be integers or strings; got {label!r}')
            cache[label] = name
        out.append(name)
    return out


def _annotation_parts(boxes, scores, labels=None, name=DEFAULT_NAME, element_type='rectangle', attributes=None,
                      line_color=DEFAULT_LINE_COLOR, description=None, fill_color=None, class_names=None, decimals=2,
                      class_colors=None, visible=None):
    """Check detections and document options (see :func:`detections_to_annotation`).

    :returns: ``(header, n, elements)``: the document without its elements, the number of detections, and
        ``elements(i0, i1)``, the element dicts of detections ``i0:i1``."""
    if element_type not in _WRITE_TYPES:
        raise CellRCNNError(
            f'element_type must be one of {", ".join(_WRITE_TYPES)}; got {element_type!r}')
    if not isinstance(name, str) or not name:
        raise CellRCNNError('the annotation name must be a non-empty string')
    _check_color(line_color, 'line_color')
    _check_color(fill_color, 'fill_color')
    if class_colors is not None and (labels is None or not isinstance(class_colors, dict)):
        raise CellRCNNError('class_colors must be a dict of class name -> colour, given with labels')
    for cls, color in (class_colors or {}).items():
        _check_color(color, f'colour of class {cls!r}')
    if attributes is not None and not isinstance(attributes, dict):
        raise CellRCNNError('attributes must be a dict')

    b, s = as_detections(boxes, scores)
    n = len(b)
    classes = _class_names(labels, n, class_names)

    # Vectorised arithmetic, then plain Python floats: no per-element numpy scalars.
    cx = np.round((b[:, 0] + b[:, 2]) / 2, decimals).tolist()
    cy = np.round((b[:, 1] + b[:, 3]) / 2, decimals).tolist()
    score_list = np.round(s, 4).tolist()
    style = _style(line_color, fill_color)
    if class_colors is None:
        def style_of(i):
            return style
    else:  # each class its own colour, label and group (the layers HistomicsUI lists and toggles)
        styles = {cls: {**_style(class_colors.get(cls, line_color), fill_color), 'label': {'value': cls},
                        'group': cls} for cls in set(classes)}

        def style_of(i):
            return styles[classes[i]]
    if element_type == 'rectangle':
        w = np.round(b[:, 2] - b[:, 0], decimals).tolist()
        h = np.round(b[:, 3] - b[:, 1], decimals).tolist()

        def element(i):
            return {'type': 'rectangle', 'center': [cx[i], cy[i], 0], 'width': w[i], 'height': h[i], 'rotation': 0,
                    **style_of(i), 'user': {'score': score_list[i], 'class': classes[i] if classes else DEFAULT_CLASS}}
    else:
        def element(i):
            return {'type': 'point', 'center': [cx[i], cy[i], 0], **style_of(i),
                    'user': {'score': score_list[i], 'class': classes[i] if classes else DEFAULT_CLASS}}
    if description is None:
        description = f'{n} detections by cellrcnn'
    header = {'name': name, 'description': description, 'attributes': dict(attributes) if attributes else {}}
    if visible is not None:
        header['display'] = {'visible': bool(visible)}
    return header, n, lambda i0, i1: [element(i) for i in range(i0, i1)]


def _style(line_color, fill_color):
    """An element's drawing keys."""
    return {'lineColor': line_color} if fill_color is None else {'lineColor': line_color, 'fillColor': fill_color}


def class_legend(counts: dict, colors: dict) -> str:
    """The classes of an annotation as a person reads them in its description: ``'name: #rrggbb (count), ...'``."""
    return ', '.join(f'{name}: {colors[name]} ({count})' for name, count in counts.items())


def detections_to_annotation(boxes, scores, labels=None, name=DEFAULT_NAME,
                             element_type='rectangle', attributes=None,
                             line_color=DEFAULT_LINE_COLOR, description=None,
                             fill_color=None, class_names=None, decimals=2, class_colors=None, visible=None):
    """Build a DSA annotation document from detections.

    :param boxes: N x 4 boxes ``x1, y1, x2, y2`` in base-level slide pixels
        (numpy array, torch tensor or nested lists).
    :param scores: N detection scores; stored per element as ``user.score``
        rounded to 4 decimals.
    :param labels: optional N labels, strings or integer class ids; integers are
        named through ``class_names`` (a list or dict; default ``{1: 'nucleus'}``,
        torchvision's first foreground class), others become ``class_<id>``.
        Stored as ``user.class``; without labels every element is ``'nucleus'``.
    :param name: the annotation's name as shown in HistomicsUI (non-empty).
    :param element_type: ``'rectangle'`` (the box) or ``'point'`` (its centre).
    :param attributes: free-form dict stored as the document's ``attributes``.
    :param line_color: element outline colour, a large_image colour string.
    :param description: document description (default: a count of detections).
    :param fill_color: optional element fill colour, e.g. ``'rgba(0,255,0,0.2)'``.
    :param decimals: coordinate rounding (0.01 px by default keeps files small).
    :param class_colors: with ``labels``, a dict ``class name -> colour``: each element then also gets its class as
        ``label`` (``{"value": name}``) and ``group``, and its class's colour as ``lineColor`` (``line_color`` for a
        class not in the dict).
    :param visible: whether HistomicsUI shows the annotation when the slide is opened (``display.visible``; None:
        large_image's default, shown only when it arrives while the slide is open).
    :returns: the annotation document (a plain dict, JSON-serialisable).
    """
    header, n, elements = _annotation_parts(boxes, scores, labels, name, element_type, attributes, line_color,
                                            description, fill_color, class_names, decimals, class_colors, visible)
    return {**header, 'elements': elements(0, n)}


def write_detections_annotation(path, boxes, scores, chunk=20_000, **options):
    """Write :func:`detections_to_annotation`'s document (same ``options``) to a JSON file without holding all its
    elements at once: they are built and encoded ``chunk`` detections at a time, so a slide's million nuclei cost a
    few MB instead of about 1 KB each."""
    header, n, elements = _annotation_parts(boxes, scores, **options)

    with atomic_write(path, 'annotation file') as f:
        f.write(_dumps(header)[:-1] + ',"elements":[')
        for i0 in range(0, n, chunk):
            f.write((',' if i0 else '') + _dumps(elements(i0, min(n, i0 + chunk)))[1:-1])
        f.write(']}')
    return path


# --------------------------------------------------------------------------- reading

def _documents(doc):
    """Yield plain annotation documents from any accepted input form."""
    if isinstance(doc, (list, tuple)):
        for item in doc:
            yield from _documents(item)
        return
    if not isinstance(doc, dict):
        raise CellRCNNError(
            f'expected an annotation document (a JSON object), got {type(doc).__name__}')
    if isinstance(doc.get('annotation'), dict):  # Girder REST form
        inner = doc['annotation']
        label = inner.get('name') or doc.get('_id') or 'annotation'
        if 'elements' not in inner:
            raise CellRCNNError(
                f'annotation {label!r} has no elements (a listing result?); '
                'fetch it with GET /annotation/{id}')
        query = doc.get('_elementQuery') or {}
        if query.get('centroids'):
            raise CellRCNNError(
                f'annotation {label!r} holds centroids only; fetch it without centroids=true')
        if 'count' in query and 'returned' in query and query['returned'] < query['count']:
            raise CellRCNNError(
                f"annotation {label!r} was truncated by the server ({query['returned']} of "
                f"{query['count']} elements); fetch it without a limit")
        yield inner
        return
    if 'elements' not in doc and ('type' in doc or 'center' in doc):
        raise CellRCNNError('got an annotation element where a document was expected')
    yield doc


def _element_geometry(el, point_box_size):
    """(cx, cy, width, height, rotation, is_ellipse) of one element's extent."""
    kind = el['type']
    if kind == 'rectangle' or kind == 'ellipse':
        c = el['center']
        return (float(c[0]), float(c[1]), float(el['width']), float(el['height']),
                float(el.get('rotation') or 0.0), kind == 'ellipse')
    if kind == 'point':
        c = el['center']
        return (float(c[0]), float(c[1]), point_box_size, point_box_size, 0.0, False)
    if kind == 'circle':
        c = el['center']
        d = 2 * float(el['radius'])
        return (float(c[0]), float(c[1]), d, d, 0.0, False)
    # closed polyline: its bounding box
    pts = np.asarray([p[:2] for p in el['points']], dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[0] - lo[0], hi[1] - lo[1], 0.0, False)


def _bounding_boxes(geometry):
    """x1,y1,x2,y2 of (rotated) rectangles / ellipses given as _element_geometry rows."""
    g = np.asarray(geometry, dtype=np.float64).reshape(-1, 6)
    cx, cy, w, h, rot, ellipse = g.T
    c, s = np.abs(np.cos(rot)), np.abs(np.sin(rot))
    # Half-extents of the axis-aligned bounding box of the rotated shape.
    hw = np.where(ellipse > 0, np.hypot(w * c, h * s), w * c + h * s) / 2
    hh = np.where(ellipse > 0, np.hypot(w * s, h * c), w * s + h * c) / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)


def _geometry(d, ei, el, point_box_size):
    """:func:`_element_geometry`, with a one-line error naming the element (its index, and its id when it has one)
    when it is malformed or has a negative width, height or radius (Girder stores such a rectangle; as a box it
    would have its corners swapped)."""
    where = f'annotation {d.get("name")!r} element {ei}' + (f' (id {el["id"]})' if el.get('id') else '')
    try:
        geometry = _element_geometry(el, point_box_size)
    except (KeyError, IndexError, TypeError, ValueError):
        raise CellRCNNError(
            f'{where}: malformed {el["type"]} (missing or non-numeric center/width/height/radius/points)') from None
    if geometry[2] < 0 or geometry[3] < 0:
        raise CellRCNNError(f'{where}: a {el["type"]} of negative size (width {geometry[2]:g}, height '
                            f'{geometry[3]:g}); correct or delete it')
    return geometry


def _element_class(el):
    """The element's class: ``user.class``, else its label's value; None when it has neither."""
    user = el.get('user')
    cls = user.get('class') if isinstance(user, dict) else None
    if not cls:
        label = el.get('label')
        cls = label.get('value') if isinstance(label, dict) else None
    return str(cls) if cls else None


def _iter_elements(doc, element_types, name):
    """(document index, element index, element) for the selected elements."""
    element_types = (element_types,) if isinstance(element_types, str) else tuple(element_types)
    unknown = set(element_types) - set(_READ_TYPES)
    if unknown:
        raise CellRCNNError(
            f'cannot read element types {sorted(unknown)}; supported: {", ".join(_READ_TYPES)}')
    docs = list(_documents(doc))
    if name is not None:
        chosen = [d for d in docs if d.get('name') == name]
        if not chosen:
            names = sorted({str(d.get('name')) for d in docs})
            raise CellRCNNError(
                f'no annotation named {name!r}; found: {", ".join(names) or "none"}')
        docs = chosen
    for d in docs:
        elements = d.get('elements') or []
        if not isinstance(elements, list):
            raise CellRCNNError(f'annotation {d.get("name")!r}: "elements" must be a list')
        for ei, el in enumerate(elements):
            if not isinstance(el, dict):
                raise CellRCNNError(
                    f'annotation {d.get("name")!r}: element {ei} is not an object')
            kind = el.get('type')
            if kind not in element_types:
                continue
            if kind == 'polyline' and not el.get('closed', False):
                continue  # an open polyline is a line, not an object outline
            yield d, ei, el


def annotation_to_boxes(doc, element_types=('rectangle', 'point'), point_box_size=None,
                        name=None):
    """Axis-aligned boxes (float32 N x 4, x1,y1,x2,y2) from DSA annotation documents.

    :param doc: a document, a list of documents, or the Girder REST form
        ``{"_id": ..., "annotation": {...}}`` (or a list of those).
    :param element_types: element types to read, from ``rectangle``, ``point``,
        ``polyline`` (closed ones; open polylines are skipped), ``circle`` and
        ``ellipse``. Other elements are ignored.
    :param point_box_size: side in pixels of the square box centred on each
        ``point`` element; required when point elements are read.
    :param name: only read annotations with this name.

    Rotated rectangles and ellipses give the bounding box of the rotated shape;
    circles give their bounding square.
    """
    return annotation_to_detections(doc, element_types, point_box_size, name)['boxes']


def annotation_to_detections(doc, element_types=('rectangle', 'point'), point_box_size=None,
                             name=None):
    """Like :func:`annotation_to_boxes`, also returning the elements' scores and classes.

    :returns: dict with ``boxes`` (float32 N x 4), ``scores`` (float32 N, from
        ``user.score``, 1.0 when absent) and ``classes`` (list of N strings, from
        ``user.class``, else the element's label value, else ``'nucleus'``).
    """
    if point_box_size is not None:
        try:
            point_box_size = float(point_box_size)
        except (TypeError, ValueError):
            raise CellRCNNError(
                f'point_box_size must be a number; got {point_box_size!r}') from None
        if not 0 < point_box_size < float('inf'):
            raise CellRCNNError(f'point_box_size must be positive; got {point_box_size}')
    geometry, scores, classes = [], [], []
    for d, ei, el in _iter_elements(doc, element_types, name):
        if el['type'] == 'point' and point_box_size is None:
            raise CellRCNNError(
                f'annotation {d.get("name")!r} element {ei} is a point: give point_box_size '
                '(the box side in pixels) to read points')
        geometry.append(_geometry(d, ei, el, point_box_size))
        user = el.get('user')
        score = user.get('score', 1.0) if isinstance(user, dict) else 1.0
        cls = _element_class(el)
        scores.append(score if isinstance(score, (int, float)) else 1.0)
        classes.append(cls or DEFAULT_CLASS)
    arr = _bounding_boxes(geometry).astype(np.float32)
    if not np.isfinite(arr).all():
        raise CellRCNNError('annotation holds non-finite coordinates')
    return {'boxes': arr, 'scores': np.asarray(scores, dtype=np.float32), 'classes': classes}


def class_source(class_from):
    """``class_from`` when it is one of :data:`CLASS_SOURCES`, else a one-line CellRCNNError."""
    if class_from not in CLASS_SOURCES:
        raise CellRCNNError(f'the class of a nucleus comes from its {", its ".join(CLASS_SOURCES[:-1])} or its '
                            f'{CLASS_SOURCES[-1]}, not {class_from!r}')
    return class_from


def _nucleus_class(d, el, class_from):
    """The class of element ``el`` of document ``d`` by ``class_from`` (:func:`annotation_to_nuclei`), or None."""
    if class_from == 'annotation':
        return str(d['name']) if d.get('name') else None
    group = str(el['group']) if el.get('group') else None
    return group if class_from == 'group' else _element_class(el) or group


def annotation_to_nuclei(doc, element_types=_READ_TYPES, name=None, class_from='label'):
    """Nuclei of DSA annotation documents as :mod:`cellrcnn.labels` takes them: points need no box size.

    :param doc, element_types, name: as :func:`annotation_to_boxes`, but every readable type by default.
    :param class_from: where a nucleus' class comes from (:data:`CLASS_SOURCES`): ``label`` (``user.class``, else
        the label value, else the element's ``group``), ``group`` (the ``group`` only) or ``annotation`` (the name of
        the annotation holding it).
    :returns: dict with ``points`` (float32 N x 2: a point element's position, else the centre of the element's
        box), ``boxes`` (float32 N x 4 as :func:`annotation_to_boxes`; a row of NaN for a point element, which has
        no extent), ``classes`` (N strings or None) and ``colors`` (N ``lineColor`` values or None). Coordinates are
        the document's (base-level slide pixels).
    """
    class_source(class_from)
    geometry, classes, colors, is_point = [], [], [], []
    for d, ei, el in _iter_elements(doc, element_types, name):
        geometry.append(_geometry(d, ei, el, float('nan')))
        classes.append(_nucleus_class(d, el, class_from))
        colors.append(el.get('lineColor'))
        is_point.append(el['type'] == 'point')
    geometry = np.asarray(geometry, dtype=np.float64).reshape(-1, 6)
    boxes = _bounding_boxes(geometry).astype(np.float32)
    points = geometry[:, :2].astype(np.float32)
    if not (np.isfinite(points).all() and np.isfinite(boxes[~np.asarray(is_point, bool)]).all()):
        raise CellRCNNError('annotation holds non-finite coordinates')
    return {'points': points, 'boxes': boxes, 'classes': classes, 'colors': colors}


# --------------------------------------------------------------------------- files

def _dumps(value):
    # json.dumps uses the C encoder; json.dump (streaming) is pure Python, several times slower.
    try:
        return json.dumps(value, separators=(',', ':'), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CellRCNNError(f'cannot write an annotation that is not plain JSON ({exc})') from None


def write_annotation(doc, path):
    """Write an annotation document (or list of documents) as a JSON file."""
    with atomic_write(path, 'annotation file') as f:
        f.write(_dumps(doc))
    return path


def read_annotation_file(path):
    """Read a JSON annotation file: a document, a list of them, or the REST form."""
    doc = read_json_file(path)
    if not isinstance(doc, (dict, list)):
        raise CellRCNNError(f'annotation file {path} does not hold an annotation document')
    return doc


def read_json_file(path, what='annotation file'):
    """Any JSON file's value, with one-line errors that call it ``what``."""
    path = os.fspath(path)
    try:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
    except OSError as exc:
        raise CellRCNNError(f'cannot read {what} {path}: {exc.strerror or exc}') from None
    except UnicodeDecodeError:
        raise CellRCNNError(f'{what} {path} is not UTF-8 text JSON') from None
    except json.JSONDecodeError as exc:
        raise CellRCNNError(
            f'{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: '
            f'{exc.msg})') from None
    except RecursionError:
        raise CellRCNNError(f'{what} {path} nests its JSON deeper than Python reads') from None
    return doc
