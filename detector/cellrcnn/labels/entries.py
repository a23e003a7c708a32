"""``--data`` entries: one string names a set of labelled images in any format; and the train / held-out splits.

An entry is ``[FORMAT:]PATH[,KEY=VALUE]...`` (no commas in paths; see :mod:`cellrcnn.labels` for examples):

- ``FORMAT`` (:data:`FORMATS`): ``points`` or ``boxes`` (JSON ``{image: [rows]}``), ``csv``, ``masks``,
  ``imagescope`` (XML), ``qupath`` (GeoJSON), ``dsa`` (annotation JSON). Without it the format is told from ``PATH``:
  ``.xml`` imagescope, ``.geojson`` qupath, ``.csv`` csv, an image file masks, ``.json`` by its contents (GeoJSON
  features, a DSA document, or an ``{image: [rows]}`` table of 2-3 or 4-5 columns); a folder by the label files in it
  (only images: masks).
- ``PATH``: a label file, or a folder of them. A table (points, boxes, csv with an image column) names its images;
  every other file holds the labels of one image, the image of the same name less the label file's extension
  (``a.xml``, ``a.png.xml`` -> ``a.png``; a mask ``a.png`` -> the image ``a.png`` in ``images``).
- ``images=DIR``: the images' folder. Default: a folder ``images`` in or beside the folder of ``PATH`` (``PATH``
  itself when it is a folder), else that folder (masks and their images must be in different folders).
- ``mpp=NUMBER|auto``: um per pixel of the images as stored; ``auto`` estimates it per image from its nuclei
  (:func:`cellrcnn.labels.record.estimate_mpp`). Default: the file's own (ImageScope's ``MicronsPerPixel``), else
  unknown (None).
- ``annotation=NAME`` (dsa only): read only the annotation documents of this name.
- ``split=NAME``: keep only the images of this split: of ``splits=FILE`` (:func:`read_splits`), else of a seeded
  80 / 20 ``train`` / ``val`` split of the entry's images (:func:`seeded_split`, ``seed=N``, default 0).
- ``weight=W``: the entry's sampling weight in training (:mod:`cellrcnn.training_data`); reading ignores it.
"""

import os
import re

import numpy as np

from ..annotation import read_json_file
from ..errors import CellRCNNError
from ..samples import IMAGE_EXTENSIONS
from .masks import read_mask
from .record import parse_mpp
from .shapes import read_dsa, read_imagescope, read_qupath
from .tables import find_image, read_boxes_json, read_csv, read_points_json

#: format -> (reader, extensions of its label files in a folder, whether one file holds the labels of many images)
FORMATS = {
    'points': (read_points_json, ('.json',), True),
    'boxes': (read_boxes_json, ('.json',), True),
    'csv': (read_csv, ('.csv',), True),
    'masks': (read_mask, IMAGE_EXTENSIONS, False),
    'imagescope': (read_imagescope, ('.xml',), False),
    'qupath': (read_qupath, ('.geojson', '.json'), False),
    'dsa': (read_dsa, ('.json',), False),
}
_KEYS = ('images', 'mpp', 'annotation', 'split', 'splits', 'seed', 'weight')
#: the seeded split of a set without a split file: fraction of the images in each split
DEFAULT_SPLIT = {'train': 0.8, 'val': 0.2}


def parse_entry(entry):
    """``(format or None, path, {key: value})`` of a ``--data`` entry (the module docstring gives the syntax)."""
    head, *pairs = entry.split(',')
    prefix = re.match(r'([A-Za-z]\w+):(.*)$', head)  # one letter before ':' is a Windows drive, not a format
    fmt, path = (prefix.group(1), prefix.group(2)) if prefix else (None, head)
    if fmt is not None and fmt not in FORMATS:
        raise CellRCNNError(f'--data {entry}: unknown format {fmt!r} (known: {", ".join(FORMATS)})')
    options = {}
    for pair in pairs:
        key, eq, value = (part.strip() for part in pair.partition('='))
        if not eq or key not in _KEYS or key in options:
            raise CellRCNNError(f'--data {entry}: {pair!r} is not a KEY=VALUE option, or repeats one '
                                f'(keys: {", ".join(_KEYS)})')
        options[key] = value
    if not path:
        raise CellRCNNError(f'--data {entry}: no path')
    if ('splits' in options or 'seed' in options) and 'split' not in options:
        raise CellRCNNError(f'--data {entry}: splits= and seed= choose a split: give split=NAME too')
    if 'seed' in options and not re.fullmatch(r'\d+', options['seed']):
        raise CellRCNNError(f'--data {entry}: seed must be a whole number, not {options["seed"]!r}')
    parse_mpp(options.get('mpp'), f'--data {entry}')
    return fmt, path, options


def _json_format(path):
    data = read_json_file(path, 'label file')
    items = data if isinstance(data, list) else [data]
    if any(isinstance(d, dict) and d.get('type') in ('Feature', 'FeatureCollection') for d in items):
        return 'qupath'
    if any(isinstance(d, dict) and ('elements' in d or 'annotation' in d) for d in items):
        return 'dsa'
    rows = [row for rows in data.values() if isinstance(rows, list) for row in rows] if isinstance(data, dict) else []
    width = len(rows[0]) if rows and isinstance(rows[0], list) else None
    if width in (2, 3, 4, 5):
        return 'points' if width < 4 else 'boxes'
    raise CellRCNNError(f'cannot tell the format of {path}; write FORMAT:PATH (formats: {", ".join(FORMATS)})')


