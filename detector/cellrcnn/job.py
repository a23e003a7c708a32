"""The detection job: a slide in, annotation documents and tables out. Shared by ``cellrcnn detect``, ``cellrcnn
batch`` (``cohort``) and the CellDetection task.

The job opens the slide (``slide``), builds the detector (``inference.DetectorSpec``), runs the loop
(``slide_detection``) and writes each output (``annotation``, ``density``, ``exports``).
"""

import dataclasses
import os

from . import __version__
from .errors import CellRCNNError

OUTPUT_SUFFIXES = {'annotation': '.anot.json', 'density': '.density.anot.json', 'geojson': '.geojson',
                   'csv': '.csv', 'overlay': '.overlay.png', 'summary': '.summary.json'}


def output_paths(folder, stem):
    """Every output of a run, named after the slide, in ``folder`` (created)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CellRCNNError(f'cannot create output folder {folder}: {exc.strerror}') from None
    return {key: os.path.join(folder, stem + suffix) for key, suffix in OUTPUT_SUFFIXES.items()}


def detect_to_files(slide_path, paths, settings, resume_dir=None):
    """Detect nuclei in a slide with :class:`cellrcnn.settings.DetectionSettings` and write the outputs named in
    ``paths`` (keys of OUTPUT_SUFFIXES; missing or None ones are not written). Raw detections stay in ``resume_dir``
    until every output is written. Only one run at a time writes an output name (``resume.output_lock``)."""
    from .checkpoint import model_sha256
    from .inference import DetectorSpec
    from .progress import Progress
    from .resume import clear_partial, output_lock, run_key
    from .slide import Slide
    from .slide_detection import detect_slide

    with output_lock(paths):  # one run at a time per output name: a second one stops here, in one line
        spec = DetectorSpec.from_settings(settings)
        detector = spec.build()
        config = detector.model.config
        slide = Slide(slide_path, magnification=settings.magnification or 10 / config.mpp, mpp=settings.mpp)
        used = dataclasses.replace(settings.result(), magnification=slide.magnification,
                                   threshold=detector.threshold, nms=config.nms_thresh,
                                   anchor_upsample=config.anchor_upsample).identity()
        # rows hold raw boxes: the element type changes how the nuclei are drawn, not which, so it is left out here
        key = run_key(slide_path, spec.model_path, {k: v for k, v in used.items() if k != 'element'})
        result = detect_slide(slide, detector, roi=settings.roi, tile_size=settings.tile_size,
                              overlap=settings.overlap, min_tissue=settings.min_tissue, workers=settings.workers,
                              resume_dir=resume_dir, key=key, scheduler=settings.scheduler,
                              adapt_tiles=settings.adapt_tiles,
                              progress=Progress(mode=settings.progress, name='cellrcnn'))
        attributes = {'model': os.path.basename(spec.model_path), 'model_sha256': model_sha256(spec.model_path),
                      'model_config': detector.checkpoint_config.to_dict(), 'cellrcnn': __version__, 'params': used}
        write_results(result, paths, settings.element, attributes)
        clear_partial(resume_dir, key)  # this run's rows; other settings' rows stay
    return result


def write_results(result, paths, element_type, attributes):
    """The nuclei annotation, the density annotation, GeoJSON, CSV, an overview PNG and the run summary."""
    from .annotation import write_annotation, write_detections_annotation
    from .density import density_annotation
    from .exports import write_csv, write_geojson, write_overlay, write_summary

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
        write_summary(paths['summary'], result.stats)
