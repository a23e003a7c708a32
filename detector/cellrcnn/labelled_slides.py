"""Labelled slides on Girder and the training samples of their annotated regions: steps 1 to 3 of the flow that
:mod:`cellrcnn.girder_training` describes. :func:`find_labelled_slides` finds the slides that carry the named
annotations and reads their nuclei (and classes) inside the annotated region, :func:`prepare_slide` gives their
points boxes at the slide's scale, and :func:`region_tiles` and :func:`region_samples` cut that region into samples
(keeping at most ``max_region_megapixels`` of a region's pixels).
"""

from dataclasses import dataclass, field

import numpy as np

from .boxes import box_centres
from .errors import CellRCNNError
from .region import element_polygon, polygons_region, union_shape
from .settings import AnnotationTrainingSettings
from .tiling import tile_grid

NUCLEUS_TYPES = ('rectangle', 'point', 'ellipse', 'circle', 'polyline')


@dataclass(eq=False)
class LabelledSlide:
    """One slide with its annotated nuclei. Coordinates are base pixels (the slide's full resolution, as DSA
    annotations are)."""

    name: str
    path: str  #: path inside the Girder folder
    item_id: str
    file_id: str
    version: dict  #: what identifies the file's bytes (``girder_api.folder_slides``)
    annotation_ids: list
    #: who made each of ``annotation_ids`` (a login, or a user id the token may not read)
    annotation_creators: list
    #: the nucleus elements of the annotation, by type (before they become boxes)
    elements: dict
    #: the region's polygons (each K x 2, base pixels) or None: the bounding box of the nuclei
    region: list = None
    local_path: str = None
    #: nuclei, float32 N x 4, base pixels, inside the region; rows of NaN for points until :func:`prepare_slide`
    boxes: np.ndarray = None
    is_point: np.ndarray = None  #: which of ``boxes`` come from point annotations
    centres: np.ndarray = None  #: float32 N x 2, each nucleus' point or the centre of its box
    classes: np.ndarray = None  #: object N: each nucleus' class name (``class_from``), or None
    colors: np.ndarray = None  #: object N: each nucleus' ``lineColor``, or None
    points_sized: int = 0  #: how many point boxes took the extent of a starting-model detection (size_points)
    region_box: tuple = None  #: (x, y, w, h) bounding box of the region, base pixels
    docs: list = field(default=None, repr=False)  #: the annotation documents with the nucleus elements only

    @property
    def cells(self):
        return 0 if self.boxes is None else len(self.boxes)


# --------------------------------------------------------------------------- annotations on Girder

def _is_region(element, region_label):
    label = element.get('label')
    value = label.get('value') if isinstance(label, dict) else None
    wanted = region_label.strip().lower()
    return any(isinstance(v, str) and v.strip().lower() == wanted for v in (value, element.get('group')))


def split_annotation(docs, region_label='region', where='annotation'):
    """The nucleus elements and the region polygons of annotation documents (the Girder REST form or plain).

    :returns: ``(nucleus_docs, region)``: plain documents holding only the nucleus elements, and a list of region
        polygons (K x 2, base pixels), or None when no element is labelled ``region_label``."""
    nucleus_docs, region = [], []
    for doc in docs:
        inner = doc.get('annotation', doc)
        elements = inner.get('elements') or []
        kept = []
        for element in elements:
            if region_label and isinstance(element, dict) and _is_region(element, region_label):
                region.append(element_polygon(element, where))
            else:
                kept.append(element)
        nucleus_docs.append({**inner, 'elements': kept})
    return nucleus_docs, region or None


