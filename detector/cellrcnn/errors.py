"""The one exception type users see, and how a command turns it into a single line and an exit status."""

import importlib
import sys

#: histomicstk's own requirements pull GDAL, which does not build without the system library, so ``pip install
#: cellrcnn`` cannot bring it: install.sh and the Docker image install it without them (setup.py lists what cellrcnn
#: uses of it)
HISTOMICSTK_INSTALL = "pip install --no-deps 'histomicstk==1.4.0'"


class CellRCNNError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def one_line(exc):
    """Any exception as one line: a CellRCNNError's own message, else ``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    text = text[0] if text else ''
    if isinstance(exc, CellRCNNError):
        return text
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def histomicstk(module='histomicstk'):
    """Import a histomicstk module; when histomicstk is not installed, one line that says what to run."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or '').split('.')[0] != 'histomicstk':
            raise
        raise CellRCNNError(f'histomicstk is not installed (pip cannot install it with cellrcnn: its own '
                            f'requirements need the GDAL system library); run: {HISTOMICSTK_INSTALL}') from None


def run_reporting_errors(program, run, interrupted='interrupted'):
    """Call ``run()``; what a person can act on becomes one ``PROGRAM: ...`` line on stderr instead of a traceback.

    :returns: the exit status: 0, 2 for a :class:`CellRCNNError` (or an operating-system error no step explained),
        1 for running out of memory, 130 for Ctrl-C (with ``interrupted`` as the line)."""
    try:
        run()
    except CellRCNNError as exc:
        print(f'{program}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'{program}: {interrupted}', file=sys.stderr)
        return 130
    except MemoryError:
        print(f'{program}: error: out of memory; use a smaller batch size or tile size', file=sys.stderr)
        return 1
    except OSError as exc:  # what no step turned into a CellRCNNError, such as printing to a full disk
        where = f': {exc.filename}' if exc.strerror and exc.filename else ''
        print(f'{program}: error: {exc.strerror or one_line(exc)}{where}', file=sys.stderr)
        return 2
    return 0
