"""What each ``cellrcnn`` command does, given its parsed options (:mod:`cellrcnn.command_line` parses them).

An option left out on the command line (None) leaves the default of what it feeds: the settings dataclass
(:func:`settings_from_args`) or the function it is passed to.
"""

import dataclasses
import json
import os
import sys

from .errors import CellRCNNError
from .progress import Progress
from .settings import BOUNDS, AnnotationTrainingSettings, DetectionSettings

SAMPLE_SLIDE = os.path.join(os.path.dirname(__file__), 'data', 'CMU-1-Small-Region.svs')


def _given(**options):
    """The options given (not None): the defaults of what they feed stand for the others."""
    return {name: value for name, value in options.items() if value is not None}


def settings_from_args(cls, args, leave_out=()):
    """A settings dataclass from the parsed options named like its fields; a field with no such option, with the
    option not given, or in ``leave_out`` keeps the dataclass's default."""
    return cls(**_given(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)
                           if f.name not in leave_out}))


def run_detect(args):
    from .exports import detection_summary_lines
    from .job import detect_to_files, output_paths
    from .region import named_region, region_settings

    slide_path = args.slide or SAMPLE_SLIDE
    if not args.slide:
        print(f'no slide given: using the bundled sample {slide_path}', file=sys.stderr)
    region = region_settings(args.region.split(',')) if args.region else {}
    name = region_annotation_name(args)
    if name:
        if args.region:
            raise CellRCNNError('give --roi or --region-annotation NAME, not both')
        on_girder = ()
        if args.girder_url and args.girder_item:
            from .girder_api import check_transport
            check_transport(args.girder_url, args.insecure_http)  # the token goes to the server to read the region
            on_girder = (args.girder_url, args.girder_token, args.girder_item)
        region, note = named_region(name, slide_path, *on_girder)
        if region is None:
            raise CellRCNNError(note)
    settings = dataclasses.replace(settings_from_args(DetectionSettings, args), **region)
    stem = os.path.splitext(os.path.basename(slide_path))[0]
    if args.pixelmap and (args.girder_url or args.girder_item or args.local_girder):
        raise CellRCNNError('--pixelmap is written to files only: the CellDetection task posts a pixelmap to the DSA; '
                            'leave it out when posting to Girder')
    paths = output_paths(args.output, stem, pixelmap=args.pixelmap)
    resume_dir = None if args.no_resume else os.path.join(args.output, f'.{stem}.partial')

    def run():
        post = girder_poster(args)  # checks server, token and item before any detection runs
        result = detect_to_files(slide_path, paths, settings, resume_dir=resume_dir)
        print('\n'.join(detection_summary_lines(result)))
        print('wrote ' + ', '.join(p for p in paths.values() if p))
        if post:
            print('\n'.join(post(paths)))

    if not args.local_girder:
        return run()
    if args.girder_url or args.girder_item:
        raise CellRCNNError('--local-girder starts its own server: leave out --girder-url and --item')
    from .devstack.local_girder import detect_on_local_girder
    from .slide import Slide

    Slide(slide_path, mpp=args.mpp, allow_upsample=True)  # a slide that cannot be read fails now, not after an upload

    def run_on(url, token, item_id):
        args.girder_url, args.girder_token, args.girder_item = url, token, item_id
        run()

    detect_on_local_girder(slide_path, run_on, keep=args.keep_girder)


def run_dsa(args):
    from .devstack.local_dsa import build, stack_up

    if args.action == 'build':
        return build()
    stack_up(args.slide or SAMPLE_SLIDE, run_task=args.run_task)


def girder_poster(args):
    """What posts ``cellrcnn detect``'s results to Girder (``girder_post.poster``), or None when not asked to."""
    from .girder_api import check_transport
    from .girder_post import poster

    if not args.girder_url and not args.girder_item:
        return None
    if not args.girder_url or not args.girder_item:
        raise CellRCNNError('posting to Girder needs both --girder-url and --item')
    check_transport(args.girder_url, args.insecure_http)
    return poster(args.girder_url, args.girder_token, args.girder_item, progress=Progress(mode='auto'))


