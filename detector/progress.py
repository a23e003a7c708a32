"""Progress reports: a bar in a terminal, slicer execution-model lines for DSA tasks, or nothing."""

import sys
import time

from tqdm import tqdm

MODES = ('auto', 'bar', 'slicer', 'none')


class Progress:
    """``update(n)`` as work units finish; ``comment(text)`` for stage changes; ``close()`` at the end.

    'slicer' prints the ``<filter-progress>`` / ``<filter-comment>`` lines that slicer_cli_web turns into a Girder
    job's progress; 'auto' shows a bar when stderr is a terminal and stays quiet otherwise.
    """

    def __init__(self, total, name='cellrcnn', mode='auto', unit='tile'):
        if mode not in MODES:
            raise ValueError(f'progress mode must be one of {MODES}')
        if mode == 'auto':
            mode = 'bar' if sys.stderr.isatty() else 'none'
        self.mode, self.total, self.name, self.done = mode, max(total, 1), name, 0
        self.started = time.time()
        self._last = -1.0
        self._bar = tqdm(total=total, desc=name, unit=unit) if mode == 'bar' else None
        if mode == 'slicer':
            self._emit(f'<filter-start><filter-name>{name}</filter-name></filter-start>')

    def _emit(self, line):
        print(line, flush=True)

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
            self._emit(f'<filter-comment>{text}</filter-comment>')

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self.mode == 'slicer':
            self._emit(f'<filter-end><filter-name>{self.name}</filter-name>'
                       f'<filter-time>{time.time() - self.started:.1f}</filter-time></filter-end>')