def detect_format(path):
    """The format of a label file or folder (the module docstring says how); a one-line error when it is unclear."""
    by_extension = {'.xml': 'imagescope', '.geojson': 'qupath', '.csv': 'csv',
                    **dict.fromkeys(IMAGE_EXTENSIONS, 'masks')}
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        labels = sorted({os.path.splitext(n)[1].lower() for n in names} & {'.xml', '.geojson', '.csv', '.json'})
        if len(labels) > 1:
            raise CellRCNNError(f'{path} holds label files of several kinds ({", ".join(labels)}); write FORMAT:PATH')
        if labels == ['.json']:
            return _json_format(os.path.join(path, next(n for n in names if n.lower().endswith('.json'))))
        if labels:
            return by_extension[labels[0]]
        if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
            return 'masks'
        raise CellRCNNError(f'{path} holds no label files')
    ext = os.path.splitext(path)[1].lower()
    if ext == '.json':
        return _json_format(path)
    if ext not in by_extension:
        raise CellRCNNError(f'cannot tell the format of {path}; write FORMAT:PATH (formats: {", ".join(FORMATS)})')
    return by_extension[ext]


def _default_images(path):
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    candidates = [os.path.join(folder, 'images'), os.path.join(os.path.dirname(os.path.abspath(folder)), 'images')]
    return next((c for c in candidates if os.path.isdir(c)), folder)


def read_format(fmt, path, images, mpp=None, annotation=None):
    """The :class:`~cellrcnn.labels.record.LabelledImage` records of a label file or folder of ``fmt``."""
    reader, extensions, many = FORMATS[fmt]
    if not os.path.isdir(images):
        raise CellRCNNError(f'{images}: no such folder of images (for {path})')
    files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(extensions)]
             if os.path.isdir(path) else [path])
    if not files:
        raise CellRCNNError(f'{path} holds no {fmt} files ({", ".join(extensions)})')
    if fmt == 'masks' and os.path.samefile(os.path.dirname(os.path.abspath(files[0])), images):
        raise CellRCNNError(f'{path}: the masks and their images must be in different folders (give images=)')
    extra = {'annotation': annotation} if fmt == 'dsa' else {}
    records = []
    for file in files:
        if many:
            records.extend(reader(file, images, mpp))
        else:
            name = os.path.basename(file) if fmt == 'masks' else os.path.splitext(os.path.basename(file))[0]
            records.append(reader(file, find_image(images, name, file), mpp, **extra))
    return records


def read_entry(entry):
    """The labelled images of one ``--data`` entry (the module docstring gives the syntax)."""
    fmt, path, options = parse_entry(entry)
    if not os.path.exists(path):
        raise CellRCNNError(f'{path}: no such file or folder (--data {entry})')
    images = options.get('images') or _default_images(path)
    fmt = fmt or detect_format(path)
    if 'annotation' in options and fmt != 'dsa':
        raise CellRCNNError(f'--data {entry}: annotation= is for dsa files only, not {fmt}')
    records = read_format(fmt, path, images, options.get('mpp'), options.get('annotation'))
    if not records:  # trained on, nothing would be learnt; evaluated, every figure would read perfect
        raise CellRCNNError(f'--data {entry}: it labels no image')
    if 'split' not in options:
        return records
    if 'splits' in options:
        splits = read_splits(options['splits'])
    else:
        splits = seeded_split([r.name for r in records], int(options.get('seed', 0)))
    return select_split(records, splits, options['split'], f'--data {entry}')


def read_entries(entries):
    """The labelled images of a list of ``--data`` entries, in order."""
    return [record for entry in entries for record in read_entry(entry)]


def read_splits(path):
    """``{split: [image names]}`` from a JSON file that holds either that, or ``{image name: split}`` (BRCA-M2C's
    splits.json maps each image to ``"train"`` or ``"val"``)."""
    data = read_json_file(path, 'splits file')
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        splits = {}
        for name, split in data.items():
            splits.setdefault(split, []).append(name)
        return splits
    if isinstance(data, dict) and all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                      for v in data.values()):
        return {split: list(names) for split, names in data.items()}
    raise CellRCNNError(f'{path}: expected {{split: [image names]}} or {{image name: split}}')


def seeded_split(names, seed=0, fractions=DEFAULT_SPLIT):
    """``{split: [image names]}``: the distinct ``names``, sorted, in an order drawn from ``seed``, cut in ``fractions``
    (rounded; the last split takes the rest). The same names and seed give the same split, whatever their order."""
    names = sorted(set(names))
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(fractions.values())
    ends = np.round(np.cumsum(list(fractions.values())) / total * len(names)).astype(int)
    starts = np.concatenate([[0], ends[:-1]])
    return {split: sorted(names[i] for i in order[start:end])
            for split, start, end in zip(fractions, starts, ends)}


def select_split(records, splits, split, source):
    """The ``records`` whose image is in ``splits[split]`` (by file name, or by name less its extension)."""
    if split not in splits:
        raise CellRCNNError(f'{source}: no split {split!r} (splits: {", ".join(map(str, splits))})')
    chosen = set(splits[split])
    kept = [r for r in records if r.name in chosen or os.path.splitext(r.name)[0] in chosen]
    if not kept:
        raise CellRCNNError(f'{source}: none of the images is in split {split!r}')
    return kept
