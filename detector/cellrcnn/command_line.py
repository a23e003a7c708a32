"""The ``cellrcnn`` command line: its commands, their options, defaults and help (argparse). What each command does
is :mod:`cellrcnn.commands`; the options of ``detect``, ``batch`` and ``train-girder`` take their defaults from
:mod:`cellrcnn.settings`.
"""

import argparse
import os
import sys

from . import __version__, commands
from .annotation import CLASS_SOURCES
from .errors import CellRCNNError
from .nuclei_map import BOXES_SHOWN
from .progress import MODES
from .region import REGION_FORMS
from .settings import DISPLAYS, VIEWS, AnnotationTrainingSettings, DetectionSettings


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, not {text}')
    return value


def _seed(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or a positive integer, not {text}')
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
                   help=f'read tiles with less tissue than this fraction only where their tissue lies, skip those '
                        f'without; 0 reads every tile whole (default {d.min_tissue})')
    p.add_argument('--keep-blue-green', dest='keep_blue_green', action='store_true',
                   help='take large green or blue areas for tissue, not for pen ink (slides of special stains such '
                        "as Masson's trichrome or alcian blue); black fill is still left out")
    p.add_argument('--leave-out-of-focus', dest='leave_out_of_focus', action='store_true',
                   help='leave the tissue that looks out of focus out of the counts, as pen ink is: its nuclei are '
                        'dropped and its area is not tissue, so counts and densities are of the tissue in focus '
                        '(default: counted, and flagged)')
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int, default=d.batch_size,
                   help=f'tiles per model call (default {d.batch_size}; a GPU gains from 8 or more, and halves it '
                        'when it runs out of memory)')
    p.add_argument('--workers', type=int, default=d.workers, help='tile reader threads')
    p.add_argument('--element', choices=['rectangle', 'point'], default=d.element)
    p.add_argument('--display', choices=DISPLAYS, default=d.display,
                   help=f'what HistomicsUI shows when the slide opens: the nuclei\'s boxes, the nuclei map (a dot per '
                        'nucleus, a density when zoomed out), the nuclei pixelmap (with --pixelmap), or auto: the '
                        f'boxes up to {BOXES_SHOWN} nuclei, else the pixelmap when written, else the map (default '
                        'auto)')
    p.add_argument('--classes', nargs='+', metavar='NAME',
                   help="keep only nuclei of these cell types (names of the model's; default: every nucleus)")
    _add_views(p)
    p.add_argument('--device', default=d.device, help='auto, cpu or cuda')


def _add_views(p):
    p.add_argument('--views', type=int, choices=VIEWS, default=DetectionSettings.views,
                   help='see each tile in N views, flipped and turned, and fuse their detections: more accurate, and N '
                        f'times the model\'s time (default {DetectionSettings.views}; docs/real-tissue.md has figures)')


class _TokenOnCommandLine(argparse.Action):
    """``--girder-token T``: taken, with a warning that every user of the machine can read it in the process list."""

    def __call__(self, parser, namespace, value, option_string=None):
        print(f'{parser.prog}: warning: a token given with --girder-token is visible to every user of this machine '
              '(ps); set GIRDER_TOKEN or use --girder-token-file instead', file=sys.stderr)
        setattr(namespace, self.dest, value)


def token_from_file(path):
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
    group.add_argument('--insecure-http', dest='insecure_http', action='store_true',
                       help='allow a plain http:// URL to another machine (the token then travels in clear)')


