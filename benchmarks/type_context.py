"""Would a second look at each nucleus' surroundings type it better? A trial of a second-stage classifier.

    python benchmarks/type_context.py --train ENTRY --held-out ENTRY [--model M.pt] [--seeds 2] [--leave-one-out]

``--train`` and ``--held-out`` are ``cellrcnn train``'s ``--data`` entries with classes (docs/training-data.md), e.g.
BRCA-M2C's ``points:DATA/brca-m2c/points.json,images=DATA/brca-m2c/images,mpp=0.5,splits=DATA/brca-m2c/
splits.json,split=train`` and the same with ``split=val``. Each image is rescaled to the model's analysis scale and
detected whole at its operating point; a detection is matched to a dot within 3 µm (``point_metrics``). A gradient
boosted classifier (scikit-learn's) is then fitted on the training images' matched detections, from

- **own**: the model's own type probabilities (its softmax), score, box width, height, log area and elongation;
- **+ neighbours**: and, within 7.5, 15 and 30 µm, how many other detections there are and their mean type
  probabilities, the distance to the nearest one and to the image's edge (the spatial context MCSpatNet models);
- **+ colour**: and the mean and spread of R, G and B in the nucleus' centre and in two rings around it (4-12 and
  12-24 µm): the tissue it sits in.

and each is scored on the held-out images by per-type F1 (``point_metrics.centroid_metrics``; every detection typed,
the matching unchanged), beside the model's own types (with its cell-type bias). A classifier that types better
than the model's own head on held-out images would be worth building into the model; one that does not, is not.

The model has learnt its training images, so its own probabilities are surer there than on new images, and a
classifier fitted on them may lean on them too much. ``--leave-one-out`` fits each classifier on the held-out images
but one instead, and types that one, in turn: every probability it learns from is one the model gives a new image.
"""

import argparse
import sys

import numpy as np
from scipy.spatial import cKDTree

from cellrcnn.boxes import box_centres
from cellrcnn.checkpoint import load_model
from cellrcnn.errors import CellRCNNError, run_reporting_errors
from cellrcnn.inference import Detector
from cellrcnn.labels import read_entries, rescale
from cellrcnn.point_metrics import centroid_metrics, match_points

RADII_UM = (7.5, 15.0, 30.0)
RINGS_UM = ((0.0, 3.0), (4.0, 12.0), (12.0, 24.0))
FEATURES = ('own', '+ neighbours', '+ colour')


def detect(model, records):
    """Per image: the detections (with the classifier's logits), the truth's points and type indices (-1 unknown),
    the image, and each detection's matched truth type (-1 unmatched or unknown)."""
    config = model.config
    index = config.cell_type_index()
    images = [r.load() for r in records]
    outputs = Detector(model, 'cpu', 8).detect_tiles_with_types(images, logits=True)
    radius = 3.0 / config.mpp
    found = []
    for record, image, out in zip(records, images, outputs):
        types = np.array([index.get(c, -1) if c is not None else -1 for c in record.classes], np.int64)
        d, t = match_points(box_centres(out['boxes']), record.points, radius)
        matched = np.full(len(out['boxes']), -1, np.int64)
        matched[d] = types[t]
        found.append((out, (np.asarray(record.points), types), image, matched))
    return found


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def features(out, image, kind, mpp):
    """The ``kind`` (:data:`FEATURES`) features of each detection of one image."""
    boxes = np.asarray(out['boxes'], np.float64)
    centres = box_centres(boxes)
    probs = softmax(np.asarray(out['cell_type_logits'], np.float64))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    columns = [probs, out['scores'][:, None], w[:, None], h[:, None], np.log(w * h)[:, None],
               (np.maximum(w, h) / np.minimum(w, h))[:, None]]
    if kind != 'own':
        tree = cKDTree(centres)
        for radius in RADII_UM:
            near = tree.query_ball_point(centres, radius / mpp)
            others = [[j for j in n if j != i] for i, n in enumerate(near)]
            columns += [np.array([len(o) for o in others], np.float64)[:, None],
                        np.array([probs[o].mean(axis=0) if o else np.full(probs.shape[1], np.nan) for o in others])]
        nearest = tree.query(centres, k=2)[0][:, 1] if len(centres) > 1 else np.full(len(centres), np.inf)
        height, width = image.shape[:2]
        columns += [nearest[:, None], np.min([centres[:, 0], centres[:, 1], width - centres[:, 0],
                                              height - centres[:, 1]], axis=0)[:, None]]
    if kind == '+ colour':
        columns.append(colour_features(image, centres, mpp))
    return np.hstack(columns)


