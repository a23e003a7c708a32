"""Training a detector from nuclei annotated in HistomicsUI: a folder of slides on Girder in, a model and its card out.

The flow (:func:`train_from_girder`; ``cellrcnn train-girder`` and the ``TrainCellDetector`` task run it):

1. **Labelled slides**: every large-image item of the folder (and its subfolders) whose annotations include one named
   ``annotation_name``. Its rectangles, points, ellipses, circles and closed polygons are the nuclei; every other
   annotation (another name) is ignored. On training slides a point gets the box of the starting model's detection
   under it (:func:`size_points`), else a square of ``point_size_um``.
2. **The annotated region**: only the part of a slide the annotator covered becomes training data, so that the cells
   nobody annotated are never taught as background. The region is the union of the annotation's rectangles and
   closed polygons labelled (or grouped as) ``region_label`` (default ``region``); without one it is the bounding
   box of the annotated nuclei. Pixels inside the region's bounding box but outside its shapes are painted white
   (glass), and only the nuclei whose centre lies inside the region are kept.
3. **Samples**: the region is read at the model's resolution (``model.config.mpp``) with :class:`cellrcnn.slide.Slide`
   and cut into tiles, with the nuclei mapped from base pixels onto each tile: the ``(image, boxes)`` samples that
   :func:`cellrcnn.train.train` and :func:`cellrcnn.evaluate.evaluate_model` take.
4. **Held-out slides**: the last ``holdout`` labelled slides in path order (a count, or a fraction of the labelled
   slides; at least one, and at least one slide is left to train on) are never trained on and give the reported
   figures. The operating point (score threshold) is calibrated on the *training* slides' tiles, never on the
   held-out ones, so the held-out figures are an honest estimate.
5. **Training**: fine-tunes ``init`` (default: the bundled model) or, with ``from_scratch``, trains a new model of the
   same configuration, with :func:`cellrcnn.train.train` (augmentation, schedule, PreciseBN).
6. **Outputs**: ``NAME.pt`` (float16, held-out metrics inside) and ``NAME.md`` (its model card: data, settings,
   held-out figures, date, cellrcnn version) in the output folder, and uploaded to a Girder folder when one is given.
   The ``.pt`` file is what ``cellrcnn detect --model`` and the CellDetection task's model parameter take.
"""

import dataclasses
import datetime
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .errors import CellRCNNError
from .files import atomic_write
from .settings import AnnotationTrainingSettings, DetectionSettings
from .tiling import tile_grid

NUCLEUS_TYPES = ('rectangle', 'point', 'ellipse', 'circle', 'polyline')
REGION_TYPES = ('rectangle', 'polyline')


@dataclass(eq=False)
class LabelledSlide:
    """One slide with its annotated nuclei. Coordinates are base pixels (the slide's full resolution, as DSA
    annotations are)."""

    name: str
    path: str  #: path inside the Girder folder
    item_id: str
    file_id: str
    annotation_ids: list
    #: who made each of ``annotation_ids`` (a login, or a user id the token may not read)
    annotation_creators: list
    #: the nucleus elements of the annotation, by type (before they become boxes)
    elements: dict
    #: the region's polygons (each K x 2, base pixels) or None: the bounding box of the nuclei
    region: list = None
    local_path: str = None
    boxes: np.ndarray = None  #: nuclei, float32 N x 4, base pixels, inside the region
    is_point: np.ndarray = None  #: which of ``boxes`` come from point annotations
    points_sized: int = 0  #: how many point boxes took the extent of a starting-model detection (size_points)
    region_box: tuple = None  #: (x, y, w, h) bounding box of the region, base pixels
    docs: list = field(default=None, repr=False)  #: the annotation documents with the nucleus elements only

    @property
    def cells(self):
        return 0 if self.boxes is None else len(self.boxes)


@dataclass
class TrainingResult:
    model_path: str
    card_path: str
    train_slides: list
    heldout_slides: list
    metrics: dict  #: held-out metrics of the trained model at its calibrated operating point
    initial_metrics: dict  #: held-out metrics of the starting model (None when trained from scratch)
    threshold: float
    train_f1: float  #: F1 on the training tiles at the chosen threshold (optimistic by construction)
    seconds: dict = field(default_factory=dict)
    uploaded: list = field(default_factory=list)  #: Girder files (dicts) of the model and its card


# --------------------------------------------------------------------------- annotations on Girder