def build_parser():
    parser = argparse.ArgumentParser(prog='cellrcnn', description='Faster R-CNN nucleus detection for histology.')
    parser.add_argument('--version', action='version', version=f'cellrcnn {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_detect(sub)
    _add_batch(sub)
    _add_train(sub)
    _add_train_girder(sub)
    _add_average(sub)
    _add_evaluate(sub)
    _add_synth(sub)
    _add_dsa(sub)
    return parser


def _add_detect(sub):
    p = sub.add_parser('detect', help='detect nuclei in a slide; write DSA annotations, GeoJSON, CSV and an overview')
    p.add_argument('slide', nargs='?', help='slide or image large_image opens (default: the bundled sample slide)')
    p.add_argument('-o', '--output', required=True, help='output folder')
    p.add_argument('--roi', dest='region',
                   help=f'region to analyse in base pixels: {REGION_FORMS} (default: the whole slide)')
    p.add_argument('--region-annotation', metavar='NAME',
                   help="or analyse the areas the slide's annotations named NAME outline: the ImageScope SLIDE.xml "
                        'or QuPath SLIDE.geojson beside the slide (regions or features named or classified NAME), '
                        'or with --girder-url and --item the annotations of that name on the item')
    _add_detection_options(p)
    p.add_argument('--scheduler', help='run tile batches on N local processes (local:N), or on the dask.distributed '
                                       'scheduler at tcp://127.0.0.1:PORT or tls://HOST:PORT (with the client '
                                       "certificate of Dask's configuration; docs/security.md)")
    p.add_argument('--progress', choices=MODES, default=DetectionSettings.progress)
    p.add_argument('--no-resume', action='store_true', help='do not keep or reuse partial results')
    p.add_argument('--pixelmap', action='store_true',
                   help="also write the nuclei pixelmap: a label image of the boxes (STEM.labels.tiff) and the DSA "
                        "annotation that draws it (STEM.pixelmap.anot.json, naming the image by its file name); the "
                        "CellDetection task uploads both to the DSA (docs/performance.md)")
    group = p.add_argument_group('posting to Girder / the Digital Slide Archive')
    _add_server_options(group, 'post the annotations to this Girder API (e.g. https://dsa.example.org/api/v1), '
                               "replacing this model's previous result on the item; the files are written first")
    group.add_argument('--item', dest='girder_item', help="id of the slide's item on Girder")
    group.add_argument('--local-girder', dest='local_girder', action='store_true',
                       help='run the whole DSA loop here: start a throwaway Girder with the DSA plugins '
                            '(./install.sh --with-girder), upload the slide, detect, post, read the annotations back')
    group.add_argument('--keep-girder', dest='keep_girder', action='store_true',
                       help='with --local-girder: keep the server up (until Ctrl-C) to look at the result')
    p.set_defaults(run=commands.run_detect)


def _add_batch(sub):
    p = sub.add_parser('batch', help='detect nuclei in every slide of a folder (local or on Girder); one result '
                                     'folder per slide and a cohort table')
    p.add_argument('source', nargs='?', help='folder of slides (searched recursively; or --girder-url and --folder)')
    p.add_argument('-o', '--output', required=True,
                   help='output folder: OUT/slides/<slide path>/ per slide, OUT/cohort.csv (with --region-annotation '
                        'NAME: OUT/slides-inside-NAME/, OUT/cohort-inside-NAME.csv); a second run skips done slides')
    _add_detection_options(p)
    p.add_argument('--scheduler', help='spread the slides over N local processes (local:N), or over the '
                                       'dask.distributed scheduler at tcp://127.0.0.1:PORT or tls://HOST:PORT (with '
                                       "the client certificate of Dask's configuration; docs/security.md)")
    p.add_argument('--region-annotation', metavar='NAME',
                   help="count each slide only inside the areas its annotations named NAME outline (e.g. a "
                        "pathologist's 'tumour'): on Girder, the slide's annotations of that name; in a local "
                        "folder, the ImageScope SLIDE.xml or QuPath SLIDE.geojson beside the slide (regions or "
                        "features named or classified NAME); slides without one are left out (status 'no region')")
    group = p.add_argument_group('slides from Girder / the Digital Slide Archive (results are posted back)')
    _add_server_options(group)
    group.add_argument('--folder', dest='girder_folder', help='id of the Girder folder (its subfolders too)')
    p.set_defaults(run=commands.run_batch)


def _add_train(sub):
    p = sub.add_parser('train', help='train a model on synthetic tissue and real labels in any format, mixed by weight')
    p.add_argument('-o', '--output', help="run folder: last.pt (resumable) and model.pt (default with --resume: "
                                          "its file's folder)")
    p.add_argument('--data', action='append', metavar='ENTRY',
                   help='labelled images, [FORMAT:]PATH[,KEY=VALUE]... (docs/training-data.md; a folder of images with '
                        'DSA annotation JSON is one); repeat for more. weight=W sets its sampling weight (default 1); '
                        'with split=NAME its other splits are reported after training')
    p.add_argument('--synthetic-weight', dest='synthetic_weight', type=float,
                   help='sampling weight of synthetic tiles beside the --data weights (default 1 without --data, '
                        '0 with)')
    p.add_argument('--annotation-name', dest='annotation_name', help='only annotations with this name (dsa)')
    p.add_argument('--point-box-size', dest='point_box_size', type=float,
                   help='side (px) of the square a dot-only nucleus is matched by (default: --dot-box-um)')
    p.add_argument('--dot-box-um', dest='dot_box_um', type=float,
                   help='side (um) of the square a dot-only nucleus is matched by; it teaches no box (default 8)')
    p.add_argument('--dot-boxes-from', dest='dot_boxes_from', metavar='MODEL',
                   help="give each dot-only nucleus this model's detection on its dot (within 3 um, at the model's "
                        'operating point) as its box before training; other dots stay dot-only')
    p.add_argument('--cell-types', dest='cell_types', nargs='+', metavar='NAME[=LABEL+LABEL]',
                   help='train a cell-type classifier for these types; LABELs: class names of the data meaning NAME, '
                        'e.g. lymphocyte tumour=tumor_epithelial stromal')
    p.add_argument('--cell-type-colors', dest='cell_type_colors', nargs='+', metavar='#RRGGBB',
                   help='their display colours (default: a fixed palette)')
    p.add_argument('--cell-types-only', dest='cell_types_only', action='store_true',
                   help="train only the cell-type classifier of --init's model; its detection stays exactly as it is")
    p.add_argument('--resume', help="continue from a run folder's last.pt, with the run's own settings (only --steps "
                                    'and the --val-* options may be given)')
    p.add_argument('--steps', type=_positive_int)
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int)
    p.add_argument('--lr', type=float)
    p.add_argument('--warmup-steps', dest='warmup_steps', type=int)
    p.add_argument('--tile-size', dest='tile_size', type=_positive_int)
    p.add_argument('--synthetic-tiles', dest='synthetic_tiles', type=_positive_int)
    p.add_argument('--synthetic-seed', dest='synthetic_seed', type=_seed)
    p.add_argument('--synthetic-scale', dest='synthetic_scale', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                   help='synthetic nuclei drawn this many times larger, per tile (default 0.8 1.25)')
    p.add_argument('--stain-jitter', dest='real_stain_sigma', type=float, nargs=2, metavar=('MUL', 'ADD'),
                   help="real images' HED stain jitter: sigmas of the multiplicative and additive change of each "
                        'stain concentration (default 0.3 0.2; 0 0: none)')
    p.add_argument('--blur', dest='real_blur', type=float, nargs=2, metavar=('SHARE', 'SIGMA_UM'),
                   help="real images out of focus: this share of the training crops is blurred by a Gaussian of a "
                        'sigma drawn up to SIGMA_UM microns and stored as JPEG (default 0 1.5: none is)')
    p.add_argument('--init', help='fine-tune this model (its own configuration is kept) instead of starting from '
                                  'random weights')
    p.add_argument('--seed', type=_seed)
    p.add_argument('--workers', type=int)
    p.add_argument('--checkpoint-every', dest='checkpoint_every', type=_positive_int)
    p.add_argument('--backbone', help='resnet18 (default), resnet34 or resnet50')
    p.add_argument('--anchor-upsample', dest='anchor_upsample', type=int, help='1, 2 or 4')
    p.add_argument('--anchor-offsets', dest='anchor_offsets', type=int, help='1 or 2 anchor centres per cell side')
    p.add_argument('--mpp', type=float, help='microns per pixel of the training images (default 0.5, 20x)')
    p.add_argument('--centre-distance', dest='centre_distance', type=float,
                   help='a detection centred within this many microns of a higher-scoring one is dropped '
                        f'(default {commands.TRAIN_CENTRE_DISTANCE_UM:g}; 0: none is)')
    p.add_argument('--val-data', dest='val_data', help='labelled folder to calibrate and report on')
    # --val-seed and --val-count left out: samples.labelled_set's own seed and count
    p.add_argument('--val-seed', dest='val_seed', type=_seed)
    p.add_argument('--val-count', dest='val_count', type=_positive_int)
    p.add_argument('--device', default='auto')
    p.set_defaults(run=commands.run_train)


