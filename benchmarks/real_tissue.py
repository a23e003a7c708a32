"""Look at a model on real H&E: detections drawn over full-resolution crops, with counts and nucleus sizes beside
the synthetic ones.

    python benchmarks/real_tissue.py [--model M.pt] [--adapt] [--out real-look/] [--images DIR]

Real images (none of them has nucleus ground truth; counts of misses come from looking at the pictures):

- the bundled CMU-1-Small-Region sample (Aperio, 20x, 0.499 um/px; skin), four 512 x 512 crops: cellular
  dermis, epidermis, keratin with dark strands (hard negatives), rete ridges;
- tiatoolbox 2.1.3's ``data/target_image.png`` (1000 x 1000 H&E carcinoma with a lymphocyte band; no scale is
  stored: 0.25 um/px, a 40x scan, is assumed from its lymphocyte nuclei, 20-24 px across);
- stardist 0.9.2's ``data/images/histo.jpg`` (300 x 500 H&E, dense tumour nuclei; 0.5 um/px assumed likewise).

The last two are taken out of their wheels (``pip download --no-deps``) into ``--images`` when not there yet. Each
image is resampled to the model's resolution (as ``cellrcnn detect`` reads a slide at its analysis magnification),
detected in one tile (with ``--adapt``, after test-time BatchNorm adaptation on that image, as
``cellrcnn detect --adapt-tiles N`` does), and drawn at twice the analysis scale into ``OUT/NAME.png`` (green boxes;
the score threshold
is the model's operating point). The table gives, per image, detections, detections per 100 um x 100 um of
tissue, the median score, and the detected nucleus sizes (sqrt of box area, um: quartiles and the share under 6 um);
then the same for held-out synthetic tiles (ground truth and detections) so the two can be compared. The
``histolytics`` package's images are never used: they are the hidden real-tissue evaluation.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import cv2
import numpy as np

from cellrcnn.adapt import reestimate_batchnorm
from cellrcnn.checkpoint import BUNDLED_MODEL, load_model
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.inference import Detector
from cellrcnn.synthetic import make_dataset

#: (name, x, y) of 512 px crops of the bundled sample at base resolution (20x)
SAMPLE_CROPS = (('cmu-stroma-cells', 850, 650), ('cmu-epidermis', 950, 1650), ('cmu-keratin', 1150, 1050),
                ('cmu-rete-ridges', 1450, 2400))
#: regions (x, y, w, h at the model's resolution) drawn 4x larger as NAME-count-K.png, for counting by eye
COUNT_CROPS = {'tia-carcinoma': ((340, 170, 128, 128), (60, 40, 128, 128)),
               'cmu-stroma-cells': ((200, 90, 128, 128),), 'cmu-keratin': ((280, 0, 160, 160),),
               'stardist-histo': ((180, 90, 128, 128),)}
WHEEL_IMAGES = (('tiatoolbox==2.1.3', 'tiatoolbox/data/target_image.png', 'tia-carcinoma', 0.25),
                ('stardist==0.9.2', 'stardist/data/images/histo.jpg', 'stardist-histo', 0.5))


def wheel_image(requirement, member, folder):
    """A file out of a package's wheel, downloaded once into ``folder`` (the package is not installed)."""
    path = os.path.join(folder, os.path.basename(member))
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', requirement, '-d', tmp],
                           check=True)
            with zipfile.ZipFile(glob.glob(os.path.join(tmp, '*.whl'))[0]) as wheel:
                with open(path, 'wb') as f:
                    f.write(wheel.read(member))
    return path


