"""The one record every label reader returns, the image scale, and rescaling.

Coordinates are continuous pixel coordinates of the image as stored, origin at the top-left corner of the top-left
pixel: pixel (row r, column c) covers [c, c+1) x [r, r+1). Boxes are ``x1, y1, x2, y2`` pixel edges, as everywhere in
cellrcnn (:mod:`cellrcnn.synthetic`, :mod:`cellrcnn.samples`): a nucleus covering columns 3..5 has x1 = 3, x2 = 6.
"""

import dataclasses
import math
import os

import cv2
import numpy as np

from ..errors import CellRCNNError

#: The median nucleus size at any scale, in micrometres, as the geometric mean of its box's sides (sqrt(w * h)).
#: 8.0 um: the median over cellrcnn.synthetic's nuclei (40 tiles of make_dataset(0, ...) at 0.5 um/px: 8.0 um), whose
#: sizes come from textbook histology and from measurements on real 20x H&E (its module docstring); it lies in the
#: middle of the 6-10 um typically quoted for a nucleus' diameter, and is the default point box side of
#: AnnotationTrainingSettings.point_size_um. An image of unknown scale (DSB 2018) gets the um/px at which its median
#: nucleus is this size: :func:`estimate_mpp`.
REFERENCE_NUCLEUS_UM = 8.0
#: the most a labelled image is enlarged to the analysis scale (a 5x image is enlarged 4 times to 20x), and the most
#: pixels it may have then: more is a scale given wrong (``mpp=20`` for a 20x image, boxes in 0-1 coordinates
#: estimated as ``mpp=auto``), which would otherwise fill the memory
MOST_ENLARGEMENT = 8.0
MOST_RESCALED_PIXELS = 400_000_000


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImage:
    """One image and its labelled nuclei.

    Invariants (checked on construction; the arrays are made read-only):

    - ``points``: float32 N x 2 ``x, y``, the centre of every nucleus: a dot's position, or the centre of the
      nucleus' box. Always present, always inside the image (0 <= x <= width, 0 <= y <= height).
    - ``boxes``: float32 N x 4 ``x1, y1, x2, y2`` (pixel edges, x2 > x1, y2 > y1), or a row of NaN for a nucleus
      that was labelled by a dot only and has no extent. :attr:`has_extent` is the mask of real boxes: a training
      loader regresses ``boxes[has_extent]`` and, for the others, can only use the centre (switch box regression
      off, or give them a size prior). NaN, not a made-up size, so that a loader that forgets to do so fails loudly.
      A box may reach past the image's edges (a nucleus cut by them); its point may not.
    - ``classes``: a tuple of N class names, None for a nucleus the source gives no class.
    - ``shape``: the image's (height, width) in pixels; ``mpp`` its micrometres per pixel, None when unknown.
    """

    #: path of the image file, or an RGB uint8 H x W x 3 array (after :func:`rescale`)
    image: object
    shape: tuple
    mpp: float
    points: np.ndarray
    boxes: np.ndarray
    classes: tuple
    #: the label file the nuclei come from (for messages)
    source: str
    #: the image's name: its file name (what split files list)
    name: str

    def __post_init__(self):
        points = np.array(self.points, dtype=np.float32).reshape(-1, 2)
        boxes = np.array(self.boxes, dtype=np.float32).reshape(-1, 4)
        classes = tuple(None if c is None else str(c) for c in self.classes)
        if not len(points) == len(boxes) == len(classes):
            raise CellRCNNError(f'{self.source}: {len(points)} points, {len(boxes)} boxes and {len(classes)} classes')
        nan = np.isnan(boxes)
        if (nan.any(axis=1) != nan.all(axis=1)).any() or not np.isfinite(boxes[~nan]).all():
            raise CellRCNNError(f'{self.source}: a box of {self.name} is partly NaN or infinite')
        extent = ~nan[:, 0]
        flat = np.flatnonzero(extent & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])))
        if len(flat):
            raise CellRCNNError(f'{self.source}: nucleus {flat[0]} of {self.name} has an empty box '
                                f'{boxes[flat[0]].tolist()}')
        height, width = self.shape
        if isinstance(self.image, np.ndarray) and self.image.shape[:2] != (height, width):
            raise CellRCNNError(f'{self.source}: the image array of {self.name} is not {height} x {width} pixels')
        outside = np.flatnonzero(~np.isfinite(points).all(axis=1) | (points[:, 0] < 0) | (points[:, 0] > width)
                                 | (points[:, 1] < 0) | (points[:, 1] > height))
        if len(outside):
            x, y = points[outside[0]].tolist()
            raise CellRCNNError(f'{self.source}: nucleus {outside[0]} at ({x:g}, {y:g}) lies outside the '
                                f'{width} x {height} image {self.name}')
        if self.mpp is not None and not 0 < self.mpp < math.inf:
            raise CellRCNNError(f'{self.source}: the scale of {self.name} must be a positive um/px, not {self.mpp}')
        points.setflags(write=False)
        boxes.setflags(write=False)
        object.__setattr__(self, 'points', points)
        object.__setattr__(self, 'boxes', boxes)
        object.__setattr__(self, 'classes', classes)
        object.__setattr__(self, 'shape', (int(height), int(width)))

    def __len__(self):
        return len(self.points)

    @property
    def has_extent(self):
        """bool N: True where the nucleus has a box, False where it was labelled by a dot only."""
        return ~np.isnan(self.boxes[:, 0])

    def load(self):
        """The image as RGB uint8 H x W x 3 (read from its file, or the array itself)."""
        if isinstance(self.image, np.ndarray):
            return self.image
        from ..samples import read_image

        image = read_image(self.image)
        if image.shape[:2] != self.shape:
            raise CellRCNNError(f'{self.image} changed size since its labels were read')
        return image