def _add_train_girder(sub):
    p = sub.add_parser('train-girder', help='train from nuclei annotated in HistomicsUI on a Girder folder of slides; '
                                            'evaluate on held-out slides; upload the model and its card')
    p.add_argument('-o', '--output', required=True, help='local folder: downloaded slides, NAME.pt and NAME.md')
    _add_server_options(p, required=True)
    p.add_argument('--folder', dest='girder_folder', required=True, help='id of the Girder folder of slides')
    p.add_argument('--annotation-name', dest='annotation_name',
                   help='name of the annotations that hold the nuclei (rectangles or points); may be left out with '
                        '--class-from annotation')
    t = AnnotationTrainingSettings
    p.add_argument('--cell-types', dest='cell_types', nargs='+', metavar='NAME[=LABEL+LABEL]',
                   help="learn a cell-type classifier for these types; LABELs: the nuclei's classes meaning NAME "
                        '(default: no classifier, or the starting model\'s own types)')
    p.add_argument('--class-from', dest='class_from', choices=CLASS_SOURCES, default=t.class_from,
                   help=f"a nucleus' class: its label (else its style group), its group, or the name of its "
                        f'annotation (then the types name the annotations to read); default {t.class_from}')
    p.add_argument('--region-label', dest='region_label', default=t.region_label,
                   help='label of the rectangles/polygons that outline the annotated region (default: '
                        f'{t.region_label}; without one, the bounding box of the nuclei)')
    p.add_argument('--point-size', dest='point_size_um', type=float, default=t.point_size_um,
                   help=f'box side in micrometres for point annotations (default {t.point_size_um:g})')
    p.add_argument('--holdout', type=float, default=t.holdout,
                   help=f'held-out slides: a count or a fraction (default {t.holdout:g}: the last)')
    p.add_argument('--max-region-megapixels', dest='max_region_megapixels', type=float,
                   default=t.max_region_megapixels,
                   help='the most analysis pixels (millions) one annotated region keeps in memory; past it only the '
                        'tiles holding its nuclei are read, and a region whose nuclei need more is refused (default '
                        f'{t.max_region_megapixels:g})')
    p.add_argument('--steps', type=_positive_int, default=t.steps)
    p.add_argument('--batch-size', dest='batch_size', type=_positive_int, default=t.batch_size)
    p.add_argument('--lr', type=float, default=t.lr)
    p.add_argument('--seed', type=_seed, default=t.seed)
    p.add_argument('--init', default=t.init, help='checkpoint to fine-tune (default: the bundled model)')
    p.add_argument('--from-scratch', dest='from_scratch', action='store_true',
                   help="train from random weights (with --init's configuration) instead of fine-tuning")
    p.add_argument('--output-folder', dest='output_folder',
                   help='id of a Girder folder to upload the model and its card to')
    p.add_argument('--name', help='model file name without .pt (default: cellrcnn-ANNOTATION_NAME, else '
                                  'cellrcnn-TYPE-TYPE...)')
    p.add_argument('--device', default=t.device)
    p.set_defaults(run=commands.run_train_girder)


