"""Checkpoints: weights plus the whole model configuration, so that a checkpoint alone rebuilds its model."""

import hashlib
import os
import threading
import zipfile

import torch
from torch.torch_version import TorchVersion

from . import __version__
from .config import ModelConfig
from .errors import CellRCNNError
from .files import atomic_write

FORMAT = 'cellrcnn-checkpoint'
BUNDLED_MODEL = os.path.join(os.path.dirname(__file__), 'models', 'cellrcnn-default.pt')

_HASHES = {}  # (absolute path, device, inode, size, mtime in ns) -> SHA-256 of the file's bytes
_HASHES_LOCK = threading.Lock()


def model_sha256(path=None):
    """What identifies a model: the SHA-256 (hex) of its checkpoint file's bytes (default: the bundled model).

    Two checkpoints are the same model exactly when their bytes are, whatever their names and folders
    (``cellrcnn train`` always writes ``model.pt``). Read in 1 MiB blocks; remembered in this process per file
    version (path, inode, size, modification time), so that a cohort hashes its model once, not once per slide.
    """
    path = os.path.abspath(os.fspath(path or BUNDLED_MODEL))
    try:
        st = os.stat(path)
        stamp = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _HASHES_LOCK:
            known = _HASHES.get(stamp)
        if known:
            return known
        digest = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    except OSError as exc:
        raise CellRCNNError(f'cannot read the model file {path}: {exc.strerror or exc}') from None
    with _HASHES_LOCK:
        _HASHES[stamp] = digest.hexdigest()
    return _HASHES[stamp]


def save_checkpoint(path, model, half=False, **extra):
    """Write atomically. ``half`` stores floating-point weights as float16 (half the size; loading restores float32).

    ``extra`` holds JSON-like metadata (metrics, training settings) and, for resumable training checkpoints,
    ``train_state`` (optimizer, scheduler, step).
    """
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {'format': FORMAT, 'version': __version__, 'config': model.config.to_dict(), 'state_dict': state}
    payload.update(extra)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        raise CellRCNNError(f'cannot write the checkpoint {path}: {exc.strerror or exc}') from None
    with atomic_write(path, 'checkpoint', binary=True) as f:
        torch.save(payload, f)


#: the oldest torch whose ``torch.load(weights_only=True)`` runs no code from the file: on torch 2.5.1 and older a
#: crafted checkpoint gets past it (CVE-2025-32434). setup.py requires it too.
SAFE_TORCH = (2, 6)


def require_safe_torch(version=None):
    """Refuse, in one line (CellRCNNError), to load checkpoints with a torch older than :data:`SAFE_TORCH`
    (``version``: that torch's version string; default: the one running)."""
    version = TorchVersion(version or torch.__version__)
    if version < SAFE_TORCH:
        raise CellRCNNError(f'torch {version} cannot load checkpoints safely (a crafted file gets past its '
                            f'weights_only check and runs code): install torch >= {".".join(map(str, SAFE_TORCH))}')


def load_checkpoint(path):
    """The checkpoint's contents, checked; CellRCNNError (one line) for a missing, corrupt or foreign file, or a torch
    that cannot load it safely (:func:`require_safe_torch`)."""
    require_safe_torch()
    if not os.path.isfile(path):
        raise CellRCNNError(f'model file not found: {path}')
    if not zipfile.is_zipfile(path):  # torch.save's format; text or an image reaches the unpickler as a bare key
        raise CellRCNNError(f'{path} is not a readable checkpoint (not a whole model file as torch writes them; '
                            'cellrcnn train writes one)')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except MemoryError:
        raise CellRCNNError(f'{path}: not enough memory to read it') from None
    except Exception as exc:  # a damaged file's bytes reach the unpickler: it can raise any error (IndexError, ...)
        raise CellRCNNError(f'{path} is not a readable checkpoint ({_first_line(exc)})') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CellRCNNError(f'{path} is not a cellrcnn checkpoint (no "{FORMAT}" header)')
    if not isinstance(payload.get('config'), dict) or not isinstance(payload.get('state_dict'), dict):
        raise CellRCNNError(f'{path} is an incomplete cellrcnn checkpoint')
    return payload


#: model settings stored under another name by older checkpoints (the bundled model among them): old -> current
RENAMED_SETTINGS = {'detect_thresh': 'threshold', 'score_thresh': 'box_score_thresh'}


def stored_config(payload, source='checkpoint'):
    """The model configuration a checkpoint holds, checked (``ModelConfig.validate``): a CellRCNNError (one line)
    for settings that are unknown, of the wrong kind or out of bounds. Settings stored under an older name
    (:data:`RENAMED_SETTINGS`) take their current one."""
    try:
        values = {RENAMED_SETTINGS.get(name, name): value for name, value in payload['config'].items()}
        return ModelConfig.from_dict(values).validate()
    except CellRCNNError as exc:
        raise CellRCNNError(f'{source} holds an unusable model configuration: {exc}') from None
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. a number where a list belongs
        raise CellRCNNError(f'{source} holds an unusable model configuration: {_first_line(exc)}') from None


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def model_from_checkpoint(payload, source='checkpoint', config=None):
    """The checkpoint's model, built with ``config`` (default: its own; another one must not change the weights'
    shapes: run-time settings such as thresholds or the anchor density). Anything wrong with the checkpoint's
    configuration or weights is a CellRCNNError (one line)."""
    from .model import build_model

    config = config or stored_config(payload, source)
    try:
        model = build_model(config)
    except CellRCNNError as exc:
        raise CellRCNNError(f'{source} holds an unusable model configuration: {exc}') from None
    except MemoryError:
        raise CellRCNNError(f'{source}: not enough memory to build its model') from None
    except Exception as exc:  # a configuration that passed validate() but that torchvision still refuses
        raise CellRCNNError(f'{source}: its model cannot be built ({type(exc).__name__}: {_first_line(exc)})') \
            from None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload['state_dict'].items()):
        raise CellRCNNError(f'{source} is an incomplete cellrcnn checkpoint (its weights are not all tensors)')
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
