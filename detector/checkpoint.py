"""Checkpoints: weights plus the whole model configuration, so that a checkpoint alone rebuilds its model."""

import os
import pickle
import zipfile

import torch

from . import __version__
from .config import ModelConfig
from .errors import CellRCNNError
from .files import atomic_write

FORMAT = 'cellrcnn-checkpoint'
BUNDLED_MODEL = os.path.join(os.path.dirname(__file__), 'models', 'cellrcnn-default.pt')


def save_checkpoint(path, model, half=False, **extra):
    """Write atomically. ``half`` stores floating-point weights as float16 (half the size; loading restores float32).

    ``extra`` holds JSON-like metadata (metrics, training settings) and, for resumable training checkpoints,
    ``train_state`` (optimizer, scheduler, step).
    """
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {'format': FORMAT, 'version': __version__, 'config': model.config.to_dict(), 'state_dict': state}
    payload.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, 'checkpoint', binary=True) as f:
        torch.save(payload, f)


def load_checkpoint(path):
    """The checkpoint's contents, checked; CellRCNNError (one line) for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise CellRCNNError(f'model file not found: {path}')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CellRCNNError(f'{path} is not a readable checkpoint ({reason[:120]})') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CellRCNNError(f'{path} is not a cellrcnn checkpoint (no "{FORMAT}" header)')
    if not isinstance(payload.get('config'), dict) or not isinstance(payload.get('state_dict'), dict):
        raise CellRCNNError(f'{path} is an incomplete cellrcnn checkpoint')
    return payload


def stored_config(payload):
    """The model configuration a checkpoint holds."""
    return ModelConfig.from_dict(payload['config'])


def model_from_checkpoint(payload, source='checkpoint', config=None):
    """The checkpoint's model, built with ``config`` (default: its own; another one must not change the weights'
    shapes: run-time settings such as thresholds or the anchor density)."""
    from .model import build_model

    model = build_model(config or stored_config(payload))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload['state_dict'].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CellRCNNError(f'{source} does not match its own configuration: '
                            f'{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}') from None
    return model


def load_model(path=None, device='cpu'):
    """The model stored at ``path`` (default: the bundled model), in eval mode on ``device``."""
    path = path or BUNDLED_MODEL
    model = model_from_checkpoint(load_checkpoint(path), source=path)
    return model.to(device).eval()
