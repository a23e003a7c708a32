"""Training samples: where labelled tiles come from, and how they are augmented.

A sample is ``(image, boxes)``: an RGB uint8 H x W x 3 array and float32 N x 4 boxes (x1, y1, x2, y2, pixel edges);
or, for real labels (``training_data``), ``(image, boxes, has_extent, cell_types)``: bool N, False for a nucleus
labelled by a dot only (its box is a prior square around the dot, for matching only: ``targets``), and int64 N, the
index of its cell type, -1 where unknown. A two-part sample's nuclei all have an extent and no known cell type.
"""

import glob
import json
import os

import cv2
import numpy as np
import torch

from .annotation import annotation_to_boxes
from .errors import CellRCNNError, histomicstk
from .model import to_tensor
from .synthetic import VISIBLE_FRACTION

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
#: JPEG qualities (lowest, highest) an out-of-focus training crop is stored at, as scanners store their tiles
RESCAN_QUALITY = (70, 95)


def visible_boxes(boxes, height, width, min_fraction=VISIBLE_FRACTION):
    """``(boxes clipped to the image, float32; mask of those to keep)``: a box is kept when at least
    ``min_fraction`` of its area (and some area) lies inside the image."""
    if not len(boxes):
        return boxes.reshape(0, 4).astype(np.float32), np.zeros(0, dtype=bool)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside > 0) & (inside >= min_fraction * area)
    return clipped.astype(np.float32), keep


def read_image(path):
    """An 8-bit RGB image file as H x W x 3 uint8 (an alpha channel is dropped); anything else is refused."""
    if not os.path.isfile(path):
        raise CellRCNNError(f'image not found: {path}')
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CellRCNNError(f'cannot read image {path} (not an image file, or a format OpenCV cannot decode)')
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise CellRCNNError(f'{path} is not an 8-bit RGB image ({channels} channel(s) of {image.dtype})')
    return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)


