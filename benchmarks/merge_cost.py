"""Cost of the exact streaming cross-tile NMS (cellrcnn.merge.StreamingNMS) against one global torchvision NMS.

    OMP_NUM_THREADS=1 python benchmarks/merge_cost.py [--sizes 100000 1000000] [--no-reference] [--seed 0]

For each size n, simulates the raw detections of a tiled whole-slide run (512 px tiles, 64 px overlap, row-major
order; nuclei 8-32 px, each visible one detected 1-3 times per tile with jittered boxes and scores), then prints
the seconds StreamingNMS takes (add per tile, complete_up_to per tile row, finish), its throughput, the peak
number of buffered boxes (and the largest tile row, for scale), the seconds one torchvision.ops.nms over all the
detections takes on the CPU (about n x kept / 2 IoU tests: ~50 s at 120k on one core, so expect well over an hour
at 1M; --no-reference skips it), and whether both keep the same boxes.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from torchvision.ops import nms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'detector'))  # uninstalled checkout
from cellrcnn.merge import StreamingNMS  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from support import simulate_slide  # noqa: E402  (one copy, shared with tests/test_merge.py)

TILE, OVERLAP, SIZE, IOU, MAX_BOX = 512, 64, (8.0, 32.0), 0.5, 48.0


def simulate(n_target, rng):
    """Tile rows [(top of row, [(boxes, scores) per tile])] of about n_target raw detections."""
    n_objects = int(n_target / 2.65)  # about 2.65 raw detections per nucleus
    side = int(np.sqrt(n_objects * 1600.0))  # one nucleus per 40 x 40 px on average
    return simulate_slide(rng, side, side, n_objects, tile=TILE, overlap=OVERLAP, size=SIZE)


def run_streaming(rows):
    merger = StreamingNMS(IOU, MAX_BOX)
    kept, peak, n = [], 0, 0
    start = time.perf_counter()
    for r, (_, tiles) in enumerate(rows):
        for boxes, scores in tiles:
            merger.add(boxes, scores, np.arange(n, n + len(boxes)))
            n += len(boxes)
            peak = max(peak, merger.buffered)
        kept.append(merger.complete_up_to(rows[r + 1][0]) if r + 1 < len(rows) else merger.finish())
    seconds = time.perf_counter() - start
    return np.concatenate([k[2] for k in kept]), seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[100_000, 1_000_000])
    parser.add_argument('--no-reference', action='store_true', help='skip the global torchvision NMS')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for size in args.sizes:
        rows = simulate(size, np.random.default_rng(args.seed))
        n = sum(len(b) for _, tiles in rows for b, _ in tiles)
        largest_row = max(sum(len(b) for b, _ in tiles) for _, tiles in rows)
        kept, seconds, peak = run_streaming(rows)
        print(f'n={n} raw detections, {len(rows)} x {len(rows[0][1])} tiles of {TILE} px (overlap {OVERLAP}), '
              f'IoU {IOU}')
        print(f'  StreamingNMS:   {seconds:8.3f} s  ({n / seconds:,.0f} boxes/s), kept {len(kept)}, '
              f'peak buffered {peak} boxes (largest tile row: {largest_row})')
        if args.no_reference:
            continue
        boxes = torch.from_numpy(np.concatenate([b for _, tiles in rows for b, _ in tiles]))
        scores = torch.from_numpy(np.concatenate([s for _, tiles in rows for _, s in tiles]))
        start = time.perf_counter()
        expected = nms(boxes, scores, IOU).numpy()
        seconds_ref = time.perf_counter() - start
        equal = len(kept) == len(expected) and set(kept.tolist()) == set(expected.tolist())
        print(f'  torchvision.ops.nms over everything (CPU): {seconds_ref:8.3f} s, kept {len(expected)}')
        print(f'  same kept set: {equal}')


if __name__ == '__main__':
    main()
