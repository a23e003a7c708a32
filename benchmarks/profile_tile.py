"""Where a tile's CPU time goes in the detector: one table, stage by stage.

    python benchmarks/profile_tile.py [--model M.pt] [--tile 1024] [--tiles 8] [--batch 4] [--threads 2] [--slide S]

Runs the model (the bundled one by default) on synthetic 20x H&E tiles (mixed crowding, seed 5000), or with
``--slide`` on the first tissue tiles of that slide at the model's magnification (real tissue sends far more
proposals to the box head than the synthetic tiles), after a warm-up batch, and times each stage with forward hooks:
input normalisation, the ResNet body, the FPN, the RPN head (on the upsampled feature maps), proposal selection
(anchors, box decoding, objectness floor, top-n, NMS), RoIAlign, the box head, the box predictor, and the box head's
post-processing (decoding, score floor, per-class NMS). Prints seconds per tile, share of the model's time, and
detections per tile. Whole-slide stages (reading, tissue, merge, writing) are in ``cellrcnn detect``'s own summary
and ``benchmarks/slide_benchmark.py``.
"""

import argparse
import collections
import time

import numpy as np
import torch

from cellrcnn.checkpoint import load_model
from cellrcnn.inference import Detector
from cellrcnn.synthetic import make_tile


def slide_tiles(path, size, count, mpp):
    """The first ``count`` tissue tiles of the slide at ``path`` (``size`` px, at the model's ``mpp``)."""
    from cellrcnn.settings import DetectionSettings
    from cellrcnn.slide import Slide
    from cellrcnn.tiling import prefetch, tile_grid
    from cellrcnn.tissue import find_tissue

    slide = Slide(path, magnification=10 / mpp)
    grid = tile_grid(slide, size, DetectionSettings.overlap, DetectionSettings.min_tissue, tissue=find_tissue(slide))
    return [image for _, image in prefetch(slide, [t for t in grid if not t.skipped][:count],
                                           workers=DetectionSettings.workers)]


class StageClock:
    """Wall time spent inside chosen modules, by forward pre/post hooks (the model runs single-stream on the CPU)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self._started = {}

    def watch(self, name, module):
        module.register_forward_pre_hook(lambda *_: self._started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *_: self._stop(name))

    def _stop(self, name):
        self.seconds[name] += time.perf_counter() - self._started.pop(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--tile', type=int, default=1024)
    parser.add_argument('--tiles', type=int, default=8)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--slide', help='profile tiles of this slide instead of synthetic ones')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    detector = Detector(model, device='cpu', batch_size=args.batch)
    if args.slide:
        tiles = slide_tiles(args.slide, args.tile, args.tiles, model.config.mpp)
    else:
        rng = np.random.default_rng(5000)
        tiles = [make_tile(rng, size=args.tile)[0] for _ in range(args.tiles)]
    detector.detect_tiles(tiles[:args.batch])  # warm-up
    model = detector.folded.current()  # what runs: the model with its BatchNorm folded into the convolutions

    clock = StageClock()
    parts = {'model': model, 'normalise': model.transform, 'resnet body': model.backbone.body,
             'fpn': model.backbone.fpn, 'rpn': model.rpn, 'rpn head': model.rpn.head,
             'roi heads': model.roi_heads, 'roialign': model.roi_heads.box_roi_pool,
             'box head': model.roi_heads.box_head, 'box predictor': model.roi_heads.box_predictor}
    for name, module in parts.items():
        clock.watch(name, module)
    started = time.perf_counter()
    found = detector.detect_tiles(tiles)
    total = time.perf_counter() - started
    s = clock.seconds
    stages = [
        ('normalise and batch', s['normalise']),
        ('ResNet body', s['resnet body']),
        ('FPN', s['fpn']),
        ('RPN head (upsampled maps)', s['rpn head']),
        ('proposal selection (decode, floor, top-n, NMS)', s['rpn'] - s['rpn head']),
        ('RoIAlign', s['roialign']),
        ('box head (two MLP layers)', s['box head']),
        ('box predictor', s['box predictor']),
        ('box post-processing (decode, NMS)', s['roi heads'] - s['roialign'] - s['box head'] - s['box predictor']),
    ]
    other = s['model'] - sum(seconds for _, seconds in stages)
    stages.append(('rest of the model (backbone glue, transform back)', other))
    stages.append(('outside the model (to tensor, threshold, copies)', total - s['model']))
    n = len(tiles)
    print(f'{n} tiles of {args.tile} px, batch {args.batch}, {args.threads} threads, '
          f'{np.mean([len(b) for b, _ in found]):.0f} detections per tile; {total / n:.3f} s per tile '
          f'({n * args.tile ** 2 / 1e6 / total:.2f} Mpx/s)')
    print('| stage | s per tile | share |')
    print('| --- | --- | --- |')
    for name, seconds in stages:
        print(f'| {name} | {seconds / n:.3f} | {100 * seconds / total:.1f} % |')


if __name__ == '__main__':
    main()
