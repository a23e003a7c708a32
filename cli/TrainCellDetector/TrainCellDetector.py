"""Training the cell detector from HistomicsUI annotations as a slicer_cli_web task (cellrcnn.girder_training).

slicer_cli_web passes the folder's id (``reference="_girder_id_"``: the slides are not copied into the job), fills in
girderApiUrl and girderToken, and uploads the model file and its card to the output folder chosen in HistomicsUI.
"""

import os
import shutil
import sys
import tempfile

from slicer_cli_web import CLIArgumentParser

from cellrcnn.errors import CellRCNNError, run_reporting_errors
from cellrcnn.girder_training import train_from_girder, training_summary_lines
from cellrcnn.progress import Progress
from cellrcnn.settings import AnnotationTrainingSettings


def settings_from(args):
    """slicer_cli_web's arguments (an empty init_model: the bundled model; cell_types: comma-separated) as
    AnnotationTrainingSettings."""
    return AnnotationTrainingSettings(
        region_label=args.region_label, point_size_um=args.point_size, holdout=args.holdout, steps=args.steps,
        batch_size=args.batch_size, lr=args.learning_rate, init=args.init_model or None,
        from_scratch=args.from_scratch, device=args.device,
        cell_types=tuple(t.strip() for t in (args.cell_types or '').split(',') if t.strip()),
        class_from=args.class_from)


def main(args):
    if not args.girderApiUrl or not args.girderToken:
        raise CellRCNNError('the Girder API URL and a token are needed to read the annotations (--api-url, '
                            '--girder-token; the Digital Slide Archive fills them in)')
    work = tempfile.mkdtemp(prefix='.train-', dir=os.path.dirname(os.path.abspath(args.outputModelFile)))
    try:
        result = train_from_girder(
            args.girderApiUrl, args.girderToken, args.slide_folder, args.annotation_name, work,
            settings_from(args), progress=Progress(mode='slicer', name='TrainCellDetector', unit='%'))
        shutil.copyfile(result.model_path, args.outputModelFile)
        if getattr(args, 'outputModelCard', None):
            shutil.copyfile(result.card_path, args.outputModelCard)
        print('\n'.join(training_summary_lines(result)[:-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(run_reporting_errors('TrainCellDetector', lambda: main(CLIArgumentParser().parse_args())))
