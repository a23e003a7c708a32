"""Inference throughput of a cellrcnn model against stock torchvision Faster R-CNN on the same image.

    python benchmarks/cpu_throughput.py [--model M.pt] [--size 2048] [--tile 512] [--batch 4] [--device cpu]

Prints megapixels per second of model inference (tile reading excluded: see docs/performance.md for whole slides)
for: the cellrcnn model on non-overlapping tiles of a synthetic H&E image at 20x, torchvision's
fasterrcnn_resnet50_fpn with its default 800 px resize on the same tiles, and the same stock model without resizing. Stock models are randomly initialised (no weights can be downloaded here): their speed does not
depend on their weights except through the number of boxes the box head sees, which stays at its maximum.
"""

import argparse
import time

import numpy as np
import torch
import torchvision

from cellrcnn.checkpoint import load_model
from cellrcnn.inference import Detector
from cellrcnn.model import to_tensor
from cellrcnn.synthetic import make_tile


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--size', type=int, default=2048)
    parser.add_argument('--tile', type=int, default=512)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()

    image, _ = make_tile(np.random.default_rng(7), size=args.size, crowding=0.6)
    mpx = args.size * args.size / 1e6
    print(f'device {args.device}, torch threads {torch.get_num_threads()}, image {args.size}x{args.size} '
          f'({mpx:.2f} Mpx), tiles {args.tile} px, batch {args.batch}')

    crops = [image[y:y + args.tile, x:x + args.tile] for y in range(0, args.size, args.tile)
             for x in range(0, args.size, args.tile)]
    detector = Detector(load_model(args.model), device=args.device, batch_size=args.batch)
    found = []
    best, median = timed(lambda: found.append(sum(len(b) for b, _ in detector.detect_tiles(crops))), args.repeats)
    print(f'cellrcnn            {mpx / median:6.2f} Mpx/s (median {median:.2f} s, best {best:.2f} s), '
          f'{found[-1]} nuclei')

    tiles = [to_tensor(crop).to(args.device) for crop in crops]
    for label, kwargs in [('stock, resize 800', {}), ('stock, no resize', {'min_size': args.tile,
                                                                          'max_size': args.tile})]:
        stock = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                     **kwargs).to(args.device).eval()

        def run_stock():
            with torch.no_grad():
                for start in range(0, len(tiles), args.batch):
                    stock(tiles[start:start + args.batch])

        best, median = timed(run_stock, args.repeats)
        print(f'{label:18}  {mpx / median:6.2f} Mpx/s (median {median:.2f} s, best {best:.2f} s)')


if __name__ == '__main__':
    main()
