"""Pen ink on a slide: what the tissue mask, the stain statistics and the count make of a marker's strokes.

    python benchmarks/pen_ink.py [--out DIR] [--model M.pt]

Draws two arcs of marker ink, 100 um wide, on a copy of the bundled sample slide (blue, a typical blue marker's hue
of 214 degrees, and green; three quarters ink with some noise; one on the glass, one across the slide's thin strand
of tissue), writes it and a copy without ink alike (tiled JPEG, quality 85, 0.5 um/px), runs ``cellrcnn detect`` on
both and prints, for each: the tissue area, the pen ink or black fill left out, the nuclei in all and away from the
ink (centres more than 4 um outside the arcs), and the LAB mean of the stain statistics. With an older checkout's
``detector`` folder on ``PYTHONPATH`` it shows what that code made of the same copies.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from cellrcnn.commands import SAMPLE_SLIDE

#: (centre x, centre y, radius) of each arc, in the sample's pixels, its colour, and the ink's share of a pixel
ARCS = (((250, 700, 350), (0, 70, 160)), ((200, 2300, 300), (20, 130, 90)))
HALF_WIDTH = 100  # px: 100 um strokes at 0.5 um/px
INK = 0.75
#: a nucleus this far (px) outside an arc counts as away from the ink
MARGIN = 8


def write_copies(folder):
    """``(plain, inked)``: the sample written again, without and with the arcs."""
    import pyvips

    sample = pyvips.Image.new_from_file(SAMPLE_SLIDE)[:3]
    rgb = np.ndarray(buffer=sample.write_to_memory(), dtype=np.uint8, shape=(sample.height, sample.width, 3))
    inked = rgb.copy()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]]
    for (cx, cy, r), colour in ARCS:
        on = np.abs(np.hypot(xx - cx, yy - cy) - r) < HALF_WIDTH
        share = np.clip(INK + rng.normal(0, 0.08, on.sum()), 0, 1)[:, None]
        inked[on] = (inked[on] * (1 - share) + np.array(colour) * share).astype(np.uint8)
    paths = []
    for name, image in (('plain', rgb), ('inked', inked)):
        path = os.path.join(folder, f'{name}.tiff')
        pyvips.Image.new_from_memory(np.ascontiguousarray(image).tobytes(), image.shape[1], image.shape[0], 3,
                                     'uchar').tiffsave(path, tile=True, pyramid=True, compression='jpeg', Q=85,
                                                       xres=2000, yres=2000, resunit='cm')
        paths.append(path)
    return paths


def away_from_ink(centres):
    """Whether each centre (N x 2, sample pixels) lies more than MARGIN outside every arc."""
    near = np.zeros(len(centres), bool)
    for (cx, cy, r), _ in ARCS:
        near |= np.abs(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy) - r) < HALF_WIDTH + MARGIN
    return ~near


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=None, help='folder for the copies and the results (default: a temporary one)')
    parser.add_argument('--model', default=None, help='checkpoint (default: the bundled model)')
    args = parser.parse_args(argv)
    folder = args.out or tempfile.mkdtemp(prefix='pen-ink-')
    os.makedirs(folder, exist_ok=True)
    print(f'{"copy":8} {"tissue mm2":>10} {"ink/fill mm2":>12} {"nuclei":>7} {"away from ink":>13}  LAB mean')
    for path in write_copies(folder):
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(folder, stem)
        subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', path, '-o', out, '--progress', 'none',
                        '--no-resume'] + (['--model', args.model] if args.model else []), check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(out, f'{stem}.summary.json')) as f:
            stats = json.load(f)
        centres = np.loadtxt(os.path.join(out, f'{stem}.csv'), delimiter=',', skiprows=1, usecols=(0, 1), ndmin=2)
        lab = ', '.join(f'{v:.3f}' for v in stats['stain']['lab_mean']) if stats.get('stain') else '-'
        print(f'{stem:8} {stats["tissue_mm2"]:10.3f} {stats.get("ink_or_fill_mm2", 0.0):12.3f} {len(centres):7d} '
              f'{int(away_from_ink(centres).sum()):13d}  {lab}')
    print(f'results in {folder}')


if __name__ == '__main__':
    main()
