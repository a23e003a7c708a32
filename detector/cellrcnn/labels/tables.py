"""Tables of nuclei for many images: dots or boxes in JSON (``{image: [rows]}``), dots in CSV.

Every coordinate is in pixels of the image as stored (see :mod:`cellrcnn.labels.record`); image names are file names
in the ``images`` folder (:func:`find_image`). No format here holds a scale: ``mpp`` is the caller's (a number, or
``'auto'`` to estimate it from boxes; None leaves it unknown).
"""

import csv
import math
import os

from ..annotation import read_json_file
from ..errors import CellRCNNError
from ..samples import IMAGE_EXTENSIONS
from .record import Nuclei


def find_image(folder, name, source):
    """The image ``name`` in ``folder``: the file of that name, else ``name`` (or ``name`` less its extension) with
    an image extension added (``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``)."""
    candidates = [name] + [base + ext for base in (name, os.path.splitext(name)[0]) for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise CellRCNNError(f'{source}: no image {name!r} in {folder}')


def _number(value):
    """A finite float from a JSON or CSV value; NaN for anything else (booleans included)."""
    if isinstance(value, bool):
        return math.nan
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _row(row, size):
    """(coordinates, class) of a table row ``[c1, ..., c<size>]`` or ``[c1, ..., c<size>, class]``; None when it is
    malformed."""
    if not isinstance(row, (list, tuple)) or len(row) not in (size, size + 1):
        return None
    coords = [_number(v) for v in row[:size]]
    cls = row[size] if len(row) > size else None
    if any(math.isnan(c) for c in coords) or not (cls is None or isinstance(cls, (str, int))):
        return None
    return coords, (None if cls is None or cls == '' else str(cls))


def _read_table_json(path, images, mpp, kind):
    table = read_json_file(path, 'label file')
    size, shape = (2, '[x, y]') if kind == 'dot' else (4, '[x1, y1, x2, y2]')
    if not isinstance(table, dict):
        raise CellRCNNError(f'{path}: expected {{image name: [{shape} rows]}}, not a JSON {type(table).__name__}')
    records = []
    for name, rows in table.items():
        if not isinstance(rows, list):
            raise CellRCNNError(f'{path}: image {name!r}: expected a list of {shape} rows')
        nuclei = Nuclei()
        add = nuclei.dot if kind == 'dot' else nuclei.box
        for i, row in enumerate(rows):
            parsed = _row(row, size)
            if parsed is None:
                raise CellRCNNError(f'{path}: image {name!r} row {i}: expected {shape} or {shape[:-1]}, class], '
                                    f'got {str(row)[:80]}')
            add(*parsed[0], parsed[1])
        records.append(nuclei.record(find_image(images, name, path), path, mpp))
    return records


def read_points_json(path, images, mpp=None):
    """Dots, with optional classes: a JSON file ``{image name: [[x, y] or [x, y, class], ...]}`` (BRCA-M2C's
    points.json). x, y: the nucleus' centre in pixels of the stored image. The nuclei have no extent (NaN boxes).

    :param images: the folder of the images named in the file.
    :param mpp: um/px of the images (the format has none): a number, ``'auto'`` is refused (dots have no size), None
        (unknown).
    :returns: a list of :class:`~cellrcnn.labels.record.LabelledImage`, in the file's order.
    """
    return _read_table_json(path, images, mpp, 'dot')


def read_boxes_json(path, images, mpp=None):
    """Boxes, with optional classes: a JSON file ``{image name: [[x1, y1, x2, y2] or [x1, y1, x2, y2, class], ...]}``
    (DSB 2018's boxes.json): pixel edges of the stored image (a nucleus covering columns 3..5 has x1 = 3, x2 = 6).

    :param images: the folder of the images named in the file.
    :param mpp: um/px of the images: a number, ``'auto'`` (estimated per image from its boxes), or None (unknown).
    """
    return _read_table_json(path, images, mpp, 'box')


def read_csv(path, images, mpp=None):
    """Dots, with optional classes, from a CSV file with a header row naming its columns (case-insensitive, in any
    order; other columns are ignored): ``x``, ``y``, optionally ``class`` and ``image``.

    - With an ``image`` column, one file holds the dots of many images: ``image`` is the image's file name in
      ``images`` (its extension may be left out), and the images come in the order they first appear.
    - Without one, the file holds the dots of one image: the image named as the file, ``a.csv`` -> ``a.png`` (or any
      image extension) in ``images``.

    x, y: the nucleus' centre in pixels of the stored image; an empty class is no class. Comma-separated, UTF-8.
    :param mpp: um/px of the images (the format has none): a number or None (unknown).
    """
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
            if 'x' not in columns or 'y' not in columns:
                raise CellRCNNError(f'{path}: the CSV header must name columns x and y '
                                    f'(found: {", ".join(columns) or "no header"})')
            single = os.path.splitext(os.path.basename(path))[0]
            by_image = {}
            for row in reader:
                name = (row[columns['image']] or '').strip() if 'image' in columns else single
                x, y = _number(row[columns['x']]), _number(row[columns['y']])
                if math.isnan(x) or math.isnan(y) or not name:
                    raise CellRCNNError(f'{path} line {reader.line_num}: expected an image name and numbers x, y')
                cls = (row[columns['class']] or '').strip() if 'class' in columns else None
                by_image.setdefault(name, Nuclei()).dot(x, y, cls or None)
    except OSError as exc:
        raise CellRCNNError(f'cannot read {path}: {exc.strerror or exc}') from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CellRCNNError(f'{path} is not a UTF-8 CSV file: {exc}') from None
    if not by_image and 'image' not in columns:
        by_image[single] = Nuclei()  # a field with no nucleus
    return [nuclei.record(find_image(images, name, path), path, mpp) for name, nuclei in by_image.items()]
