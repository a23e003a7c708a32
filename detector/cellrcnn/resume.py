"""Run identity and resume storage: what identifies a run, the raw detections of its finished tile rows, and the lock
that keeps two runs from writing the same outputs.

A run is identified by the slide (a path, or any JSON-able identity such as a Girder file's), the model (the SHA-256
of its checkpoint's bytes: ``checkpoint.model_sha256``) and the :class:`cellrcnn.settings.ResultSettings` it used.
Raw detections of each finished tile row are saved under ``RESUME_DIR/<run key>/``; a run that is interrupted and
started again with the same identity re-reads them instead of running the model on those rows again.

What survives what:

- **a kill** (Ctrl-C, ``kill -9``, a crash, a power cut): every row file and the manifest ``run.json`` are written
  whole or not at all and reach the disk before they take their names (``files.atomic_write``); a manifest or row
  file that cannot be read all the same (truncated by a full disk, edited) is dropped and that row computed again;
- **another run on the same outputs**: :func:`output_lock` lets one run at a time write an output name; the second
  stops at once with one line. Runs with other settings or another model keep their rows in their own
  ``<run key>/`` folders, so they never mix or delete each other's rows;
- **a full disk**: a row that cannot be written ends the run with one line; the rows written before it stay.

Cleanup: a finished run removes its own ``<run key>/`` folder (:meth:`RowStore.clear`), and the resume folder when
nothing else is left in it. Rows of other keys (an interrupted run with other settings on the same outputs) stay until
a run with that key finishes, or until someone removes the folder.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import zipfile
import zlib

import numpy as np

from .errors import CellRCNNError
from .files import atomic_write, exclusive_lock

MANIFEST = 'run.json'
_ROW_FILE = re.compile(r'row_(\d{5,})\.npz')
_SAFE_KEY = re.compile(r'[A-Za-z0-9_-]{1,64}')


def file_stamp(path):
    """What identifies a file's version for :func:`run_key`: its absolute path, size, modification time in
    nanoseconds and inode, so that a file rewritten or replaced within the same second is another version."""
    try:
        st = os.stat(path)
    except OSError:
        raise CellRCNNError(f'not found: {path}') from None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino]


def run_key(source, model_path, settings):
    """Identity of a run, for resuming and for skipping finished work: the slide (a path, or any JSON-able
    identity such as a Girder file's), the model (the SHA-256 of the checkpoint's bytes, wherever the file lies and
    whatever its name) and every setting that changes detections."""
    from .checkpoint import model_sha256

    source = file_stamp(source) if isinstance(source, (str, os.PathLike)) else source
    text = json.dumps([source, ['sha256', model_sha256(model_path)], settings], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def output_lock(paths):
    """A context manager that holds the lock on a run's output name for its block (``files.exclusive_lock``), or
    raises CellRCNNError (one line) when another run holds it. ``paths``: the run's outputs (``job.output_paths``);
    the name is the annotation's (else the first output's) without ``.anot.json``: ``OUT/STEM.anot.json`` is locked
    by ``OUT/.STEM.lock``, removed when the run ends (a killed run leaves it unlocked: the next run takes it)."""
    named = [p for p in paths.values() if p]
    first = paths.get('annotation') or (named[0] if named else None)
    if first is None:
        return contextlib.nullcontext()
    folder, name = os.path.split(os.path.abspath(os.fspath(first)))
    stem = name[:-len('.anot.json')] if name.endswith('.anot.json') and len(name) > len('.anot.json') else name
    return exclusive_lock(os.path.join(folder, f'.{stem}.lock'), f'the results {os.path.join(folder, stem)}.*')


def _key_folder(resume_dir, key):
    """The folder of one run key's rows: the key itself when it is a plain name, else its hash."""
    key = str(key)
    name = key if _SAFE_KEY.fullmatch(key) else hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(resume_dir, name)