def _add_average(sub):
    p = sub.add_parser('average', help='average the weights of models fine-tuned from one another (a model soup); '
                                       'calibrate its operating point on training data and report held-out figures')
    p.add_argument('models', nargs='+', metavar='MODEL', help='checkpoints of one architecture and cell types')
    p.add_argument('-o', '--output', required=True, help='checkpoint to write')
    p.add_argument('--weights', nargs='+', type=float, metavar='W',
                   help='one positive weight per model (default: equal)')
    p.add_argument('--data', action='append', metavar='ENTRY',
                   help='the labelled images the models were trained on, as --data entries of train: the operating '
                        "point is the score threshold of best centroid F1 on them, and their other splits are "
                        "reported (default: the first model's threshold, nothing reported)")
    p.add_argument('--objectness-floor', dest='objectness_floor', type=float, metavar='P',
                   help="at inference the RPN drops proposals whose objectness is below P before its NMS; stored in "
                        "the model written, and used to calibrate it (default: the first model's)")
    p.add_argument('--stain-reference', dest='stain_reference', metavar='ENTRY',
                   help="normalise every image's stain toward that of a typical image of this --data entry "
                        "(docs/real-tissue.md, 'Stain normalisation'), or 'none'; stored in the model written, and "
                        "used to calibrate it (default: the first model's)")
    p.add_argument('--stain-strength', dest='stain_strength', type=float, metavar='S',
                   help="how far the stain is moved toward the reference, from 0 (not at all) to 1 (all the way); "
                        "default: the first model's (0.75 for a model that had none)")
    p.add_argument('--device', default='auto')
    p.set_defaults(run=commands.run_average)


