"""Writing files whole or not at all: a reader (or a resumed run) never sees half a file, even after a crash or a power
cut; and locks that say "another run is writing these files" and vanish with the process that held them."""

import contextlib
import errno
import os

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

from .errors import CellRCNNError


@contextlib.contextmanager
def atomic_write(path, what='file', binary=False, newline=None):
    """Open a temporary file next to ``path`` for writing; move it onto ``path`` when the block succeeds.

    Any failure removes the temporary file (``path`` keeps what it held); OS errors (a full disk, a file size limit,
    no permission) become one-line CellRCNNErrors naming ``what`` and the path. The file's bytes reach the disk
    (fsync) before it takes the name, and the rename reaches the disk (fsync of the folder) before this returns, so
    a crash leaves either the old file or the whole new one. Yields the open file (text in UTF-8, or binary).
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') if binary else open(tmp, 'w', encoding='utf-8', newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(path) or '.')
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CellRCNNError(f'cannot write {what} {path}: {exc.strerror or exc}') from None
        raise


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable (where the file system allows it: some refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on the file ``path`` (created) for the block, or raise CellRCNNError (one line) at once
    when another process holds it: ``what`` names what the lock guards.

    ``fcntl.flock``: the kernel drops the lock when its holder ends in any way (even ``kill -9``), so no lock is ever
    stale. The file is removed when the block ends; a process that opened it just before that notices (the name then
    points to another file, or none) and tries again. The holder's process id is written into it, for the message.
    Without ``fcntl`` (not POSIX), or on a file system that cannot lock, nothing is locked.
    """
    if fcntl is None:
        yield
        return
    path = os.fspath(path)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CellRCNNError(f'cannot create the lock file {path}: {exc.strerror or exc}') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a file system without locks
                os.close(fd)
                fd = None
                break
            held = True
        if held:
            holder = ''
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode('ascii').strip()
            os.close(fd)
            by = f' (process {holder})' if holder.isdigit() else ''
            raise CellRCNNError(f'another run{by} is writing {what}: wait for it to end, or use another output '
                                f'folder (lock {path})')
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:  # removed by the holder that just ended
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise CellRCNNError(f'cannot take the lock {path}: it keeps being replaced')
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode('ascii'), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding the lock: whoever opens the name next gets a new file
        os.close(fd)
