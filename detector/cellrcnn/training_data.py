"""What ``cellrcnn train`` learns from: ``--data`` entries of real labels and synthetic tiles, mixed by weight.

A *source* is one ``--data`` entry (``cellrcnn.labels`` reads it), or the synthetic tiles. Each source has a
sampling weight (``weight=W`` in the entry, default 1; ``TrainConfig.synthetic_weight`` for the synthetic tiles):
a training draw picks a source with probability ``weight / sum(weights)`` and one of its images uniformly, whatever
the source's size. A weight of 0 leaves a source out.

Real records become four-part samples (``samples``) at the model's analysis scale (``labels.rescale`` to
``ModelConfig.mpp``): nuclei with a box keep it; a dot-only nucleus gets a square of ``TrainConfig.dot_box_um``
(or ``point_box_size`` px) around its dot,
used only to match anchors and proposals (``targets``: it teaches no box regression), unless a teacher model
(``TrainConfig.dot_boxes_from``) detects it and gives it that detection's box (``dot_boxes``); a nucleus' class
becomes the index of the cell type whose name or ``cell_type_labels`` hold it, else -1 (unknown).

Held out: an entry with ``split=NAME`` trains on that split; its other splits (of its ``splits=`` file, or of the
seeded split) are the held-out images reported after training (:func:`held_out_entries`).
"""

import os

import numpy as np
import torch

from .dot_boxes import teacher_boxes
from .errors import CellRCNNError
from .labels import DEFAULT_SPLIT, detect_format, parse_entry, read_entry, read_splits, rescale
from .stain import StainNormaliser, StainStats


def entry_weight(entry):
    """The sampling weight of a ``--data`` entry: its ``weight=`` (a number >= 0), default 1."""
    value = parse_entry(entry)[2].get('weight', '1')
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not 0 <= weight < float('inf'):
        raise CellRCNNError(f'--data {entry}: weight must be a number >= 0, not {value!r}')
    return weight


def held_out_entries(entry):
    """The entries of the splits of ``entry`` it does not train on (``split=`` swapped); [] without ``split=``."""
    _, _, options = parse_entry(entry)
    if 'split' not in options:
        return []
    names = read_splits(options['splits']).keys() if 'splits' in options else DEFAULT_SPLIT.keys()
    head, *pairs = entry.split(',')
    kept = [p for p in pairs if p.partition('=')[0].strip() not in ('split', 'weight')]
    return [','.join([head, *kept, f'split={name}']) for name in names if name != options['split']]


def real_samples(records, mpp, cell_type_index, dot_box_px):
    """Four-part samples (``samples``) of labelled records at ``mpp`` um/px; ``cell_type_index``: class name ->
    cell type index (``ModelConfig.cell_type_index``); ``dot_box_px``: the side of a dot's prior square in pixels
    at ``mpp``."""
    samples = []
    for record in records:
        scaled = rescale(record, mpp)
        extent = scaled.has_extent
        half = dot_box_px / 2
        squares = np.concatenate([scaled.points - half, scaled.points + half], axis=1)
        boxes = np.where(extent[:, None], scaled.boxes, squares).astype(np.float32)
        types = np.array([cell_type_index.get(c, -1) for c in scaled.classes], dtype=np.int64)
        samples.append((scaled.load(), boxes, extent, types))
    return samples


def training_sources(cfg, config, device='cpu', log=print):
    """``[(name, samples, weight)]``: every ``--data`` entry of ``cfg`` (a ``TrainConfig``) with weight > 0, then the
    synthetic tiles when their weight is above 0; ``config``: the model's ``ModelConfig`` (scale, cell types). With
    ``cfg.dot_boxes_from``, that model, run on ``device``, boxes the dots it detects (``log`` says how many)."""
    from .synthetic import make_dataset

    teacher = _teacher(cfg.dot_boxes_from, device)
    sources = []
    for entry in cfg.entries:
        weight = entry_weight(entry)
        if weight > 0:
            samples = real_samples(entry_records(entry, cfg, config), config.mpp, config.cell_type_index(),
                                   cfg.dot_box_px(config))
            if teacher is not None:
                samples, boxed, dots = teacher_boxes(samples, teacher, config.mpp, device=device)
                if dots:
                    log(f'{entry}: {boxed} of {dots} dots boxed by {os.path.basename(cfg.dot_boxes_from)}')
            sources.append((entry, stain_normalised(samples, config), weight))
    if cfg.synthetic_share > 0:
        samples = make_dataset(cfg.synthetic_seed, cfg.synthetic_tiles, size=cfg.tile_size, mpp=config.mpp,
                               scale=cfg.synthetic_scale)
        sources.append(('synthetic', stain_normalised(samples, config), cfg.synthetic_share))
    if not sources:
        raise CellRCNNError('nothing to train on: every --data entry and the synthetic tiles have weight 0')
    return sources


def stain_normalised(samples, config):
    """``samples`` with each image normalised from its own stain, as the model of ``config`` sees images at inference
    (``stain``; unchanged for a model without a stain reference). The teacher of ``--dot-boxes-from`` has seen them
    before, as they are: it normalises them itself, to its own reference."""
    normaliser = StainNormaliser.of(config)
    if normaliser is None:
        return samples
    return [(normaliser.normalise_image(image), *rest) for image, *rest in samples]


def stain_reference(entry, config):
    """The stain of a typical image of a ``--data`` entry at the scale of a model of ``config``
    (``StainStats.typical``), as ``ModelConfig.stain_reference`` holds it. The entry is read as training reads it
    (a bare folder of images with DSA JSON at the model's scale)."""
    records = read_entry(_legacy_dsa(entry, None, config.mpp))
    return StainStats.typical(rescale(record, config.mpp).load() for record in records).to_tuple()


def _teacher(path, device):
    """The model at ``path`` on ``device`` (None without a path)."""
    if path is None:
        return None
    from .checkpoint import load_model
    return load_model(path, device)


def entry_records(entry, cfg, config):
    """The labelled images of a ``--data`` entry, for a ``TrainConfig`` ``cfg`` and a model of ``config``."""
    return read_entry(_legacy_dsa(entry, cfg.annotation_name, config.mpp))


def _legacy_dsa(entry, annotation_name, mpp):
    """A dsa entry (``--data FOLDER`` of images with DSA JSON, as before the formats) is read as it always was: its
    images at the model's scale unless it gives ``mpp=``, and only the annotations named ``--annotation-name``
    unless it gives ``annotation=``."""
    fmt, path, options = parse_entry(entry)
    if (fmt or detect_format(path)) != 'dsa':
        return entry
    extra = [] if 'mpp' in options else [f'mpp={mpp}']
    if annotation_name is not None and 'annotation' not in options:
        extra.append(f'annotation={annotation_name}')
    return ','.join([entry, *extra])


def sample_weights(sources):
    """Per sample of the concatenated sources, its draw probability: its source's weight shared by its images."""
    total = sum(weight for _, _, weight in sources)
    return torch.cat([torch.full((len(samples),), weight / total / len(samples), dtype=torch.float64)
                      for _, samples, weight in sources])
