"""Progress reports, the one way every long step tells a person how far it is: a bar in a terminal, slicer
execution-model lines for DSA tasks, plain lines, or nothing."""

import sys
import time
from xml.sax.saxutils import escape

from tqdm import tqdm

MODES = ('auto', 'bar', 'slicer', 'none')


class Progress:
    """``start(total)`` a stage of countable work, ``update(n)`` as units finish, ``comment(text)`` when the stage
    changes, ``finish()`` at its end; ``log(line)`` for a line a person reads (printed in every mode but 'none').

    'slicer' prints the ``<filter-progress>`` / ``<filter-comment>`` lines that slicer_cli_web turns into a Girder
    job's progress; 'auto' shows a bar when stderr is a terminal and prints only the log lines otherwise.
    """

    def __init__(self, mode='auto', name='cellrcnn', unit='tile'):
        if mode not in MODES:
            raise ValueError(f'progress mode must be one of {MODES}')
        self.quiet = mode == 'none'
        if mode in ('auto', 'none'):
            mode = 'bar' if mode == 'auto' and sys.stderr.isatty() else 'lines'
        self.mode, self.name, self.unit = mode, name, unit
        self.total, self.done = 1, 0
        self._bar = None
        self._started = None
        self._last = -1.0

    def _emit(self, line):
        print(line, flush=True)

    def start(self, total, unit=None):
        """Begin a stage of ``total`` units (``unit``: what they are, if not this reporter's own unit)."""
        self.finish()
        self.total, self.done, self._last, self._started = max(int(total), 1), 0, -1.0, time.time()
        if self.mode == 'bar' and not self.quiet:
            self._bar = tqdm(total=total, desc=self.name, unit=unit or self.unit)
        elif self.mode == 'slicer':
            self._emit(f'<filter-start><filter-name>{escape(self.name)}</filter-name></filter-start>')

    def update(self, n=1):
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == 'slicer':
            fraction = min(1.0, self.done / self.total)
            if fraction - self._last >= 0.01 or fraction == 1.0:
                self._last = fraction
                self._emit(f'<filter-progress>{fraction:.3f}</filter-progress>')

    def comment(self, text):
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        elif self.mode == 'slicer':
            self._emit(f'<filter-comment>{escape(text)}</filter-comment>')

    def log(self, line):
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            self._emit(line)

    def finish(self):
        """End the current stage (if one is running)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == 'slicer' and self._started is not None:
            self._emit(f'<filter-end><filter-name>{escape(self.name)}</filter-name>'
                       f'<filter-time>{time.time() - self._started:.1f}</filter-time></filter-end>')
        self._started = None
