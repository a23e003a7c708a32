"""Where the model runs: device choice and mixed precision."""

import contextlib

import torch

from .errors import CellRCNNError


def resolve_device(name='auto'):
    """'auto' (a GPU when present), 'cpu', 'cuda' or 'cuda:N'."""
    if isinstance(name, torch.device):
        return name
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise CellRCNNError(f'device {name!r} was asked for, but torch sees no CUDA GPU here')
    try:
        return torch.device(name)
    except RuntimeError:
        raise CellRCNNError(f'unknown device {name!r}; use auto, cpu or cuda') from None


def autocast(device):
    """float16 mixed precision on a GPU; full precision on the CPU (this kind of CPU has no fast bfloat16)."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.float16)
    return contextlib.nullcontext()
