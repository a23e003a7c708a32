"""The detection job: a slide in, annotation documents and tables out. Shared by ``cellrcnn detect`` and the DSA task."""

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from . import __version__
from .errors import CellRCNNError

OUTPUT_SUFFIXES = {'annotation': '.anot.json', 'density': '.density.anot.json', 'geojson': '.geojson',
                   'csv': '.csv', 'overlay': '.overlay.png', 'summary': '.summary.json'}
#: the settings that change the detections (the rest, such as device or batch size, only how fast they come); with
#: the slide and the model file they identify a run (resuming, cohort skipping, the annotation's ``params``)
DETECTION_SETTINGS = ('magnification', 'mpp', 'roi', 'tile_size', 'overlap', 'min_tissue', 'threshold', 'nms',
                      'anchor_upsample', 'adapt_tiles')


@dataclass
class DetectionSettings:
    """Everything that chooses what a detection run computes and how (None: the model's or the slide's own)."""

    model: str = None
    magnification: float = None
    mpp: float = None
    roi: tuple = None
    tile_size: int = 1024
    overlap: int = 64
    min_tissue: float = 0.05
    threshold: float = None
    nms: float = None
    anchor_upsample: int = None
    #: re-estimate the model's BatchNorm statistics on this many of the slide's tissue tiles first (0: off). Off by
    #: default: on the real sample's loose dermis it added boxes on collagen and glass (docs/real-tissue.md).
    adapt_tiles: int = 0
    element: str = 'rectangle'
    batch_size: int = 4
    workers: int = 2
    device: str = 'auto'
    scheduler: str = None
    progress: str = 'auto'


def output_paths(folder, stem):
    """Every output of a run, named after the slide, in ``folder`` (created)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CellRCNNError(f'cannot create output folder {folder}: {exc.strerror}') from None
    return {key: os.path.join(folder, stem + suffix) for key, suffix in OUTPUT_SUFFIXES.items()}


def detect_to_files(slide_path, paths, settings, resume_dir=None):
    """Detect nuclei in a slide and write the outputs named in ``paths`` (keys of OUTPUT_SUFFIXES; missing or None
    ones are not written). Raw detections stay in ``resume_dir`` until every output is written."""
    from .checkpoint import BUNDLED_MODEL, load_model
    from .engine import clear_partial, detect_slide, run_key
    from .inference import Detector
    from .slide import Slide

    model_path = settings.model or BUNDLED_MODEL
    model = load_model(model_path)
    if settings.anchor_upsample:
        model.set_anchor_upsample(settings.anchor_upsample)
    detector = Detector(model, device=settings.device, batch_size=settings.batch_size,
                        score_thresh=settings.threshold, nms_thresh=settings.nms)
    slide = Slide(slide_path, magnification=settings.magnification or 10 / model.config.mpp, mpp=settings.mpp)
    used = {**asdict(settings), 'model': os.path.basename(model_path), 'magnification': slide.magnification,
            'threshold': detector.score_thresh, 'nms': model.config.nms_thresh,
            'anchor_upsample': model.config.anchor_upsample}
    identity = {k: used[k] for k in DETECTION_SETTINGS}
    result = detect_slide(slide, detector, roi=settings.roi, tile_size=settings.tile_size, overlap=settings.overlap,
                          min_tissue=settings.min_tissue, workers=settings.workers, resume_dir=resume_dir,
                          key=run_key(slide_path, model_path, identity), progress=settings.progress,
                          scheduler=settings.scheduler, model_path=model_path, adapt_tiles=settings.adapt_tiles)
    attributes = {'model': used['model'], 'model_config': model.config.to_dict(), 'cellrcnn': __version__,
                  'params': {k: used[k] for k in identity}}
    write_results(result, paths, settings.element, attributes)
    clear_partial(resume_dir)
    return result


def write_results(result, paths, element_type, attributes):
    """The nuclei annotation, the density annotation, GeoJSON, CSV, an overview PNG and the run summary."""
    from .annotation import write_annotation, write_detections_annotation
    from .outputs import density_annotation, write_csv, write_geojson

    slide = result.slide
    base_mpp = slide.mpp / slide.scale
    if paths.get('annotation'):
        write_detections_annotation(paths['annotation'], result.boxes, result.scores, element_type=element_type,
                                    attributes={**attributes, 'stats': result.stats})
    if paths.get('density'):
        write_annotation(density_annotation(result.boxes, slide.base_size, base_mpp, attributes=attributes),
                         paths['density'])
    if paths.get('geojson'):
        write_geojson(paths['geojson'], result.boxes, result.scores)
    if paths.get('csv'):
        write_csv(paths['csv'], result.boxes, result.scores, mpp=base_mpp)
    if paths.get('overlay'):
        write_overlay(result, paths['overlay'])
    if paths.get('summary'):
        with open(paths['summary'], 'w') as f:
            json.dump(result.stats, f, indent=2)


def write_overlay(result, path, max_side=2048):
    """An overview PNG of the analysed region (at most ``max_side`` px) with every detection drawn."""
    import cv2

    slide = result.slide
    ax0, ay0, ax1, ay1 = result.roi
    x0, y0 = ax0 * slide.scale, ay0 * slide.scale
    image, factor = slide.overview((x0, y0, (ax1 - ax0) * slide.scale, (ay1 - ay0) * slide.scale), max_side)
    overlay = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for x1, y1, x2, y2 in np.round((result.boxes - [x0, y0, x0, y0]) * factor).astype(int):
        cv2.rectangle(overlay, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), (0, 255, 0), 1)
    if not cv2.imwrite(path, overlay):
        raise CellRCNNError(f'cannot write {path}')


def summary_lines(result, settings):
    """The closing summary a person reads: what was found, where, and what each stage cost."""
    st, sec = result.stats, result.stats['seconds']
    lines = []
    if st['tiles_read'] == 0 and not st['tile_rows_resumed']:
        lines.append(f'no tissue found in {st["slide"]} (all {st["tiles"]} tiles below the minimum tissue fraction '
                     f'{settings.min_tissue}): the annotation is empty')
    adapt = f'adapt {sec["adapt"]:.1f} on {st["adapt_tiles"]} tiles, ' if st['adapt_tiles'] else ''
    lines.append(
        f'{st["detections"]} nuclei in {os.path.basename(st["slide"])} at {st["analysis_magnification"]:g}x: '
        f'{st["tissue_mm2"]:.2f} mm2 of tissue, {st["tiles_read"]} tiles read, {st["tiles_skipped"]} skipped as '
        f'background; {sec["total"]:.1f} s (tissue {sec["tissue_and_grid"]:.1f}, {adapt}read wait {sec["read"]:.1f}, '
        f'detect {sec["detect"]:.1f}, merge {sec["merge"]:.2f}), {st["megapixels_per_second"]:.2f} Mpx/s on '
        f'{st["device"]}')
    return lines