def find_labelled_slides(api_url, token, folder_id, annotation_names,
                         region_label=AnnotationTrainingSettings.region_label,
                         class_from=AnnotationTrainingSettings.class_from, progress=None):
    """The slides of a Girder folder (and its subfolders) that carry an annotation named ``annotation_names`` (a
    name, or a sequence of names), with their nuclei read (:func:`read_nuclei`).

    Fetches each slide's annotation list (``GET annotation?itemId=``) and then only the documents with those names
    (``GET annotation/{id}``). Raises CellRCNNError, naming the annotation names that are there, when no slide has
    one. :returns: a list of :class:`LabelledSlide` (not downloaded yet), in path order."""
    from .girder_api import GirderConnection, folder_slides

    say = progress.log if progress else (lambda line: None)
    wanted = (annotation_names,) if isinstance(annotation_names, str) else tuple(annotation_names or ())
    wanted = tuple(str(n) for n in wanted if n and str(n).strip())
    if not wanted:
        raise CellRCNNError('give the name of the annotations that hold the nuclei (--annotation-name)')
    called = ' or '.join(repr(n) for n in wanted)
    slides = folder_slides(api_url, token, folder_id)
    if not slides:
        raise CellRCNNError(f'Girder folder {folder_id} holds no slides (large-image items)')
    server = GirderConnection(api_url, token, retries=4, backoff=1.0, timeout=600, saved=None)
    labelled, names, logins = [], {}, {}
    with server.session():
        for slide in slides:
            listing = server.get(f'listing the annotations of {slide["path"]}', 'annotation',
                                 {'itemId': slide['item_id'], 'limit': 0, 'sort': 'created', 'sortdir': 1},
                                 item_id=slide['item_id'])
            chosen = []
            for record in listing:
                name = (record.get('annotation') or {}).get('name')
                names[name] = names.get(name, 0) + 1
                if name in wanted:
                    chosen.append(server.get(f'reading annotation {record["_id"]} of {slide["path"]}',
                                             f'annotation/{record["_id"]}', item_id=slide['item_id']))
            if not chosen:
                continue
            where = f'annotation {called} on {slide["path"]}'
            nucleus_docs, region = split_annotation(chosen, region_label, where)
            counts = {}
            for doc in nucleus_docs:
                for element in doc['elements']:
                    if isinstance(element, dict) and element.get('type') in NUCLEUS_TYPES:
                        counts[element['type']] = counts.get(element['type'], 0) + 1
            if not counts:
                say(f'{slide["path"]}: annotation {called} holds no nuclei; skipped')
                continue
            creators = [_login(server, d.get('creatorId'), logins) for d in chosen]
            found = LabelledSlide(slide['name'], slide['path'], slide['item_id'], slide['file_id'], slide['version'],
                                  [d['_id'] for d in chosen], creators, counts, region, docs=nucleus_docs)
            try:  # every slide's annotations are read, and checked, before anything is downloaded
                labelled.append(read_nuclei(found, class_from))
            except CellRCNNError as exc:
                raise CellRCNNError(f'{slide["path"]}: {exc}') from None
    if not labelled:
        present = ', '.join(f'{n!r} ({k})' for n, k in sorted(names.items(), key=lambda x: str(x[0])))
        raise CellRCNNError(f'no annotation named {called} on the {len(slides)} slide(s) of Girder folder '
                            f'{folder_id}; annotation names there: {present or "none"}')
    return labelled


def _login(server, user_id, known):
    """The login of the user with this id (what the model card names), or the id when the token may not read it."""
    from girder_client import HttpError

    if user_id not in known:
        try:
            known[user_id] = server.get('reading an annotator', f'user/{user_id}', passthrough=(400, 403, 404))['login']
        except (HttpError, KeyError, TypeError):
            known[user_id] = f'user {user_id}'
    return known[user_id]


# --------------------------------------------------------------------------- slides -> samples

def _region_shape(polygons):
    """The union of the region's polygons as one prepared shapely geometry: tests against it take time and memory
    that grow with points + vertices, not points x vertices (a hand-drawn region has thousands of vertices)."""
    import shapely

    region = union_shape(polygons)
    shapely.prepare(region)
    return region


def _centres_inside(boxes, polygons):
    """Whether each box's centre lies inside any of the polygons (:func:`_region_shape`)."""
    import shapely

    return shapely.contains_xy(_region_shape(polygons), *box_centres(boxes).T)


