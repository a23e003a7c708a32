"""The detection job: a slide in, annotation documents and tables out. Shared by ``cellrcnn detect``, ``cellrcnn
batch`` (``cohort``) and the CellDetection task.

The job opens the slide (``slide``), builds the detector (``inference.DetectorSpec``), runs the loop
(``slide_detection``) and writes each output (``annotation``, ``density``, ``exports``).
"""

import dataclasses
import os
import time
from typing import TYPE_CHECKING

from . import __version__
from .errors import CellRCNNError

if TYPE_CHECKING:  # the stages are imported when a job runs, not when the command starts
    from .progress import Progress
    from .settings import DetectionSettings
    from .slide_detection import SlideDetections

#: what a run writes, by key; ``class_density`` holds a list of density documents, one per cell type (an empty list
#: for a model without cell types), so that one declared output of the DSA task carries them all; ``pixelmap`` (the
#: annotation) and ``label_image`` (the image it draws) come together
OUTPUT_SUFFIXES = {'annotation': '.anot.json', 'map': '.map.anot.json', 'density': '.density.anot.json',
                   'class_density': '.class-density.anot.json', 'geojson': '.geojson', 'csv': '.csv',
                   'overlay': '.overlay.png', 'summary': '.summary.json', 'pixelmap': '.pixelmap.anot.json',
                   'label_image': '.labels.tiff', 'tissue': '.tissue.anot.json'}
#: the outputs posted to a slide's Girder item, in order: the annotations a pathologist opens
POSTED_OUTPUTS = ('map', 'annotation', 'density', 'class_density', 'tissue')
#: the outputs written only when asked for (``output_paths(pixelmap=True)``)
PIXELMAP_OUTPUTS = ('pixelmap', 'label_image')


