"""BatchNorm statistics: re-estimated on a set of tiles (after training, and per slide before detecting it: test-time
adaptation, ``slide_adaptation``), and read or set as plain arrays (to restore them, or to send them to Dask workers).

Only the backbone has BatchNorm layers, so only the backbone runs: no proposals, no box head.
"""

import numpy as np
import torch

from .model import to_tensor


def batchnorm_layers(model):
    """The model's BatchNorm layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


@torch.no_grad()
def reestimate_batchnorm(model, images, device, batch_size, prepare=None):
    """Replace every BatchNorm layer's running mean and variance by their average over ``images`` (RGB uint8 tiles,
    in batches of ``batch_size``, each made the model's input on ``device`` by ``prepare``; default: as it is); the
    model is left in eval mode."""
    prepare = prepare or (lambda image: to_tensor(image).to(device))
    norms = list(batchnorm_layers(model).values())
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            batch = [prepare(t) for t in images[start:start + batch_size]]
            model.backbone(model.transform(batch)[0].tensors)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def batchnorm_stats(model):
    """Every BatchNorm layer's running mean and variance, as float32 arrays keyed by buffer name."""
    return {f'{name}.{buffer}': getattr(m, buffer).detach().float().cpu().numpy().copy()
            for name, m in batchnorm_layers(model).items() for buffer in ('running_mean', 'running_var')}


def load_batchnorm_stats(model, stats):
    """Set the running statistics that :func:`batchnorm_stats` returned (of this model or one built alike)."""
    norms = batchnorm_layers(model)
    for key, value in stats.items():
        name, buffer = key.rsplit('.', 1)
        target = getattr(norms[name], buffer)
        target.copy_(torch.from_numpy(np.asarray(value)).to(target.device, target.dtype))
