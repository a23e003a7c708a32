"""Whole-slide images: a pyramidal TIFF generated one row of tiles at a time, with the boxes of all its nuclei."""

import math
import os
import tempfile

import numpy as np

from .fields import F_TISSUE, FIELD_CELL_UM, HashNoise, Layout, octave_grid
from .nuclei import (
    MAX_SIZE_UM,
    boxes_from_groups,
    candidates,
    concat_nuclei,
    place,
    rasterise,
    select_boxes,
    take_nuclei,
)
from .render import finish, make_style, render

#: the largest strip of the temporary base-level TIFF, bytes (libtiff stops reading at 50 MB allocated in all)
STRIP_BYTES = 16 * 2 ** 20


class _SlideGen:
    """Generates a slide tile-row by tile-row.  Nuclei are placed per generation tile (centres inside the tile),
    in raster order, taking into account the nuclei already placed in the neighbouring tiles, and rasterised once;
    rendering a tile draws the nuclei of its 3 x 3 neighbourhood, so nuclei crossing seams are drawn whole and
    identically on both sides, with one box."""

    def __init__(self, width, height, seed, mpp, tile):
        self.W, self.H, self.T = width, height, tile
        self.seed = seed
        rng = np.random.default_rng([seed, 1])
        self.ppu = 1.0 / mpp
        self.style = make_style(rng, self.ppu)
        self.style['blur'] = rng.uniform(0.4, 0.9) * self.ppu * 0.5
        self.style['noise'] = rng.uniform(1.0, 2.0)
        # collagen directions vary much more over a slide than within a tile
        self.style['fib_dtheta'] = rng.uniform(0.9, 1.6) * rng.choice([-1, 1])
        self.layout = Layout(rng, height, width, FIELD_CELL_UM * self.ppu * 1.5, 'slide', None)
        # tissue blobs at a coarser scale than within-tile structure: add a very coarse octave to the tissue field
        g = self.layout.grid
        gh, gw = g.shape[:2]
        coarse = max(4, int(max(gh, gw) / 5))
        g[..., F_TISSUE] = 0.5 * g[..., F_TISSUE] + 1.2 * octave_grid(rng, gh, gw, coarse)
        inner = g[2:-2, 2:-2, F_TISSUE]
        self.layout.t_thr = float(np.quantile(inner, 1 - rng.uniform(0.35, 0.6)))
        self.noise = HashNoise(seed)
        self.nty = int(math.ceil(height / tile))
        self.ntx = int(math.ceil(width / tile))
        self.cells = {}  # (ty, tx) -> dict(nuc, groups, load)
        self.boxes = []
        self.margin = int(math.ceil(MAX_SIZE_UM * self.ppu)) + 8

    def _place_tile(self, ty, tx):
        T = self.T
        y0, x0 = ty * T, tx * T
        h, w = min(T, self.H - y0), min(T, self.W - x0)
        rng = np.random.default_rng([self.seed, 2, ty, tx])
        cand = candidates(rng, self.layout, self.style, y0, x0, h, w, 0)
        nbrs = [(ty, tx - 1), (ty - 1, tx - 1), (ty - 1, tx), (ty - 1, tx + 1)]
        nbrs = [k for k in nbrs if k in self.cells and len(self.cells[k]['nuc']['cx'])]
        if nbrs:
            fixed = concat_nuclei([self.cells[k]['nuc'] for k in nbrs])
            fload = np.concatenate([self.cells[k]['load'] for k in nbrs])
            acc, fload = place(cand, fixed, fload)
            o = 0
            for k in nbrs:
                n = len(self.cells[k]['nuc']['cx'])
                self.cells[k]['load'] = fload[o:o + n]
                o += n
        else:
            acc, _ = place(cand)
        nuc = take_nuclei(cand, acc)
        groups = rasterise(nuc)
        box, frac = boxes_from_groups(groups, len(nuc['cx']), 0, 0, self.H, self.W)
        b, _ = select_boxes(box, frac, 0, 0, self.H, self.W)
        self.boxes.append(b)
        self.cells[(ty, tx)] = {'nuc': nuc, 'groups': groups, 'load': np.zeros(len(nuc['cx']))}

    def _render_tile(self, ty, tx):
        T, M = self.T, self.margin
        y0, x0 = ty * T, tx * T
        h, w = min(T, self.H - y0), min(T, self.W - x0)
        drawn = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                c = self.cells.get((ty + dy, tx + dx))
                if c is not None and c['groups']:
                    drawn.append((c['nuc'], c['groups']))
        rgb, _ = render(self.layout, self.style, self.noise, y0 - M, x0 - M, h + 2 * M, w + 2 * M, drawn)
        img = finish(rgb, self.style, self.noise, y0 - M, x0 - M)
        return img[M:M + h, M:M + w]

    def strips(self, rows):
        """Yield uint8 strips of ``rows`` rows (a divisor of T), full width, top to bottom."""
        for tx in range(self.ntx):
            self._place_tile(0, tx)
        for ty in range(self.nty):
            if ty + 1 < self.nty:
                for tx in range(self.ntx):
                    self._place_tile(ty + 1, tx)
            row = np.concatenate([self._render_tile(ty, tx) for tx in range(self.ntx)], 1)
            for y in range(0, len(row), rows):
                yield row[y:y + rows]
            for tx in range(self.ntx):
                self.cells.pop((ty - 1, tx), None)


