"""Which nuclei a model misses: box recall by size, elongation, contrast and crowding, on images whose truth has boxes.

    python benchmarks/missed_nuclei.py --data ENTRY [--data ENTRY ...] [--model M.pt] [--montage missed.png]

``--data`` entries are ``cellrcnn train``'s (docs/training-data.md) whose nuclei all have extents (masks or boxes),
e.g. DSB's held-out split
``masks:DATA/dsb2018-he/masks,images=DATA/dsb2018-he/images,mpp=auto,split=val``. Each image is rescaled to the
model's analysis scale and detected whole at the model's operating point. A nucleus is found when a detection
overlaps its box at IoU >= 0.5. Nuclei whose box touches the image's edge (cut by it) are left out of the tables.
The columns of each table:

- **size**: the square root of the box's area, in µm;
- **elongation**: its long side over its short side;
- **contrast**: the mean optical density in the box, less the image's median;
- **crowding**: how many other truth boxes overlap it.

``--montage`` draws up to 24 missed nuclei under 6 µm, each as the image beside the same crop with the truth
(green), the detections (red) and the missed nucleus (blue).
"""

import argparse
import sys

import cv2
import numpy as np

from cellrcnn.boxes import iou
from cellrcnn.checkpoint import load_model
from cellrcnn.errors import CellRCNNError, run_reporting_errors
from cellrcnn.inference import Detector
from cellrcnn.labels import read_entries, rescale

TABLES = (('size (sqrt of the box area, um)', 'size', (0, 4, 5, 6, 7, 8, 10, 13, np.inf)),
          ('elongation (long side / short side)', 'elongation', (1, 1.3, 1.6, 2, 3, np.inf)),
          ('contrast (mean optical density in the box less the image median)', 'contrast',
           (-np.inf, 0.1, 0.2, 0.3, 0.5, np.inf)),
          ('crowding (other truth boxes overlapping it)', 'crowding', (0, 1, 2, 3, np.inf)))


def nucleus_rows(image, truth, detections, mpp):
    """One row of figures per truth box not cut by the image's edge: its size, elongation, contrast, crowding and
    best IoU with a detection."""
    density = -np.log((image.astype(np.float32) + 1) / 256).mean(2)
    background = np.median(density)
    height, width = density.shape
    best = iou(truth[:, None], detections[None]).max(1) if len(detections) else np.zeros(len(truth))
    overlaps = (iou(truth[:, None], truth[None]) > 0).sum(1) - 1
    rows = []
    for box, found_iou, crowding in zip(truth, best, overlaps):
        x0, y0, x1, y1 = box
        if x0 <= 1 or y0 <= 1 or x1 >= width - 1 or y1 >= height - 1:
            continue
        w, h = x1 - x0, y1 - y0
        patch = density[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        rows.append({'size': np.sqrt(w * h) * mpp, 'elongation': max(w, h) / max(min(w, h), 1e-6),
                     'contrast': patch.mean() - background if patch.size else 0.0, 'crowding': crowding,
                     'iou': found_iou, 'box': box})
    return rows


def print_tables(rows):
    found = np.array([r['iou'] >= 0.5 for r in rows])
    print(f'{len(rows)} nuclei not cut by the image edge; box recall (IoU >= 0.5) {found.mean():.3f}')
    for title, key, edges in TABLES:
        values = np.array([r[key] for r in rows])
        print(title)
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (values >= lo) & (values < hi)
            if inside.any():
                print(f'  [{lo:g}, {hi:g}): {inside.sum():5d} nuclei, box recall {found[inside].mean():.3f}')


def montage(items, path, count=24, seed=0):
    """Write up to ``count`` of ``items`` ((image, truth, detections, missed box)) as a grid of crops."""
    pad = 40
    crops = []
    picked = np.random.default_rng(seed).permutation(len(items))[:count]
    for image, truth, detections, missed in (items[i] for i in picked):
        plain = cv2.copyMakeBorder(np.ascontiguousarray(image[..., ::-1]), pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                   value=(255, 255, 255))
        drawn = plain.copy()
        for boxes, colour in ((truth, (0, 200, 0)), (detections, (0, 0, 255)), (missed[None], (255, 0, 0))):
            for x0, y0, x1, y1 in np.round(boxes).astype(int) + pad:
                cv2.rectangle(drawn, (x0, y0), (x1, y1), colour, 1)
        cx, cy = np.round((missed[:2] + missed[2:]) / 2).astype(int)  # the crop's centre is at +pad
        pair = np.hstack([plain[cy:cy + 2 * pad, cx:cx + 2 * pad], drawn[cy:cy + 2 * pad, cx:cx + 2 * pad]])
        crops.append(cv2.resize(pair, (8 * pad, 4 * pad), interpolation=cv2.INTER_NEAREST))
    crops += [np.full_like(crops[0], 255)] * (-len(crops) % 4)
    cv2.imwrite(path, np.vstack([np.hstack(crops[i:i + 4]) for i in range(0, len(crops), 4)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data', action='append', required=True, metavar='ENTRY')
    ap.add_argument('--model', help='checkpoint (default: the bundled model)')
    ap.add_argument('--montage', metavar='PNG', help='draw missed nuclei under 6 um here')
    args = ap.parse_args()
    model = load_model(args.model)
    config = model.config
    records = [rescale(r, config.mpp) for r in read_entries(args.data)]
    records = [r for r in records if r.has_extent.all()]
    if not records:
        raise CellRCNNError('no image whose nuclei all have boxes or masks')
    images = [r.load() for r in records]
    outputs = Detector(model, 'cpu', 8).detect_tiles_with_types(images)
    rows, small_missed = [], []
    for record, image, out in zip(records, images, outputs):
        truth, detections = np.asarray(record.boxes, float), np.asarray(out['boxes'])
        these = nucleus_rows(image, truth, detections, config.mpp)
        rows += these
        small_missed += [(image, truth, detections, r['box']) for r in these if r['iou'] < 0.5 and r['size'] < 6]
    print(f'{len(records)} images, the model at its operating point (score >= {config.threshold:.2f})')
    print_tables(rows)
    if args.montage and small_missed:
        montage(small_missed, args.montage)
        print(f'{min(24, len(small_missed))} of {len(small_missed)} missed nuclei under 6 um drawn in {args.montage}')


if __name__ == '__main__':
    sys.exit(run_reporting_errors('missed_nuclei', main))