def load_annotated_folder(folder, annotation_name=None, point_box_size=None):
    """Images with DSA annotation JSON beside them (``name.png`` + ``name.json`` or ``name.png.json``).

    The annotations' rectangles (or points, given point_box_size in px) are the nuclei of the image.
    """
    samples = []
    for path in sorted(glob.glob(os.path.join(folder, '*'))):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        candidates = [path + '.json', os.path.splitext(path)[0] + '.json']
        annotation_path = next((c for c in candidates if os.path.exists(c)), None)
        if annotation_path is None:
            continue
        try:
            with open(annotation_path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise CellRCNNError(f'cannot read annotation file {annotation_path}: {exc}') from None
        boxes = annotation_to_boxes(doc, name=annotation_name, point_box_size=point_box_size)
        samples.append((read_image(path), boxes))
    if not samples:
        raise CellRCNNError(f'no images with DSA annotation JSON files found in {folder}')
    return samples


def labelled_set(data=None, seed=2000, count=200, tile_size=256, mpp=0.5, annotation_name=None,
                 point_box_size=None, scale=None):
    """Samples from a folder of images with DSA annotation JSON, or ``count`` synthetic tiles from ``seed`` (drawn
    at scales in ``scale``, see ``synthetic.make_dataset``)."""
    if data:
        return load_annotated_folder(data, annotation_name, point_box_size)
    from .synthetic import make_dataset
    return make_dataset(seed, count, size=tile_size, mpp=mpp, scale=scale)


def rescanned(image, sigma_px, quality):
    """``image`` as a scanner out of focus would store it: blurred by a Gaussian of ``sigma_px`` pixels (none at 0),
    then through a JPEG at ``quality``."""
    if sigma_px > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigma_px)
    ok, data = cv2.imencode('.jpg', np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


class Augmenter:
    """Random flips, 90 degree rotations, scale jitter, stain jitter (histomicstk), focus and a crop to the tile
    size.

    Scale: uniform in ``1 +- scale_jitter``, or log-uniform in ``scale_range`` (low, high) when given. Stain:
    Tellez et al.'s jitter of the haematoxylin and eosin concentrations, ``stain_sigma`` = (multiplicative sigma,
    additive sigma). Focus: ``blur`` = (share, sigma): that share of the crops is blurred by a Gaussian of a sigma
    drawn uniformly up to ``sigma`` pixels and stored as JPEG (:func:`rescanned`, quality in
    :data:`RESCAN_QUALITY`). Called with ``nuclei`` (a tuple of per-box arrays), it returns them for the boxes it
    keeps.
    """

    def __init__(self, tile_size, scale_jitter=0.15, stain_sigma=(0.15, 0.1), flips=True, scale_range=None,
                 blur=None):
        self.tile_size = tile_size
        self.scale_jitter = scale_jitter
        self.scale_range = scale_range
        self.stain_sigma = stain_sigma
        self.flips = flips
        self.blur = blur if blur and blur[0] > 0 else None
        stain_color_map = histomicstk('histomicstk.preprocessing.color_deconvolution').stain_color_map
        self._stain_matrix = np.array([stain_color_map['hematoxylin'], stain_color_map['eosin'],
                                       stain_color_map['null']]).T

    def __call__(self, image, boxes, rng, nuclei=None):
        if self.scale_range:
            low, high = np.log(self.scale_range)
            image, boxes = self._rescale(image, boxes, float(np.exp(rng.uniform(low, high))))
        elif self.scale_jitter:
            image, boxes = self._rescale(image, boxes, rng.uniform(1 - self.scale_jitter, 1 + self.scale_jitter))
        image, boxes, kept = self._crop(image, boxes, rng)
        if self.blur and rng.random() < self.blur[0]:
            low, high = RESCAN_QUALITY
            image = rescanned(image, rng.uniform(0, self.blur[1]), rng.integers(low, high + 1))
        if self.flips:
            image, boxes = self._flip_rotate(image, boxes, rng)
        if self.stain_sigma:
            image = self._stain(image, rng)
        if nuclei is None:
            return np.ascontiguousarray(image), boxes
        return np.ascontiguousarray(image), boxes, tuple(np.asarray(a)[kept] for a in nuclei)

    @staticmethod
    def _rescale(image, boxes, factor):
        h, w = image.shape[:2]
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        scale = np.array([size[0] / w, size[1] / h] * 2, dtype=np.float32)
        return image, boxes * scale

    def _crop(self, image, boxes, rng):
        """A tile_size crop at a random place; smaller images are padded with white glass."""
        t = self.tile_size
        h, w = image.shape[:2]
        if h < t or w < t:
            padded = np.full((max(h, t), max(w, t), 3), 255, np.uint8)
            padded[:h, :w] = image
            image, h, w = padded, max(h, t), max(w, t)
        y = int(rng.integers(0, h - t + 1))
        x = int(rng.integers(0, w - t + 1))
        shifted = boxes - np.array([x, y, x, y], dtype=np.float32)
        clipped, kept = visible_boxes(shifted, t, t)
        return image[y:y + t, x:x + t], clipped[kept], kept

    @staticmethod
    def _flip_rotate(image, boxes, rng):
        h, w = image.shape[:2]
        if rng.random() < 0.5:
            image = image[:, ::-1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
        if rng.random() < 0.5:
            image = image[::-1]
            boxes = np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], axis=1)
        if rng.random() < 0.5:  # transpose: with the flips, all eight symmetries of the square
            image = image.transpose(1, 0, 2)
            boxes = boxes[:, [1, 0, 3, 2]]
        return image, boxes.astype(np.float32)

    def _stain(self, image, rng):
        """Tellez et al.'s stain concentration jitter, through histomicstk's colour deconvolution."""
        perturb_stain_concentration = histomicstk(
            'histomicstk.preprocessing.augmentation.color_augmentation').perturb_stain_concentration
        color_deconvolution = histomicstk('histomicstk.preprocessing.color_deconvolution').color_deconvolution
        stains = color_deconvolution(image, self._stain_matrix).Stains.astype(float)
        state = np.random.get_state()
        np.random.seed(int(rng.integers(2 ** 31)))  # histomicstk draws from numpy's global generator
        try:
            return perturb_stain_concentration(stains, self._stain_matrix, sigma1=self.stain_sigma[0],
                                               sigma2=self.stain_sigma[1])
        finally:
            np.random.set_state(state)


class TileDataset(torch.utils.data.Dataset):
    """Labelled samples, augmented on every read (a fresh draw each epoch, reproducible from the seed).

    ``real_augmenter``: the augmenter of four-part samples (real labels), when they need another (stronger) one.
    A target holds ``boxes`` and ``labels`` (all 1: nucleus), and for four-part samples ``has_extent`` and
    ``cell_types`` (``targets``).
    """

    def __init__(self, samples, augmenter=None, seed=0, real_augmenter=None):
        self.samples = samples
        self.augmenter = augmenter
        self.real_augmenter = real_augmenter
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image, boxes, *nuclei = self.samples[index]
        augmenter = self.real_augmenter if nuclei and self.real_augmenter is not None else self.augmenter
        if augmenter is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, boxes, *nuclei = augmenter(image, boxes, rng, *([tuple(nuclei)] if nuclei else []))
            nuclei = list(nuclei[0]) if nuclei else []
        target = {'boxes': torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
                  'labels': torch.ones(len(boxes), dtype=torch.int64)}
        if nuclei:
            target['has_extent'] = torch.from_numpy(np.asarray(nuclei[0], dtype=bool))
            target['cell_types'] = torch.from_numpy(np.asarray(nuclei[1], dtype=np.int64))
        return to_tensor(image), target


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]