def _add_evaluate(sub):
    p = sub.add_parser('evaluate', help='precision, recall, F1 and COCO AP of a model on a labelled set')
    p.add_argument('--model', help='checkpoint (default: the bundled model)')
    p.add_argument('--data', action='append', metavar='ENTRY',
                   help='a folder of images with DSA annotation JSON (box figures), or labelled images as --data '
                        'entries of train (centroid figures within 3 um, per cell type, and box figures where the '
                        'truth has boxes); repeat for more (default: held-out synthetic tiles)')
    p.add_argument('--annotation-name', dest='annotation_name')
    p.add_argument('--point-box-size', dest='point_box_size', type=float)
    # --seed, --count and --tile-size left out: samples.labelled_set's own
    p.add_argument('--seed', type=_seed, help='synthetic set seed (training uses 1000+)')
    p.add_argument('--count', type=_positive_int)
    p.add_argument('--tile-size', type=_positive_int)
    p.add_argument('--threshold', type=float, help="score threshold (default: the model's calibrated one)")
    _add_views(p)
    p.add_argument('--json', help='also write the metrics to this JSON file')
    p.add_argument('--device', default='auto')
    p.set_defaults(run=commands.run_evaluate)


def _add_synth(sub):
    p = sub.add_parser('synth', help='write synthetic H&E tiles with DSA annotations, or a synthetic slide')
    p.add_argument('output', help='folder for tiles, or .tiff path with --slide')
    p.add_argument('--slide', action='store_true', help='write one pyramidal TIFF slide (+ .boxes.npy)')
    p.add_argument('--width', type=_positive_int, default=4096)
    p.add_argument('--height', type=_positive_int, default=4096)
    p.add_argument('--count', type=_positive_int, default=100)
    p.add_argument('--tile-size', type=_positive_int, default=256)
    p.add_argument('--seed', type=_seed, default=0)
    p.add_argument('--mpp', type=float, default=0.5)
    p.set_defaults(run=commands.run_synth)


def _add_dsa(sub):
    p = sub.add_parser('dsa', help='a whole Digital Slide Archive on this machine (Girder, HistomicsUI, '
                                   'girder_worker, a Docker engine): make its images, or start it')
    p.add_argument('action', choices=('build', 'up'),
                   help='build: make the task image (and what the stack runs) from this checkout; up: start the '
                        'stack with the task registered and the slide uploaded, until Ctrl-C')
    p.add_argument('--slide', help='with up: the slide to upload (default: the bundled sample)')
    p.add_argument('--run-task', dest='run_task', action='store_true',
                   help='with up: run CellDetection on the slide through girder_worker, print the result and stop')
    p.set_defaults(run=commands.run_dsa)