class Nuclei:
    """Nuclei collected in source order by a reader, then made a :class:`LabelledImage` (:meth:`record`)."""

    def __init__(self):
        self.points, self.boxes, self.classes = [], [], []

    def dot(self, x, y, cls=None):
        self.points.append((x, y))
        self.boxes.append((math.nan,) * 4)
        self.classes.append(cls)

    def box(self, x1, y1, x2, y2, cls=None):
        self.points.append(((x1 + x2) / 2, (y1 + y2) / 2))
        self.boxes.append((x1, y1, x2, y2))
        self.classes.append(cls)

    def record(self, image, source, mpp=None, file_mpp=None):
        """The :class:`LabelledImage` of ``image`` (a path) with these nuclei; its scale from :func:`resolve_mpp`."""
        height, width = image_shape(image)
        labelled = LabelledImage(image=image, shape=(height, width), mpp=None, points=self.points, boxes=self.boxes,
                                 classes=self.classes, source=os.fspath(source), name=os.path.basename(image))
        return resolve_mpp(labelled, mpp, file_mpp)


def image_shape(path):
    """(height, width) of an image file, from its header (PIL reads no pixels here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise CellRCNNError(f'image not found: {path}') from None
    except (OSError, UnidentifiedImageError) as exc:
        raise CellRCNNError(f'cannot read image {path}: {exc}') from None
    return height, width


def parse_mpp(value, source):
    """A ``mpp`` option: None, ``'auto'``, or a positive number of micrometres per pixel (a string is parsed)."""
    if value is None or value == 'auto':
        return value
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not 0 < mpp < math.inf:
        raise CellRCNNError(f'{source}: mpp must be a positive number of um per pixel or "auto", not {value!r}')
    return mpp


def resolve_mpp(labelled, mpp=None, file_mpp=None):
    """``labelled`` with its scale: ``mpp`` when it is a number (the caller's word wins over the file's), estimated
    from its nuclei when it is ``'auto'`` (:func:`estimate_mpp`), else the label file's own (``file_mpp``, None when
    the format has none)."""
    mpp = parse_mpp(mpp, labelled.source)
    if mpp == 'auto':
        mpp = estimate_mpp(labelled)
    elif mpp is None:
        mpp = file_mpp
    return dataclasses.replace(labelled, mpp=mpp)


def estimate_mpp(labelled, reference_um=REFERENCE_NUCLEUS_UM):
    """The um/px at which the median nucleus of ``labelled`` measures ``reference_um`` (the geometric mean of its box's
    sides, :data:`REFERENCE_NUCLEUS_UM`): ``reference_um / median(sqrt(w * h))`` over its boxes. The estimate is as good
    as the median nucleus is typical: a few nuclei, or a tissue of unusually large or small ones, shift it."""
    boxes = labelled.boxes[labelled.has_extent].astype(np.float64)
    if not len(boxes):
        raise CellRCNNError(f'{labelled.source}: cannot estimate the scale of {labelled.name}: '
                            'none of its nuclei has an extent (give mpp=)')
    size = np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    return float(reference_um / size)


def rescale(labelled, mpp):
    """``labelled`` at ``mpp`` um/px: the image resized (cv2, INTER_AREA to shrink, INTER_LINEAR to enlarge) to
    ``round(size * labelled.mpp / mpp)`` pixels, and its points and boxes scaled by the same factors (the exact ratio
    of the new size to the old along each axis). The result holds the image as an array."""
    if labelled.mpp is None:
        raise CellRCNNError(f'{labelled.source}: the scale of {labelled.name} is unknown; give mpp= or mpp=auto')
    mpp = parse_mpp(mpp, labelled.source)
    height, width = labelled.shape
    factor = labelled.mpp / mpp
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if factor > MOST_ENLARGEMENT or size[0] * size[1] > MOST_RESCALED_PIXELS:
        raise CellRCNNError(f'{labelled.source}: {labelled.name} at {labelled.mpp:.4g} um/px would be enlarged '
                            f'{factor:.3g} times, to {size[0]}x{size[1]} px, for the analysis scale of {mpp:g} um/px: '
                            'is its scale right? (mpp= takes micrometres per pixel, 0.5 at 20x, not a '
                            'magnification; mpp=auto needs boxes in pixels)')
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(labelled.load(), size, interpolation=interpolation)
    sx, sy = size[0] / width, size[1] / height
    return LabelledImage(image=image, shape=(size[1], size[0]), mpp=mpp, points=labelled.points * [sx, sy],
                         boxes=labelled.boxes * [sx, sy, sx, sy], classes=labelled.classes, source=labelled.source,
                         name=labelled.name)
