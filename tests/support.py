"""Helpers shared by the tests and the benchmarks (benchmarks/ import this file through a ``sys.path`` line; tests
never import from benchmarks/).

- :func:`simulate_slide`: the raw detections of a tiled whole-slide run (tests/test_merge.py,
  benchmarks/merge_cost.py).
- :func:`annotated_cohort`: three synthetic slides on a Girder server with annotations drawn the way an annotator
  draws them in HistomicsUI (tests/test_girder_training.py, benchmarks/train_from_annotations.py).
- :func:`report_figures`: what :func:`cellrcnn.metrics.format_report` printed, to check against the metrics
  (tests/test_metrics.py, tests/test_cli.py).
- :func:`run_batch`: ``cellrcnn batch`` in this process, with its table (tests/test_cohort.py,
  tests/test_cohort_girder.py).
- :func:`image_pins`: the versions image-constraints.txt pins for the task image (tests/test_image_pins.py,
  tests/test_dsa.py).
- :func:`mark_beside`: a slide with a band beside it of the black fill some scanners write, or of a marker's ink
  (tests/test_slide_detection.py, tests/test_stain.py).
- :func:`blur_right_half`: a slide whose right half is out of focus (tests/test_focus.py,
  tests/test_histomicsui.py).
"""

import contextlib
import csv
import io
import os
import re

import numpy as np

# --------------------------------------------------------------------------- raw detections of a tiled run


class PassingDetector:
    """A stand-in around a real detector: what ``detect_slide`` reads of a detector (its model, device, views,
    threshold, ...) is the real one's; subclasses record or stop what ``detect_tiles_with_types`` returns."""

    def __init__(self, detector):
        self.inner = detector

    def __getattr__(self, name):  # only for what the stand-in does not have itself
        return getattr(self.inner, name)