def region_annotation_name(args):
    """``--region-annotation``'s name, stripped (None when not given); a one-line CellRCNNError for a blank one."""
    if args.region_annotation is None:
        return None
    if not args.region_annotation.strip():
        raise CellRCNNError('--region-annotation needs the name of the annotations that outline the region')
    return args.region_annotation.strip()


def run_batch(args):
    from .cohort import GirderFolder, batch
    from .girder_api import check_transport

    girder = None
    region_annotation = region_annotation_name(args)
    if args.girder_url or args.girder_folder:
        if not (args.girder_url and args.girder_folder) or args.source:
            raise CellRCNNError('give either a folder of slides or both --girder-url and --folder')
        check_transport(args.girder_url, args.insecure_http)
        girder = GirderFolder(args.girder_url, args.girder_token, args.girder_folder)
    elif not args.source:
        raise CellRCNNError('give a folder of slides, or --girder-url and --folder')
    # batch's --scheduler spreads whole slides over a cluster; the settings' scheduler (tile batches) stays unset
    settings = settings_from_args(DetectionSettings, args, leave_out=('scheduler',))
    batch(args.source, args.output, settings, scheduler=args.scheduler, girder=girder,
          progress=Progress(mode='auto', name='cellrcnn batch', unit='slide'),
          region_annotation=region_annotation)


#: a new model's ``centre_distance_um`` (``train --centre-distance``)
TRAIN_CENTRE_DISTANCE_UM = 2.5
#: the ``train`` options a resumed run takes: the rest are the run's own (stored in its last.pt)
RESUME_OPTIONS = ('command', 'run', 'output', 'resume', 'steps', 'device', 'val_data', 'val_seed', 'val_count')


def _model_config(args):
    from .config import ModelConfig
    centre = TRAIN_CENTRE_DISTANCE_UM if args.centre_distance is None else args.centre_distance
    values = {'backbone': args.backbone, 'anchor_upsample': args.anchor_upsample,
              'anchor_offsets': args.anchor_offsets, 'mpp': args.mpp, 'centre_distance_um': centre}
    return ModelConfig(**{k: v for k, v in values.items() if v is not None}).validate()


def run_train(args):
    from .checkpoint import load_checkpoint, save_checkpoint
    from .evaluate import calibrate_threshold, evaluate_model
    from .metrics import format_report
    from .samples import labelled_set
    from .train import TrainConfig, train

    if args.output is None:
        if not args.resume:
            raise CellRCNNError('train needs -o/--output, the run folder')
        args.output = os.path.dirname(args.resume) or '.'
    if args.resume:
        fixed = [name for name, value in vars(args).items()
                 if name not in RESUME_OPTIONS and value not in (None, False)]
        if fixed:
            options = ', '.join('--' + name.replace('_', '-') for name in fixed)
            raise CellRCNNError(f'a resumed run keeps its own settings: leave out {options} (only --steps may '
                                'change; start a new run with --init to train with others)')
    if args.val_data and not os.path.isdir(args.val_data):  # before training: it is read after the last step
        raise CellRCNNError(f'--val-data {args.val_data} is not a folder of labelled images')
    # a resumed run keeps its own settings; of this command's options only --steps applies
    train_config = None if args.resume and args.steps is None else settings_from_args(TrainConfig, args)
    model, _ = train(_model_config(args), train_config, args.output, device=args.device,
                     resume=args.resume, init=args.init, progress=Progress(mode='auto', name='train', unit='step'))
    # what the run trained with: a resumed run's own settings, not the options of the command that resumed it
    cfg = TrainConfig(**load_checkpoint(os.path.join(args.output, 'last.pt'))['train_config'])
    path = os.path.join(args.output, 'model.pt')
    if cfg.entries and not args.val_data:
        _calibrate_on_entries(model, cfg, args.device)
        # kept before the held-out figures, which read images of their own (a bad one loses nothing computed)
        save_checkpoint(path, model, half=True, train_config=dataclasses.asdict(cfg))
    extra = {'held_out': _report_held_out(model, cfg, args.device)}
    if args.val_data or cfg.synthetic_share > 0:
        val = labelled_set(args.val_data, tile_size=cfg.tile_size, mpp=model.config.mpp,
                           annotation_name=cfg.annotation_name, point_box_size=cfg.point_box_size,
                           **_given(seed=args.val_seed, count=args.val_count))
        if args.val_data or not cfg.entries:  # with real entries, the operating point comes from them
            threshold, _ = calibrate_threshold(model, val, device=args.device)
            print(f'operating point: score >= {threshold:.3f}')
        metrics = evaluate_model(model, val, device=args.device)
        print('held-out synthetic tiles' if not args.val_data else f'--val-data {args.val_data}')
        print(format_report(metrics))
        extra['validation'] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    save_checkpoint(path, model, half=True, train_config=dataclasses.asdict(cfg), **extra)
    print(f'model written to {path}')


