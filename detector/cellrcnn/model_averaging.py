"""Averaging the weights of models fine-tuned from one another (a "model soup": Wortsman et al., ICML 2022).

Two runs that start from the same weights stay in one basin of the loss, and the mean of their weights is often
better than either: on this project's data the bundled stage 5 and the longer stage 6 (model card) each won on
some sets and lost on others, and their mean won on nearly all of them (docs/training.md, "Averaging two runs").
"""

import dataclasses
import math

import torch

from .errors import CellRCNNError

#: the settings that say what the weights mean: two models may be averaged only when these agree. The others
#: (thresholds, proposal limits, the anchor density) are inference settings, taken from the first model.
WEIGHT_SETTINGS = ('backbone', 'backbone_stages', 'backbone_width', 'fpn_channels', 'rpn_levels', 'anchor_sizes',
                   'aspect_ratios', 'anchor_offsets', 'rpn_conv_depth', 'box_head_channels', 'image_mean',
                   'image_std', 'mpp', 'class_names', 'cell_types')


def average_models(models, weights, names=None):
    """The first of ``models``, its weights replaced by the weighted mean of all the models' floating-point weights
    and BatchNorm statistics (``weights``: one positive number per model; normalised). Integer buffers
    (BatchNorm's batch counters) and every inference setting are the first model's. ``names`` name the models in
    errors. A model whose weights mean something else (:data:`WEIGHT_SETTINGS`) is refused in one line."""
    names = names or [f'model {i + 1}' for i in range(len(models))]
    weights = [float(w) for w in weights]
    if len(models) < 2 or len(weights) != len(models) or not all(0 < w < math.inf for w in weights):
        raise CellRCNNError(f'averaging needs two or more models and one positive weight each '
                            f'({len(models)} models, weights {weights})')
    first = models[0]
    reference = dataclasses.asdict(first.config)
    states = [m.state_dict() for m in models]
    for model, state, name in zip(models[1:], states[1:], names[1:]):
        other = dataclasses.asdict(model.config)
        differ = [k for k in WEIGHT_SETTINGS if other[k] != reference[k]]
        if differ:
            raise CellRCNNError(f'{name} cannot be averaged with {names[0]}: their {differ[0]} differ '
                                f'({other[differ[0]]} against {reference[differ[0]]})')
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in states[0].items()}:
            raise CellRCNNError(f'{name} cannot be averaged with {names[0]}: their weights differ in shape')
    largest = max(weights)  # each over the largest first: a sum of weights near the float limit stays finite
    shares = [w / largest for w in weights]
    shares = [share / sum(shares) for share in shares]
    mean = {key: sum(share * s[key].double() for share, s in zip(shares, states)).to(tensor.dtype)
            if tensor.is_floating_point() else tensor for key, tensor in states[0].items()}
    with torch.no_grad():
        first.load_state_dict(mean)
    return first
