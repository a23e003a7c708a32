"""Resuming an interrupted run from the raw detections of its finished tile rows (``cellrcnn.resume.RowStore``,
as the detection loop opens and saves them)."""

import os

import numpy as np
import pytest

from cellrcnn.inference import DetectorSpec
from cellrcnn.resume import RowStore, run_key
from cellrcnn.slide import Slide
from cellrcnn.slide_detection import detect_slide
from support import PassingDetector


@pytest.fixture(scope='module')
def slide_path(synthetic_slide):
    return synthetic_slide(900, 700, seed=11)[0]


@pytest.fixture(scope='module')
def spec(tiny_checkpoint):
    return DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, nms=0.3, device='cpu', batch_size=3)


@pytest.fixture
def detector(spec):
    return spec.build()


class Interrupting(PassingDetector):
    """A detector that stops the run (as Ctrl-C would) after a number of batches."""

    def __init__(self, detector, batches):
        super().__init__(detector)
        self.left = batches

    def detect_tiles_with_types(self, tiles, parts=False, stain=None):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.inner.detect_tiles_with_types(tiles, parts, stain=stain)


def test_an_interrupted_run_resumes_from_its_saved_rows(slide_path, detector, tmp_path):
    slide = Slide(slide_path)
    kwargs = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)
    full = detect_slide(slide, detector, **kwargs)
    partial = tmp_path / 'partial'
    with pytest.raises(KeyboardInterrupt):
        detect_slide(slide, Interrupting(detector, 3), resume=RowStore(str(partial), 'k'), **kwargs)
    saved = sorted(p.relative_to(partial).as_posix() for p in partial.rglob('row_*.npz'))
    assert saved == ['k/row_00000.npz']  # 9 tiles done: the first row of 5 and 4 tiles of the second (key k's)
    resumed = detect_slide(slide, detector, resume=RowStore(str(partial), 'k'), **kwargs)
    assert resumed.stats['tile_rows_resumed'] == 1
    assert resumed.stats['tiles_read'] == 15
    # the same nuclei; coordinates may differ in the last float bits, as tiles meet the model in other batches
    assert resumed.boxes.shape == full.boxes.shape
    np.testing.assert_allclose(resumed.boxes, full.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(resumed.scores, full.scores, rtol=0, atol=1e-5)
    # another key (other settings or model) does not reuse them
    other = detect_slide(slide, detector, resume=RowStore(str(partial), 'other'), **kwargs)
    assert other.stats['tile_rows_resumed'] == 0
    for key in ('k', 'other'):
        RowStore(str(partial), key).clear()
    assert not partial.exists()


# --------------------------------------------------------------------------- resume files: damaged, and other runs'

KW = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)


@pytest.fixture(scope='module')
def full_runs(slide_path, spec):
    """Uninterrupted results: at the spec's threshold 0.05 ('low') and at 0.45 ('high')."""
    import dataclasses
    return {name: detect_slide(Slide(slide_path), dataclasses.replace(spec, threshold=t).build(), **KW)
            for name, t in (('low', 0.05), ('high', 0.45))}


def interrupted(slide_path, spec, folder, key, threshold=0.05, batches=3):
    """A run stopped (as by Ctrl-C) after ``batches`` batches of 3 tiles: it leaves the first row of 5 tiles."""
    import dataclasses
    with pytest.raises(KeyboardInterrupt):
        detect_slide(Slide(slide_path), Interrupting(dataclasses.replace(spec, threshold=threshold).build(), batches),
                     resume=RowStore(str(folder), key), **KW)


