"""The ``cellrcnn`` command: detect, batch, train, evaluate, synth, dsa."""

import argparse
import dataclasses
import json
import os
import sys

from . import __version__
from .errors import CellRCNNError, histomicstk, run_reporting_errors
from .progress import MODES, Progress
from .settings import AnnotationTrainingSettings, DetectionSettings

SAMPLE_SLIDE = os.path.join(os.path.dirname(__file__), 'data', 'CMU-1-Small-Region.svs')


def _detect(args):
    from .exports import summary_lines
    from .job import detect_to_files, output_paths

    slide_path = args.slide or SAMPLE_SLIDE
    if not args.slide:
        print(f'no slide given: using the bundled sample {slide_path}', file=sys.stderr)
    settings = DetectionSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DetectionSettings)})
    stem = os.path.splitext(os.path.basename(slide_path))[0]
    paths = output_paths(args.output, stem)
    resume_dir = None if args.no_resume else os.path.join(args.output, f'.{stem}.partial')

    def run():
        post = _poster(args)  # checks server, token and item before any detection runs
        result = detect_to_files(slide_path, paths, settings, resume_dir=resume_dir)
        print('\n'.join(summary_lines(result, settings)))
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


def _dsa(args):
    from .devstack.local_dsa import build, stack_up

    if args.action == 'build':
        return build()
    stack_up(args.slide or SAMPLE_SLIDE, run_task=args.run_task)


def _poster(args):
    """What posts ``cellrcnn detect``'s results to Girder (``girder_post.poster``), or None when not asked to."""
    from .girder_post import poster

    if not args.girder_url and not args.girder_item:
        return None
    if not args.girder_url or not args.girder_item:
        raise CellRCNNError('posting to Girder needs both --girder-url and --item')
    return poster(args.girder_url, args.girder_token, args.girder_item, progress=Progress(mode='auto'))


def _batch(args):
    from .cohort import GirderFolder, batch

    girder = None
    if args.girder_url or args.girder_folder:
        if not (args.girder_url and args.girder_folder) or args.source:
            raise CellRCNNError('give either a folder of slides or both --girder-url and --folder')
        girder = GirderFolder(args.girder_url, args.girder_token, args.girder_folder)
    elif not args.source:
        raise CellRCNNError('give a folder of slides, or --girder-url and --folder')
    settings = DetectionSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DetectionSettings)
                                    if f.name not in ('scheduler', 'progress') and hasattr(args, f.name)})
    batch(args.source, args.output, settings, scheduler=args.scheduler, girder=girder,
          progress=Progress(mode='auto', name='cellrcnn batch', unit='slide'))


def _roi(text):
    try:
        values = [float(v) for v in text.split(',')]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f'expected X,Y,W,H in base pixels, not {text!r}')
    return tuple(values)


def _model_config(args):
    from .config import ModelConfig
    values = {'backbone': args.backbone, 'anchor_upsample': args.anchor_upsample,
              'anchor_offsets': args.anchor_offsets, 'mpp': args.mpp}
    return ModelConfig(**{k: v for k, v in values.items() if v is not None}).validate()


