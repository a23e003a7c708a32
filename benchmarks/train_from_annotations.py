"""Training from HistomicsUI annotations: held-out precision, recall and F1 after training on 200 annotated nuclei
on 2 slides (the goal: F1 >= 0.8 on a held-out slide of the same kind).

    ./install.sh --with-girder    # or set CELLRCNN_GIRDER_PYTHON to the python of such a virtualenv
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_from_annotations.py [--steps 60] [--cells 100]
        [--from-scratch] [--init M.pt] [--size 768]

Starts a throwaway DSA server (cellrcnn.devstack.local_girder), writes three synthetic slides (cellrcnn.synthetic, exact
boxes), uploads them and posts annotations the way an annotator would draw them in HistomicsUI
(``annotated_cohort`` in tests/support.py): on slide a, ``--cells`` nuclei as rectangles inside a rectangle
labelled ``region``; on slide b, ``--cells`` nuclei as points (no region: the bounding box of the points is the
region); on slide c, the held-out slide, every nucleus as a rectangle; plus a decoy annotation of another name on
slide a. Then it runs
:func:`cellrcnn.girder_training.train_from_girder` (the flow of ``cellrcnn train-girder`` and the TrainCellDetector
task) and prints its summary: the starting model's and the trained model's figures on the held-out slide.
The tests use ``annotated_cohort`` too (tests/test_girder_training.py).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support import annotated_cohort  # noqa: E402  (one copy, shared with tests/test_girder_training.py)


def main():
    from cellrcnn.devstack.local_girder import GirderServer, girder_python
    from cellrcnn.girder_training import train_from_girder, training_summary_lines
    from cellrcnn.settings import AnnotationTrainingSettings

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--cells', type=int, default=100, help='annotated nuclei on each training slide')
    parser.add_argument('--size', type=int, default=768, help='slide side in pixels (0.5 um/px)')
    parser.add_argument('--from-scratch', action='store_true')
    parser.add_argument('--init', help='checkpoint to fine-tune (default: the bundled model)')
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--batch-size', type=int, default=4)
    args = parser.parse_args()
    python, why = girder_python()
    if python is None:
        sys.exit(f'no Girder server environment: {why}')
    with tempfile.TemporaryDirectory(prefix='cellrcnn-train-girder-') as root, GirderServer(python) as server:
        cohort = annotated_cohort(server, root, cells=args.cells, size=args.size)
        print('annotated: ' + ', '.join(f'{k} {len(v["boxes"])} nuclei' for k, v in cohort.items()), flush=True)
        started = time.perf_counter()
        result = train_from_girder(server.api_url, server.token, server.folder_id, 'nuclei',
                                   os.path.join(root, 'out'),
                                   AnnotationTrainingSettings(steps=args.steps, init=args.init,
                                                              from_scratch=args.from_scratch, lr=args.lr,
                                                              batch_size=args.batch_size, device='cpu'))
        print('\n'.join(training_summary_lines(result)))
        print(f'{args.steps} steps{" from scratch" if args.from_scratch else ""}: '
              f'{time.perf_counter() - started:.0f} s in all, training {result.seconds["train"]:.0f} s')


if __name__ == '__main__':
    main()
