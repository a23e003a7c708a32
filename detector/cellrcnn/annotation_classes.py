"""Cell types learnt from HistomicsUI annotations (``cellrcnn train-girder --cell-types``, the TrainCellDetector
task): the model configuration they give, which annotations hold the nuclei, how many nuclei of each type there are,
the types' colours, the held-out slides as labelled images for the per-type figures, and the model card's section.

A nucleus' class is its label (else its style group), its style group, or the name of its annotation
(``class_from``, :func:`cellrcnn.annotation.annotation_to_nuclei`); a cell type ``NAME=LABEL+LABEL`` holds the
nuclei whose class is ``NAME`` or one of its labels (``ModelConfig.cell_type_index``). Nuclei of any other
class, or of none, are of unknown type: they teach detection, not the type.
"""

import dataclasses
from collections import Counter

import numpy as np

from .annotation import class_source
from .colors import hex_color
from .errors import CellRCNNError

#: what the model card says a nucleus' class is, by ``class_from``
_CLASS_WORDS = {'label': "its label (else its style group)", 'group': 'its style group',
                'annotation': 'the name of the annotation holding it'}


def typed_config(config, train_config, class_from):
    """The model configuration ``config`` (the starting model's) with the cell types ``train_config``
    (``train.TrainConfig``) asks for, checked, or ``config`` itself when it names none (the starting model's own
    types are then learnt, if it has any). One-line CellRCNNError for an unknown ``class_from``, or for
    ``class_from='annotation'`` without cell types."""
    class_source(class_from)
    if train_config.cell_types:
        config = dataclasses.replace(config, **train_config.cell_type_settings()).validate()
    if class_from == 'annotation' and not config.cell_types:
        raise CellRCNNError('classes from annotation names need --cell-types: the names of the annotations that '
                            'hold each type')
    return config


def annotation_names(annotation_name, config, class_from):
    """The names of the annotations that hold the nuclei: ``annotation_name`` (None: none) and, when classes come
    from annotation names, every name and label of ``config``'s cell types."""
    names = [annotation_name] if annotation_name else []
    if class_from == 'annotation':
        names += list(config.cell_type_index())
    return tuple(dict.fromkeys(names))


def type_counts(slides, config):
    """How many nuclei of each of ``config``'s cell types ``slides`` (:class:`~cellrcnn.labelled_slides.LabelledSlide`
    with their nuclei read) hold, and how many of unknown type: ``(int array K, int)``."""
    index = config.cell_type_index()
    types = np.array([index.get(c, -1) for s in slides for c in s.classes], np.int64)
    return np.bincount(types[types >= 0], minlength=len(config.cell_types)), int((types < 0).sum())


def check_examples(train_slides, config, class_from):
    """A one-line CellRCNNError when a cell type of ``config`` has no nucleus on the training slides, naming the
    classes there."""
    counts, _ = type_counts(train_slides, config)
    empty = [name for name, n in zip(config.cell_types, counts) if not n]
    if empty:
        found = Counter(c for s in train_slides for c in s.classes)
        listed = ', '.join(f'{c!r} ({n})' if c is not None else f'no class ({n})' for c, n in found.most_common(12))
        raise CellRCNNError(f'no annotated nucleus of cell type {", ".join(map(repr, empty))} on the training '
                            f'slides (class from {class_from}); classes there: {listed or "none"}')


def type_colors(slides, config):
    """One ``#rrggbb`` colour per cell type of ``config``: the ``lineColor`` its nuclei on ``slides`` share, else
    (none, several, or one some nuclei lack) the palette's (``train.CELL_TYPE_PALETTE``)."""
    from .train import CELL_TYPE_PALETTE

    index = config.cell_type_index()
    seen = [set() for _ in config.cell_types]
    for slide in slides:
        for cls, color in zip(slide.classes, slide.colors):
            if index.get(cls, -1) >= 0:
                seen[index[cls]].add(hex_color(color))
    return tuple(next(iter(colors)) if len(colors) == 1 and None not in colors
                 else CELL_TYPE_PALETTE[i % len(CELL_TYPE_PALETTE)] for i, colors in enumerate(seen))


def sample_records(samples, config):
    """Four-part samples of training or held-out slides (``labelled_slides.region_samples`` with a type index) as
    labelled images (``labels.LabelledImage`` at ``config.mpp``, classes named by ``config``'s cell types), for
    :mod:`cellrcnn.evaluate`'s functions on records."""
    from .boxes import box_centres
    from .labels.record import LabelledImage

    return [LabelledImage(image, image.shape[:2], config.mpp, box_centres(boxes), boxes,
                          [config.cell_types[t] if t >= 0 else None for t in types], 'slides', f'tile {i}')
            for i, (image, boxes, _, types) in enumerate(samples)]


def card_lines(config, class_from, metrics, train_slides, heldout_slides, radius_um):
    """The model card's section on the cell types (markdown lines): where classes came from, each type's labels,
    colour, nuclei and held-out figures (``metrics``: :func:`cellrcnn.point_metrics.centroid_metrics` with types),
    and the held-out confusion matrix."""
    names = config.cell_types
    trained, trained_unknown = type_counts(train_slides, config)
    held, held_unknown = type_counts(heldout_slides, config)
    lines = ['## Cell types',
             f'A nucleus\' class is {_CLASS_WORDS[class_from]}; nuclei of another class or of none '
             f'({trained_unknown} training, {held_unknown} held out) taught detection only. Held-out figures: a '
             f'detection matches a nucleus when its box centre lies within {radius_um:g} µm of the nucleus\' centre, '
             'one to one, at the operating point; a matched nucleus of another type counts against both types.', '']
    if config.cell_type_bias:
        lines += ['Cell-type bias (added to the classifier\'s logits; the best mean per-type F1 on the training '
                  'slides\' nuclei): ' + ', '.join(f'{n} {b:+.1f}' for n, b in zip(names, config.cell_type_bias))
                  + '.', '']
    lines += ['| cell type | classes | colour | training nuclei | held-out nuclei | precision | recall | F1 |',
              '|---|---|---|---|---|---|---|---|']
    for i, name in enumerate(names):
        m = metrics['types'][i] if 'types' in metrics else None
        figures = f"{m['precision']:.3f} | {m['recall']:.3f} | **{m['f1']:.3f}**" if m else '- | - | -'
        lines.append(f"| {name} | {', '.join((name, *config.cell_type_labels[i]))} | `{config.cell_type_colors[i]}` | "
                     f'{trained[i]} | {held[i]} | {figures} |')
    if 'confusion' in metrics:
        lines += ['', 'Held-out confusion (rows: truth, then no nucleus; columns: detected type, then missed):', '',
                  f"| truth \\ detected | {' | '.join(names)} | missed |", '|---' * (len(names) + 2) + '|']
        lines += [f"| {label} | {' | '.join(map(str, row))} |"
                  for label, row in zip([*names, 'no nucleus'], metrics['confusion'])]
    return lines + ['']
