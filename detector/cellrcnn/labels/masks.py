"""Instance masks: a label image per image (0 = background, every other value one nucleus) -> tight boxes.

A nucleus' box is the extent of its pixels in pixel edges (:mod:`cellrcnn.labels.record`): the pixels of columns
3..5 give x1 = 3, x2 = 6, as :mod:`cellrcnn.synthetic` draws boxes and as DSB 2018's boxes.json holds them (for each
mask there, these boxes are boxes.json's, in the same order). Its point is the centre of that box.
"""

import os

import cv2
import numpy as np
import scipy.ndimage

from ..errors import CellRCNNError
from .record import Nuclei, image_shape

#: JPEG, whose compression changes pixel values: no label image
LOSSY = ('.jpg', '.jpeg', '.jpe', '.jfif')


def read_label_image(path):
    """A label image file as a 2-D array of non-negative integers: PNG (8- or 16-bit, one channel) through OpenCV,
    TIFF (any integer type, one page) through tifffile."""
    if not os.path.isfile(path):
        raise CellRCNNError(f'mask not found: {path}')
    if path.lower().endswith(LOSSY):
        raise CellRCNNError(f'{path}: a mask must be stored losslessly (PNG or TIFF): JPEG changes the nucleus '
                            'numbers at their edges, and each changed number would read as a nucleus')
    if path.lower().endswith(('.tif', '.tiff')):
        import tifffile

        try:
            labels = tifffile.imread(path)
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            raise CellRCNNError(f'cannot read mask {path}: {exc}') from None
    else:
        labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise CellRCNNError(f'cannot read mask {path} (not an image file OpenCV can decode)')
    if labels.ndim != 2:
        raise CellRCNNError(f'{path} is not a label image: it has shape {labels.shape}, not one channel '
                            '(height x width) of nucleus numbers')
    if not np.issubdtype(labels.dtype, np.integer) or (np.issubdtype(labels.dtype, np.signedinteger) and
                                                        labels.min() < 0):
        raise CellRCNNError(f'{path} is not a label image: its pixels are {labels.dtype}, not non-negative integers')
    return labels


def read_mask(path, image, mpp=None):
    """The nuclei of ``image`` from its instance mask ``path`` (same size as the image; 0 = background, each other
    value one nucleus, in any order and not necessarily consecutive): one box (tight, pixel edges, in pixels of the
    stored image) per value, in increasing order of value, no class.

    A mask whose one value covers several separate regions is a binary (semantic) mask, not instance labels, and is
    refused.

    :param mpp: um/px of the image (the format has none): a number, ``'auto'`` (estimated from the boxes), or None.
    :returns: a :class:`~cellrcnn.labels.record.LabelledImage`.
    """
    labels = read_label_image(path)
    values, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape)
    if values[0] != 0:
        compact += 1  # no background pixel: every value is a nucleus
    if len(values[values != 0]) == 1 and cv2.connectedComponents((labels > 0).astype(np.uint8))[0] > 2:
        raise CellRCNNError(f'{path} is a binary mask (one value over separate regions), not instance labels: '
                            'give each nucleus its own value')
    height, width = image_shape(image)
    if labels.shape != (height, width):
        raise CellRCNNError(f'{path}: the mask is {labels.shape[1]} x {labels.shape[0]} pixels, its image {image} '
                            f'{width} x {height}')
    nuclei = Nuclei()
    for rows, cols in scipy.ndimage.find_objects(compact):
        nuclei.box(cols.start, rows.start, cols.stop, rows.stop)
    return nuclei.record(image, path, mpp)
