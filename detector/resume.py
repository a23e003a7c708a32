"""Run identity and resume storage: what identifies a run, and the raw detections of its finished tile rows.

A run is identified by the slide (a path, or any JSON-able identity such as a Girder file's), the model file and the
:class:`cellrcnn.settings.ResultSettings` it used. Raw detections of each finished tile row are saved under a
folder; a run that is interrupted and started again with the same identity re-reads them instead of running the
model on those rows again.
"""

import hashlib
import json
import os
import shutil

import numpy as np

from .errors import CellRCNNError
from .files import atomic_write


def file_stamp(path):
    """What identifies a file's version for :func:`run_key`: its absolute path, size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        raise CellRCNNError(f'not found: {path}') from None
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def run_key(source, model_path, settings):
    """Identity of a run, for resuming and for skipping finished work: the slide (a path, or any JSON-able
    identity such as a Girder file's), the model file and every setting that changes detections."""
    source = file_stamp(source) if isinstance(source, (str, os.PathLike)) else source
    text = json.dumps([source, file_stamp(model_path), settings], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class RowStore:
    """Raw detections of finished tile rows, one file per row, written atomically."""

    def __init__(self, folder, key):
        self.folder = folder
        self.enabled = folder is not None
        if not self.enabled:
            return
        manifest = os.path.join(folder, 'run.json')
        try:
            if os.path.exists(manifest):
                with open(manifest) as f:
                    if json.load(f).get('key') != key:  # another slide, model or settings: start over
                        shutil.rmtree(folder)
            os.makedirs(folder, exist_ok=True)
            with atomic_write(manifest, 'partial results') as f:
                json.dump({'key': key}, f)
        except (OSError, ValueError) as exc:
            raise CellRCNNError(f'cannot keep partial results in {folder}: {exc}') from None

    def done_rows(self):
        if not self.enabled:
            return {}
        rows = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith('row_') and name.endswith('.npz'):
                with np.load(os.path.join(self.folder, name)) as data:
                    rows[int(name[4:-4])] = (data['boxes'], data['scores'])
        return rows

    def save(self, row, boxes, scores):
        if self.enabled:
            with atomic_write(os.path.join(self.folder, f'row_{row:05d}.npz'), 'partial results', binary=True) as f:
                np.savez(f, boxes=boxes, scores=scores)


def clear_partial(resume_dir):
    """Remove the saved rows of a finished run."""
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)