class RowStore:
    """Raw detections of the finished tile rows of the run ``key``, one file per row in ``folder/<key>/``, written
    atomically. Created where a run starts (``job``), which holds the output lock (:func:`output_lock`), so no other
    process writes this folder meanwhile; opened for the run's tile grid by the detection loop (:meth:`open`), which
    saves each row it finishes (:meth:`save`); cleared by the run once its outputs are written (:meth:`clear`).
    Unreadable files are dropped (their rows are computed again), never an error."""

    def __init__(self, folder, key):
        self.folder, self.key = folder, str(key)
        self.rows_folder = _key_folder(folder, self.key)

    def open(self, grid=None):
        """Start this key's rows, or go on with them. ``grid``: what places the tiles of each row (any JSON-able
        value); rows saved with another grid, by a version of cellrcnn that laid its tiles out otherwise, are dropped
        and computed again. :returns: ``{row: (boxes, scores, extra or None, patches or None)}`` of the rows an earlier
        run finished."""
        manifest = os.path.join(self.rows_folder, MANIFEST)
        try:
            _remove_old_layout(self.folder)
            record = {'key': self.key, 'grid': grid}
            if _read_manifest(manifest) != record:  # missing, unreadable, another key or grid: start over
                shutil.rmtree(self.rows_folder, ignore_errors=True)
            os.makedirs(self.rows_folder, exist_ok=True)
            for name in os.listdir(self.rows_folder):
                if '.tmp' in name:  # left by a run that was killed while writing
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.rows_folder, name))
            with atomic_write(manifest, 'partial results') as f:
                json.dump(record, f)
        except OSError as exc:
            raise CellRCNNError(f'cannot keep partial results in {self.rows_folder}: {exc.strerror or exc}') from None
        return self._done_rows()

    def _done_rows(self):
        """``{row: (boxes, scores, extra or None, patches or None)}`` of every readable row file; the others are
        removed (computed again)."""
        rows = {}
        try:
            names = sorted(os.listdir(self.rows_folder))
        except OSError:
            return {}
        for name in names:
            match = _ROW_FILE.fullmatch(name)
            if not match:
                continue
            path = os.path.join(self.rows_folder, name)
            row = _read_row(path)
            if row is None:
                with contextlib.suppress(OSError):
                    os.remove(path)
            else:
                rows[int(match.group(1))] = row
        return rows

    def save(self, row, boxes, scores, extra=None, patches=None):
        """Keep a finished row's raw detections (boxes N x 4 in base pixels, scores N) and, when given, ``extra``: a
        row of any plain numpy dtype per box (the detection loop's cell types), and ``patches``: float32 rows of 5
        (the blur of its tiles' patches, ``focus.patch_blur``); rows saved without them (every row of a model without
        cell types; rows saved before blur was measured) are read back with None."""
        try:
            os.makedirs(self.rows_folder, exist_ok=True)
        except OSError as exc:
            raise CellRCNNError(f'cannot keep partial results in {self.rows_folder}: {exc.strerror or exc}') from None
        with atomic_write(os.path.join(self.rows_folder, f'row_{row:05d}.npz'), 'partial results', binary=True) as f:
            optional = {name: value for name, value in (('extra', extra), ('patches', patches)) if value is not None}
            np.savez(f, boxes=boxes, scores=scores, **optional)

    def clear(self):
        """Remove this key's rows, once the run's outputs are written, and the resume folder when nothing else is left
        in it; other keys' rows stay."""
        shutil.rmtree(self.rows_folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)  # only when empty


def _read_manifest(path):
    """The record a manifest holds (its run key and grid), or None when it is missing or unreadable (empty,
    truncated, not JSON)."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_row(path):
    """``(boxes N x 4, scores N, extra N or None, patches K x 5 or None)`` from a row file (boxes, scores and
    patches as float32), or None when it cannot be read whole."""
    try:
        with np.load(path, allow_pickle=False) as data:
            boxes = np.asarray(data['boxes'], np.float32)
            scores = np.asarray(data['scores'], np.float32)
            extra = data['extra'] if 'extra' in data.files else None
            patches = np.asarray(data['patches'], np.float32) if 'patches' in data.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error):
        return None
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (len(boxes),):
        return None
    if extra is not None and (extra.ndim == 0 or len(extra) != len(boxes)):
        return None
    if patches is not None and (patches.ndim != 2 or patches.shape[1] != 5 or not np.isfinite(patches).all()):
        return None
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        return None
    return boxes, scores, extra, patches


def _remove_old_layout(folder):
    """Rows saved straight in the resume folder by cellrcnn before rows were kept per run key: their key cannot be
    trusted (two runs could mix them), so they are dropped."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name == MANIFEST or _ROW_FILE.fullmatch(name) or (name.startswith('row_') and '.tmp' in name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
