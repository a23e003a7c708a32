"""Small pieces of tissue alone on the glass: what reading a tile with little tissue only where its tissue lies (the
default) costs and finds, against reading every tile whole (``--min-tissue 0``).

    python benchmarks/tissue_pieces.py --slide whole40x.tiff --roi 20000,20000,16000,16000 [--rounds 3]

Takes a synthetic slide with its true boxes beside it (``SLIDE.boxes.npy``, as ``cellrcnn.synthetic.write_slide``
writes them; its tissue is pieces of every size scattered over glass) and prints:

- over the whole slide, the tiles read and their area (in full tiles), and the true nuclei whose centre lies in no
  tile read, for the default and for every tile that holds tissue read whole;
- in the region, ``cellrcnn detect`` (a subprocess timed whole) with the default and with ``--min-tissue 0``,
  alternately for ``--rounds`` rounds: medians of wall and CPU seconds and the detect stage, and box precision,
  recall and F1 at IoU 0.5 against the true boxes whose centre lies in the region.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
from slide_runs import run_measured
from slide_scoring import centres_inside, read_csv_boxes, score_detections

from cellrcnn.boxes import box_centres
from cellrcnn.settings import DetectionSettings
from cellrcnn.slide import Slide
from cellrcnn.tiling import tile_grid
from cellrcnn.tissue import find_tissue


def coverage(slide, tissue, truth, cut):
    """(tiles read, their area in full tiles, true nuclei in no tile read)."""
    d = DetectionSettings()
    tiles = [t for t in tile_grid(slide, d.tile_size, d.overlap, d.min_tissue if cut else 0, tissue=tissue)
             if cut or t.tissue > 0]
    read = [t for t in tiles if not t.skipped]
    cx, cy = box_centres(truth).T
    seen = np.zeros(len(truth), bool)
    for t in read:
        seen |= (cx >= t.base_x) & (cx < t.base_x + t.base_width) & (cy >= t.base_y) & (cy < t.base_y + t.base_height)
    return len(read), sum(t.width * t.height for t in read) / d.tile_size ** 2, int((~seen).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--slide', required=True, help='a synthetic slide with SLIDE.boxes.npy beside it')
    parser.add_argument('--roi', required=True, help='X,Y,W,H in base pixels: the region detected')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    truth = np.load(args.slide + '.boxes.npy')

    slide = Slide(args.slide, magnification=20)
    tissue = find_tissue(slide)
    print(f'{os.path.basename(args.slide)}: {len(truth)} true nuclei')
    for cut, what in ((True, 'default (little tissue: read where it lies)'), (False, 'tiles with tissue read whole')):
        n, area, missed = coverage(slide, tissue, truth, cut)
        print(f'  {what}: {n} tiles read, {area:.1f} full tiles of area; true nuclei in no tile read: {missed} '
              f'({missed / len(truth):.2%})', flush=True)

    truth_in = centres_inside(truth, tuple(int(v) for v in args.roi.split(',')))
    runs = {'default': [], '--min-tissue 0': []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in (('default', []), ('--min-tissue 0', ['--min-tissue', '0'])):
                out = os.path.join(tmp, f'{len(runs[name])}-{name.replace(" ", "")}')
                cmd = [sys.executable, '-m', 'cellrcnn', 'detect', args.slide, '-o', out, '--roi', args.roi,
                       '--no-resume', '--progress', 'none', *extra]
                run = run_measured(cmd, os.path.join(tmp, 'log.txt'))
                if run['returncode']:
                    sys.exit(f'cellrcnn detect failed: see {run["log"]}')
                stem = os.path.splitext(os.path.basename(args.slide))[0]
                boxes, scores = read_csv_boxes(os.path.join(out, stem + '.csv'))
                with open(os.path.join(out, stem + '.summary.json')) as f:
                    summary = json.load(f)
                runs[name].append({'wall_s': run['wall_s'], 'cpu_s': run['cpu_s'],
                                   'detect_s': summary['seconds']['detect'], 'tiles': summary['tiles_read'],
                                   'score': score_detections(boxes, scores, truth_in, False)})
    print(f'region {args.roi}: {len(truth_in)} true nuclei; medians of {args.rounds} rounds, run alternately')
    for name, rounds in runs.items():
        score = rounds[0]['score']
        print(f'  {name}: wall {statistics.median(r["wall_s"] for r in rounds):.1f} s, CPU '
              f'{statistics.median(r["cpu_s"] for r in rounds):.1f} s, detect '
              f'{statistics.median(r["detect_s"] for r in rounds):.1f} s, {rounds[0]["tiles"]} tiles; '
              f'P / R / F1 {score["precision"]:.3f} / {score["recall"]:.3f} / {score["f1"]:.3f} '
              f'({score["n_pred"]} boxes)')


if __name__ == '__main__':
    main()
