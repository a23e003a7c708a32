"""Where the out-of-focus limit comes from, and what blur costs the model (docs/real-tissue.md, "Out of focus").

    python benchmarks/focus_blur.py [--brca ../shared/data/brca-m2c] [--dsb ../shared/data/dsb2018-he]
                                    [--sigmas 0 0.5 0.75 1 1.5 2] [--thresholds 0.3 0.2] [--json out.json]
                                    [--model MODEL.pt]

Real tissue in focus (the bundled sample slide, 20x, read whole; BRCA-M2C's 90 breast fields, 20x), each also
blurred on purpose by a Gaussian of ``sigma`` um and saved as JPEG at quality 80 (as a scanner stores its tiles:
JPEG's block edges are sharp, so a measure that ignored them would call blurred tiles sharp). For each sigma:

1. ``cellrcnn.focus.patch_blur`` over every image: the 1st, 50th and 99th percentiles of the patches' blur and the
   share of patches above ``focus.BLUR_LIMIT`` (those a run calls out of focus);
2. the bundled model (or ``--model``) on the 10 held-out breast fields (the authors' validation split) so blurred:
   centroid precision, recall and F1 within 3 um at its operating point (``cellrcnn.evaluate.evaluate_records``),
   i.e. how many nuclei blur of that size costs; and at each of ``--thresholds`` (would a lower score threshold in
   blurred tissue win them back?).

Then images as they come, soft or not: DSB 2018's 107 H&E images (scale estimated, then resampled to 0.5 um/px, as
training and evaluation do), split by whether their median patch is above the limit, and the bundled model's
(or ``--model``'s) centroid figures on each group, on the held-out split and on the training one.
"""

import argparse
import dataclasses
import json
import os

import numpy as np

from cellrcnn.checkpoint import BUNDLED_MODEL, load_model
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.evaluate import evaluate_records
from cellrcnn.focus import BLUR_LIMIT, patch_blur
from cellrcnn.labels import read_entry, rescale
from cellrcnn.samples import rescanned
from cellrcnn.slide import Slide

HERE = os.path.dirname(os.path.abspath(__file__))
JPEG_QUALITY = 80


def sample_image():
    """The bundled sample slide at 20x, whole, and its um/px."""
    slide = Slide(SAMPLE_SLIDE)
    region, _ = slide.source.getRegion(format='numpy', scale={'magnification': slide.magnification})
    return np.ascontiguousarray(region[..., :3]), slide.mpp


def blur_figures(images, sigma_um):
    """Percentiles of the patches' blur over ``images`` (``[(rgb, mpp)]``) blurred by ``sigma_um``, and the share
    above the limit."""
    blur = np.concatenate([patch_blur(rescanned(rgb, sigma_um / mpp, JPEG_QUALITY), 0, 0, mpp)[:, 4]
                           for rgb, mpp in images])
    p1, p50, p99 = np.percentile(blur, [1, 50, 99])
    return {'patches': int(len(blur)), 'p1': float(p1), 'p50': float(p50), 'p99': float(p99),
            'out_of_focus': float(np.mean(blur > BLUR_LIMIT))}


def centroid_figures(model, records, thresholds):
    """The model's centroid figures on ``records`` at its operating point, then at each of ``thresholds``."""
    return [{'threshold': t, **{k: c[k] for k in ('n_gt', 'precision', 'recall', 'f1')}}
            for t in (None, *thresholds)
            for c in [evaluate_records(model, records, device='cpu', threshold=t)['centroid']]]


def prf(figures):
    """``P / R / F1`` of each of :func:`centroid_figures`' rows, those at a given threshold named by it."""
    parts = []
    for f in figures:
        at = '' if f['threshold'] is None else f"at {f['threshold']:g}: "
        parts.append(f"{at}{f['precision']:.3f} / {f['recall']:.3f} / {f['f1']:.3f}")
    return ' ; '.join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--brca', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'brca-m2c'))
    parser.add_argument('--dsb', default=os.path.join(HERE, '..', '..', 'shared', 'data', 'dsb2018-he'))
    parser.add_argument('--sigmas', type=float, nargs='+', default=[0, 0.5, 0.75, 1, 1.5, 2],
                        help='Gaussian blurs to apply, in um')
    parser.add_argument('--thresholds', type=float, nargs='*', default=[],
                        help='score thresholds to score the model at besides its operating point')
    parser.add_argument('--json')
    parser.add_argument('--model', default=BUNDLED_MODEL, help='the model to score (default: the bundled one)')
    args = parser.parse_args()

    entry = f'points:{args.brca}/points.json,images={args.brca}/images,mpp=0.5'
    fields = read_entry(entry)
    held_out = read_entry(f'{entry},splits={args.brca}/splits.json,split=val')
    model = load_model(args.model, 'cpu')
    sets = {'sample slide': [sample_image()], 'breast fields': [(r.load(), r.mpp) for r in fields]}
    figures = []
    print(f'blur_effect of {len(fields)} breast fields and the sample slide in patches; share above {BLUR_LIMIT}; '
          f'{os.path.basename(args.model)} on the {len(held_out)} held-out fields')
    print('sigma um | set | patches | p1 | p50 | p99 | out of focus | held-out P / R / F1')
    for sigma in args.sigmas:
        blurred = [dataclasses.replace(r, image=rescanned(r.load(), sigma / r.mpp, JPEG_QUALITY)) for r in held_out]
        held = centroid_figures(model, blurred, args.thresholds)
        for name, images in sets.items():
            row = {'sigma_um': sigma, 'set': name, **blur_figures(images, sigma), 'held_out': held}
            figures.append(row)
            print(f"{sigma:g} | {name} | {row['patches']} | {row['p1']:.3f} | {row['p50']:.3f} | {row['p99']:.3f} | "
                  f"{100 * row['out_of_focus']:.1f} % | {prf(held)}", flush=True)
    print('DSB 2018 at 0.5 um/px | images | patches above the limit | nuclei | P / R / F1')
    for split in ('val', 'train'):
        groups = {'median patch above the limit': [], 'median patch below it': []}
        for record in read_entry(f'masks:{args.dsb}/masks,images={args.dsb}/images,mpp=auto,split={split}'):
            blur = patch_blur(rescale(record, 0.5).load(), 0, 0, 0.5)[:, 4]
            if len(blur):
                groups[list(groups)[int(np.median(blur) <= BLUR_LIMIT)]].append((record, blur))
        for name, members in groups.items():
            held = centroid_figures(model, [r for r, _ in members], args.thresholds)
            blur = np.concatenate([b for _, b in members])
            row = {'set': f'DSB {split}', 'group': name, 'images': len(members),
                   'out_of_focus': float(np.mean(blur > BLUR_LIMIT)), 'figures': held}
            figures.append(row)
            print(f"{split}, {name} | {len(members)} | {100 * row['out_of_focus']:.0f} % | {held[0]['n_gt']} | "
                  f"{prf(held)}", flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=2)


if __name__ == '__main__':
    main()