def write_slide(path, width, height, seed, mpp=0.5, tile_size=512):
    """Write a pyramidal tiled JPEG (Q=90) BigTIFF whole-slide image of ``width`` x ``height`` pixels at ``mpp``
    micrometres per pixel, with resolution tags so that large_image reports mm_x = mm_y = mpp / 1000 and
    magnification 10 / mpp.  Tissue blobs on white glass; the image is generated one row of ``tile_size`` tiles at a
    time and streamed to libvips, so memory stays bounded for large slides.

    Returns all nucleus boxes in base-level pixels (float32 N x 4, same conventions as make_tile, clipped to the
    slide) and saves them as ``<path>.boxes.npy``."""
    import pyvips
    import tifffile

    width, height, tile_size = int(width), int(height), int(tile_size)
    if tile_size % 16 or tile_size < 64:
        raise ValueError('tile_size must be a multiple of 16, at least 64')
    if width < 1 or height < 1 or not mpp > 0:
        raise ValueError('width and height must be positive and mpp > 0')
    gen = _SlideGen(width, height, int(seed), float(mpp), tile_size)
    path = os.fspath(path)
    # The base level is streamed, one row of tiles at a time, into an uncompressed strip TIFF next to the output
    # (W x H x 3 bytes of disk; this libvips build has no streaming loader fed from Python), which libvips then reads
    # sequentially and turns into the pyramidal JPEG TIFF in one pass: memory stays at a few tile rows. libtiff
    # refuses to read a strip that takes its allocations past 50 MB, so a wide slide's strips are fewer rows.
    rows = max(r for r in range(1, tile_size + 1) if tile_size % r == 0 and (r == 1 or r * width * 3 <= STRIP_BYTES))
    fd, tmp = tempfile.mkstemp(suffix='.tif', prefix='.synthetic-', dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data=gen.strips(rows), shape=(height, width, 3), dtype=np.uint8, photometric='rgb',
                         rowsperstrip=rows, bigtiff=width * height * 3 > 2 ** 31)
        image = pyvips.Image.new_from_file(tmp, access='sequential')
        px_per_mm = 1000.0 / mpp
        image = image.copy(xres=px_per_mm, yres=px_per_mm)
        image.tiffsave(path, tile=True, tile_width=tile_size, tile_height=tile_size, pyramid=True,
                       compression='jpeg', Q=90, bigtiff=True, resunit='cm')
        del image
    finally:
        os.unlink(tmp)
    boxes = np.concatenate(gen.boxes) if gen.boxes else np.zeros((0, 4), np.float32)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    np.save(path + '.boxes.npy', boxes)
    return boxes
