"""Writing files whole or not at all: a reader (or a resumed run) never sees half a file, even after a crash or a power
cut; and locks that say "another run is writing these files" and vanish with the process that held them."""

import contextlib
import errno
import os
import stat
import tempfile

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

from .errors import CellRCNNError

#: the permissions ``open`` gives a new file: 0o666 less this process's umask (read once, as the module loads:
#: ``os.umask`` is read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_NEW_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_write(path, what='file', binary=False, newline=None):
    """Open a temporary file next to ``path`` for writing; move it onto ``path`` when the block succeeds.

    The temporary file is new, made by ``tempfile.mkstemp`` in ``path``'s folder (a name no one can guess, created
    with ``O_EXCL``, so never through a symbolic link or onto a file someone planted there), and it takes the
    permissions ``open`` would give it. ``os.replace`` then puts it in the place of ``path``'s name: a symbolic link
    planted at ``path`` is replaced, never followed. Any failure removes the temporary file (``path`` keeps what it
    held); OS errors (a full disk, a file size limit, no permission) become one-line CellRCNNErrors naming ``what``
    and the path. The file's bytes reach the disk (fsync) before it takes the name, and the rename reaches the disk
    (fsync of the folder) before this returns, so a crash leaves either the old file or the whole new one. Yields
    the open file (text in UTF-8, or binary).
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder or '.')
        with open(fd, 'wb') if binary else open(fd, 'w', encoding='utf-8', newline=newline) as f:
            os.fchmod(fd, _NEW_FILE_MODE)  # mkstemp makes it 0o600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder or '.')
    except BaseException as exc:
        if tmp is not None:
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

    The name is known in advance, so in a folder others may write to, someone may plant something there: a symbolic
    link is never followed (``O_NOFOLLOW``), and a file that is not a plain file of its own (a hard link to another
    file, a pipe) is refused, so the lock never truncates or writes a file of someone else's choice.
    """
    if fcntl is None:
        yield
        return
    path = os.fspath(path)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            why = 'it is a symbolic link' if exc.errno == errno.ELOOP else exc.strerror or exc
            raise CellRCNNError(f'cannot create the lock file {path}: {why}; remove it, or use another output '
                                'folder') from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # nlink 0: removed by a holder just now (see below)
            os.close(fd)
            raise CellRCNNError(f'cannot use the lock file {path}: it is not a plain file of its own (a hard link '
                                'or a pipe); remove it, or use another output folder')
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
