"""Run settings: their kinds are checked once where a run starts, in one line."""

import pathlib
import re

import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.job import detect_to_files
from cellrcnn.settings import BOUNDS, TRAINING_BOUNDS, AnnotationTrainingSettings, DetectionSettings


def test_settings_of_their_declared_kinds_pass():
    assert DetectionSettings().validate() == DetectionSettings()
    DetectionSettings(tile_size=np.int64(512), min_tissue=0, magnification=np.float32(20), roi=[0, 0, 10, 10],
                      model=pathlib.Path('model.pt'), threshold=1).validate()


@pytest.mark.parametrize('change, message', [
    ({'tile_size': '512'}, "tile_size must be a whole number, not '512'"),
    ({'adapt_tiles': 1.5}, 'adapt_tiles must be a whole number, not 1.5'),
    ({'batch_size': True}, 'batch_size must be a whole number, not True'),
    ({'min_tissue': '0.1'}, "min_tissue must be a number, not '0.1'"),
    ({'roi': '0,0,10,10'}, "roi must be a sequence, not '0,0,10,10'"),
    ({'workers': None}, 'workers must be a whole number, not None'),
    ({'element': None}, 'element must be a string, not None'),
])
def test_a_setting_of_another_kind_stops_the_run_before_it_starts(tmp_path, change, message):
    settings = DetectionSettings(**change)
    with pytest.raises(CellRCNNError, match=f'^{message}$'):
        settings.validate()
    with pytest.raises(CellRCNNError, match=f'^{message}$'):  # before the slide is even looked for
        detect_to_files(str(tmp_path / 'missing.svs'), {'annotation': str(tmp_path / 'a.anot.json')}, settings)


@pytest.mark.parametrize('change, message', [
    ({'tile_size': 100000}, 'tile_size must be between 64 and 4096, not 100000'),
    ({'tile_size': 65, 'overlap': 64}, 'overlap must be below half the tile size 65, not 64'),
    ({'overlap': 8}, 'overlap must be between 16 and 2047, not 8'),
    ({'adapt_tiles': 10000}, 'adapt_tiles must be between 0 and 256, not 10000'),
    ({'batch_size': 0}, 'batch_size must be between 1 and 64, not 0'),
    ({'batch_size': 100000}, 'batch_size must be between 1 and 64, not 100000'),
    ({'workers': 1000}, 'workers must be between 0 and 32, not 1000'),
    ({'min_tissue': 1.5}, 'min_tissue must be between 0 and 1, not 1.5'),
    ({'threshold': -0.5}, 'threshold must be between 0 and 1, not -0.5'),
    ({'mpp': 1e-6}, 'mpp must be between 0.05 and 20, not 1e-06'),
    ({'scheduler': 'localhost:8786'}, "scheduler 'localhost:8786': local:N takes a whole number N of processes"),
    ({'scheduler': 'tcp://10.0.0.5:8786'}, "scheduler 'tcp://10.0.0.5:8786' is not local:N, tcp://127.0.0.1:PORT"),
])
def test_a_setting_out_of_bounds_stops_the_run_before_it_starts(tmp_path, change, message):
    settings = DetectionSettings(**change)
    with pytest.raises(CellRCNNError, match=f'^{re.escape(message)}'):
        detect_to_files(str(tmp_path / 'missing.svs'), {'annotation': str(tmp_path / 'a.anot.json')}, settings)


def test_the_bounds_themselves_pass():
    high = {name: high for name, (_, high) in BOUNDS.items()}
    DetectionSettings(**{**high, 'overlap': 2047}).validate()
    DetectionSettings(**{name: low for name, (low, _) in BOUNDS.items()}).validate()
    AnnotationTrainingSettings(**{name: high for name, (_, high) in TRAINING_BOUNDS.items()}).validate()
    AnnotationTrainingSettings(**{name: low for name, (low, _) in TRAINING_BOUNDS.items()}).validate()
    assert AnnotationTrainingSettings().validate() == AnnotationTrainingSettings()


def test_cell_types_asked_in_any_order_are_the_same_run():
    """``--classes tumour lymphocyte`` and ``--classes lymphocyte tumour`` keep the same nuclei: the same settings,
    the same recorded params and the same run key (a finished run is not run again), in name order, as the Girder
    plugin's folder runs hold them."""
    from cellrcnn.checkpoint import BUNDLED_MODEL
    from cellrcnn.resume import run_key

    asked = DetectionSettings(classes=['tumour', 'lymphocyte'])
    other = DetectionSettings(classes=('lymphocyte', 'tumour'))
    assert asked == other and asked.classes == ('lymphocyte', 'tumour') and asked.identity() == other.identity()
    slide = {'girder_file': '0' * 24}
    assert run_key(slide, BUNDLED_MODEL, asked.identity()) == run_key(slide, BUNDLED_MODEL, other.identity())
    assert run_key(slide, BUNDLED_MODEL, asked.identity()) != run_key(
        slide, BUNDLED_MODEL, DetectionSettings(classes=('tumour',)).identity())
    with pytest.raises(CellRCNNError, match=r"^classes must be distinct cell type names, not \('tumour', 'tumour'\)$"):
        DetectionSettings(classes=['tumour', 'tumour']).validate()
