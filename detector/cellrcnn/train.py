"""Training: warm-up + cosine schedule, gradient clipping, mixed precision on GPU, checkpoints and resume."""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .adapt import reestimate_batchnorm
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, stored_config
from .devices import autocast, resolve_device
from .errors import CellRCNNError
from .model import build_model
from .progress import Progress
from .samples import Augmenter, TileDataset, collate
from .settings import BOUNDS
from .training_data import sample_weights, training_sources

#: the largest training crop: detection's largest tile (``settings.BOUNDS``)
MOST_TILE_SIZE = BOUNDS['tile_size'][1]
#: display colours of cell types given without one, in order
CELL_TYPE_PALETTE = ('#3c78d8', '#e0403a', '#2ca02c', '#ff9f1c', '#9467bd', '#8c564b', '#e377c2', '#17becf')


@dataclass
class TrainConfig:
    """How a model is trained (``cellrcnn train``; ``train-girder`` sets some from its own settings). Stored in every
    checkpoint that ``train`` writes, so that a resumed run goes on as it started."""

    #: optimizer steps in all (a resumed run keeps its other settings but may take this one anew)
    steps: int = 4000
    #: tiles per step
    batch_size: int = 4
    #: AdamW's peak learning rate, reached after the warm-up and decayed along a cosine (:func:`lr_factor`)
    lr: float = 2e-3
    #: AdamW's weight decay
    weight_decay: float = 1e-4
    #: steps of linear warm-up from a small learning rate to ``lr``
    warmup_steps: int = 200
    #: gradients are clipped to this global norm
    clip_norm: float = 10.0
    #: side of the square training crops, in pixels (a multiple of 32)
    tile_size: int = 256
    #: seeds the weights' initialisation, the shuffling and the augmentation
    seed: int = 0
    #: ``--data`` entries of real labels (``cellrcnn.labels``, ``training_data``); a folder of images with DSA JSON is
    #: one (format ``dsa``). A single string is one entry.
    data: tuple = ()
    #: sampling weight of the synthetic tiles beside the entries' ``weight=`` (``training_data``); None: 1 without
    #: entries, 0 with them (synthetic tissue only when there is no real data, as before the entries)
    synthetic_weight: float = None
    #: synthetic tiles drawn, and the seed they are drawn from
    synthetic_tiles: int = 2000
    synthetic_seed: int = 1000
    #: synthetic nuclei drawn this many times larger (log-uniform per tile), before the augmenter's own jitter
    synthetic_scale: tuple = (0.8, 1.25)
    #: of ``data``'s annotations, only those with this name (None: all)
    annotation_name: str = None
    #: side (analysis px) of the prior square of a dot-only nucleus; None: ``dot_box_um``
    point_box_size: float = None
    #: side (um) of the prior square of a dot-only nucleus: used to match anchors and proposals only
    dot_box_um: float = 8.0
    #: a model (file) whose detections give dot-only nuclei their boxes before training (``dot_boxes``); None: none
    dot_boxes_from: str = None
    #: augmentation of real samples: scale factor range (log-uniform) and HED stain jitter (multiplicative, additive)
    real_scale_range: tuple = (0.7, 1.4)
    real_stain_sigma: tuple = (0.3, 0.2)
    #: focus augmentation of real samples: the share of crops blurred and stored as JPEG, and the largest Gaussian
    #: sigma (um) drawn (``samples.Augmenter``'s ``blur``); share 0: none
    real_blur: tuple = (0.0, 1.5)
    #: cell types of the class head, ``NAME`` or ``NAME=LABEL+LABEL`` (class names of the data that mean it); empty:
    #: no class head (or the starting checkpoint's own)
    cell_types: tuple = ()
    #: their colours ('#rrggbb'); default :data:`CELL_TYPE_PALETTE`
    cell_type_colors: tuple = ()
    #: train the cell-type classifier alone: every other weight of the starting checkpoint, BatchNorm statistics
    #: included, stays as it is, so detection does not change
    cell_types_only: bool = False
    #: write the resumable ``last.pt`` every this many steps (and after the last one)
    checkpoint_every: int = 500
    #: data loader processes preparing the batches (0: in the training process)
    workers: int = 1

    def __post_init__(self):
        self.data = (self.data,) if isinstance(self.data, str) else tuple(self.data or ())

    @property
    def entries(self):
        return self.data

    @property
    def synthetic_share(self):
        """The synthetic tiles' sampling weight (``synthetic_weight``, or its default)."""
        if self.synthetic_weight is not None:
            return self.synthetic_weight
        return 0.0 if self.entries else 1.0

    def dot_box_px(self, config):
        """Side in analysis pixels of a dot-only nucleus' prior square, for a model of ``config``."""
        return self.point_box_size or self.dot_box_um / config.mpp

    def cell_type_settings(self):
        """The ``ModelConfig`` settings ``cell_types``, ``cell_type_colors`` and ``cell_type_labels`` these ask for,
        and no ``cell_type_bias`` (calibration fits one to the trained weights)."""
        names = tuple(spec.partition('=')[0].strip() for spec in self.cell_types)
        labels = tuple(tuple(x.strip() for x in spec.partition('=')[2].split('+') if x.strip())
                       for spec in self.cell_types)
        colors = tuple(self.cell_type_colors) or tuple(CELL_TYPE_PALETTE[i % len(CELL_TYPE_PALETTE)]
                                                       for i in range(len(names)))
        return {'cell_types': names, 'cell_type_colors': colors, 'cell_type_labels': labels, 'cell_type_bias': ()}

    def validate(self):
        for name in ('steps', 'batch_size', 'tile_size', 'synthetic_tiles', 'checkpoint_every'):
            if getattr(self, name) <= 0:
                raise CellRCNNError(f'{name} must be positive, not {getattr(self, name)}')
        if self.tile_size % 32 or self.tile_size > MOST_TILE_SIZE:
            raise CellRCNNError(f'tile_size must be a multiple of 32 up to {MOST_TILE_SIZE}, not {self.tile_size}')
        if not 0 <= self.warmup_steps < self.steps:
            raise CellRCNNError('warmup_steps must be between 0 and steps')
        for name in ('seed', 'synthetic_seed', 'workers'):
            if getattr(self, name) < 0:
                raise CellRCNNError(f'{name} must be 0 or more, not {getattr(self, name)}')
        if not 0 < self.synthetic_scale[0] <= self.synthetic_scale[1] < math.inf:
            raise CellRCNNError(f'synthetic_scale must be LOW HIGH with 0 < LOW <= HIGH, not {self.synthetic_scale}')
        if not 0 < self.lr <= 1:
            raise CellRCNNError(f'lr must be above 0 and at most 1, not {self.lr}')
        if self.synthetic_weight is not None and not 0 <= self.synthetic_weight < math.inf:
            raise CellRCNNError(f'synthetic_weight must be 0 or more, not {self.synthetic_weight}')
        if self.point_box_size is not None and not 0 < self.point_box_size < math.inf:
            raise CellRCNNError(f'point_box_size must be a positive number of pixels, not {self.point_box_size}')
        if (not 0 < self.dot_box_um < math.inf
                or not 0 < self.real_scale_range[0] <= self.real_scale_range[1] < math.inf):
            raise CellRCNNError('dot_box_um must be positive and real_scale_range LOW HIGH with 0 < LOW <= HIGH')
        if len(self.real_stain_sigma) != 2 or not all(0 <= sigma < math.inf for sigma in self.real_stain_sigma):
            raise CellRCNNError(f'real_stain_sigma must be two sigmas of 0 or more, not {self.real_stain_sigma}')
        if len(self.real_blur) != 2 or not 0 <= self.real_blur[0] <= 1 or not self.real_blur[1] >= 0:
            raise CellRCNNError(f'real_blur must be a share from 0 to 1 and a sigma of 0 or more, not {self.real_blur}')
        if self.cell_type_colors and len(self.cell_type_colors) != len(self.cell_types):
            raise CellRCNNError(f'{len(self.cell_type_colors)} cell type colours for {len(self.cell_types)} types')
        return self


