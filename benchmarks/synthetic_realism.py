"""Compare the colour statistics of synthetic H&E tiles (cellrcnn.synthetic) with real H&E images.

    python benchmarks/synthetic_realism.py REAL_IMAGE [REAL_IMAGE ...] [--count 64] [--seed 0] [--mpp 0.5]
                                           [--compare-png out.png]

Real images: anything OpenCV reads (PNG, JPEG) or a whole-slide image large_image opens (SVS, TIFF; read at base
resolution, at most a 4096 x 4096 region from the top-left).  Prints, over *tissue* pixels (optical density sum
> 0.25, i.e. not glass), the mean and std of RGB, of optical density (OD = -log10(I / I0), I0 = 242) and of CIE LAB,
the tissue fraction, the mean colour of four k-means colour clusters (background-like/stroma/cytoplasm/nuclei),
then the nucleus size distribution (micrometres, longest box side) and the per-tile nucleus count of the
synthetic set, and the generation time per tile.
"""

import argparse
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'detector'))  # uninstalled checkout
from cellrcnn import synthetic  # noqa: E402


def read_image(path, limit=4096):
    """RGB uint8 image from an ordinary image file or a whole-slide image."""
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is not None:
        return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)
    import large_image

    ts = large_image.open(path)
    md = ts.getMetadata()
    region = {'left': 0, 'top': 0, 'width': min(md['sizeX'], limit), 'height': min(md['sizeY'], limit),
              'units': 'base_pixels'}
    im, _ = ts.getRegion(region=region, format=large_image.constants.TILE_FORMAT_NUMPY)
    return np.ascontiguousarray(im[..., :3]).astype(np.uint8)


