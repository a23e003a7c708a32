"""Where the model runs: device choice, mixed precision, and the C library's handling of CPU memory."""

import contextlib
import ctypes

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


#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory():
    """Have glibc keep freed memory for the next allocations instead of handing it back to the kernel at once.

    By default glibc maps each large allocation fresh from the kernel and unmaps it when it is freed. Feature maps
    of a batch of tiles are that large, so every layer of every batch would fault in, zeroed, memory that the layer
    before had just released. Blocks of up to 1 GB come from the heap instead, which keeps up to 1 GB free at its top
    (a smaller top still gave memory back now and then); the peak is the same either way, since the kept memory is
    what the next batch uses. Without glibc (no ``mallopt``) nothing changes. Measured effects: docs/performance.md.
    """
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def autocast(device):
    """float16 mixed precision on a GPU; full precision on the CPU (this kind of CPU has no fast bfloat16)."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.float16)
    return contextlib.nullcontext()
