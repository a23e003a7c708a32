"""Training and evaluation tiles: one generated image with the exact boxes of its nuclei, and seeded datasets."""

import math

import cv2
import numpy as np

from .fields import FIELD_CELL_UM, Layout, RngNoise
from .nuclei import MAX_SIZE_UM, boxes_from_groups, candidates, place, rasterise, select_boxes, take_nuclei
from .render import clutter_maps, finish, make_style, render


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _make_tile(rng, size=256, mpp=0.5, crowding=None, jpeg=True):
    rng = _as_rng(rng)
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1 or not mpp > 0:
        raise ValueError('size must be positive and mpp > 0')
    ppu = 1.0 / mpp
    style = make_style(rng, ppu)
    if crowding is None:
        crowding = rng.uniform(0, 1)
    crowding = float(np.clip(crowding, 0, 1))
    r = rng.random()
    mode = 'full' if r < 0.62 else ('partial' if r < 0.92 else 'empty')
    layout = Layout(rng, h, w, FIELD_CELL_UM * ppu, mode, crowding)
    margin = int(math.ceil(MAX_SIZE_UM / 2 * ppu))
    cand = candidates(rng, layout, style, 0, 0, h, w, margin)
    acc, _ = place(cand)
    nuc = take_nuclei(cand, acc)
    groups = rasterise(nuc)
    noise = RngNoise(rng)
    rgb, lab = render(layout, style, noise, 0, 0, h, w, [(nuc, groups)], clutter_maps(rng, h, w, ppu))
    img = finish(rgb, style, noise, 0, 0)
    if jpeg and rng.random() < 0.85:
        q = int(rng.integers(55, 96))
        ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, q])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    n = len(nuc['cx'])
    box, frac = boxes_from_groups(groups, n, 0, 0, h, w)
    boxes, keep = select_boxes(box, frac, 0, 0, h, w)
    info = {'nuclei': nuc, 'groups': groups, 'label': lab, 'keep': keep, 'style': style, 'crowding': crowding,
            'mode': mode}
    return img, boxes, info


def make_tile(rng, size=256, mpp=0.5, crowding=None):
    """One H&E-like RGB tile (uint8, size x size x 3, or (h, w) if size is a tuple) and its nucleus boxes
    (float32 N x 4 x1, y1, x2, y2 in pixel-edge coordinates; see :mod:`cellrcnn.synthetic` for the border rule).

    ``rng``: a numpy.random.Generator or an integer seed.  ``mpp``: micrometres per pixel (0.5 = 20x).
    ``crowding`` in [0, 1] sets nucleus density (None: drawn at random per tile, so a dataset mixes sparse and
    crowded tiles)."""
    img, boxes, _ = _make_tile(rng, size, mpp, crowding)
    return img, boxes


def make_dataset(seed, count, size=256, mpp=0.5, scale=None):
    """``count`` tiles from one seed (different seeds give disjoint sets); tile i depends only on (seed, i), so a
    longer dataset extends a shorter one with the same seed.

    ``scale=(low, high)``: each tile is drawn with its nuclei and textures ``s`` times larger in pixels, ``s``
    log-uniform in that range (as if scanned at ``mpp / s`` and labelled ``mpp``: a scanner's true 20x, a mis-stated
    resolution, shrinkage in processing)."""
    tiles = []
    for i in range(int(count)):
        rng = np.random.default_rng([int(seed), 0, i])
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))) if scale else 1.0
        tiles.append(make_tile(rng, size, mpp / s))
    return tiles