def colour_features(image, centres, mpp):
    """Mean and standard deviation of R, G, B (0-1) in each ring of :data:`RINGS_UM` around each centre."""
    reach = int(np.ceil(RINGS_UM[-1][1] / mpp))
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    distance = np.hypot(dx, dy) * mpp
    rings = [(dy[(distance >= lo) & (distance < hi)], dx[(distance >= lo) & (distance < hi)]) for lo, hi in RINGS_UM]
    pixels = image.astype(np.float32) / 255
    height, width = image.shape[:2]
    rows = []
    for x, y in np.round(centres).astype(int):
        row = []
        for ry, rx in rings:
            ys, xs = ry + y, rx + x
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            values = pixels[ys[inside], xs[inside]]
            row += [*values.mean(axis=0), *values.std(axis=0)]
        rows.append(row)
    return np.array(rows, np.float64).reshape(len(centres), -1)


def type_f1(found, types_of, num_types, mpp):
    figures = centroid_metrics([{**out, 'cell_types': types_of(i)} for i, (out, _, _, _) in enumerate(found)],
                               [truth for _, truth, _, _ in found], 3.0 / mpp, num_types)
    return [t['f1'] for t in figures['types']]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--train', action='append', metavar='ENTRY', help='the images the classifiers are fitted on')
    ap.add_argument('--held-out', dest='held_out', action='append', required=True, metavar='ENTRY')
    ap.add_argument('--model', help='checkpoint (default: the bundled model)')
    ap.add_argument('--seeds', type=int, default=2, help='classifiers fitted per kind of features')
    ap.add_argument('--leave-one-out', dest='leave_one_out', action='store_true',
                    help='fit on the held-out images but one and type that one, in turn (--train is not used)')
    args = ap.parse_args()
    if not (args.train or args.leave_one_out):
        raise CellRCNNError('give --train, or --leave-one-out')
    model = load_model(args.model)
    config = model.config
    if not config.cell_types:
        raise CellRCNNError('the model has no cell types')
    train, held = (detect(model, [rescale(r, config.mpp) for r in read_entries(entries)]) if entries else []
                   for entries in (None if args.leave_one_out else args.train, args.held_out))
    names = config.cell_types
    fitted_on = 'the other held-out images' if args.leave_one_out else f'{len(train)} training images'
    print(f'{len(held)} held-out images, classifiers fitted on {fitted_on}; per-type F1 on the held-out images '
          f'({", ".join(names)}), and their mean')

    def line(label, f1):
        print(f'{label:24s} ' + ' '.join(f'{f:.3f}' for f in f1) + f'  mean {np.mean(f1):.3f}')

    line('the model\'s own types', type_f1(held, lambda i: held[i][0]['cell_types'], len(names), config.mpp))
    for kind in FEATURES:
        train_x = [features(out, image, kind, config.mpp) for out, _, image, _ in train]
        held_x = [features(out, image, kind, config.mpp) for out, _, image, _ in held]
        for seed in range(args.seeds):
            if args.leave_one_out:
                predicted = [fitted(held_x[:i] + held_x[i + 1:], held[:i] + held[i + 1:], seed, [held_x[i]])[0]
                             for i in range(len(held))]
            else:
                predicted = fitted(train_x, train, seed, held_x)
            line(f'{kind}, seed {seed}', type_f1(held, predicted.__getitem__, len(names), config.mpp))


def fitted(xs, found, seed, targets):
    """The types a classifier fitted on the matched detections of ``found`` (their features ``xs``) gives the
    detections of each of ``targets`` (features)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.vstack([f[matched >= 0] for f, (*_, matched) in zip(xs, found)])
    y = np.concatenate([matched[matched >= 0] for *_, matched in found])
    classifier = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15,
                                                l2_regularization=1.0, random_state=seed).fit(x, y)
    return [classifier.predict(t) if len(t) else np.zeros(0, np.int64) for t in targets]


if __name__ == '__main__':
    sys.exit(run_reporting_errors('type_context', main))
