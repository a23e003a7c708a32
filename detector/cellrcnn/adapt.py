"""BatchNorm statistics: re-estimated on a set of tiles (after training, and per slide before detecting it: test-time
adaptation), and read or set as plain arrays (to restore them, or to send them to Dask workers).

Only the backbone has BatchNorm layers, so only the backbone runs: no proposals, no box head.
"""

import numpy as np
import torch

from .samples import to_tensor
from .tiling import prefetch


def batchnorm_layers(model):
    """The model's BatchNorm layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


@torch.no_grad()
def reestimate_batchnorm(model, images, device, batch_size):
    """Replace every BatchNorm layer's running mean and variance by their average over ``images`` (RGB uint8 tiles,
    in batches of ``batch_size``); the model is left in eval mode."""
    norms = list(batchnorm_layers(model).values())
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            batch = [to_tensor(t).to(device) for t in images[start:start + batch_size]]
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


#: adaptation uses this centre crop (analysis px) of each chosen tile, and runs the backbone on this many at a time
#: (as ``train.precise_bn`` does; fixed, so that the detector's batch size does not change the statistics)
ADAPT_CROP = 512
ADAPT_BATCH = 8


def adaptation_tiles(tiles, count):
    """Up to ``count`` tiles of a grid to adapt the model to, always the same for the same grid: of the tiles not
    skipped, those with at least the median tissue fraction (or more tiles, down to the ``count``-th most tissue), so
    that tiles on the tissue's edge do not skew the statistics; of these, ``count`` spread evenly in raster order."""
    candidates = [t for t in tiles if not t.skipped]
    ranked = sorted((t.tissue for t in candidates), reverse=True)
    if not ranked:
        return []
    floor = ranked[min(len(ranked), max(count, (len(ranked) + 1) // 2)) - 1]
    kept = [t for t in candidates if t.tissue >= floor]
    if len(kept) <= count:
        return kept
    return [kept[(2 * i + 1) * len(kept) // (2 * count)] for i in range(count)]


def adapt_to_slide(slide, detector, tiles, count, workers=2):
    """Test-time adaptation (AdaBN): re-estimate the detector's BatchNorm statistics on the centre crops
    (:data:`ADAPT_CROP`) of up to ``count`` tissue tiles of the slide (:func:`adaptation_tiles`), read at the analysis
    magnification. Only the backbone runs. :returns: the tiles used (none: the model is left as it was)."""
    chosen = adaptation_tiles(tiles, count)
    if chosen:
        images = [_centre_crop(image, ADAPT_CROP)
                  for _, image in prefetch(slide, chosen, workers=workers, queue=len(chosen))]
        reestimate_batchnorm(detector.model, images, detector.device, ADAPT_BATCH)
    return chosen


def _centre_crop(image, side):
    y, x = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[y:y + side, x:x + side]