def read_nuclei(labelled, class_from=AnnotationTrainingSettings.class_from):
    """Fill in ``labelled``'s ``boxes`` (rows of NaN for points), ``is_point``, ``centres``, ``classes`` (by
    ``class_from``: :func:`cellrcnn.annotation.annotation_to_nuclei`) and ``colors`` from its annotation documents:
    the nuclei whose centre lies inside its region. Needs no pixel of the slide."""
    from .annotation import annotation_to_nuclei

    nuclei = annotation_to_nuclei(labelled.docs, NUCLEUS_TYPES, class_from=class_from)
    centres, boxes = nuclei['points'], nuclei['boxes']
    inside = np.ones(len(boxes), bool) if labelled.region is None else \
        _centres_inside(np.hstack([centres, centres]), labelled.region)
    if not inside.any():
        raise CellRCNNError('no annotated nucleus lies inside its region')
    labelled.boxes, labelled.centres = boxes[inside], centres[inside]
    labelled.is_point = np.isnan(labelled.boxes[:, 0])
    labelled.classes = np.array(nuclei['classes'], dtype=object)[inside]
    labelled.colors = np.array(nuclei['colors'], dtype=object)[inside]
    return labelled


def prepare_slide(labelled, slide, point_size_um=AnnotationTrainingSettings.point_size_um):
    """Give the points of ``labelled`` (:func:`read_nuclei`) squares of ``point_size_um`` at the opened ``slide``'s
    native resolution (:class:`cellrcnn.slide.Slide`) and fill in ``labelled.region_box``."""
    if not point_size_um > 0:
        raise CellRCNNError(f'the point box size must be positive, not {point_size_um} um')
    half = point_size_um / slide.native_mpp / 2
    squares = np.hstack([labelled.centres - half, labelled.centres + half])
    boxes = np.where(labelled.is_point[:, None], squares, labelled.boxes).astype(np.float32)
    if labelled.region is not None:
        labelled.region_box = polygons_region(labelled.region)['roi']
    else:
        labelled.region_box = (float(boxes[:, 0].min()), float(boxes[:, 1].min()),
                               float(np.ptp(boxes[:, 0::2])), float(np.ptp(boxes[:, 1::2])))
    labelled.boxes = boxes
    return labelled


def _base_boxes(tiles):
    """float64 T x 4 ``(x0, y0, x1, y1)``: the base rectangle each tile reads."""
    return np.array([[t.base_x, t.base_y, t.base_x + t.base_width, t.base_y + t.base_height] for t in tiles],
                    np.float64).reshape(-1, 4)


def _spans_holding(starts, ends, values):
    """For each value, the first and past-the-last index of the spans ``[starts[i], ends[i])`` (both ascending, as a
    tile grid's columns or rows are) that hold it."""
    return np.searchsorted(ends, values, side='right'), np.searchsorted(starts, values, side='right')


def _tiles_holding_centres(tiles, centres):
    """The tiles of a :func:`cellrcnn.tiling.tile_grid` whose base rectangle holds the centre of a nucleus, in grid
    order: found by the grid's rows and columns, so time grows with tiles + nuclei, not tiles x nuclei."""
    columns = sorted({(t.col, t.base_x, t.base_x + t.base_width) for t in tiles})
    rows = sorted({(t.row, t.base_y, t.base_y + t.base_height) for t in tiles})
    col_lo, col_hi = _spans_holding([c[1] for c in columns], [c[2] for c in columns], centres[:, 0])
    row_lo, row_hi = _spans_holding([r[1] for r in rows], [r[2] for r in rows], centres[:, 1])
    held = set()
    for dr in range(int(np.max(row_hi - row_lo, initial=0))):
        for dc in range(int(np.max(col_hi - col_lo, initial=0))):
            ok = (row_lo + dr < row_hi) & (col_lo + dc < col_hi)
            held.update(zip((row_lo + dr)[ok].tolist(), (col_lo + dc)[ok].tolist()))
    return [t for t in tiles if (t.row, t.col) in held]  # a grid's rows and columns are numbered from 0


