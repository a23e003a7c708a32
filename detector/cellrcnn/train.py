"""Training: warm-up + cosine schedule, gradient clipping, mixed precision on GPU, checkpoints and resume."""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .adapt import reestimate_batchnorm
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .devices import autocast, resolve_device
from .errors import CellRCNNError
from .model import build_model
from .progress import Progress
from .samples import Augmenter, TileDataset, collate, labelled_set


@dataclass
class TrainConfig:
    """How a model is trained (``cellrcnn train``; ``train-girder`` sets some from its own settings). Stored in every
    checkpoint that ``train`` writes, so that a resumed run goes on as it started."""

    #: optimizer steps in all (a resumed run keeps its other settings but takes this one anew)
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
    #: folder of images with DSA annotation JSON; None trains on synthetic tissue.
    data: str = None
    #: synthetic tiles drawn when there is no ``data``, and the seed they are drawn from
    synthetic_tiles: int = 2000
    synthetic_seed: int = 1000
    #: synthetic nuclei drawn this many times larger (log-uniform per tile), before the augmenter's own jitter
    synthetic_scale: tuple = (0.8, 1.25)
    #: of ``data``'s annotations, only those with this name (None: all)
    annotation_name: str = None
    #: side in pixels of the square box centred on each point annotation of ``data`` (needed when it holds points)
    point_box_size: float = None
    #: write the resumable ``last.pt`` every this many steps (and after the last one)
    checkpoint_every: int = 500
    #: data loader processes preparing the batches (0: in the training process)
    workers: int = 1

    def validate(self):
        for name in ('steps', 'batch_size', 'tile_size', 'synthetic_tiles', 'checkpoint_every'):
            if getattr(self, name) <= 0:
                raise CellRCNNError(f'{name} must be positive, not {getattr(self, name)}')
        if self.tile_size % 32:
            raise CellRCNNError(f'tile_size must be a multiple of 32, not {self.tile_size}')
        if not 0 <= self.warmup_steps < self.steps:
            raise CellRCNNError('warmup_steps must be between 0 and steps')
        if not 0 < self.synthetic_scale[0] <= self.synthetic_scale[1]:
            raise CellRCNNError(f'synthetic_scale must be LOW HIGH with 0 < LOW <= HIGH, not {self.synthetic_scale}')
        if self.lr <= 0:
            raise CellRCNNError(f'lr must be positive, not {self.lr}')
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
    tiles = [crop(image, boxes, rng)[0] for image, boxes in samples[:count]]
    reestimate_batchnorm(model, tiles, device, batch_size)


def train(model_config, train_config, out_dir, device='auto', resume=None, samples=None, progress=None, init=None,
          on_step=None):
    """Train a model; write ``out_dir/last.pt`` (resumable) and ``out_dir/model.pt`` (weights only).

    ``samples``: a list of ``(image, boxes)`` to train on instead of ``train_config.data``. ``init``: a checkpoint to
    fine-tune (its own configuration is used; ``model_config`` is ignored). ``on_step(step, steps)`` is called after
    every step; ``progress`` (a :class:`cellrcnn.progress.Progress`) counts the steps. Returns the trained model and the
    list of per-step losses.
    """
    cfg = train_config.validate()
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    start_step, state = 0, None
    if resume:
        payload = load_checkpoint(resume)
        state = payload.get('train_state')
        if state is None:
            raise CellRCNNError(f'{resume} holds no training state to resume from (it is a weights-only model)')
        model = model_from_checkpoint(payload, source=resume)
        cfg = TrainConfig(**{**payload['train_config'], 'steps': cfg.steps})
        start_step = state['step']
    elif init:
        model = model_from_checkpoint(load_checkpoint(init), source=init)
    else:
        model = build_model(model_config)
    model.to(device, memory_format=torch.channels_last).train()
    if samples is None:
        samples = labelled_set(cfg.data, cfg.synthetic_seed, cfg.synthetic_tiles, cfg.tile_size, model.config.mpp,
                               cfg.annotation_name, cfg.point_box_size, scale=cfg.synthetic_scale)
    dataset = TileDataset(samples, Augmenter(cfg.tile_size), seed=cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=cfg.workers, drop_last=len(dataset) >= cfg.batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
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
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            losses.append({k: v.item() for k, v in parts.items()})
            bar.update(1)
            recent = losses[-20:]
            bar.comment(' '.join(f"{k.replace('loss_', '')} {np.mean([x[k] for x in recent]):.3f}" for k in parts))
            if on_step is not None:
                on_step(step, cfg.steps)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step, 'last.pt')
            if step >= cfg.steps:
                break
        dataset.epoch += 1
    bar.finish()
    precise_bn(model, samples, cfg.tile_size, device)
    save_checkpoint(os.path.join(out_dir, 'model.pt'), model, train_config=dataclasses.asdict(cfg),
                    train_seconds=time.time() - started)
    return model, losses