def lr_factor(step, warmup, total, floor=0.01):
    """Linear warm-up to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def precise_bn(model, samples, tile_size, device, count=256, batch_size=8):
    """Re-estimate BatchNorm statistics on un-augmented training tiles (Detectron's PreciseBN).

    The running averages kept during training describe augmented (stain- and scale-jittered) batches; a model whose
    statistics do not match the images it sees in use loses much of its accuracy (measured: best F1 0.61 before,
    0.98 after, same weights). Only the backbone has BatchNorm layers.
    """
    crop = Augmenter(tile_size, scale_jitter=0, stain_sigma=None, flips=False)
    rng = np.random.default_rng(0)
    tiles = [crop(image, boxes, rng)[0] for image, boxes, *_ in samples[:count]]
    reestimate_batchnorm(model, tiles, device, batch_size)


def initial_model(model_config, cfg, init=None):
    """The model training starts from: ``init``'s weights (fine-tuning; its configuration kept) or ``model_config``
    built from scratch, with the cell types ``cfg`` asks for. ``init``'s own cell types are kept when ``cfg`` names
    none or the same; other types (a lab's own, say, on the bundled model) get a class head of their own, which
    starts from random weights, while every other weight of ``init`` is kept. ``init``'s cell-type bias is not
    kept: it was fitted to ``init``'s weights (calibration fits the new model's own)."""
    wanted = cfg.cell_type_settings() if cfg.cell_types else {}
    if not init:
        return build_model(dataclasses.replace(model_config, **wanted))
    payload = load_checkpoint(init)
    stored = dataclasses.replace(stored_config(payload, init), cell_type_bias=())
    if not wanted or wanted['cell_types'] == stored.cell_types:
        return model_from_checkpoint(payload, source=init, config=stored)
    head = 'roi_heads.cell_type_predictor.'
    model = build_model(dataclasses.replace(stored, **wanted))
    kept = {k: v for k, v in model_from_checkpoint(payload, source=init).state_dict().items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or not all(k.startswith(head) for k in missing):
        raise CellRCNNError(f'{init} does not match the model it should start (missing {missing[:2]})')
    return model


def _train_cell_types_only(model):
    """Freeze every weight but the cell-type classifier's, and keep the backbone's BatchNorm statistics (eval mode):
    the model detects exactly as before."""
    if model.roi_heads.cell_type_predictor is None:
        raise CellRCNNError('training the cell types alone needs a model with cell types (--cell-types)')
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith('roi_heads.cell_type_predictor.')
    model.backbone.eval()


def _loader(cfg, dataset, weights):
    """Batches of the dataset: shuffled each epoch, or drawn by ``weights`` (one per sample) when given."""
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = None if weights is None else torch.utils.data.WeightedRandomSampler(
        weights, len(dataset), replacement=True, generator=generator)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                                       collate_fn=collate, num_workers=cfg.workers,
                                       drop_last=len(dataset) >= cfg.batch_size, generator=generator)


def _step(model, images, targets, device, optimizer, scaler, params, clip_norm, step):
    """One optimisation step on a batch; returns the loss parts (tensors)."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    with autocast(device):
        parts = model(images, targets)
    loss = sum(parts.values())
    if not torch.isfinite(loss):
        raise CellRCNNError(f'training diverged at step {step} (loss {loss.item()}); lower --lr')
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return parts


def _loss_summary(losses):
    """The mean of each loss part over ``losses`` (a list of per-step dicts), as text."""
    return ' '.join(f"{k.replace('loss_', '')} {np.mean([x[k] for x in losses]):.3f}" for k in losses[-1])


def train(model_config, train_config, out_dir, device='auto', resume=None, samples=None, progress=None, init=None,
          on_step=None):
    """Train a model; write ``out_dir/last.pt`` (resumable) and ``out_dir/model.pt`` (weights only).

    ``samples``: a list of samples (``samples``) to train on instead of ``train_config``'s sources
    (``training_data``). ``init``: a checkpoint to fine-tune (:func:`initial_model`; ``model_config`` is ignored).
    ``resume``: a run's ``last.pt`` to go on from, with the run's own settings; ``train_config`` then gives only the
    number of steps, or is None to keep the run's.
    ``on_step(step, steps)`` is called after every step; ``progress`` (a :class:`cellrcnn.progress.Progress`) counts
    the steps. Returns the trained model and the list of per-step losses.
    """
    device = resolve_device(device)
    start_step, state = 0, None
    if resume:
        payload = load_checkpoint(resume)
        state = payload.get('train_state')
        if state is None:
            raise CellRCNNError(f'{resume} holds no training state to resume from (it is a weights-only model)')
        steps = payload['train_config']['steps'] if train_config is None else train_config.steps
        cfg = TrainConfig(**{**payload['train_config'], 'steps': steps}).validate()
        start_step = state['step']
    else:
        cfg = train_config.validate()
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(payload, source=resume) if resume else initial_model(model_config, cfg, init)
    model.to(device, memory_format=torch.channels_last).train()
    if cfg.cell_types_only:
        _train_cell_types_only(model)
    log = (progress or Progress(mode='none')).log
    sources = [('samples', samples, 1.0)] if samples is not None else training_sources(cfg, model.config, device, log)
    samples = [sample for _, source, _ in sources for sample in source]
    dataset = TileDataset(samples, Augmenter(cfg.tile_size), seed=cfg.seed,
                          real_augmenter=Augmenter(cfg.tile_size, stain_sigma=cfg.real_stain_sigma,
                                                   scale_range=cfg.real_scale_range,
                                                   blur=(cfg.real_blur[0], cfg.real_blur[1] / model.config.mpp)))
    loader = _loader(cfg, dataset, sample_weights(sources) if len(sources) > 1 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == 'cuda')
    if state is not None:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        scaler.load_state_dict(state['scaler'])
        dataset.epoch = state['epoch']
    os.makedirs(out_dir, exist_ok=True)

    def checkpoint(step, name):
        save_checkpoint(os.path.join(out_dir, name), model, train_config=dataclasses.asdict(cfg),
                        train_state={'step': step, 'epoch': dataset.epoch, 'optimizer': optimizer.state_dict(),
                                     'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict()})

    losses = []
    step = start_step
    bar = progress or Progress(mode='none')
    bar.start(cfg.steps)
    bar.update(start_step)
    started = time.time()
    while step < cfg.steps:
        for images, targets in loader:
            parts = _step(model, images, targets, device, optimizer, scaler, params, cfg.clip_norm, step)
            scheduler.step()
            step += 1
            losses.append({k: v.item() for k, v in parts.items()})
            bar.update(1)
            bar.comment(_loss_summary(losses[-20:]))
            if on_step is not None:
                on_step(step, cfg.steps)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step, 'last.pt')
                bar.log(f'step {step}/{cfg.steps}, {time.time() - started:.0f} s: {_loss_summary(losses[-20:])}')
            if step >= cfg.steps:
                break
        dataset.epoch += 1
    bar.finish()
    if not cfg.cell_types_only:
        precise_bn(model, samples, cfg.tile_size, device)
    save_checkpoint(os.path.join(out_dir, 'model.pt'), model, train_config=dataclasses.asdict(cfg),
                    train_seconds=time.time() - started)
    return model, losses