def output_paths(folder: str, stem: str, pixelmap: bool = False) -> dict[str, str]:
    """The outputs of a run, named after the slide, in ``folder`` (created): all but the nuclei pixelmap's, those
    too with ``pixelmap``."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CellRCNNError(f'cannot create output folder {folder}: {exc.strerror}') from None
    return {key: os.path.join(folder, stem + suffix) for key, suffix in OUTPUT_SUFFIXES.items()
            if pixelmap or key not in PIXELMAP_OUTPUTS}


def check_pixelmap_paths(paths: dict[str, str | None]) -> None:
    """The pixelmap annotation names its label image: a run writes both or neither (one line otherwise)."""
    given = [key for key in PIXELMAP_OUTPUTS if paths.get(key)]
    if len(given) == 1:
        raise CellRCNNError(f'the nuclei pixelmap needs both its annotation and its label image; only the '
                            f'{given[0].replace("_", " ")} was given')


def detect_to_files(slide_path: str, paths: dict[str, str | None], settings: 'DetectionSettings',
                    resume_dir: str | None = None, label_image_id: str | None = None) -> 'SlideDetections':
    """Detect nuclei in a slide with :class:`cellrcnn.settings.DetectionSettings` and write the outputs named in
    ``paths`` (keys of OUTPUT_SUFFIXES; missing or None ones are not written). Raw detections stay in ``resume_dir``
    until every output is written. Only one run at a time writes an output name (``resume.output_lock``).
    ``label_image_id``: what the pixelmap annotation calls its label image (:func:`write_results`)."""
    from .checkpoint import model_sha256
    from .inference import DetectorSpec
    from .progress import Progress
    from .resume import RowStore, output_lock, run_key
    from .slide import Slide, magnification_from_mpp
    from .slide_detection import detect_slide

    settings.validate()
    check_pixelmap_paths(paths)
    view = {'map': 'its annotation output', 'pixelmap': 'its annotation and label image'}.get(settings.display)
    if view and not paths.get(settings.display):
        raise CellRCNNError(f'display {settings.display} needs the nuclei {settings.display} written ({view})')
    with output_lock(paths):  # one run at a time per output name: a second one stops here, in one line
        spec = DetectorSpec.from_settings(settings)
        detector = spec.build()
        config = detector.model.config
        keep_types = settings.type_indices(config.cell_types)  # unknown classes stop the run here, in one line
        slide = Slide(slide_path, magnification=settings.magnification or magnification_from_mpp(config.mpp),
                      mpp=settings.mpp)
        used = dataclasses.replace(settings.result(), magnification=slide.magnification,
                                   threshold=detector.threshold, nms=config.nms_thresh,
                                   anchor_upsample=config.anchor_upsample).identity()
        resume = None
        if resume_dir:
            # rows hold raw boxes: the element type changes how the nuclei are drawn, not which, so it is left out here
            key = run_key(slide_path, spec.model_path, {k: v for k, v in used.items() if k != 'element'})
            resume = RowStore(resume_dir, key)
        progress = Progress(mode=settings.progress, name='cellrcnn')
        result = detect_slide(slide, detector, tile_size=settings.tile_size, overlap=settings.overlap,
                              min_tissue=settings.min_tissue, workers=settings.workers, roi=settings.roi,
                              resume=resume, scheduler=settings.scheduler, adapt_tiles=settings.adapt_tiles,
                              keep_types=keep_types, progress=progress, polygons=settings.polygons,
                              ink=not settings.keep_blue_green, leave_out_of_focus=settings.leave_out_of_focus)
        attributes = {'model': os.path.basename(spec.model_path), 'model_sha256': model_sha256(spec.model_path),
                      'model_config': detector.checkpoint_config.to_dict(), 'cellrcnn': __version__, 'params': used}
        write_results(result, paths, settings.element, attributes, settings.display, label_image_id, progress)
        if resume is not None:
            resume.clear()  # this run's rows; other settings' rows stay
    return result


def write_results(result: 'SlideDetections', paths: dict[str, str | None], element_type: str, attributes: dict,
                  display: str = 'auto', label_image_id: str | None = None, progress: 'Progress | None' = None) -> None:
    """The nuclei annotation, the nuclei map, the density annotation (and one per cell type), GeoJSON, CSV, an
    overview PNG, the nuclei pixelmap with its label image and the run summary. With cell types, each nucleus carries
    its type's name and colour (and in the tables its probability); without, every output is what it was before
    there were cell types.

    ``display`` ('auto', 'boxes', 'map' or 'pixelmap': ``nuclei_map.shown_on_open``) chooses whether HistomicsUI
    opens the slide on the nuclei's boxes, the map or the pixelmap; the density heatmaps are listed, not shown, until
    a user asks. ``label_image_id`` is the pixelmap's ``girderId``: the label image's item id or, in a DSA task, the
    name of the output that uploads it (default: the label image's file name, for whoever uploads the two).
    ``progress`` (a :class:`cellrcnn.progress.Progress`) counts the outputs as they are written and names each; the
    seconds they took are the result's ``stats['seconds']['write']``, in the summary written last. A run counted
    inside a slide's annotations of one name (``params.region_annotation``) says so in its annotations' names
    (``cellrcnn nuclei inside tumour``): HistomicsUI lists them beside the slide's whole-slide result, which posting
    keeps (``girder_post.result_region``)."""
    from .annotation import DEFAULT_NAME, write_annotation, write_detections_annotation
    from .density import class_density_annotations, density_annotation
    from .exports import write_csv, write_geojson, write_overlay, write_summary
    from .nuclei_map import nuclei_map_annotation, shown_on_open
    from .nuclei_pixelmap import pixelmap_annotation, write_label_image
    from .progress import Progress
    from .tissue_outline import qupath_regions, tissue_outline_annotation

    slide = result.slide
    base_mpp = slide.mpp / slide.scale
    typed = _class_options(result)
    boxes_shown, map_shown, pixelmap_shown = shown_on_open(display, len(result.boxes), bool(paths.get('map')),
                                                           bool(paths.get('pixelmap')))
    colors = dict(zip(result.cell_type_names, result.cell_type_colors)) if typed else None
    hidden = {'display': {'visible': False}}
    region = (attributes.get('params') or {}).get('region_annotation')

    def titled(name):
        return f'{name} inside {region}' if region else name

    def named(doc):
        return {**doc, 'name': titled(doc['name'])}

    def pixelmap(path):
        write_label_image(paths['label_image'], result.boxes, *slide.base_size, base_mpp)
        write_annotation(named(pixelmap_annotation(label_image_id or os.path.basename(paths['label_image']),
                                                   len(result.boxes), result.cell_types, result.cell_type_names,
                                                   colors, attributes=attributes, visible=pixelmap_shown)), path)

    writers = {  # what each output is, for a person, and how it is written to its path
        'annotation': ('nuclei annotation', lambda path: write_detections_annotation(
            path, result.boxes, result.scores, element_type=element_type, name=titled(DEFAULT_NAME),
            attributes={**attributes, 'stats': result.stats}, visible=boxes_shown, **typed.get('annotation', {}))),
        'map': ('nuclei map', lambda path: write_annotation(named(nuclei_map_annotation(
            result.boxes, result.cell_types, result.cell_type_names, colors, attributes=attributes,
            visible=map_shown)), path)),
        'density': ('density heatmap', lambda path: write_annotation({**hidden, **named(density_annotation(
            result.boxes, slide.base_size, base_mpp, attributes=attributes))}, path)),
        'class_density': ('density heatmaps of the cell types', lambda path: write_annotation([
            {**hidden, **named(doc)} for doc in class_density_annotations(
                result.boxes, result.cell_types, result.cell_type_names, slide.base_size, base_mpp,
                attributes=attributes)] if typed else [], path)),
        'geojson': ('GeoJSON', lambda path: write_geojson(
            path, result.boxes, result.scores, annotations=qupath_regions(
                result.tissue, result.analysis_bounds, slide.scale), **typed.get('geojson', {}))),
        'csv': ('CSV', lambda path: write_csv(path, result.boxes, result.scores, mpp=base_mpp,
                                              **typed.get('csv', {}))),
        'overlay': ('overview picture', lambda path: write_overlay(result, path)),
        'pixelmap': ('nuclei pixelmap and its label image', pixelmap),
        'tissue': ('tissue outline', lambda path: write_annotation(named(tissue_outline_annotation(
            result.tissue, result.analysis_bounds, slide.scale, attributes=attributes, stats=result.stats)), path)),
    }
    todo = [key for key in writers if paths.get(key)]
    progress = progress or Progress(mode='none')
    progress.start(len(todo) + bool(paths.get('summary')), unit='output')
    started = time.perf_counter()
    for key in todo:
        what, write = writers[key]
        progress.comment(f'writing the {what}')
        write(paths[key])
        progress.update(1)
    result.stats['seconds']['write'] = round(time.perf_counter() - started, 3)
    if paths.get('summary'):
        write_summary(paths['summary'], result.stats)
        progress.update(1)
    progress.finish()


def _class_options(result):
    """The cell types of ``result`` as the options of each writer (``annotation``, ``geojson``, ``csv``): names,
    colours, a legend in the annotation's description and the probability in the tables; {} without cell types."""
    from .annotation import class_legend
    from .exports import CLASS_PROBABILITY

    if result.cell_types is None:
        return {}
    names, colors = result.cell_type_names, dict(zip(result.cell_type_names, result.cell_type_colors))
    classes = {'class_names': names}
    description = f'{len(result.boxes)} detections by cellrcnn; {class_legend(result.type_counts(), colors)}'
    return {'annotation': {'labels': result.cell_types, **classes, 'class_colors': colors, 'description': description},
            'geojson': {'classes': result.cell_types, **classes, 'class_colors': colors,
                        'properties': {CLASS_PROBABILITY: result.cell_type_scores}},
            'csv': {'classes': result.cell_types, **classes, 'class_scores': result.cell_type_scores}}