def _train(args):
    from .checkpoint import save_checkpoint
    from .samples import labelled_set
    from .evaluate import calibrate_threshold, evaluate_model
    from .metrics import format_report
    from .train import TrainConfig, train

    defaults = TrainConfig()
    cfg = TrainConfig(**{f.name: getattr(args, f.name) if getattr(args, f.name, None) is not None
                         else getattr(defaults, f.name) for f in dataclasses.fields(TrainConfig)})
    model, _ = train(_model_config(args), cfg, args.output, device=args.device, resume=args.resume, init=args.init,
                     progress=Progress(mode='auto', name='train', unit='step'))
    if args.val_data or not cfg.data:
        val = labelled_set(args.val_data, seed=args.val_seed, count=args.val_count, tile_size=cfg.tile_size,
                           mpp=model.config.mpp, annotation_name=cfg.annotation_name,
                           point_box_size=cfg.point_box_size)
        threshold, _ = calibrate_threshold(model, val, device=args.device)
        metrics = evaluate_model(model, val, device=args.device)
        print(f'operating point: score >= {threshold:.3f}')
        print(format_report(metrics))
        save_checkpoint(os.path.join(args.output, 'model.pt'), model, half=True, train_config=dataclasses.asdict(cfg),
                        validation={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    print(f'model written to {os.path.join(args.output, "model.pt")}')


def _train_girder(args):
    from .girder_training import summary_lines, train_from_girder

    settings = AnnotationTrainingSettings(**{f.name: getattr(args, f.name)
                                             for f in dataclasses.fields(AnnotationTrainingSettings)})
    result = train_from_girder(args.girder_url, args.girder_token, args.girder_folder, args.annotation_name,
                               args.output, settings, output_folder=args.output_folder, name=args.name,
                               progress=Progress(mode='auto', name='train-girder', unit='%'))
    print('\n'.join(summary_lines(result)))


def _evaluate(args):
    from .checkpoint import load_model
    from .samples import labelled_set
    from .evaluate import evaluate_model
    from .metrics import format_report

    model = load_model(args.model)
    samples = labelled_set(args.data, seed=args.seed, count=args.count, tile_size=args.tile_size,
                           mpp=model.config.mpp, annotation_name=args.annotation_name,
                           point_box_size=args.point_box_size)
    metrics = evaluate_model(model, samples, device=args.device, threshold=args.threshold)
    print(format_report(metrics))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(metrics, f, indent=2, default=float)


def _synth(args):
    from .annotation import detections_to_annotation, write_annotation
    from .synthetic import make_dataset, write_slide

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


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, not {text}')
    return value


def _add_detection_options(p):
    """The options of ``detect`` and ``batch`` that go into ``settings.DetectionSettings`` (and its defaults)."""
    d = DetectionSettings
    p.add_argument('--magnification', type=float, help="analysis magnification (default: the model's, 20x)")
    p.add_argument('--mpp', type=float, help='microns per base pixel, for slides that do not state it')
    p.add_argument('--model', help='checkpoint (default: the bundled model)')
    p.add_argument('--threshold', type=float, help="score threshold (default: the model's calibrated one)")
    p.add_argument('--nms', type=float, help="NMS IoU threshold (default: the model's)")
    p.add_argument('--anchor-upsample', dest='anchor_upsample', type=int, choices=[1, 2, 4],
                   help="anchor density upsampling at inference (default: the model's)")
    p.add_argument('--adapt-tiles', dest='adapt_tiles', type=int, default=d.adapt_tiles, metavar='N',
                   help="adapt the model to the slide's staining first: re-estimate its BatchNorm statistics on N of "
                        f"the slide's tissue tiles, e.g. 8 (default {d.adapt_tiles}: off; docs/real-tissue.md says "
                        "when it helps)")
    p.add_argument('--tile-size', dest='tile_size', type=_positive_int, default=d.tile_size,
                   help=f'largest tile side in analysis px; tiles shrink to fit the region (default {d.tile_size})')
    p.add_argument('--overlap', type=int, default=d.overlap,
                   help=f'px shared by neighbouring tiles, at least the largest nucleus (default {d.overlap})')
    p.add_argument('--min-tissue', dest='min_tissue', type=float, default=d.min_tissue,
                   help=f'skip tiles with less tissue than this fraction (default {d.min_tissue})')
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int, default=d.batch_size,
                   help=f'tiles per model call (default {d.batch_size}; a GPU gains from 8 or more, and halves it '
                        'when it runs out of memory)')
    p.add_argument('--workers', type=int, default=d.workers, help='tile reader threads')
    p.add_argument('--element', choices=['rectangle', 'point'], default=d.element)
    p.add_argument('--device', default=d.device, help='auto, cpu or cuda')


class _TokenOnCommandLine(argparse.Action):
    """``--girder-token T``: taken, with a warning that every user of the machine can read it in the process list."""

    def __call__(self, parser, namespace, value, option_string=None):
        print(f'{parser.prog}: warning: a token given with --girder-token is visible to every user of this machine '
              '(ps); set GIRDER_TOKEN or use --girder-token-file instead', file=sys.stderr)
        setattr(namespace, self.dest, value)


def _token_from_file(path):
    """``--girder-token-file PATH``: the token is the file's first line."""
    try:
        with open(path, encoding='utf-8') as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CellRCNNError(f'cannot read the token file {path}: {getattr(exc, "strerror", None) or exc}') from None
    if not token:
        raise CellRCNNError(f'the token file {path} is empty')
    return token


def _add_server_options(group, url_help='Girder API URL, e.g. https://dsa.example.org/api/v1', required=False):
    """``--girder-url`` and the token of a command: the GIRDER_TOKEN environment variable, ``--girder-token-file``, or
    (visible in the process list, so with a warning) ``--girder-token``."""
    group.add_argument('--girder-url', dest='girder_url', required=required, help=url_help)
    group.add_argument('--girder-token-file', dest='girder_token_file', metavar='PATH',
                       help='a file whose first line is the Girder token (default: the GIRDER_TOKEN environment '
                            'variable)')
    group.add_argument('--girder-token', dest='girder_token', action=_TokenOnCommandLine,
                       default=os.environ.get('GIRDER_TOKEN'), metavar='TOKEN',
                       help='the Girder token itself; other users of the machine can read it (ps): prefer '
                            'GIRDER_TOKEN or --girder-token-file')


def build_parser():
    parser = argparse.ArgumentParser(prog='cellrcnn', description='Faster R-CNN nucleus detection for histology.')
    parser.add_argument('--version', action='version', version=f'cellrcnn {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('detect', help='detect nuclei in a slide; write DSA annotations, GeoJSON, CSV and an overview')
    p.add_argument('slide', nargs='?', help='slide or image large_image opens (default: the bundled sample slide)')
    p.add_argument('-o', '--output', required=True, help='output folder')
    p.add_argument('--roi', type=_roi, help='region of interest X,Y,W,H in base pixels (default: the whole slide)')
    _add_detection_options(p)
    p.add_argument('--scheduler', help='run tile batches on a dask.distributed cluster at this address, '
                                       'or on N local processes with local:N')
    p.add_argument('--progress', choices=MODES, default=DetectionSettings.progress)
    p.add_argument('--no-resume', action='store_true', help='do not keep or reuse partial results')
    group = p.add_argument_group('posting to Girder / the Digital Slide Archive')
    _add_server_options(group, 'post the annotations to this Girder API (e.g. https://dsa.example.org/api/v1), '
                               "replacing this model's previous result on the item; the files are written first")
    group.add_argument('--item', dest='girder_item', help="id of the slide's item on Girder")
    group.add_argument('--local-girder', dest='local_girder', action='store_true',
                       help='run the whole DSA loop here: start a throwaway Girder with the DSA plugins '
                            '(./install.sh --with-girder), upload the slide, detect, post, read the annotations back')
    group.add_argument('--keep-girder', dest='keep_girder', action='store_true',
                       help='with --local-girder: keep the server up (until Ctrl-C) to look at the result')
    p.set_defaults(run=_detect)

    p = sub.add_parser('batch', help='detect nuclei in every slide of a folder (local or on Girder); one result '
                                     'folder per slide and a cohort table')
    p.add_argument('source', nargs='?', help='folder of slides (searched recursively; or --girder-url and --folder)')
    p.add_argument('-o', '--output', required=True,
                   help='output folder: OUT/slides/<slide path>/ per slide, OUT/cohort.csv; a second run skips done '
                        'slides')
    _add_detection_options(p)
    p.add_argument('--scheduler', help='spread the slides over a dask.distributed cluster at this address, '
                                       'or over N local processes with local:N')
    group = p.add_argument_group('slides from Girder / the Digital Slide Archive (results are posted back)')
    _add_server_options(group)
    group.add_argument('--folder', dest='girder_folder', help='id of the Girder folder (its subfolders too)')
    p.set_defaults(run=_batch)

    p = sub.add_parser('train', help='train a model on synthetic tissue or on images with DSA annotations')
    p.add_argument('-o', '--output', required=True, help='run folder: last.pt (resumable) and model.pt')
    p.add_argument('--data', help='folder of images with DSA annotation JSON (default: synthetic tissue)')
    p.add_argument('--annotation-name', dest='annotation_name', help='only annotations with this name')
    p.add_argument('--point-box-size', dest='point_box_size', type=float, help='box side (px) for point annotations')
    p.add_argument('--resume', help='continue from a run folder\'s last.pt')
    p.add_argument('--steps', type=_positive_int)
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int)
    p.add_argument('--lr', type=float)
    p.add_argument('--warmup-steps', dest='warmup_steps', type=int)
    p.add_argument('--tile-size', dest='tile_size', type=_positive_int)
    p.add_argument('--synthetic-tiles', dest='synthetic_tiles', type=_positive_int)
    p.add_argument('--synthetic-seed', dest='synthetic_seed', type=int)
    p.add_argument('--synthetic-scale', dest='synthetic_scale', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                   help='synthetic nuclei drawn this many times larger, per tile (default 0.8 1.25)')
    p.add_argument('--init', help='fine-tune this model (its own configuration is kept) instead of starting from '
                                  'random weights')
    p.add_argument('--seed', type=int)
    p.add_argument('--workers', type=int)
    p.add_argument('--checkpoint-every', dest='checkpoint_every', type=_positive_int)
    p.add_argument('--backbone', help='resnet18 (default), resnet34 or resnet50')
    p.add_argument('--anchor-upsample', dest='anchor_upsample', type=int, help='1, 2 or 4')
    p.add_argument('--anchor-offsets', dest='anchor_offsets', type=int, help='1 or 2 anchor centres per cell side')
    p.add_argument('--mpp', type=float, help='microns per pixel of the training images (default 0.5, 20x)')
    p.add_argument('--val-data', dest='val_data', help='labelled folder to calibrate and report on')
    p.add_argument('--val-seed', dest='val_seed', type=int, default=2000)
    p.add_argument('--val-count', dest='val_count', type=_positive_int, default=200)
    p.add_argument('--device', default='auto')
    p.set_defaults(run=_train)

    p = sub.add_parser('train-girder', help='train from nuclei annotated in HistomicsUI on a Girder folder of slides; '
                                            'evaluate on held-out slides; upload the model and its card')
    p.add_argument('-o', '--output', required=True, help='local folder: downloaded slides, NAME.pt and NAME.md')
    _add_server_options(p, required=True)
    p.add_argument('--folder', dest='girder_folder', required=True, help='id of the Girder folder of slides')
    p.add_argument('--annotation-name', dest='annotation_name', required=True,
                   help='name of the annotations that hold the nuclei (rectangles or points)')
    t = AnnotationTrainingSettings
    p.add_argument('--region-label', dest='region_label', default=t.region_label,
                   help='label of the rectangles/polygons that outline the annotated region (default: '
                        f'{t.region_label}; without one, the bounding box of the nuclei)')
    p.add_argument('--point-size', dest='point_size_um', type=float, default=t.point_size_um,
                   help=f'box side in micrometres for point annotations (default {t.point_size_um:g})')
    p.add_argument('--holdout', default=t.holdout,
                   help=f'held-out slides: a count or a fraction (default {t.holdout:g}: the last)')
    p.add_argument('--steps', type=_positive_int, default=t.steps)
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int, default=t.batch_size)
    p.add_argument('--lr', type=float, default=t.lr)
    p.add_argument('--seed', type=int, default=t.seed)
    p.add_argument('--init', default=t.init, help='checkpoint to fine-tune (default: the bundled model)')
    p.add_argument('--from-scratch', dest='from_scratch', action='store_true',
                   help="train from random weights (with --init's configuration) instead of fine-tuning")
    p.add_argument('--output-folder', dest='output_folder',
                   help='id of a Girder folder to upload the model and its card to')
    p.add_argument('--name', help='model file name without .pt (default: cellrcnn-ANNOTATION_NAME)')
    p.add_argument('--device', default=t.device)
    p.set_defaults(run=_train_girder)

    p = sub.add_parser('evaluate', help='precision, recall, F1 and COCO AP of a model on a labelled set')
    p.add_argument('--model', help='checkpoint (default: the bundled model)')
    p.add_argument('--data', help='folder of images with DSA annotation JSON (default: held-out synthetic tiles)')
    p.add_argument('--annotation-name', dest='annotation_name')
    p.add_argument('--point-box-size', dest='point_box_size', type=float)
    p.add_argument('--seed', type=int, default=2000, help='synthetic set seed (training uses 1000+)')
    p.add_argument('--count', type=_positive_int, default=200)
    p.add_argument('--tile-size', type=_positive_int, default=256)
    p.add_argument('--threshold', type=float, help="score threshold (default: the model's calibrated one)")
    p.add_argument('--json', help='also write the metrics to this JSON file')
    p.add_argument('--device', default='auto')
    p.set_defaults(run=_evaluate)

    p = sub.add_parser('synth', help='write synthetic H&E tiles with DSA annotations, or a synthetic slide')
    p.add_argument('output', help='folder for tiles, or .tiff path with --slide')
    p.add_argument('--slide', action='store_true', help='write one pyramidal TIFF slide (+ .boxes.npy)')
    p.add_argument('--width', type=_positive_int, default=4096)
    p.add_argument('--height', type=_positive_int, default=4096)
    p.add_argument('--count', type=_positive_int, default=100)
    p.add_argument('--tile-size', type=_positive_int, default=256)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--mpp', type=float, default=0.5)
    p.set_defaults(run=_synth)

    p = sub.add_parser('dsa', help='a whole Digital Slide Archive on this machine (Girder, HistomicsUI, '
                                   'girder_worker, a Docker engine): make its images, or start it')
    p.add_argument('action', choices=('build', 'up'),
                   help='build: make the task image (and what the stack runs) from this checkout; up: start the '
                        'stack with the task registered and the slide uploaded, until Ctrl-C')
    p.add_argument('--slide', help='with up: the slide to upload (default: the bundled sample)')
    p.add_argument('--run-task', dest='run_task', action='store_true',
                   help='with up: run CellDetection on the slide through girder_worker, print the result and stop')
    p.set_defaults(run=_dsa)
    return parser


#: the commands that need histomicstk (tissue detection, stain augmentation): they check it before any work
NEEDS_HISTOMICSTK = ('detect', 'batch', 'train', 'train-girder')


def main(argv=None):
    args = build_parser().parse_args(argv)

    def run():
        if args.command in NEEDS_HISTOMICSTK:
            histomicstk()
        if getattr(args, 'girder_token_file', None):
            args.girder_token = _token_from_file(args.girder_token_file)
        args.run(args)

    return run_reporting_errors('cellrcnn', run)


if __name__ == '__main__':
    sys.exit(main())
