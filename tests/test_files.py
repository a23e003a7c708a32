"""Writing outputs in a folder other users may write to (``cellrcnn.files``): what someone planted at a lock's name or
at a temporary file's name never makes a run truncate or overwrite a file of their choice."""

import os
import stat

import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.files import atomic_write
from cellrcnn.resume import output_lock

PRECIOUS = b'a file of someone else\'s choice\n'


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / 'victim'
    path.write_bytes(PRECIOUS)
    return path


@pytest.fixture
def shared(tmp_path):
    """The output folder, as another user of the machine may write to it."""
    folder = tmp_path / 'shared'
    folder.mkdir()
    return folder


def test_links_planted_at_the_temporary_and_final_names_are_never_followed(shared, victim, tmp_path):
    target = shared / 'slide.anot.json'
    planted = shared / f'slide.anot.json.tmp{os.getpid()}'  # the name the temporary file had before: predictable
    planted.symlink_to(victim)
    other = tmp_path / 'other-victim'
    other.write_bytes(PRECIOUS)
    target.symlink_to(other)
    with atomic_write(target, 'annotation file') as f:
        f.write('{"elements": []}')
    assert victim.read_bytes() == PRECIOUS and other.read_bytes() == PRECIOUS
    assert not target.is_symlink() and target.read_text() == '{"elements": []}'
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # what open() gives, not mkstemp's 0o600
    assert sorted(os.listdir(shared)) == ['slide.anot.json', planted.name]  # no temporary file left


@pytest.mark.parametrize('plant', ['symlink', 'hard link'])
def test_a_link_planted_at_the_lock_is_refused_in_one_line_and_never_written(shared, victim, plant):
    lock = shared / '.slide.lock'
    if plant == 'symlink':
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    with pytest.raises(CellRCNNError, match='lock file .*/.slide.lock') as info:
        with output_lock({'annotation': str(shared / 'slide.anot.json')}):
            pytest.fail('the lock was taken through a planted link')
    assert '\n' not in str(info.value) and 'use another output folder' in str(info.value)
    assert victim.read_bytes() == PRECIOUS and os.path.lexists(lock)


def test_the_lock_still_guards_its_outputs(shared):
    paths = {'annotation': str(shared / 'slide.anot.json')}
    with output_lock(paths):
        assert (shared / '.slide.lock').read_text() == str(os.getpid())
    assert not (shared / '.slide.lock').exists()
