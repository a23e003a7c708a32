"""Training a detector from nuclei annotated in HistomicsUI: a folder of slides on Girder in, a model and its card out.

The flow (:func:`train_from_girder`; ``cellrcnn train-girder`` and the ``TrainCellDetector`` task run it; steps 1
to 3 are :mod:`cellrcnn.labelled_slides`):

1. **Labelled slides**: every large-image item of the folder (and its subfolders) whose annotations include one named
   ``annotation_name`` (and, when classes come from annotation names, the cell types' names). Its rectangles,
   points, ellipses, circles and closed polygons are the nuclei; every other annotation (another name) is ignored.
   On training slides a point gets the box of the starting model's detection under it (:func:`size_points`), else a
   square of ``point_size_um``. With cell types (``settings.cell_types``), each nucleus' class (its label or style
   group, or its annotation's name: ``settings.class_from``) names its type, or none
   (:mod:`cellrcnn.annotation_classes`).
2. **The annotated region**: only the part of a slide the annotator covered becomes training data, so that the cells
   nobody annotated are never taught as background. The region is the union of the annotation's rectangles and closed
   polygons (their holes cut out: ``region.keyhole``) labelled (or grouped as) ``region_label`` (default ``region``);
   without one it is the bounding box of the annotated nuclei. Pixels inside the region's bounding box but outside its
   shapes are painted white (glass), and only the nuclei whose centre lies inside the region are kept.
3. **Samples**: the region is read at the model's resolution (``model.config.mpp``) with :class:`cellrcnn.slide.Slide`
   and cut into tiles (at most ``max_region_megapixels`` of them: past it only the tiles holding nuclei, and a region
   whose nuclei need more is refused), with the nuclei mapped from base pixels onto each tile: the samples
   (``(image, boxes)``, with cell types four-part, :mod:`cellrcnn.samples`) that :func:`cellrcnn.train.train` and
   :func:`cellrcnn.evaluate.evaluate_model` take.
4. **Held-out slides**: the last ``holdout`` labelled slides in path order (a count, or a fraction of the labelled
   slides; at least one, and at least one slide is left to train on) are never trained on and give the reported
   figures. The operating point (score threshold) is calibrated on the *training* slides' tiles, never on the
   held-out ones, so the held-out figures are an honest estimate. A model with cell types is also measured per type
   (centroid matching, :func:`cellrcnn.evaluate.evaluate_records`), with the confusion matrix.
5. **Training**: fine-tunes ``init`` (default: the bundled model) or, with ``from_scratch``, trains a new model of the
   same configuration, with :func:`cellrcnn.train.train` (augmentation, schedule, PreciseBN).
6. **Outputs**: ``NAME.pt`` (float16, held-out metrics inside) and ``NAME.md`` (its model card: data, settings,
   cell types, held-out figures, date, cellrcnn version) in the output folder, and uploaded to a Girder folder when
   one is given. The ``.pt`` file is what ``cellrcnn detect --model`` and the CellDetection task's model parameter take.
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
from .boxes import box_centres
from .errors import CellRCNNError
from .files import atomic_write
from .labelled_slides import find_labelled_slides, prepare_slide, region_samples, region_tiles
from .settings import AnnotationTrainingSettings, DetectionSettings


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
    model_config: object = None  #: the trained model's ``ModelConfig`` (its cell types, operating point)
    #: held-out centroid figures per cell type and the confusion matrix (``point_metrics.centroid_metrics``; None
    #: for a model without cell types)
    class_metrics: dict = None


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
    centres = box_centres(found)
    for i in points:
        box = labelled.boxes[i]
        px, py, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2
        distance = np.hypot(centres[:, 0] - px, centres[:, 1] - py)
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
    from .annotation_classes import card_lines
    from .evaluate import CENTROID_RADIUS_UM

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
        f"- Annotations named {' or '.join(f'**{n!r}**' for n in s['annotation_names'])} on the slides of Girder "
        f"folder `{folder_id}` "
        f'({api_url}); region label {s["region_label"]!r}; points the starting model found no '
        f'nucleus under became {s["point_size_um"]:g} µm squares.',
        f'- {len(result.train_slides)} training slide(s) with {sum(x.cells for x in result.train_slides)} nuclei, '
        f'{len(result.heldout_slides)} held-out slide(s) with {sum(x.cells for x in result.heldout_slides)} '
        f"nuclei; read at {s['mpp']:g} µm/px.", '',
        '| slide | use | nuclei | annotated as | region |', '|---|---|---|---|---|', slide_rows, '',
        f"Every annotation of {'that name' if len(s['annotation_names']) == 1 else 'those names'} on those slides "
        'was used, whoever made it:', '',
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
    if result.class_metrics is not None:
        at = lines.index('## Limits')
        lines[at:at] = card_lines(result.model_config, s['class_from'], result.class_metrics, result.train_slides,
                                  result.heldout_slides, CENTROID_RADIUS_UM)
    return '\n'.join(lines)


# --------------------------------------------------------------------------- the whole flow

def train_from_girder(api_url, token, folder_id, annotation_name, out_dir, settings=AnnotationTrainingSettings(),
                      output_folder=None, name=None, size_point_boxes=True, warmup_steps=None, tile_size=256,
                      sample_size=512, workers=0, progress=None):
    """Train (or fine-tune) a detector on the annotated slides of a Girder folder, evaluate it on held-out slides,
    write ``out_dir/NAME.pt`` and ``out_dir/NAME.md`` and upload both to ``output_folder`` (a Girder folder id) when
    given. See the module's docstring for the steps.

    :param annotation_name: the annotations that hold the nuclei (None: only the cell types' annotations, with
        ``class_from='annotation'``).
    :param settings: :class:`cellrcnn.settings.AnnotationTrainingSettings`: the starting model (``init``, whose
        configuration and resolution are kept; ``from_scratch``: only its configuration), the held-out slides
        (``holdout``: a count, or a fraction of the labelled slides), the training steps and rates, the cell types
        and where a nucleus' class comes from (:mod:`cellrcnn.annotation_classes`).
    :param size_point_boxes: give each point the box of the starting model's detection under it
        (:func:`size_points`), else a ``point_size_um`` square.
    :param progress: a :class:`cellrcnn.progress.Progress`, given the percentage done and a line per step.
    :returns: a :class:`TrainingResult`.
    """
    from .annotation_classes import annotation_names, sample_records, typed_config
    from .checkpoint import BUNDLED_MODEL, load_model
    from .evaluate import calibrate_threshold, evaluate_model, evaluate_records
    from .girder_api import upload_files
    from .train import TrainConfig, train

    say = progress.log if progress else (lambda line: None)
    advance = _percent_done(progress)
    st = settings.validate()
    steps, from_scratch = st.steps, st.from_scratch
    init = st.init or BUNDLED_MODEL
    base = load_model(init)  # checked before anything is downloaded
    warmup = min(steps // 10, 200) if warmup_steps is None else warmup_steps
    cfg = TrainConfig(steps=steps, batch_size=st.batch_size, lr=st.lr, warmup_steps=warmup, tile_size=tile_size,
                      seed=st.seed, workers=workers, checkpoint_every=max(steps, 1),
                      cell_types=tuple(st.cell_types)).validate()
    typed = typed_config(base.config, cfg, st.class_from)
    names = annotation_names(annotation_name, typed, st.class_from)
    name = _slug(name or f'cellrcnn-{annotation_name or "-".join(typed.cell_types)}')
    if output_folder:  # fail before hours of training, not after
        _check_output_folder(api_url, token, output_folder)
    timings = {}
    started = time.perf_counter()

    advance(1, 'finding annotated slides')
    slides = find_labelled_slides(api_url, token, folder_id, names, st.region_label, st.class_from, progress)
    n_held = holdout_count(st.holdout, len(slides))
    train_slides, heldout_slides = slides[:-n_held], slides[-n_held:]
    cfg = _with_cell_types(cfg, typed, st.class_from, train_slides, slides)
    type_index = typed.cell_type_index() if typed.cell_types else None
    train_samples, heldout_samples = _read_samples(api_url, token, slides, heldout_slides, base, out_dir, st,
                                                   size_point_boxes, sample_size, type_index, advance, say)
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
    threshold, train_f1 = calibrate_threshold(
        model, train_samples, device=st.device,
        records=sample_records(train_samples, model.config) if model.config.cell_types else None)
    metrics = evaluate_model(model, heldout_samples, device=st.device)
    result = TrainingResult(os.path.join(out_dir, f'{name}.pt'), os.path.join(out_dir, f'{name}.md'),
                            train_slides, heldout_slides, metrics, initial, float(threshold), float(train_f1),
                            timings, model_config=model.config)
    if model.config.cell_types:
        result.class_metrics = evaluate_records(model, sample_records(heldout_samples, model.config),
                                                device=st.device)['centroid']
    _write_model(result, model, cfg, name, st, init, base.config.mpp, names, folder_id, api_url)
    if output_folder:
        advance(95, 'uploading the model and its card')
        result.uploaded = upload_files(api_url, token, output_folder, [result.model_path, result.card_path])
    timings['total'] = time.perf_counter() - started
    advance(100)
    if progress is not None:
        progress.finish()
    return result


def _with_cell_types(cfg, typed, class_from, train_slides, slides):
    """``cfg`` (``train.TrainConfig``) with the colours of the cell types it asks for (the ``lineColor`` their nuclei
    share on ``slides``, else the palette's), after checking that each has nuclei on the training slides; ``cfg``
    itself when it asks for none (``typed``: :func:`cellrcnn.annotation_classes.typed_config`)."""
    from .annotation_classes import check_examples, type_colors

    if not cfg.cell_types:
        return cfg
    check_examples(train_slides, typed, class_from)
    return dataclasses.replace(cfg, cell_type_colors=type_colors(slides, typed))


def _percent_done(progress):
    """``advance(to, comment=None)``: tells ``progress`` (when there is one, started here at 100) that the run is
    ``to`` percent done, with an optional comment; it never goes back."""
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

    return advance


def _check_output_folder(api_url, token, folder_id):
    """Fail when the output folder cannot be read, before hours of training."""
    from .girder_api import GirderConnection

    server = GirderConnection(api_url, token, retries=4, backoff=1.0, timeout=600, saved=None)
    with server.session(timeout=60):
        server.get('checking the output folder', f'folder/{folder_id}', item_id=folder_id)


def _read_samples(api_url, token, slides, heldout_slides, base, out_dir, settings, size_point_boxes, sample_size,
                  type_index, advance, say):
    """Download each labelled slide into ``out_dir/slides`` (``girder_api.download_path``: kept for the next run,
    downloaded again once Girder's file changes), read its annotated region at the starting model ``base``'s
    resolution, keeping at most ``settings.max_region_megapixels`` of it
    (:func:`cellrcnn.labelled_slides.region_tiles`), and cut it into samples (with cell types by ``type_index``:
    :func:`cellrcnn.labelled_slides.region_samples`).
    :returns: ``(train_samples, heldout_samples)``."""
    from .girder_api import download_file, download_path
    from .slide import Slide, magnification_from_mpp

    st = settings
    download_dir = os.path.join(out_dir, 'slides')
    train_samples, heldout_samples = [], []
    for i, labelled in enumerate(slides):
        advance(2 + int(18 * i / len(slides)), f'reading {labelled.path}')
        local = download_path(download_dir, labelled.item_id, labelled.file_id, labelled.version, labelled.name)
        labelled.local_path = download_file(api_url, token, labelled.file_id, local, download_dir)
        slide = Slide(local, magnification=magnification_from_mpp(base.config.mpp))
        prepare_slide(labelled, slide, st.point_size_um)
        held = labelled in heldout_slides
        # held-out regions are cut into large tiles without overlap: every nucleus is counted once
        tiles, whole = region_tiles(slide, labelled, tile_size=1024 if held else sample_size,
                                    overlap=0 if held else 64, max_megapixels=st.max_region_megapixels)
        if size_point_boxes and not held:  # held-out annotations stay as drawn: no help from the starting model
            labelled.points_sized = size_points(base, slide, labelled, tiles, st.device)
        samples = region_samples(tiles, labelled, type_index)
        (heldout_samples if held else train_samples).extend(samples)
        sized = f', {labelled.points_sized} points sized by the starting model' if labelled.points_sized else ''
        say(f'{labelled.path}: {labelled.cells} nuclei ({", ".join(f"{k} {v}" for k, v in labelled.elements.items())}'
            f'{sized}) in region {", ".join(f"{v:.0f}" for v in labelled.region_box)} -> {len(samples)} tile(s)'
            f'{"" if whole else f" holding its nuclei (the whole region is over {st.max_region_megapixels:g} MP)"}, '
            f'{"held out" if held else "training"}')
    return train_samples, heldout_samples


def _write_model(result, model, cfg, name, settings, init, mpp, annotation_names, folder_id, api_url):
    """Write the trained model (float16, with its held-out metrics and what it was trained on) and its card."""
    from .checkpoint import save_checkpoint
    from .devices import resolve_device

    st, from_scratch = settings, settings.from_scratch
    train_slides, heldout_slides = result.train_slides, result.heldout_slides
    card_settings = {**dataclasses.asdict(cfg), 'annotation_names': annotation_names, 'class_from': st.class_from,
                     'region_label': st.region_label, 'point_size_um': st.point_size_um, 'mpp': mpp,
                     'from_scratch': bool(from_scratch), 'init_name': os.path.basename(init),
                     'device': str(resolve_device(st.device))}
    numbers = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    save_checkpoint(result.model_path, model, half=True, train_config=dataclasses.asdict(cfg),
                    validation=numbers, held_out_cell_types=result.class_metrics, training_data={
                        'girder_folder': folder_id, 'annotation_names': list(annotation_names),
                        'class_from': st.class_from,
                        'train_slides': [s.path for s in train_slides],
                        'heldout_slides': [s.path for s in heldout_slides],
                        'train_cells': sum(s.cells for s in train_slides),
                        'heldout_cells': sum(s.cells for s in heldout_slides),
                        'init': None if from_scratch else os.path.basename(init),
                        'annotations': [{'slide': s.path, 'id': a, 'creator': c} for s in train_slides + heldout_slides
                                        for a, c in zip(s.annotation_ids, s.annotation_creators)]})
    with atomic_write(result.card_path, 'model card') as f:
        f.write(model_card(name, card_settings, result, folder_id, api_url))


def training_summary_lines(result):
    """What a person reads at the end of a training run: the slides, the operating point, the held-out figures and
    the files written and uploaded."""
    from .point_metrics import format_centroid_report

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
    if result.class_metrics is not None:
        lines += ['held-out cell types:',
                  *format_centroid_report(result.class_metrics, result.model_config.cell_types).splitlines()]
    lines.append(f'wrote {result.model_path} and {result.card_path}')
    for file in result.uploaded:
        lines.append(f'uploaded {file["name"]} to Girder as file {file["_id"]} (item {file["itemId"]})')
    return lines