def _is_region(element, region_label):
    label = element.get('label')
    value = label.get('value') if isinstance(label, dict) else None
    wanted = region_label.strip().lower()
    return any(isinstance(v, str) and v.strip().lower() == wanted for v in (value, element.get('group')))


def _region_polygon(element, where):
    """A region element as a K x 2 polygon in base pixels."""
    try:
        if element['type'] == 'rectangle':
            cx, cy = (float(v) for v in element['center'][:2])
            w, h, rot = float(element['width']), float(element['height']), float(element.get('rotation') or 0)
            corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
            c, s = math.cos(rot), math.sin(rot)
            return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        if element['type'] == 'polyline' and element.get('closed'):
            points = np.asarray([p[:2] for p in element['points']], dtype=np.float64)
            if len(points) >= 3:
                return points
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    raise CellRCNNError(f'{where}: a region must be a rectangle or a closed polygon, not this '
                        f'{element.get("type")!r} element')


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
                region.append(_region_polygon(element, where))
            else:
                kept.append(element)
        nucleus_docs.append({**inner, 'elements': kept})
    return nucleus_docs, region or None


def _server(api_url, token):
    from .girder_api import GirderConnection

    return GirderConnection(api_url, token, retries=4, backoff=1.0, timeout=600, saved=None)