def simulate_slide(rng, width, height, n_objects, tile=256, overlap=48, size=(8, 32), jitter=3.0, quantise=None):
    """Raw detections of a tiled detector, in the detection loop's order: a list of tile rows, each
    (top of the row's tiles, [(boxes, scores) per tile, left to right]).

    ``n_objects`` nuclei of sides ``size`` px anywhere on a ``width`` x ``height`` slide; each one at least 30 %
    visible in a tile is detected 1-3 times there, boxes jittered by ``jitter`` px (clipped to the tile), scores
    uniform in [0.05, 1) (rounded to multiples of 1/``quantise`` when given: ties); detections shuffled within a
    tile."""
    step = tile - overlap
    nx, ny = max(1, -(-(width - overlap) // step)), max(1, -(-(height - overlap) // step))
    wh = rng.uniform(*size, (n_objects, 2))
    xy = rng.uniform(0, 1, (n_objects, 2)) * (np.array([width, height]) - wh)
    objects = np.concatenate([xy, xy + wh], 1)
    # the tiles each object may touch (the one holding its top-left corner and its neighbours)
    pairs = []
    for ox in (-1, 0, 1):
        for oy in (-1, 0, 1):
            tx = np.minimum(np.floor(objects[:, 0] / step).astype(np.int64) - ox, nx - 1)
            ty = np.minimum(np.floor(objects[:, 1] / step).astype(np.int64) - oy, ny - 1)
            pairs.append(np.stack([np.arange(n_objects), tx, ty], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    pairs = pairs[(pairs[:, 1] >= 0) & (pairs[:, 2] >= 0)]
    origin = pairs[:, 1:] * step
    obj = objects[pairs[:, 0]]
    lo, hi = np.maximum(obj[:, :2], origin), np.minimum(obj[:, 2:], origin + tile)
    visible = np.prod(np.clip(hi - lo, 0, None), 1) >= 0.3 * np.prod(obj[:, 2:] - obj[:, :2], 1)
    pairs, origin, obj = pairs[visible], origin[visible], obj[visible]
    rep = np.repeat(np.arange(len(pairs)), rng.integers(1, 4, len(pairs)))  # 1-3 detections per tile
    det = obj[rep] + rng.normal(0, jitter, (len(rep), 4))
    det[:, :2] = np.clip(det[:, :2], origin[rep], origin[rep] + tile - 1)
    det[:, 2:] = np.clip(det[:, 2:], det[:, :2] + 1, origin[rep] + tile)
    det = det.astype(np.float32)
    scores = rng.uniform(0.05, 1, len(rep)).astype(np.float32)
    if quantise:
        scores = (np.round(scores * quantise) / quantise).astype(np.float32)
    tile_of = pairs[rep, 2] * nx + pairs[rep, 1]
    order = np.lexsort((rng.random(len(rep)), tile_of))  # row-major tiles, detections shuffled within a tile
    det, scores, tile_of = det[order], scores[order], tile_of[order]
    bounds = np.searchsorted(tile_of, np.arange(nx * ny + 1))
    return [(ty * step, [(det[bounds[t]:bounds[t + 1]], scores[bounds[t]:bounds[t + 1]])
                         for t in range(ty * nx, (ty + 1) * nx)]) for ty in range(ny)]


# --------------------------------------------------------------------------- metrics reports

def report_figures(text):
    """(first line's counts, the 'all' row) of a :func:`cellrcnn.metrics.format_report` table, and the same
    computed from its metrics dict: ``report_figures(format_report(m)) == report_figures(m)``."""
    if isinstance(text, dict):
        m = text
        return ([m['n_images'], m['n_gt'], m['n_pred']],
                [str(m['tp']), str(m['fp']), str(m['fn'])] + [f'{m[k]:.3f}' for k in ('precision', 'recall', 'f1')])
    lines = text.splitlines()
    words = lines[0].split()  # images N  ground truth M  predictions K  (IoU ...
    assert [words[0], *words[2:4], words[5]] == ['images', 'ground', 'truth', 'predictions'], lines[0]
    row = next(line for line in lines if line.startswith('all '))  # the first: TP, FP, FN, precision, recall, F1
    return [int(words[1]), int(words[4]), int(words[6])], row.split()[1:]


# --------------------------------------------------------------------------- annotated slides on Girder

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
    """Three annotated synthetic slides (``size`` px square) uploaded into ``server.folder_id`` (a
    :class:`cellrcnn.devstack.local_girder.GirderServer`): on slide a, ``cells`` nuclei as rectangles inside a rectangle
    labelled ``region``, and a decoy annotation of another name; on slide b, ``cells`` nuclei as points (no region:
    the bounding box of the points is the region); on slide c, the held-out slide, every nucleus as a rectangle.
    The slide files are written into the folder ``root``.

    :returns: ``{file name: {'item_id', 'boxes' (the annotated ones), 'all_boxes'}}``."""
    from cellrcnn.annotation import detections_to_annotation
    from cellrcnn.synthetic import write_slide

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


# --------------------------------------------------------------------------- a cohort run here


def run_batch(*args):
    """``cellrcnn batch ARGS --device cpu`` here: (exit status, stdout, stderr, table rows by slide); the rows of the
    region's own table with ``--region-annotation NAME``."""
    from cellrcnn.__main__ import main
    from cellrcnn.cohort import output_names

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(['batch', *map(str, args), '--device', 'cpu'])
    output = args[args.index('-o') + 1]
    region = args[args.index('--region-annotation') + 1] if '--region-annotation' in args else None
    table = os.path.join(output, output_names(region and str(region).strip())[1])
    rows = {}
    if os.path.exists(table):
        with open(table, newline='') as f:
            rows = {r['slide']: r for r in csv.DictReader(f)}
    return code, out.getvalue(), err.getvalue(), rows


#: one ``name==version`` line, as image-constraints.txt and ``pip freeze`` write them
PINNED_LINE = re.compile(r'^([A-Za-z0-9_.\-]+)==(\S+)$', re.M)


def image_pins():
    """``{canonical name: version}`` of every package image-constraints.txt pins; any other line than a comment or
    a pin fails."""
    from packaging.utils import canonicalize_name
    pins = {}
    with open(os.path.join(os.path.dirname(__file__), '..', 'image-constraints.txt')) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line:
                name, version = PINNED_LINE.fullmatch(line).groups()
                pins[canonicalize_name(name)] = version
    return pins


# --------------------------------------------------------------------------- a mark beside a slide

#: colours of marks that are not tissue: the black fill some scanners write, and a blue and a green marker's ink
#: over glass (three quarters ink)
BLACK, BLUE_INK, GREEN_INK = (0, 0, 0), (60, 113, 180), (75, 158, 128)


def mark_beside(slide, out, width, colour=BLACK, quality=75):
    """Write ``out`` (and return it): the slide file ``slide`` (RGB) with a band ``width`` px wide of ``colour``
    joined on its right (0: none), as a tiled JPEG pyramid at 0.5 um/px."""
    import pyvips

    image = pyvips.Image.new_from_file(str(slide))[:3]
    if width:
        image = image.join(pyvips.Image.black(width, image.height, bands=3) + list(colour), 'horizontal')
    image.cast('uchar').tiffsave(str(out), tile=True, pyramid=True, compression='jpeg', Q=quality, xres=2000,
                                 yres=2000, resunit='cm')
    return out


def blur_right_half(slide, out, sigma_um, quality=80):
    """Write ``out`` (and return it): the slide file ``slide`` (RGB, 0.5 um/px) with its right half blurred by a
    Gaussian of ``sigma_um`` (0: none), as a tiled JPEG pyramid at 0.5 um/px, as a scanner that lost focus there
    would."""
    import pyvips

    image = pyvips.Image.new_from_file(str(slide))[:3]
    if sigma_um:
        half = image.width // 2
        image = image.insert(image.crop(half, 0, image.width - half, image.height).gaussblur(sigma_um / 0.5), half, 0)
    image.cast('uchar').tiffsave(str(out), tile=True, pyramid=True, compression='jpeg', Q=quality, xres=2000,
                                 yres=2000, resunit='cm')
    return out
