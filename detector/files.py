"""Writing files whole or not at all: a reader (or a resumed run) never sees half a file."""

import contextlib
import os

from .errors import CellRCNNError


@contextlib.contextmanager
def atomic_write(path, what='file', binary=False, newline=None):
    """Open a temporary file next to ``path`` for writing; move it onto ``path`` when the block succeeds.

    Any failure removes the temporary file (``path`` keeps what it held); OS errors become one-line CellRCNNErrors
    naming ``what`` and the path. Yields the open file (text in UTF-8, or binary).
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') if binary else open(tmp, 'w', encoding='utf-8', newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CellRCNNError(f'cannot write {what} {path}: {exc.strerror or exc}') from None
        raise
