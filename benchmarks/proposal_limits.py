r"""Speed against accuracy of the inference-time proposal limits (``rpn_pre_nms_per_mpx_test``,
``rpn_post_nms_per_mpx_test``, ``rpn_nms_thresh_test``, ``rpn_score_thresh``) of a trained model.

    OMP_NUM_THREADS=2 python benchmarks/proposal_limits.py [--model M.pt] \
        [--limits 8000,2500,0.6 24000,12000,0.6,0.2 ...]

For each ``PRE,POST,IOU[,SCORE]`` (per megapixel of input: the best PRE anchors of each RPN level, those with an
objectness probability of at least SCORE, NMS at IoU, the best POST kept), prints the median seconds of four 1024 px
synthetic tiles in one batch on the CPU (three timed runs after a warm-up, the settings interleaved), the proposals
per megapixel that reached the box head on them, and, at the model's own score threshold, precision, recall, F1 and
COCO AP on the model card's held-out sets: mixed tissue (seed 3000, 200 tiles of 256 px), crowded tissue (seed 4000,
100 tiles) and dense sheets of small nuclei (the 15 densest of 40 crowded tiles drawn at 0.75x, seed 4001: about 3500
nuclei per megapixel, as packed lymphocytes are; the proposal budget, not the model, caps recall there).
With ``--slide PATH`` (e.g. the bundled real sample, which has no ground truth) it also runs each setting over that
slide and prints how many detections it keeps, and how many of the first setting's detections have no match (IoU
0.5) in it, with their median score.
The threshold is not recalibrated per setting, so a setting far from the model's own is shown at a slight
disadvantage.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from anchor_ablation import crowded_set  # noqa: E402

from cellrcnn.checkpoint import BUNDLED_MODEL, load_checkpoint, model_from_checkpoint, stored_config  # noqa: E402
from cellrcnn.evaluate import evaluate_model  # noqa: E402
from cellrcnn.inference import Detector  # noqa: E402
from cellrcnn.samples import labelled_set  # noqa: E402
from cellrcnn.synthetic import make_tile  # noqa: E402

DEFAULT_LIMITS = ['8000,2500,0.6,0', '12000,6000,0.6,0.2', '24000,12000,0.6,0', '24000,12000,0.6,0.2',
                  '24000,12000,0.6,0.4', '24000,12000,0.5,0.2']


def configured(path, pre, post, iou, score):
    """The model at ``path`` built with these proposal limits (its weights do not depend on them)."""
    payload = load_checkpoint(path)
    stored = stored_config(payload)
    config = dataclasses.replace(stored, rpn_pre_nms_per_mpx_test=pre, rpn_post_nms_per_mpx_test=post,
                                 detections_per_mpx=max(stored.detections_per_mpx, post), rpn_nms_thresh_test=iou,
                                 rpn_score_thresh=score)
    return model_from_checkpoint(payload, source=path, config=config).eval()


def dense_set(seed=4001, count=40, keep=15):
    """The ``keep`` densest of ``count`` crowded tiles whose nuclei are drawn at 0.75x: packed small nuclei."""
    rng = np.random.default_rng(seed)
    tiles = [make_tile(rng, size=256, mpp=0.5 / 0.75, crowding=1.0) for _ in range(count)]
    return sorted(tiles, key=lambda t: -len(t[1]))[:keep]


def proposals_per_mpx(model, tiles):
    """Proposals per megapixel that reach the box head on ``tiles`` (one batch)."""
    counts = []
    hook = model.rpn.register_forward_hook(lambda m, i, out: counts.append(sum(len(b) for b in out[0])))
    try:
        Detector(model, device='cpu', batch_size=len(tiles)).detect_tiles(tiles)
    finally:
        hook.remove()
    return counts[0] / (sum(t.shape[0] * t.shape[1] for t in tiles) / 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--limits', nargs='+', default=DEFAULT_LIMITS, help='PRE,POST,IOU settings to compare')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--slide', help='also compare the settings\' detections on this slide')
    args = parser.parse_args()
    settings = []
    for text in args.limits:
        pre, post, iou, score = (text + ',0').split(',')[:4]
        settings.append((int(pre), int(post), float(iou), float(score)))
    rng = np.random.default_rng(5)
    tiles = [make_tile(rng, size=1024)[0] for _ in range(4)]
    detectors = {s: Detector(configured(args.model or BUNDLED_MODEL, *s), device='cpu', batch_size=4) for s in settings}
    seconds = {s: [] for s in settings}
    for detector in detectors.values():
        detector.detect_tiles(tiles)  # warm-up
    for _ in range(args.repeats):
        for s, detector in detectors.items():
            started = time.perf_counter()
            detector.detect_tiles(tiles)
            seconds[s].append(time.perf_counter() - started)
    sets = {'mixed': labelled_set(seed=3000, count=200), 'crowded': crowded_set(4000, 100), 'dense': dense_set()}
    print(f'{torch.get_num_threads()} threads; seconds: median of {args.repeats} batches of 4 x 1024 px')
    print('| pre / post per Mpx, RPN NMS IoU, objectness >= | seconds | Mpx/s | proposals / Mpx | '
          'mixed P / R / F1 / AP | crowded P / R / F1 / AP | dense P / R / F1 / AP |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for s, detector in detectors.items():
        sec = statistics.median(seconds[s])
        cells = []
        for samples in sets.values():
            m = evaluate_model(detector.model, samples, device='cpu')
            cells.append(f'{m["precision"]:.3f} / {m["recall"]:.3f} / {m["f1"]:.3f} / {m["AP"]:.3f}')
        print(f'| {s[0]} / {s[1]}, {s[2]}, {s[3]} | {sec:.2f} | {4 * 1024 ** 2 / 1e6 / sec:.2f} | '
              f'{proposals_per_mpx(detector.model, tiles):.0f} | {" | ".join(cells)} |', flush=True)
    if args.slide:
        compare_on_slide(args.slide, detectors)


def compare_on_slide(path, detectors):
    from torchvision.ops import box_iou

    from cellrcnn.settings import DetectionSettings
    from cellrcnn.slide import Slide
    from cellrcnn.slide_detection import detect_slide

    run = {name: getattr(DetectionSettings, name) for name in ('tile_size', 'overlap', 'min_tissue', 'workers')}
    results = {s: detect_slide(Slide(path), d, **run) for s, d in detectors.items()}
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