def real_images(folder):
    """(name, RGB uint8 image, um per px) of every real image."""
    import large_image

    source = large_image.open(SAMPLE_SLIDE)
    mpp = source.getMetadata()['mm_x'] * 1000
    for name, x, y in SAMPLE_CROPS:
        region = {'left': x, 'top': y, 'width': 512, 'height': 512, 'units': 'base_pixels'}
        image, _ = source.getRegion(region=region, format=large_image.constants.TILE_FORMAT_NUMPY)
        yield name, np.ascontiguousarray(image[..., :3]), mpp
    for requirement, member, name, image_mpp in WHEEL_IMAGES:
        image = cv2.imread(wheel_image(requirement, member, folder), cv2.IMREAD_COLOR)
        yield name, cv2.cvtColor(image, cv2.COLOR_BGR2RGB), image_mpp


def at_model_scale(image, mpp, model_mpp):
    factor = mpp / model_mpp
    if abs(factor - 1) < 0.02:
        return image
    size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)


def draw(image, boxes, path, zoom=2, origin=(0, 0)):
    big = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)
    for x1, y1, x2, y2 in np.round((boxes - np.tile(origin, 2)) * zoom).astype(int):
        cv2.rectangle(big, (x1, y1), (x2 - 1, y2 - 1), (0, 255, 0), 1)
    cv2.imwrite(path, big)


def size_row(boxes, mpp):
    if not len(boxes):
        return '-', '-'
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * mpp
    q = np.percentile(side, [25, 50, 75])
    return f'{q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f}', f'{100 * np.mean(side < 6):.0f} %'


def tissue_area_um2(image, mpp):
    od = -np.log10(np.maximum(image.astype(np.float32), 1) / 240).sum(2)
    return float((od > 0.25).sum()) * mpp * mpp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default=BUNDLED_MODEL)
    parser.add_argument('--adapt', action='store_true',
                        help='re-estimate BatchNorm statistics on the image itself before detecting')
    parser.add_argument('--out', default='real-look')
    parser.add_argument('--images', default=os.path.expanduser('~/.cache/cellrcnn-real-images'))
    parser.add_argument('--synthetic', type=int, default=50, help='held-out synthetic tiles to compare (seed 3000)')
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model = load_model(args.model)
    model_mpp = model.config.mpp
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    detector = Detector(model, device='cpu', batch_size=1)
    header = (f'| image | px at {model_mpp} um/px | detections | per 100x100 um tissue | median score '
              '| size um q1/med/q3 | under 6 um |')
    print(header)
    print('|' + ' --- |' * header.count(' | ') + ' --- |')
    for name, image, mpp in real_images(args.images):
        image = at_model_scale(image, mpp, model_mpp)
        model.load_state_dict(weights)
        if args.adapt:
            reestimate_batchnorm(model, [image], detector.device, 1)
        boxes, scores = detector.detect_tiles([image])[0]
        draw(image, boxes, os.path.join(args.out, f'{name}.png'))
        for k, (x, y, w, h) in enumerate(COUNT_CROPS.get(name, ())):
            draw(image[y:y + h, x:x + w], boxes, os.path.join(args.out, f'{name}-count-{k}.png'), 4, (x, y))
        density = len(boxes) / max(tissue_area_um2(image, model_mpp), 1) * 1e4
        sizes, small = size_row(boxes, model_mpp)
        median = f'{np.median(scores):.2f}' if len(scores) else '-'
        print(f'| {name} | {image.shape[1]}x{image.shape[0]} | {len(boxes)} | {density:.1f} | {median} | {sizes} '
              f'| {small} |')
    model.load_state_dict(weights)
    tiles = make_dataset(3000, args.synthetic, mpp=model_mpp)
    truth = np.concatenate([b for _, b in tiles])
    found = detector.detect_tiles([t for t, _ in tiles])
    detected = np.concatenate([b for b, _ in found])
    for label, boxes in (('synthetic truth', truth), ('synthetic detections', detected)):
        sizes, small = size_row(boxes, model_mpp)
        print(f'| {label} ({args.synthetic} tiles) | 256x256 | {len(boxes)} | - | - | {sizes} | {small} |')
    print(f'pictures in {args.out}/')


if __name__ == '__main__':
    main()
