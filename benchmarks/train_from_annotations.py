"""Training from HistomicsUI annotations: held-out precision, recall and F1 after training on 200 annotated nuclei
on 2 slides (the goal: F1 >= 0.8 on a held-out slide of the same kind).

    ./install.sh --with-girder    # or set CELLRCNN_GIRDER_PYTHON to the python of such a virtualenv
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_from_annotations.py [--steps 60] [--cells 100]
        [--from-scratch] [--init M.pt] [--size 768]

Starts a throwaway DSA server (cellrcnn.local_girder), writes three synthetic slides (cellrcnn.synthetic, exact
boxes), uploads them and posts annotations the way an annotator would draw them in HistomicsUI
(:func:`annotated_cohort`): on slide a, ``--cells`` nuclei as rectangles inside a rectangle labelled ``region``;
on slide b, ``--cells`` nuclei as points (no region: the bounding box of the points is the region); on slide c, the
held-out slide, every nucleus as a rectangle; plus a decoy annotation of another name on slide a. Then it runs
:func:`cellrcnn.girder_training.train_from_girder` (the flow of ``cellrcnn train-girder`` and the TrainCellDetector
task) and prints its summary: the starting model's and the trained model's figures on the held-out slide.
The tests use :func:`annotated_cohort` too (tests/test_girder_training.py).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from cellrcnn.annotation import detections_to_annotation
from cellrcnn.synthetic import write_slide

#: (file name, synthetic seed, how the nuclei are annotated); the last is the held-out slide (last in path order)
SLIDES = (('a_rectangles.tiff', 1, 'rectangle'), ('b_points.tiff', 4, 'point'), ('c_heldout.tiff', 6, 'all'))


def region_with(boxes, cells, y0=128, y1=640, x0=64):
    """A base-pixel rectangle (x, y, w, h) holding the centres of exactly ``cells`` nuclei, and which ones."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    band = np.sort(centres[(centres[:, 1] >= y0) & (centres[:, 1] < y1) & (centres[:, 0] >= x0), 0])
    if len(band) <= cells:
        raise ValueError(f'only {len(band)} nuclei in the band; use a larger slide')
    x1 = float(band[cells - 1] + band[cells]) / 2
    inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
    return (x0, y0, x1 - x0, y1 - y0), inside


def annotated_cohort(server, root, cells=100, size=768, name='nuclei'):
    """Three annotated synthetic slides in ``server.folder_id`` (see the module docstring).

    :returns: ``{file name: {'item_id', 'boxes' (the annotated ones), 'all_boxes'}}``."""
    gc = server.client()
    cohort = {}
    for filename, seed, kind in SLIDES:
        path = os.path.join(root, filename)
        boxes = write_slide(path, size, size, seed=seed)
        item_id, _ = server.upload_slide(path)
        if kind == 'all':
            chosen, region = np.ones(len(boxes), bool), None
        else:
            region, chosen = region_with(boxes, cells)
        doc = detections_to_annotation(boxes[chosen], np.ones(int(chosen.sum())), name=name,
                                       element_type='point' if kind == 'point' else 'rectangle')
        for element in doc['elements']:
            element.pop('user', None)  # drawn by hand: no scores
        if kind == 'rectangle':
            x, y, w, h = region
            doc['elements'].append({'type': 'rectangle', 'center': [x + w / 2, y + h / 2, 0], 'width': w,
                                    'height': h, 'rotation': 0, 'label': {'value': 'region'},
                                    'lineColor': 'rgb(0,0,255)'})
            decoy = {'name': 'tumour outline', 'elements': [
                {'type': 'polyline', 'closed': True, 'points': [[0, 0, 0], [size, 0, 0], [size, size / 2, 0]]},
                {'type': 'rectangle', 'center': [600, 300, 0], 'width': 40, 'height': 40, 'rotation': 0}]}
            gc.post('annotation', parameters={'itemId': item_id}, json=decoy)
        gc.post('annotation', parameters={'itemId': item_id}, json=doc)
        cohort[filename] = {'item_id': item_id, 'boxes': boxes[chosen], 'all_boxes': boxes}
    return cohort


def main():
    from cellrcnn.girder_training import summary_lines, train_from_girder
    from cellrcnn.local_girder import GirderServer, girder_python

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
                                   os.path.join(root, 'out'), steps=args.steps, init=args.init,
                                   from_scratch=args.from_scratch, lr=args.lr, batch_size=args.batch_size,
                                   device='cpu', log=None)
        print('\n'.join(summary_lines(result)))
        print(f'{args.steps} steps{" from scratch" if args.from_scratch else ""}: '
              f'{time.perf_counter() - started:.0f} s in all, training {result.seconds["train"]:.0f} s')


if __name__ == '__main__':
    main()
