"""Look at models on held-out real images: the truth and each model's detections drawn side by side.

    python benchmarks/held_out_overlays.py --data ENTRY [--data ENTRY ...] --model A.pt [--model B.pt ...] \
        [--count 4] [--most CLASS] [--crop 320] [--views N ...] [--out overlays/]

``--data`` entries are ``cellrcnn train``'s (docs/training-data.md); give a held-out split, e.g.
``points:DATA/brca-m2c/points.json,images=DATA/brca-m2c/images,mpp=0.5,splits=DATA/brca-m2c/splits.json,split=val``.
Each image is rescaled to the first model's analysis scale and detected whole by every model at its own operating
point. The ``--count`` images with the most nuclei of class ``--most`` (all nuclei without it) are drawn, each as a
``--crop``-px square around the densest cluster of that class, at twice the analysis scale: the truth first (a dot
per nucleus in its class colour, a box where the truth has one), then one panel per model (boxes in the colour of
the cell type the model gives, green for a model without cell types). Written to ``OUT/NAME.png``; the console gets
one line per image with the counts in the crop.
"""

import argparse
import os

import cv2
import numpy as np

from cellrcnn.checkpoint import load_model
from cellrcnn.colors import rgb_tuple
from cellrcnn.inference import Detector
from cellrcnn.labels import read_entries, rescale
from cellrcnn.settings import VIEWS

TRUTH_COLORS = {'lymphocyte': (40, 90, 255), 'tumor_epithelial': (230, 40, 40), 'tumour': (230, 40, 40),
                'stromal': (40, 180, 60)}
PLAIN = (0, 220, 0)


def crop_origin(points, shape, crop):
    """Top-left corner of the ``crop`` square holding the most of ``points``."""
    height, width = shape
    best, origin = -1, (0, 0)
    for x0 in range(0, max(1, width - crop + 1), 32):
        for y0 in range(0, max(1, height - crop + 1), 32):
            inside = ((points[:, 0] >= x0) & (points[:, 0] < x0 + crop) &
                      (points[:, 1] >= y0) & (points[:, 1] < y0 + crop)).sum()
            if inside > best:
                best, origin = inside, (x0, y0)
    return origin


def draw_truth(image, record, origin, scale):
    panel = image.copy()
    for (x, y), box, cls in zip(record.points, record.boxes, record.classes):
        color = TRUTH_COLORS.get(cls, (255, 255, 0))
        if np.isfinite(box).all():
            x1, y1, x2, y2 = ((box - np.tile(origin, 2)) * scale).round().astype(int)
            cv2.rectangle(panel, (x1, y1), (x2, y2), color, 1)
        cv2.circle(panel, (int((x - origin[0]) * scale), int((y - origin[1]) * scale)), 3, color, -1)
    return panel


def draw_detections(image, out, colors, origin, scale):
    panel = image.copy()
    types = out.get('cell_types')
    for i, box in enumerate(out['boxes']):
        color = colors[types[i]] if types is not None else PLAIN
        x1, y1, x2, y2 = ((box - np.tile(origin, 2)) * scale).round().astype(int)
        cv2.rectangle(panel, (x1, y1), (x2, y2), color, 1)
    return panel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', action='append', required=True, help='labelled images (a held-out split)')
    parser.add_argument('--model', action='append', required=True, help='checkpoint; repeat to compare')
    parser.add_argument('--count', type=int, default=4)
    parser.add_argument('--most', help='draw the images with the most nuclei of this class')
    parser.add_argument('--crop', type=int, default=320, help='crop side in analysis pixels')
    parser.add_argument('--out', default='overlays')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--views', type=int, nargs='+', choices=VIEWS,
                        help='views per image for each model, in order (default 1 each): the same --model twice with '
                             '--views 1 8 compares one view with eight')
    args = parser.parse_args()
    views = args.views or [1] * len(args.model)
    if len(views) != len(args.model):
        parser.error(f'--views takes one number per --model ({len(args.model)}), not {len(views)}')
    models = [load_model(path) for path in args.model]
    mpp = models[0].config.mpp
    records = [rescale(r, mpp) for r in read_entries(args.data)]
    records.sort(key=lambda r: -sum(args.most is None or c == args.most for c in r.classes))
    records = records[:args.count]
    images = [r.load() for r in records]
    outputs = [Detector(m, args.device, 4, views=n).detect_tiles_with_types(images) for m, n in zip(models, views)]
    os.makedirs(args.out, exist_ok=True)
    scale = 2
    for i, (record, image) in enumerate(zip(records, images)):
        chosen = np.array([args.most is None or c == args.most for c in record.classes])
        origin = np.array(crop_origin(record.points[chosen] if chosen.any() else record.points, image.shape[:2],
                                      args.crop), np.float32)
        x0, y0 = origin.astype(int)
        crop = cv2.resize(image[y0:y0 + args.crop, x0:x0 + args.crop], None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_CUBIC)
        panels = [draw_truth(crop, record, origin, scale)]
        counts = []
        for model, out in zip(models, outputs):
            colors = [rgb_tuple(c) for c in model.config.cell_type_colors] if model.config.cell_types else None
            panels.append(draw_detections(crop, out[i], colors, origin, scale))
            centres = (out[i]['boxes'][:, :2] + out[i]['boxes'][:, 2:]) / 2
            counts.append(int(((centres >= origin) & (centres < origin + args.crop)).all(axis=1).sum()))
        truth = int(((record.points >= origin) & (record.points < origin + args.crop)).all(axis=1).sum())
        gap = np.full((crop.shape[0], 8, 3), 255, np.uint8)
        row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
        path = os.path.join(args.out, f'{os.path.splitext(record.name)[0]}.png')
        cv2.imwrite(path, cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
        named = [f'{os.path.basename(m)}{f" ({v} views)" if v > 1 else ""}' for m, v in zip(args.model, views)]
        print(f'{path}: truth {truth}, detections ' + ', '.join(f'{m} {n}' for m, n in zip(named, counts)))


if __name__ == '__main__':
    main()