def same_result(result, full):
    assert result.boxes.shape == full.boxes.shape
    np.testing.assert_allclose(result.boxes, full.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(result.scores, full.scores, rtol=0, atol=1e-5)


def test_rows_saved_with_another_tile_grid_are_computed_again(slide_path, spec, tmp_path):
    """As rows left by a version of cellrcnn that laid its tiles out otherwise, under the same run key."""
    interrupted(slide_path, spec, tmp_path, 'k')
    other_grid = {**KW, 'overlap': 64}  # rows of other heights and places
    full = detect_slide(Slide(slide_path), spec.build(), **other_grid)
    rerun = detect_slide(Slide(slide_path), spec.build(), resume=RowStore(str(tmp_path), 'k'), **other_grid)
    assert rerun.stats['tile_rows_resumed'] == 0 and rerun.stats['tiles_read'] == full.stats['tiles_read']
    same_result(rerun, full)


@pytest.mark.parametrize('damage', [b'', b'{"ke', b'[1, 2]'])
def test_an_empty_or_truncated_manifest_starts_the_rows_over(slide_path, spec, full_runs, tmp_path, damage):
    interrupted(slide_path, spec, tmp_path, 'k')
    next(tmp_path.rglob('run.json')).write_bytes(damage)  # as a crash or a full disk could have left it
    rerun = detect_slide(Slide(slide_path), spec.build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    assert rerun.stats['tile_rows_resumed'] == 0 and rerun.stats['tiles_read'] == 20  # all computed again
    same_result(rerun, full_runs['low'])


@pytest.mark.parametrize('damage', ['half', 'empty', 'no scores'])
def test_a_truncated_row_file_is_computed_again(slide_path, spec, full_runs, tmp_path, damage):
    interrupted(slide_path, spec, tmp_path, 'k', batches=4)  # 12 tiles: rows 0 and 1 done
    row = next(tmp_path.rglob('row_00001.npz'))
    data = row.read_bytes()
    if damage == 'no scores':
        with np.load(row) as saved:
            np.savez(row, boxes=saved['boxes'])
    else:
        row.write_bytes(data[:len(data) // 2] if damage == 'half' else b'')
    rerun = detect_slide(Slide(slide_path), spec.build(), resume=RowStore(str(tmp_path), 'k'), **KW)
    assert rerun.stats['tile_rows_resumed'] == 1 and rerun.stats['tiles_read'] == 15  # row 1 again, row 0 kept
    same_result(rerun, full_runs['low'])


def test_runs_with_other_settings_interleaved_on_one_folder_keep_their_own_rows(slide_path, spec, full_runs,
                                                                                 tmp_path):
    interrupted(slide_path, spec, tmp_path, 'low', threshold=0.05)
    interrupted(slide_path, spec, tmp_path, 'high', threshold=0.45)  # must neither delete nor take low's rows
    import dataclasses
    low = detect_slide(Slide(slide_path), spec.build(), resume=RowStore(str(tmp_path), 'low'), **KW)
    assert low.stats['tile_rows_resumed'] == 1
    same_result(low, full_runs['low'])
    high = detect_slide(Slide(slide_path), dataclasses.replace(spec, threshold=0.45).build(),
                        resume=RowStore(str(tmp_path), 'high'), **KW)
    assert high.stats['tile_rows_resumed'] == 1
    assert high.scores.min() >= 0.45  # labelled 0.45, holds nothing below it
    same_result(high, full_runs['high'])
    RowStore(str(tmp_path), 'high').clear()  # a finished run removes its own rows only
    assert not (tmp_path / 'high').exists() and (tmp_path / 'low' / 'row_00000.npz').exists()
    RowStore(str(tmp_path), 'low').clear()
    assert not tmp_path.exists()  # nothing else was left in it


def test_row_stores_of_two_keys_written_in_turn_never_mix(tmp_path):
    def rows(score):
        return np.array([[0, 0, 10, 10]], np.float32), np.array([score], np.float32)

    a, b = RowStore(str(tmp_path), 'a'), RowStore(str(tmp_path), 'b')
    a.open(), b.open()  # as two runs started at once would
    a.save(0, *rows(0.9))
    b.save(0, *rows(0.1))
    a.save(1, *rows(0.8))
    done_a, done_b = RowStore(str(tmp_path), 'a').open(), RowStore(str(tmp_path), 'b').open()
    assert {r: float(s[0]) for r, (_, s, *_) in done_a.items()} == pytest.approx({0: 0.9, 1: 0.8})
    assert {r: float(s[0]) for r, (_, s, *_) in done_b.items()} == pytest.approx({0: 0.1})


def test_a_slide_changed_within_the_same_second_is_another_run(tmp_path):
    """A run's identity holds the slide's size, modification time in nanoseconds and inode: a slide rewritten or
    replaced by another of the same size within one second never resumes (or skips as done) the old one's rows."""
    slide, model = tmp_path / 'slide.tiff', tmp_path / 'model.pt'
    model.write_bytes(b'model')
    second = 1_700_000_000 * 10 ** 9

    def write(path, data, ns):
        path.write_bytes(data)
        os.utime(path, ns=(ns, ns))

    write(slide, b'a' * 100, second + 100)
    first = run_key(str(slide), str(model), {})
    assert run_key(str(slide), str(model), {}) == first
    write(slide, b'b' * 100, second + 200)  # rewritten in place: same inode, same size, same second
    rewritten = run_key(str(slide), str(model), {})
    write(tmp_path / 'new.tiff', b'c' * 100, second + 100)
    os.replace(tmp_path / 'new.tiff', slide)  # replaced: same size, same modification time, another inode
    assert len({first, rewritten, run_key(str(slide), str(model), {})}) == 3
