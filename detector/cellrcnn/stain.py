"""Stain normalisation: each image's colours moved part of the way toward a reference's (Reinhard et al. 2001).

A slide stained paler, bluer or pinker than the tissue a model learnt from loses nuclei (docs/real-tissue.md,
"Stain normalisation"). Reinhard's method matches the mean and standard deviation of each channel of Ruderman's LAB
space (histomicstk's ``rgb_to_lab`` and ``reinhard``): here over the *tissue* pixels of an image or slide
(:class:`StainStats`, from a histogram of their colours), and only ``strength`` of the way (the target is the blend
``strength * reference + (1 - strength) * own``; 1 is histomicstk's ``reinhard``). The reference and strength are
the model's (``ModelConfig.stain_reference``, ``stain_strength``); a model without a reference sees its images as
they are.

:class:`StainNormaliser` applies the transform to the model's float input on its own device: per pixel a 3 x 3
product, a log, an affine map, an exp and a 3 x 3 product (the LAB transform folded into the log-LMS space).
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CellRCNNError

#: Ruderman et al.'s RGB -> LMS cone responses and log-LMS -> LAB decorrelation, as histomicstk's ``rgb_to_lab``
RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402],
                       [0.1967, 0.7244, 0.0782],
                       [0.0241, 0.1288, 0.8444]])
LMS_TO_LAB = np.diag([1 / 3 ** 0.5, 1 / 6 ** 0.5, 1 / 2 ** 0.5]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
#: a pixel whose darkest channel is above this is glass or background, not tissue
BACKGROUND_LEVEL = 215
#: statistics need at least this many tissue pixels; an image with fewer counts all of its pixels
MIN_TISSUE_PIXELS = 100
#: statistics count every pixel's colour in bins of 4 levels a channel (6 bits): they are the same whatever the
#: pixels' order (a tile, flipped or turned, has the same), and cost a count per pixel instead of a logarithm
BITS = 6
#: the transform never multiplies a channel's spread by more than this, nor divides it by more (a nearly uniform
#: image, say, whose spread is tiny)
MAX_GAIN = 4.0


@dataclass(frozen=True)
class StainStats:
    """Mean and standard deviation of the L, A and B channels (Ruderman's LAB) over an image's tissue pixels."""

    mean: tuple
    std: tuple

    @classmethod
    def of(cls, images) -> 'StainStats':
        """The statistics of the tissue pixels of RGB uint8 ``images`` (an iterable, read once) taken together."""
        counts = np.zeros(2 ** (3 * BITS), np.int64)
        for image in images:
            counts += _colour_counts(image)
        lab, tissue = _bin_colours()
        if counts[tissue].sum() >= MIN_TISSUE_PIXELS:
            counts = np.where(tissue, counts, 0)
        total = counts.sum()
        if total == 0:
            raise CellRCNNError('no pixels to take stain statistics from')
        mean = counts @ lab / total
        std = np.sqrt(np.maximum(counts @ lab ** 2 / total - mean ** 2, 0))
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    @classmethod
    def typical(cls, images) -> 'StainStats':
        """The mean of each image's own statistics: the stain of a typical one of ``images`` (a reference)."""
        stats = [cls.of([image]) for image in images]
        if not stats:
            raise CellRCNNError('no images to take a stain reference from')
        return cls(tuple(np.mean([s.mean for s in stats], axis=0).tolist()),
                   tuple(np.mean([s.std for s in stats], axis=0).tolist()))

    def to_tuple(self) -> tuple:
        """The six numbers ``ModelConfig.stain_reference`` holds: the means, then the standard deviations."""
        return tuple(self.mean) + tuple(self.std)

    @classmethod
    def from_tuple(cls, values) -> 'StainStats':
        return cls(tuple(values[:3]), tuple(values[3:]))


def _colour_counts(image):
    """How many pixels of an RGB uint8 image fall in each colour bin (:data:`BITS` a channel)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CellRCNNError(f'stain statistics need an RGB uint8 image, not {image.dtype} {image.shape}')
    drop = 8 - BITS
    bins = image >> drop
    codes = (bins[..., 0].astype(np.int32) << (2 * BITS)) | (bins[..., 1].astype(np.int32) << BITS) | bins[..., 2]
    return np.bincount(codes.ravel(), minlength=2 ** (3 * BITS))


@functools.cache
def _bin_colours():
    """``(LAB of each colour bin's centre (float64 bins x 3), whether the bin is tissue)``."""
    side = 2 ** BITS
    centres = (np.arange(side) + 0.5) * (256 / side)
    rgb = np.stack(np.meshgrid(centres, centres, centres, indexing='ij'), axis=-1).reshape(-1, 3)
    lab = np.log(rgb @ RGB_TO_LMS.T) @ LMS_TO_LAB.T
    return lab, rgb.min(axis=1) <= BACKGROUND_LEVEL


class StainNormaliser:
    """Moves an image's LAB statistics ``strength`` of the way to ``reference``'s (a :class:`StainStats`)."""

    def __init__(self, reference: StainStats, strength: float):
        self.reference, self.strength = reference, strength

    @classmethod
    def of(cls, config) -> 'StainNormaliser | None':
        """The normaliser of a ``ModelConfig``; None for a model without a stain reference."""
        if not config.stain_reference:
            return None
        return cls(StainStats.from_tuple(config.stain_reference), config.stain_strength)

    def _log_lms_map(self, source):
        """``(A, c)``: the transform as ``log LMS' = A @ log LMS + c`` (float64)."""
        own_mean, own_std = np.array(source.mean), np.array(source.std)
        target_mean = self.strength * np.array(self.reference.mean) + (1 - self.strength) * own_mean
        target_std = self.strength * np.array(self.reference.std) + (1 - self.strength) * own_std
        gain = np.clip(target_std / np.maximum(own_std, 1e-12), 1 / MAX_GAIN, MAX_GAIN)
        lab_to_lms = np.linalg.inv(LMS_TO_LAB)
        return lab_to_lms @ np.diag(gain) @ LMS_TO_LAB, lab_to_lms @ (target_mean - own_mean * gain)

    def __call__(self, image: torch.Tensor, source: StainStats) -> torch.Tensor:
        """``image`` (float RGB in [0, 1], 3 x H x W, any device) normalised from its stain ``source``."""
        matrix, offset = self._log_lms_map(source)
        to_lms = torch.as_tensor(RGB_TO_LMS * 255, dtype=torch.float32, device=image.device)
        to_rgb = torch.as_tensor(np.linalg.inv(RGB_TO_LMS) / 255, dtype=torch.float32, device=image.device)
        matrix = torch.as_tensor(matrix, dtype=torch.float32, device=image.device)
        offset = torch.as_tensor(offset, dtype=torch.float32, device=image.device)
        height, width = image.shape[-2:]
        pixels = image.float().reshape(3, -1)
        log_lms = torch.log(torch.clamp_min(to_lms @ pixels, float(np.finfo(np.float32).tiny)))
        lms = torch.exp(matrix @ log_lms + offset[:, None])
        return torch.clamp(to_rgb @ lms, 0, 1).reshape(3, height, width)

    def normalise_image(self, image: np.ndarray) -> np.ndarray:
        """An RGB uint8 image normalised from its own statistics, as RGB uint8 (training images)."""
        from .model import to_tensor

        out = self(to_tensor(image), StainStats.of([image]))
        return (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
