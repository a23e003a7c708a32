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

    glibc maps each allocation over 32 MB fresh from the kernel and unmaps it when it is freed. A feature map of a
    batch of 1024 px tiles is 30-130 MB, so every layer of every batch faulted in, zeroed, memory that the layer
    before had just released: a fifth of CPU inference's CPU time was the kernel's. Blocks of up to 1 GB now come
    from the heap, which keeps up to 1 GB free at its top: with 256 MB, a batch now and then still gave 280 MB back
    and faulted it in again. The peak is the same either way, since the kept memory is what the next batch uses.
    Without glibc (no ``mallopt``) nothing changes.
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
