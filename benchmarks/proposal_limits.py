"""Speed against accuracy of the inference-time proposal limits (``rpn_pre_nms_per_mpx_test``,
``rpn_post_nms_per_mpx_test``, ``rpn_nms_thresh_test``) of a trained model.

    OMP_NUM_THREADS=2 python benchmarks/proposal_limits.py [--model M.pt] [--limits 12000,6000,0.7 8000,2500,0.6 ...]

For each ``PRE,POST,IOU`` (per megapixel of input: the best PRE anchors of each RPN level, NMS at IoU, the best POST
kept), prints the median seconds of four 1024 px synthetic tiles in one batch on the CPU (three timed runs after a
warm-up, the settings interleaved) and, at the model's own score threshold, precision, recall, F1 and COCO AP on the
model card's held-out sets: mixed tissue (seed 3000, 200 tiles of 256 px) and crowded tissue (seed 4000, 100 tiles).
With ``--slide PATH`` (e.g. the bundled real sample, which has no ground truth) it also runs each setting over that
slide and prints how many detections it keeps, and how many of the first setting's detections have no match (IoU
0.5) in it, with their median score.
The threshold is not recalibrated per setting, so a setting far from the model's own is shown at a slight
disadvantage.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from anchor_ablation import crowded_set  # noqa: E402

from cellrcnn.checkpoint import load_model  # noqa: E402
from cellrcnn.data import labelled_set  # noqa: E402
from cellrcnn.evaluate import evaluate_model  # noqa: E402
from cellrcnn.inference import Detector  # noqa: E402
from cellrcnn.synthetic import make_tile  # noqa: E402

DEFAULT_LIMITS = ['12000,6000,0.7', '8000,3000,0.7', '6000,3000,0.7', '8000,2500,0.6', '8000,2000,0.5',
                  '4000,2000,0.5']


def configured(path, pre, post, iou):
    model = load_model(path)
    model.config.rpn_pre_nms_per_mpx_test, model.config.rpn_post_nms_per_mpx_test = pre, post
    model.config.rpn_nms_thresh_test = iou
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--limits', nargs='+', default=DEFAULT_LIMITS, help='PRE,POST,IOU settings to compare')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--slide', help='also compare the settings\' detections on this slide')
    args = parser.parse_args()
    settings = []
    for text in args.limits:
        pre, post, iou = text.split(',')
        settings.append((int(pre), int(post), float(iou)))
    rng = np.random.default_rng(5)
    tiles = [make_tile(rng, size=1024)[0] for _ in range(4)]
    detectors = {s: Detector(configured(args.model, *s), device='cpu', batch_size=4) for s in settings}
    seconds = {s: [] for s in settings}
    for detector in detectors.values():
        detector.detect_tiles(tiles)  # warm-up
    for _ in range(args.repeats):
        for s, detector in detectors.items():
            started = time.perf_counter()
            detector.detect_tiles(tiles)
            seconds[s].append(time.perf_counter() - started)
    sets = {'mixed': labelled_set(seed=3000, count=200), 'crowded': crowded_set(4000, 100)}
    print(f'{torch.get_num_threads()} threads; seconds: median of {args.repeats} batches of 4 x 1024 px')
    print('| pre / post per Mpx, RPN NMS IoU | seconds | Mpx/s | mixed P / R / F1 / AP | crowded P / R / F1 / AP |')
    print('| --- | --- | --- | --- | --- |')
    for s, detector in detectors.items():
        sec = statistics.median(seconds[s])
        cells = []
        for samples in sets.values():
            m = evaluate_model(detector.model, samples, device='cpu')
            cells.append(f'{m["precision"]:.3f} / {m["recall"]:.3f} / {m["f1"]:.3f} / {m["AP"]:.3f}')
        print(f'| {s[0]} / {s[1]}, {s[2]} | {sec:.2f} | {4 * 1024 ** 2 / 1e6 / sec:.2f} | {cells[0]} | {cells[1]} |',
              flush=True)
    if args.slide:
        compare_on_slide(args.slide, detectors)


def compare_on_slide(path, detectors):
    from torchvision.ops import box_iou

    from cellrcnn.engine import detect_slide
    from cellrcnn.slide import Slide

    results = {s: detect_slide(Slide(path), d, progress='none') for s, d in detectors.items()}
    first = next(iter(results))
    reference = results[first]
    print(f'\n{os.path.basename(path)}: detections, and those of {first} without a match at IoU 0.5')
    for s, result in results.items():
        if len(reference.boxes) and len(result.boxes):
            unmatched = box_iou(torch.as_tensor(reference.boxes), torch.as_tensor(result.boxes)).max(1).values < 0.5
            unmatched = unmatched.numpy()
        else:
            unmatched = np.ones(len(reference.boxes), bool)
        median = f'{np.median(reference.scores[unmatched]):.2f}' if unmatched.any() else '-'
        print(f'{s}: {len(result.boxes)} detections; {int(unmatched.sum())} unmatched (median score {median})')


if __name__ == '__main__':
    main()