def colour_stats(pixels_rgb, rng=None):
    """Statistics of a (N, 3) uint8 pixel array; returns dict."""
    rgb = pixels_rgb.reshape(-1, 3)
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1) / 242.0)
    tissue = od.sum(1) > 0.25
    out = {'tissue_frac': float(tissue.mean())}
    p = rgb[tissue]
    if len(p) < 100:
        return out
    rng = rng or np.random.default_rng(0)
    if len(p) > 400000:
        p = p[rng.choice(len(p), 400000, replace=False)]
    o = -np.log10(np.maximum(p.astype(np.float32), 1) / 242.0)
    lab = cv2.cvtColor(p.reshape(-1, 1, 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    lab[:, 0] *= 100.0 / 255
    lab[:, 1:] -= 128
    out.update(rgb_mean=p.mean(0), rgb_std=p.std(0), od_mean=o.mean(0), od_std=o.std(0), lab_mean=lab.mean(0),
               lab_std=lab.std(0))
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    cv2.setRNGSeed(0)
    sub = o[rng.choice(len(o), min(len(o), 50000), replace=False)].astype(np.float32)
    _, lab_k, centres = cv2.kmeans(sub, 4, None, crit, 3, cv2.KMEANS_PP_CENTERS)
    order = np.argsort(centres.sum(1))
    frac = np.bincount(lab_k.ravel(), minlength=4)[order] / len(sub)
    out['clusters'] = [(242 * 10 ** (-centres[i]), f) for i, f in zip(order, frac)]
    # darkest 3% of tissue pixels (nuclear chromatin)
    s = o.sum(1)
    out['dark_rgb'] = p[s >= np.quantile(s, 0.97)].mean(0)
    return out


def fmt(v, nd=1):
    return ' '.join(f'{x:6.{nd}f}' for x in np.atleast_1d(v))


def print_stats(name, st):
    print(f'{name:28s} tissue {st["tissue_frac"]:.2f}')
    if 'rgb_mean' not in st:
        return
    print(f'    RGB mean {fmt(st["rgb_mean"])}  std {fmt(st["rgb_std"])}')
    print(f'    OD  mean {fmt(st["od_mean"], 3)}  std {fmt(st["od_std"], 3)}')
    print(f'    LAB mean {fmt(st["lab_mean"])}  std {fmt(st["lab_std"])}')
    print('    k-means RGB (light->dark, frac): ' + ' | '.join(f'{fmt(c, 0)} {f:.2f}' for c, f in st['clusters']))
    print(f'    darkest 3% RGB {fmt(st["dark_rgb"], 0)}')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('real', nargs='+', help='real H&E images (PNG/JPEG or whole-slide image)')
    ap.add_argument('--count', type=int, default=64, help='number of synthetic tiles')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--mpp', type=float, default=0.5)
    ap.add_argument('--size', type=int, default=256)
    ap.add_argument('--compare-png', help='write real crop | synthetic tiles side by side to this PNG')
    args = ap.parse_args(argv)

    reals = []
    for path in args.real:
        im = read_image(path)
        reals.append((os.path.basename(path), im))
        print_stats('real ' + os.path.basename(path), colour_stats(im))

    t0 = time.perf_counter()
    tiles = synthetic.make_dataset(args.seed, args.count, args.size, args.mpp)
    dt = (time.perf_counter() - t0) / max(args.count, 1)
    pix = np.concatenate([t[0].reshape(-1, 3) for t in tiles])
    print_stats(f'synthetic ({args.count} tiles)', colour_stats(pix))
    tissue_tiles = [t for t in tiles if colour_stats(t[0])['tissue_frac'] > 0.5]
    if tissue_tiles:
        pix = np.concatenate([t[0].reshape(-1, 3) for t in tissue_tiles])
        print_stats(f'synthetic, tissue tiles ({len(tissue_tiles)})', colour_stats(pix))

    boxes = np.concatenate([t[1] for t in tiles])
    counts = np.array([len(t[1]) for t in tiles])
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * args.mpp
    short = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * args.mpp
    q = [0, 5, 25, 50, 75, 95, 100]
    print()
    print(f'nuclei: {len(boxes)} in {len(tiles)} tiles of {args.size}^2 px at {args.mpp} um/px')
    print('  percentiles          ' + ' '.join(f'{p:6d}' for p in q))
    print('  longest side (um)    ' + fmt(np.percentile(side, q)) if len(side) else '  (none)')
    print('  shortest side (um)   ' + fmt(np.percentile(short, q)) if len(side) else '')
    print('  nuclei per tile      ' + fmt(np.percentile(counts, q)))
    hist, edges = np.histogram(side, bins=np.arange(4, 17, 1))
    print('  longest side histogram (um): ' + ', '.join(f'{int(e)}-{int(e) + 1}: {c}' for e, c in zip(edges, hist)))
    print(f'generation time: {1000 * dt:.1f} ms per tile (incl. first-call overhead)')

    if args.compare_png:
        # real crops at their own scale next to synthetic tiles (same pixel size = same scale only for real images
        # at the same mpp, e.g. a 20x slide with --mpp 0.5)
        s = args.size
        rows = []
        for name, im in reals:
            h, w = im.shape[:2]
            y, x = max(0, (h - s) // 2), max(0, (w - s) // 2)
            crop = im[y:y + s, x:x + s]
            crop = cv2.copyMakeBorder(crop, 0, s - crop.shape[0], 0, s - crop.shape[1], cv2.BORDER_CONSTANT,
                                      value=(255, 255, 255))
            rows.append(crop)
        syn = [t[0] for t in tissue_tiles[:max(len(rows), 1) * 3]]
        while len(syn) < len(rows) * 3:
            syn.append(np.full((s, s, 3), 255, np.uint8))
        lines = [np.concatenate([rows[i], np.full((s, 8, 3), 255, np.uint8)] + syn[3 * i:3 * i + 3], 1)
                 for i in range(len(rows))]
        cv2.imwrite(args.compare_png, cv2.cvtColor(np.concatenate(lines, 0), cv2.COLOR_RGB2BGR))
        print('wrote', args.compare_png)


if __name__ == '__main__':
    main()