def _calibrate_on_entries(model, cfg, device):
    """Set the operating point of best centroid F1 on the images of the real ``--data`` entries trained on, each
    entry counting the same (the mean of their F1s), and the cell-type bias, where they name types; print them."""
    from .evaluate import calibrate_on_records
    from .training_data import entry_records, entry_weight

    sets = [entry_records(entry, cfg, model.config) for entry in cfg.entries if entry_weight(entry) > 0]
    if not sets:
        raise CellRCNNError('every --data entry has weight 0: there is nothing to calibrate the model on')
    threshold, f1 = calibrate_on_records(model, sets, device=device)
    over = f', the mean of {len(sets)} entries' if len(sets) > 1 else ''
    print(f'operating point: score >= {threshold:.3f} (centroid F1 {f1:.3f} on the training images{over})')
    bias = model.config.cell_type_bias
    if bias:
        print('cell-type bias: ' + ', '.join(f'{name} {b:+.1f}' for name, b in zip(model.config.cell_types, bias)))


def _report_held_out(model, cfg, device):
    """Print and return the figures of the model on the held-out split of every real ``--data`` entry."""
    from .evaluate import evaluate_records, format_records_report
    from .training_data import entry_records, entry_weight, held_out_entries

    figures = {}
    for entry in cfg.entries:
        for held_out in held_out_entries(entry) if entry_weight(entry) > 0 else ():
            result = evaluate_records(model, entry_records(held_out, cfg, model.config), device=device)
            print(f'held out: {held_out}')
            print(format_records_report(result, model.config.cell_types))
            figures[held_out] = result
    return figures


def run_average(args):
    from .checkpoint import load_model, model_sha256, save_checkpoint
    from .config import LIMITS
    from .model_averaging import average_models
    from .train import TrainConfig
    from .training_data import stain_reference

    for option, value, limits in (('--objectness-floor', args.objectness_floor, LIMITS['rpn_score_thresh']),
                                  ('--stain-strength', args.stain_strength, LIMITS['stain_strength'])):
        if value is not None and not limits[0] <= value <= limits[1]:  # before any model is read
            raise CellRCNNError(f'{option} must be a number from {limits[0]:g} to {limits[1]:g}, not {value}')
    weights = args.weights or [1.0] * len(args.models)
    model = average_models([load_model(path) for path in args.models], weights, names=args.models)
    # before calibrating: the operating point is found with the floor and the stain normalisation in use
    if args.objectness_floor is not None:
        model.config = dataclasses.replace(model.config, rpn_score_thresh=args.objectness_floor)
    if args.stain_reference is not None:
        model.config = dataclasses.replace(model.config, stain_reference=() if args.stain_reference == 'none' else
                                           stain_reference(args.stain_reference, model.config))
    if args.stain_strength is not None:
        model.config = dataclasses.replace(model.config, stain_strength=args.stain_strength)
    extra = {'averaged_from': [{'file': os.path.basename(path), 'sha256': model_sha256(path), 'weight': weight}
                               for path, weight in zip(args.models, weights)]}
    if args.data:
        cfg = TrainConfig(data=args.data)
        _calibrate_on_entries(model, cfg, args.device)
        extra['calibrated_on'] = list(args.data)
        # kept before the held-out figures, which read images of their own (a bad one loses nothing computed)
        save_checkpoint(args.output, model, half=True, **extra)
        extra['held_out'] = _report_held_out(model, cfg, args.device)
    save_checkpoint(args.output, model, half=True, **extra)
    print(f'model written to {args.output}')


