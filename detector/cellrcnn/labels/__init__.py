"""Real labels: readers for the formats labelled nuclei come in, all into one record, :class:`LabelledImage`.

Formats (:data:`FORMATS`; each reader's docstring has the details):

- ``points``: JSON ``{image: [[x, y] or [x, y, class], ...]}`` (BRCA-M2C's points.json): dots.
- ``boxes``: JSON ``{image: [[x1, y1, x2, y2] or [x1, y1, x2, y2, class], ...]}`` (DSB 2018's boxes.json): boxes.
- ``csv``: CSV with a header ``x, y[, class][, image]``: dots; one file per image, or one with an image column.
- ``masks``: one label image (PNG / TIFF, 8- to 32-bit, 0 = background) per image (DSB 2018): tight boxes.
- ``imagescope``: Aperio ImageScope XML per image: polygons, rectangles, ellipses (boxes) and markers (dots).
- ``qupath``: QuPath GeoJSON per image: polygons (boxes), points and multipoints (dots).
- ``dsa``: DSA / large_image annotation JSON per image: rectangles, ellipses, circles, closed polylines (boxes) and
  points (dots), read by :func:`cellrcnn.annotation.annotation_to_nuclei`.

Units: every coordinate is in pixels of the image as stored, origin at the top-left corner of the top-left pixel;
boxes are ``x1, y1, x2, y2`` pixel edges (a nucleus covering columns 3..5 has x1 = 3, x2 = 6), as in the rest of
cellrcnn. Every nucleus has a point (its dot, or the centre of its box); a nucleus labelled by a dot has no box: its
row of ``boxes`` is NaN and :attr:`LabelledImage.has_extent` is False.

Scale (``mpp``, um per pixel of the image as stored): given by the caller, read from the file where the format holds
it (ImageScope's ``MicronsPerPixel``), or ``'auto'``: estimated per image so that its median nucleus measures
:data:`REFERENCE_NUCLEUS_UM` (:func:`estimate_mpp`, for images of unknown scale such as DSB 2018's).
:func:`rescale` brings an image and its labels to the analysis scale.

Training takes ``--data`` entries, ``[FORMAT:]PATH[,KEY=VALUE]...`` (:mod:`cellrcnn.labels.entries` has the syntax),
read by :func:`read_entries`; for example::

    points:/data/brca-m2c/points.json,images=/data/brca-m2c/images,mpp=0.5,splits=/data/brca-m2c/splits.json,split=train
    masks:/data/dsb2018-he/masks,images=/data/dsb2018-he/images,mpp=auto,split=train
    /data/slides/annotations,mpp=0.25          (a folder of ImageScope .xml files beside their images)

Bad input (a missing or unreadable file, a mask that is not a label image, a nucleus outside its image, an unknown
format) raises a one-line :class:`cellrcnn.errors.CellRCNNError` naming the file.
"""

from .entries import (
                      DEFAULT_SPLIT,
                      FORMATS,
                      detect_format,
                      parse_entry,
                      read_entries,
                      read_entry,
                      read_format,
                      read_splits,
                      seeded_split,
                      select_split,
)
from .masks import read_label_image, read_mask
from .record import REFERENCE_NUCLEUS_UM, LabelledImage, estimate_mpp, rescale
from .shapes import read_dsa, read_imagescope, read_qupath
from .tables import find_image, read_boxes_json, read_csv, read_points_json

__all__ = ['DEFAULT_SPLIT', 'FORMATS', 'REFERENCE_NUCLEUS_UM', 'LabelledImage', 'detect_format', 'estimate_mpp',
           'find_image', 'parse_entry', 'read_boxes_json', 'read_csv', 'read_dsa', 'read_entries', 'read_entry',
           'read_format', 'read_imagescope', 'read_label_image', 'read_mask', 'read_points_json', 'read_qupath',
           'read_splits', 'rescale', 'seeded_split', 'select_split']
