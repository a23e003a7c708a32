"""Run settings: their kinds are checked once where a run starts, in one line."""

import pathlib

import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.job import detect_to_files
from cellrcnn.settings import DetectionSettings


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