def find_labelled_slides(api_url, token, folder_id, annotation_name, region_label=AnnotationTrainingSettings.region_label,
                         progress=None):
    """The slides of a Girder folder (and its subfolders) that carry an annotation named ``annotation_name``.

    Fetches each slide's annotation list (``GET annotation?itemId=``) and then only the documents with that name
    (``GET annotation/{id}``). Raises CellRCNNError, naming the annotation names that are there, when no slide has
    one. :returns: a list of :class:`LabelledSlide` (not downloaded yet), in path order."""
    from .girder_api import folder_slides

    say = progress.log if progress else (lambda line: None)
    if not annotation_name or not str(annotation_name).strip():
        raise CellRCNNError('give the name of the annotations that hold the nuclei (--annotation-name)')
    slides = folder_slides(api_url, token, folder_id)
    if not slides:
        raise CellRCNNError(f'Girder folder {folder_id} holds no slides (large-image items)')
    server = _server(api_url, token)
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
                if name == annotation_name:
                    chosen.append(server.get(f'reading annotation {record["_id"]} of {slide["path"]}',
                                             f'annotation/{record["_id"]}', item_id=slide['item_id']))
            if not chosen:
                continue
            where = f'annotation {annotation_name!r} on {slide["path"]}'
            nucleus_docs, region = split_annotation(chosen, region_label, where)
            counts = {}
            for doc in nucleus_docs:
                for element in doc['elements']:
                    if isinstance(element, dict) and element.get('type') in NUCLEUS_TYPES:
                        counts[element['type']] = counts.get(element['type'], 0) + 1
            if not counts:
                say(f'{slide["path"]}: annotation {annotation_name!r} holds no nuclei; skipped')
                continue
            creators = [_login(server, d.get('creatorId'), logins) for d in chosen]
            labelled.append(LabelledSlide(slide['name'], slide['path'], slide['item_id'], slide['file_id'],
                                          [d['_id'] for d in chosen], creators, counts, region, docs=nucleus_docs))
    if not labelled:
        present = ', '.join(f'{n!r} ({k})' for n, k in sorted(names.items(), key=lambda x: str(x[0])))
        raise CellRCNNError(f'no annotation named {annotation_name!r} on the {len(slides)} slide(s) of Girder folder '
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

def _polygons_box(polygons):
    points = np.concatenate(polygons)
    lo, hi = points.min(axis=0), points.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def _centres_inside(boxes, polygons):
    """Whether each box's centre lies inside any of the polygons: shapely's prepared geometry, so time and memory
    grow with nuclei + vertices, not nuclei x vertices (a hand-drawn region has thousands of vertices)."""
    import shapely

    region = shapely.union_all([shapely.make_valid(shapely.Polygon(p)) for p in polygons])
    shapely.prepare(region)
    return shapely.contains_xy(region, (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2)


def prepare_slide(labelled, slide, point_size_um=AnnotationTrainingSettings.point_size_um):
    """Fill in ``labelled.boxes``, ``labelled.is_point`` and ``labelled.region_box`` from its annotation and the
    opened ``slide`` (:class:`cellrcnn.slide.Slide`, whose native resolution sizes the point boxes)."""
    from .annotation import annotation_to_boxes

    if not point_size_um > 0:
        raise CellRCNNError(f'the point box size must be positive, not {point_size_um} um')
    shapes = annotation_to_boxes(labelled.docs, element_types=[t for t in NUCLEUS_TYPES if t != 'point'])
    points = annotation_to_boxes(labelled.docs, element_types=('point',),
                                 point_box_size=point_size_um / slide.native_mpp)
    boxes = np.concatenate([shapes, points])
    is_point = np.arange(len(boxes)) >= len(shapes)
    if labelled.region is not None:
        inside = _centres_inside(boxes, labelled.region)
        boxes, is_point = boxes[inside], is_point[inside]
        labelled.region_box = _polygons_box(labelled.region)
    else:
        labelled.region_box = (float(boxes[:, 0].min()), float(boxes[:, 1].min()),
                               float(np.ptp(boxes[:, 0::2])), float(np.ptp(boxes[:, 1::2])))
    if not len(boxes):
        raise CellRCNNError(f'{labelled.path}: no annotated nucleus lies inside its region')
    labelled.boxes, labelled.is_point = boxes.astype(np.float32), is_point
    return labelled


def region_tiles(slide, labelled, tile_size=512, overlap=64):
    """``(tile, image)`` of a slide's annotated region at the slide's analysis scale; pixels outside the region's
    shapes are painted white, tiles with none of the region are left out."""
    import cv2

    tiles = []
    for tile in tile_grid(slide, tile_size=tile_size, overlap=overlap, roi=labelled.region_box, min_tissue=0):
        image = slide.read(tile)
        if labelled.region is not None:
            sx, sy = tile.width / tile.base_width, tile.height / tile.base_height
            mask = np.zeros(image.shape[:2], np.uint8)
            for polygon in labelled.region:
                local = (polygon - [tile.base_x, tile.base_y]) * [sx, sy]
                cv2.fillPoly(mask, [np.round(local).astype(np.int32)], 1)
            if not mask.any():
                continue
            image = image.copy()
            image[mask == 0] = 255
        tiles.append((tile, image))
    return tiles


def region_samples(tiles, labelled):
    """``(image, boxes)`` samples of :func:`region_tiles`, with the slide's nuclei mapped onto each tile; boxes
    less than 40 % inside a tile (``synthetic.VISIBLE_FRACTION``) are dropped (:func:`cellrcnn.samples.keep_inside`)."""
    from .samples import keep_inside

    samples = []
    for tile, image in tiles:
        sx, sy = tile.width / tile.base_width, tile.height / tile.base_height
        scale = np.array([sx, sy, sx, sy], np.float32)
        offset = np.array([tile.base_x, tile.base_y, tile.base_x, tile.base_y], np.float32)
        samples.append((image, keep_inside((labelled.boxes - offset) * scale, tile.height, tile.width)))
    return samples


def size_points(model, slide, labelled, tiles, device='auto'):
    """Give point annotations the extent of the nucleus under them: each point's box becomes the box of the
    nearest detection of ``model`` (at its operating point) that contains the point and whose centre lies within
    half a point box of it; points with no such detection keep their square. :returns: how many were sized."""
    from .inference import Detector

    points = np.flatnonzero(labelled.is_point)
    if not len(points) or not tiles:
        return 0
    detector = Detector(model, device, DetectionSettings.batch_size)
    found = [slide.to_base(boxes, tile) for (tile, _), (boxes, _) in
             zip(tiles, detector.detect_tiles([image for _, image in tiles]))]
    found = np.concatenate(found) if found else np.zeros((0, 4))
    if not len(found):
        return 0
    sized = 0
    for i in points:
        box = labelled.boxes[i]
        px, py, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
        distance = np.hypot((found[:, 0] + found[:, 2]) / 2 - px, (found[:, 1] + found[:, 3]) / 2 - py)
        holds = (found[:, 0] <= px) & (px <= found[:, 2]) & (found[:, 1] <= py) & (py <= found[:, 3])
        candidates = np.flatnonzero(holds & (distance <= half))
        if len(candidates):
            labelled.boxes[i] = found[candidates[np.argmin(distance[candidates])]]
            sized += 1
    return sized


def holdout_count(holdout, n):
    """How many of ``n`` labelled slides to hold out: ``holdout`` is a count (an integer >= 1) or a fraction in
    (0, 1); at least one slide is held out and at least one is left to train on."""
    if n < 2:
        raise CellRCNNError(f'training needs at least 2 annotated slides (one to train on, one held out to '
                            f'evaluate on); found {n}')
    try:
        holdout = float(holdout)
    except (TypeError, ValueError):
        raise CellRCNNError(f'--holdout must be a number of slides or a fraction, not {holdout!r}') from None
    if 0 < holdout < 1:
        count = max(1, math.ceil(holdout * n - 1e-9))
    elif holdout >= 1 and holdout == int(holdout):
        count = int(holdout)
    else:
        raise CellRCNNError(f'--holdout must be a whole number of slides (>= 1) or a fraction between 0 and 1, '
                            f'not {holdout:g}')
    if count >= n:
        raise CellRCNNError(f'holding out {count} of {n} annotated slides leaves none to train on')
    return count


# --------------------------------------------------------------------------- the model card

def _slug(text):
    return re.sub(r'[^A-Za-z0-9._-]+', '-', str(text)).strip('-.') or 'nuclei'


def _figures(metrics):
    return (f"{metrics['precision']:.3f} | {metrics['recall']:.3f} | **{metrics['f1']:.3f}** | "
            f"{metrics['AP']:.3f} | {metrics['tp']} | {metrics['fp']} | {metrics['fn']}")


def model_card(name, settings, result, folder_id, api_url):
    """The model card of a model trained by :func:`train_from_girder`, as markdown."""
    s = settings
    slide_rows = '\n'.join(
        f"| {sl.path} | {'held out' if sl in result.heldout_slides else 'training'} | {sl.cells} | "
        f"{', '.join(f'{k} {v}' for k, v in sorted(sl.elements.items()))}"
        f"{f' ({sl.points_sized} sized by the starting model)' if sl.points_sized else ''} | "
        f"{'labelled shapes' if sl.region is not None else 'bounding box of the nuclei'} |"
        for sl in result.train_slides + result.heldout_slides)
    annotation_rows = '\n'.join(f'| {sl.path} | `{annotation_id}` | {creator} |'
                                 for sl in result.train_slides + result.heldout_slides
                                 for annotation_id, creator in zip(sl.annotation_ids, sl.annotation_creators))
    start = 'random initialisation (--from-scratch)' if s['from_scratch'] else f"fine-tuned from `{s['init_name']}`"
    lines = [
        f'# Model card: `{name}.pt`', '',
        f'Nucleus detector trained by `cellrcnn train-girder` (cellrcnn {__version__}) on '
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", '',
        '## Data',
        f"- Annotations named **{s['annotation_name']!r}** on the slides of Girder folder `{folder_id}` "
        f'({api_url}); region label {s["region_label"]!r}; points the starting model found no '
        f'nucleus under became {s["point_size_um"]:g} µm squares.',
        f'- {len(result.train_slides)} training slide(s) with {sum(x.cells for x in result.train_slides)} nuclei, '
        f'{len(result.heldout_slides)} held-out slide(s) with {sum(x.cells for x in result.heldout_slides)} '
        f"nuclei; read at {s['mpp']:g} µm/px.", '',
        '| slide | use | nuclei | annotated as | region |', '|---|---|---|---|---|', slide_rows, '',
        'Every annotation of that name on those slides was used, whoever made it:', '',
        '| slide | annotation | made by |', '|---|---|---|', annotation_rows, '',
        '## Settings',
        f"- Start: {start}.",
        f"- {s['steps']} steps, batch {s['batch_size']}, learning rate {s['lr']:g} (warm-up {s['warmup_steps']}, "
        f"cosine decay), {s['tile_size']} px training crops with flips, rotations, scale and stain jitter, PreciseBN.",
        f"- Operating point: score ≥ {result.threshold:.3f}, the threshold with the best F1 on the **training** "
        f'slides\' tiles (F1 there {result.train_f1:.3f}; the held-out slides were not used to choose it).',
        f"- Training took {result.seconds.get('train', 0):.0f} s on {s['device']}.", '',
        '## Held-out evaluation',
        'Precision, recall and F1 at IoU ≥ 0.5 at the operating point, COCO AP [.5:.95], on the held-out slides\' '
        'annotated regions (never seen in training or calibration).', '',
        '| model | precision | recall | F1 | AP | TP | FP | FN |', '|---|---|---|---|---|---|---|---|',
        f'| this model | {_figures(result.metrics)} |',
    ]
    if result.initial_metrics is not None:
        lines.append(f"| `{s['init_name']}` before training, at its own threshold | "
                     f'{_figures(result.initial_metrics)} |')
    lines += ['', '## Limits',
              f'- Figures come from {len(result.heldout_slides)} held-out slide(s) of the same folder: they say '
              'little about slides from another lab, scanner or stain.',
              '- A point becomes the box of the starting model\'s detection under it (training slides only), else a '
              'square of the point size: box sizes learnt from points are the starting model\'s, and IoU-based '
              'figures on held-out slides annotated with points are approximate.',
              '- Not a medical device; not for diagnosis.', '',
              f'Use it: `cellrcnn detect SLIDE -o OUT --model {name}.pt`, or pick the file as the Model of the '
              'CellDetection task.', '']
    return '\n'.join(lines)


# --------------------------------------------------------------------------- the whole flow

def train_from_girder(api_url, token, folder_id, annotation_name, out_dir, settings=AnnotationTrainingSettings(),
                      output_folder=None, name=None, size_point_boxes=True, warmup_steps=None, tile_size=256,
                      sample_size=512, workers=0, progress=None):
    """Train (or fine-tune) a detector on the annotated slides of a Girder folder, evaluate it on held-out slides,
    write ``out_dir/NAME.pt`` and ``out_dir/NAME.md`` and upload both to ``output_folder`` (a Girder folder id) when
    given. See the module's docstring for the steps.

    :param settings: :class:`cellrcnn.settings.AnnotationTrainingSettings`: the starting model (``init``, whose
        configuration and resolution are kept; ``from_scratch``: only its configuration), the held-out slides
        (``holdout``: a count, or a fraction of the labelled slides), the training steps and rates.
    :param size_point_boxes: give each point the box of the starting model's detection under it
        (:func:`size_points`), else a ``point_size_um`` square.
    :param progress: a :class:`cellrcnn.progress.Progress`, given the percentage done and a line per step.
    :returns: a :class:`TrainingResult`.
    """
    from .checkpoint import BUNDLED_MODEL, load_model, save_checkpoint
    from .evaluate import calibrate_threshold, evaluate_model
    from .girder_api import download_file, upload_files
    from .slide import Slide, magnification_from_mpp
    from .train import TrainConfig, train

    say = progress.log if progress else (lambda line: None)
    done = [0]
    if progress is not None:
        progress.start(100)

    def advance(to, comment=None):
        if progress is not None:
            if comment:
                progress.comment(comment)
            if to > done[0]:
                progress.update(to - done[0])
                done[0] = to

    st = settings
    steps, from_scratch = st.steps, st.from_scratch
    init = st.init or BUNDLED_MODEL
    base = load_model(init)  # checked before anything is downloaded
    mpp = base.config.mpp
    name = _slug(name or f'cellrcnn-{annotation_name}')
    warmup = min(steps // 10, 200) if warmup_steps is None else warmup_steps
    cfg = TrainConfig(steps=steps, batch_size=st.batch_size, lr=st.lr, warmup_steps=warmup, tile_size=tile_size,
                      seed=st.seed, workers=workers, checkpoint_every=max(steps, 1)).validate()
    if output_folder:  # fail before hours of training, not after
        server = _server(api_url, token)
        with server.session(timeout=60):
            server.get('checking the output folder', f'folder/{output_folder}', item_id=output_folder)
    timings = {}
    started = time.perf_counter()

    advance(1, 'finding annotated slides')
    slides = find_labelled_slides(api_url, token, folder_id, annotation_name, st.region_label, progress=progress)
    n_held = holdout_count(st.holdout, len(slides))
    train_slides, heldout_slides = slides[:-n_held], slides[-n_held:]
    download_dir = os.path.join(out_dir, 'slides')
    os.makedirs(download_dir, exist_ok=True)
    train_samples, heldout_samples = [], []
    for i, labelled in enumerate(slides):
        advance(2 + int(18 * i / len(slides)), f'reading {labelled.path}')
        local = os.path.join(download_dir, f'{labelled.item_id}-{_slug(labelled.name)}')
        if not os.path.exists(local):
            download_file(api_url, token, labelled.file_id, local)
        labelled.local_path = local
        slide = Slide(local, magnification=magnification_from_mpp(mpp))
        prepare_slide(labelled, slide, st.point_size_um)
        held = labelled in heldout_slides
        # held-out regions are cut into large tiles without overlap: every nucleus is counted once
        tiles = region_tiles(slide, labelled, tile_size=1024 if held else sample_size, overlap=0 if held else 64)
        if size_point_boxes and not held:  # held-out annotations stay as drawn: no help from the starting model
            labelled.points_sized = size_points(base, slide, labelled, tiles, st.device)
        samples = region_samples(tiles, labelled)
        (heldout_samples if held else train_samples).extend(samples)
        sized = f', {labelled.points_sized} points sized by the starting model' if labelled.points_sized else ''
        say(f'{labelled.path}: {labelled.cells} nuclei ({", ".join(f"{k} {v}" for k, v in labelled.elements.items())}'
            f'{sized}) in region {", ".join(f"{v:.0f}" for v in labelled.region_box)} -> {len(samples)} tile(s), '
            f'{"held out" if held else "training"}')
    timings['data'] = time.perf_counter() - started

    advance(20, 'evaluating the starting model')
    initial = None
    if not from_scratch:
        initial = evaluate_model(base, heldout_samples, device=st.device)
        say(f'starting model on the held-out slides: P {initial["precision"]:.3f} R {initial["recall"]:.3f} '
            f'F1 {initial["f1"]:.3f}')

    advance(22, f'training {steps} steps')
    t0 = time.perf_counter()
    model, _ = train(base.config, cfg, os.path.join(out_dir, 'run'), device=st.device, samples=train_samples,
                     init=None if from_scratch else init,
                     on_step=lambda step, total: advance(22 + int(68 * step / total)))
    timings['train'] = time.perf_counter() - t0

    advance(90, 'calibrating on the training slides, evaluating on the held-out slides')
    threshold, train_f1 = calibrate_threshold(model, train_samples, device=st.device)
    metrics = evaluate_model(model, heldout_samples, device=st.device)
    from .devices import resolve_device
    card_settings = {**dataclasses.asdict(cfg), 'annotation_name': annotation_name, 'region_label': st.region_label,
                     'point_size_um': st.point_size_um, 'mpp': mpp, 'from_scratch': bool(from_scratch),
                     'init_name': os.path.basename(init), 'device': str(resolve_device(st.device))}
    result = TrainingResult(os.path.join(out_dir, f'{name}.pt'), os.path.join(out_dir, f'{name}.md'),
                            train_slides, heldout_slides, metrics, initial, float(threshold), float(train_f1),
                            timings)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    save_checkpoint(result.model_path, model, half=True, train_config=dataclasses.asdict(cfg),
                    validation=numbers, training_data={
                        'girder_folder': folder_id, 'annotation_name': annotation_name,
                        'train_slides': [s.path for s in train_slides],
                        'heldout_slides': [s.path for s in heldout_slides],
                        'train_cells': sum(s.cells for s in train_slides),
                        'heldout_cells': sum(s.cells for s in heldout_slides),
                        'init': None if from_scratch else os.path.basename(init),
                        'annotations': [{'slide': s.path, 'id': a, 'creator': c} for s in train_slides + heldout_slides
                                        for a, c in zip(s.annotation_ids, s.annotation_creators)]})
    with atomic_write(result.card_path, 'model card') as f:
        f.write(model_card(name, card_settings, result, folder_id, api_url))
    if output_folder:
        advance(95, 'uploading the model and its card')
        result.uploaded = upload_files(api_url, token, output_folder, [result.model_path, result.card_path])
    timings['total'] = time.perf_counter() - started
    advance(100)
    if progress is not None:
        progress.finish()
    return result


def summary_lines(result):
    """What a person reads at the end of a run."""
    m = result.metrics
    lines = [f'trained on {len(result.train_slides)} slide(s), {sum(s.cells for s in result.train_slides)} nuclei; '
             f'held out {", ".join(s.path for s in result.heldout_slides)} '
             f'({sum(s.cells for s in result.heldout_slides)} nuclei)',
             f'operating point: score >= {result.threshold:.3f} (calibrated on the training slides, F1 there '
             f'{result.train_f1:.3f})',
             f'held-out: precision {m["precision"]:.3f}  recall {m["recall"]:.3f}  F1 {m["f1"]:.3f}  AP {m["AP"]:.3f}']
    if result.initial_metrics is not None:
        i = result.initial_metrics
        lines.append(f'starting model on the same slides: precision {i["precision"]:.3f}  recall {i["recall"]:.3f}  '
                     f'F1 {i["f1"]:.3f}')
    lines.append(f'wrote {result.model_path} and {result.card_path}')
    for file in result.uploaded:
        lines.append(f'uploaded {file["name"]} to Girder as file {file["_id"]} (item {file["itemId"]})')
    return lines