def _region_mask(tile, labelled):
    """uint8 ``tile.height x tile.width``: 1 where the tile lies inside the region's shapes."""
    import cv2

    sx, sy = tile.width / tile.base_width, tile.height / tile.base_height
    mask = np.zeros((tile.height, tile.width), np.uint8)
    for polygon in labelled.region:
        local = (polygon - [tile.base_x, tile.base_y]) * [sx, sy]
        cv2.fillPoly(mask, [np.round(local).astype(np.int32)], 1)
    return mask


def _megapixels(tiles):
    return sum(t.width * t.height for t in tiles) / 1e6


def region_tiles(slide, labelled, tile_size=512, overlap=64,
                 max_megapixels=AnnotationTrainingSettings.max_region_megapixels):
    """``(tile, image)`` of a slide's annotated region at the slide's analysis scale; pixels outside the region's
    shapes are painted white, tiles with none of the region are left out.

    The pixels kept are bounded by ``max_megapixels`` (millions of analysis pixels): the tiles are chosen from the
    geometry before any is read, then read one at a time. When the tiles the region reaches would hold more, only
    those holding the centre of a labelled nucleus are read (a region that two nuclei far apart span reads their two
    tiles, not the slide between them); when those too would hold more, a one-line CellRCNNError names the slide and
    the annotation.

    :returns: ``(tiles, whole)``: the list of ``(tile, image)``, and whether it covers the whole region (False: only
        the tiles holding nuclei)."""
    import shapely

    grid = tile_grid(slide, tile_size=tile_size, overlap=overlap, roi=labelled.region_box, min_tissue=0)
    chosen = grid
    if labelled.region is not None:  # the tiles the region's shapes reach
        reach = shapely.intersects(_region_shape(labelled.region), shapely.box(*_base_boxes(grid).T))
        chosen = [t for t, hit in zip(grid, reach) if hit]
    whole = _megapixels(chosen) <= max_megapixels
    if not whole:
        chosen = _tiles_holding_centres(grid, labelled.centres)
        if _megapixels(chosen) > max_megapixels:
            raise CellRCNNError(
                f'{labelled.path}: the region of annotation {", ".join(labelled.annotation_ids)} needs '
                f'{_megapixels(chosen):.0f} megapixels at {slide.magnification:g}x for the tiles holding its '
                f'{labelled.cells} nuclei alone, more than the {max_megapixels:g} a region may keep '
                '(max_region_megapixels): split it into smaller regions')
    tiles = []
    for tile in chosen:
        mask = None if labelled.region is None else _region_mask(tile, labelled)
        if mask is not None and not mask.any():
            continue
        image = slide.read(tile)
        if mask is not None:
            image = image.copy()
            image[mask == 0] = 255
        tiles.append((tile, image))
    return tiles, whole


def region_samples(tiles, labelled, type_index=None):
    """Samples (:mod:`cellrcnn.samples`) of :func:`region_tiles`, with the slide's nuclei mapped onto each tile; boxes
    less than 40 % inside a tile (``synthetic.VISIBLE_FRACTION``) are dropped (:func:`cellrcnn.samples.visible_boxes`).

    :param type_index: ``{class name: cell type index}`` (``ModelConfig.cell_type_index``) of a model with cell
        types: the samples are then ``(image, boxes, has_extent, cell_types)``, each nucleus' type its class's
        index, -1 (unknown) for other classes; without it, ``(image, boxes)``."""
    from .samples import visible_boxes

    samples = []
    for tile, image in tiles:
        sx, sy = tile.width / tile.base_width, tile.height / tile.base_height
        scale = np.array([sx, sy, sx, sy], np.float32)
        offset = np.array([tile.base_x, tile.base_y, tile.base_x, tile.base_y], np.float32)
        boxes, kept = visible_boxes((labelled.boxes - offset) * scale, tile.height, tile.width)
        if type_index is None:
            samples.append((image, boxes[kept]))
        else:
            types = np.array([type_index.get(c, -1) for c in labelled.classes[kept]], np.int64)
            samples.append((image, boxes[kept], np.ones(len(types), bool), types))
    return samples