def run_train_girder(args):
    from .girder_api import check_transport
    from .girder_training import train_from_girder, training_summary_lines

    check_transport(args.girder_url, args.insecure_http)
    settings = settings_from_args(AnnotationTrainingSettings, args)
    result = train_from_girder(args.girder_url, args.girder_token, args.girder_folder, args.annotation_name,
                               args.output, settings, output_folder=args.output_folder, name=args.name,
                               progress=Progress(mode='auto', name='train-girder', unit='%'))
    print('\n'.join(training_summary_lines(result)))


def run_evaluate(args):
    from .checkpoint import load_model
    from .evaluate import evaluate_model
    from .metrics import format_report
    from .samples import labelled_set

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise CellRCNNError(f'--threshold must be a score from 0 to 1, not {args.threshold}')
    _check_json_folder(args.json)  # before the work whose figures it keeps
    model = load_model(args.model)
    if args.data and not _is_dsa_folder(args.data):
        return _evaluate_entries(model, args)
    samples = labelled_set(args.data and args.data[0], mpp=model.config.mpp, annotation_name=args.annotation_name,
                           point_box_size=args.point_box_size,
                           **_given(seed=args.seed, count=args.count, tile_size=args.tile_size))
    metrics = evaluate_model(model, samples, device=args.device, threshold=args.threshold, views=args.views)
    print(format_report(metrics))
    _write_json(args.json, metrics)


def _is_dsa_folder(data):
    """``--data`` is one bare folder of images with DSA JSON (box truth, evaluated as before the entries)."""
    from .labels import detect_format, parse_entry

    fmt, path, options = parse_entry(data[0])
    return len(data) == 1 and fmt is None and not options and os.path.isdir(path) and detect_format(path) == 'dsa'


def _evaluate_entries(model, args):
    from .evaluate import evaluate_records, format_records_report
    from .train import TrainConfig
    from .training_data import entry_records

    cfg = TrainConfig(annotation_name=args.annotation_name, point_box_size=args.point_box_size)
    figures = {}
    for entry in args.data:
        result = evaluate_records(model, entry_records(entry, cfg, model.config), device=args.device,
                                  threshold=args.threshold, views=args.views)
        print(f'{entry}:')
        print(format_records_report(result, model.config.cell_types))
        figures[entry] = result
    _write_json(args.json, figures)


def _check_json_folder(path):
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        raise CellRCNNError(f'cannot write --json {path}: its folder {folder} does not exist')


def _write_json(path, figures):
    from .files import atomic_write

    if path:
        with atomic_write(path, 'the figures') as f:
            json.dump(figures, f, indent=2, default=float)


def run_synth(args):
    from .annotation import detections_to_annotation, write_annotation
    from .synthetic import make_dataset, write_slide

    for option, value in (('mpp', args.mpp), ('tile_size', args.tile_size)):
        low, high = BOUNDS[option]
        if not low <= value <= high:
            raise CellRCNNError(f'--{option.replace("_", "-")} must be from {low:g} to {high:g}, not {value:g}')
    if args.slide and os.path.isdir(args.output):
        raise CellRCNNError(f'{args.output} is a folder: --slide writes one .tiff file')
    if args.slide and not args.output.lower().endswith(('.tif', '.tiff')):  # never over a file of another kind
        raise CellRCNNError(f'{args.output}: --slide writes a pyramidal TIFF: name it .tiff')
    if args.slide:
        boxes = write_slide(args.output, args.width, args.height, args.seed, mpp=args.mpp)
        print(f'wrote {args.output} ({args.width}x{args.height} px at {args.mpp} um/px) with {len(boxes)} nuclei')
        return
    import cv2
    os.makedirs(args.output, exist_ok=True)
    for i, (image, boxes) in enumerate(make_dataset(args.seed, args.count, size=args.tile_size, mpp=args.mpp)):
        path = os.path.join(args.output, f'tile_{i:05d}.png')
        cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_annotation(detections_to_annotation(boxes, [1.0] * len(boxes), name='ground truth'), path + '.json')
    print(f'wrote {args.count} tiles with DSA annotation JSON to {args.output}')
