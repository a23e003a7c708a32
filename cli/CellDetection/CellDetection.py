"""Cell detection as a slicer_cli_web task: HistomicsUI's analysis panel and girder_worker run it."""

import os
import sys

from slicer_cli_web import CLIArgumentParser

from cellrcnn.dask_cluster import SCHEDULER_ENV, scheduler_route
from cellrcnn.errors import CellRCNNError, run_reporting_errors
from cellrcnn.exports import detection_summary_lines
from cellrcnn.job import detect_to_files
from cellrcnn.progress import Progress
from cellrcnn.region import named_region, region_settings
from cellrcnn.settings import DetectionSettings


def settings_from(args):
    """slicer_cli_web's arguments (-1, 0 or empty mean 'the model's or the slide's own'; the region a rectangle or
    polygons: ``cellrcnn.region``) as DetectionSettings."""
    return DetectionSettings(
        model=args.model_file or None, magnification=args.analysis_mag if args.analysis_mag > 0 else None,
        mpp=args.base_mpp if args.base_mpp > 0 else None, **region_of(args),
        tile_size=args.analysis_tile_size, overlap=args.tile_overlap, min_tissue=args.min_tissue_frac,
        keep_blue_green=args.keep_blue_green, leave_out_of_focus=args.leave_out_of_focus,
        threshold=args.threshold if args.threshold >= 0 else None,
        nms=args.nms_iou if args.nms_iou >= 0 else None, anchor_upsample=args.anchor_upsample or None,
        adapt_tiles=args.adapt_tiles, views=args.views, element=args.element_type, display=args.display,
        batch_size=args.batch_size, device=args.device,
        scheduler=_scheduler(args.scheduler), progress='slicer', classes=_classes(args.classes))


def region_of(args):
    """The region to analyse: the one drawn (``analysis_roi``), or the areas the slide's annotations named
    ``region_annotation`` outline, read from Girder (``cellrcnn.region.named_region``) with the job's token. Given
    both (a folder run of the Girder plugin passes the areas it read), the region is the one given, and the name is
    recorded with it."""
    name = (getattr(args, 'region_annotation', None) or '').strip()
    region = region_settings(args.analysis_roi)
    if not name:
        return region
    if region['polygons'] is not None:
        return {**region, 'region_annotation': name}
    if region['roi'] is not None:
        raise CellRCNNError('a region annotation outlines polygons, not a rectangle: give the region to analyse or '
                            'the name of a region annotation')
    url, token, slide = args.girderApiUrl, args.girderToken, getattr(args, 'girder_slide', None)
    if not url or not token or not slide:
        raise CellRCNNError('region_annotation is read from Girder: it needs the Girder API URL, a token and the '
                            'slide (--girder_slide: the id of its item or file; the Digital Slide Archive fills them '
                            'in)')
    found, note = named_region(name, None, url, token, slide)
    if found is None:
        raise CellRCNNError(note)
    return found


def _scheduler(asked):
    """Where the tiles run: the task's user may ask for ``local:N`` only (a scheduler of their choosing could run
    code in the task, which holds the job's Girder token); else the cluster the worker's administrator names in
    :data:`SCHEDULER_ENV` (checked as ``cellrcnn detect --scheduler`` is); else this process (None)."""
    if asked:
        if scheduler_route(asked)[0] is None:
            raise CellRCNNError(f'the scheduler parameter takes only local:N; a Dask cluster for this task is set by '
                                f'the administrator of its worker ({SCHEDULER_ENV})')
        return asked
    return os.environ.get(SCHEDULER_ENV) or None


def _classes(names):
    """The cell types to keep (None: every nucleus) from the task's list of names, which is empty by default and
    may hold empty strings (slicer_cli_web splits an empty text on commas)."""
    return tuple(name.strip() for name in names if name.strip()) or None


def girder_poster(args):
    """With post_to_girder: check the server, token and slide before detecting, and return what posts the results
    (``cellrcnn.girder_post.poster``; else None). slicer_cli_web fills in girderApiUrl and girderToken; HistomicsUI
    fills in girder_slide."""
    if not getattr(args, 'post_to_girder', False):
        return None
    from cellrcnn.girder_post import poster

    url, token, slide = args.girderApiUrl, args.girderToken, getattr(args, 'girder_slide', None)
    if not url or not token:
        raise CellRCNNError('post_to_girder needs the Girder API URL and a token (--api-url, --girder-token; the '
                            'Digital Slide Archive fills them in)')
    if not slide:
        raise CellRCNNError('post_to_girder needs the slide to post to (--girder_slide: the id of its item or file)')
    return poster(url, token, slide, progress=Progress(mode='slicer', name='CellDetection'))


def main(args):
    outputs = {'annotation': args.outputCellAnnotationFile,
               'map': getattr(args, 'outputNucleiMapAnnotationFile', None) or None,
               'density': getattr(args, 'outputDensityAnnotationFile', None) or None,
               'class_density': getattr(args, 'outputClassDensityAnnotationFile', None) or None,
               'tissue': getattr(args, 'outputTissueAnnotationFile', None) or None,
               'pixelmap': getattr(args, 'outputNucleiPixelmapAnnotationFile', None) or None}
    label_image = getattr(args, 'outputNucleiLabelImage', None) or None
    settings = settings_from(args)
    post = girder_poster(args)
    paths = {**outputs, 'label_image': label_image}
    if post:
        # The results go to the slide straight from files beside the outputs; the declared outputs stay empty lists
        # of documents, since the DSA uploads them next and HistomicsUI would add them as annotations a second time.
        # The pixelmap is not made: its label image is uploaded by the DSA as an output, which a direct post is not.
        paths = {key: path and f'{path}.posted.json' for key, path in outputs.items() if key != 'pixelmap'}
    # large_image puts the label image's item in place of the output's name when the DSA uploads both
    result = detect_to_files(args.inputImageFile, paths, settings,
                             resume_dir=args.outputCellAnnotationFile + '.partial',
                             label_image_id='outputNucleiLabelImage')
    print('\n'.join(detection_summary_lines(result)), flush=True)
    if post:
        print('\n'.join(post(paths)), flush=True)
        for key, path in outputs.items():
            if path:
                with open(path, 'w') as f:
                    f.write('[]')
                if paths.get(key):
                    os.remove(paths[key])


if __name__ == '__main__':
    sys.exit(run_reporting_errors('CellDetection', lambda: main(CLIArgumentParser().parse_args()),
                                 interrupted='interrupted; finished tile rows are kept next to the output'))
