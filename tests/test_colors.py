"""Colours in every form the product reads them, and the one-line error for anything else."""

import numpy as np
import pytest

from cellrcnn import exports
from cellrcnn.colors import hex_color, parse_rgb, rgb_components, rgb_tuple
from cellrcnn.errors import CellRCNNError


@pytest.mark.parametrize('color, rgb', [
    ('#ff8000', (255, 128, 0)), ('#FF8000', (255, 128, 0)), (' #f80 ', (255, 136, 0)),
    ('rgb(1,2,3)', (1, 2, 3)), ('rgb( 1, 2 ,3 )', (1, 2, 3)), ('rgba(4,5,6,0.5)', (4, 5, 6)),
    ([7, 8, 9], (7, 8, 9)), ((0, 0, 255), (0, 0, 255)), (np.array([1, 2, 3]).tolist(), (1, 2, 3)),
])
def test_forms(color, rgb):
    assert parse_rgb(color) == rgb_tuple(color) == rgb
    assert hex_color(color) == '#{:02x}{:02x}{:02x}'.format(*rgb)


@pytest.mark.parametrize('color', ['green', '#ff80', '#gg0000', 'rgb(256,0,0)', [1, 2], [1, 2, 300], [1.5, 2, 3],
                                   [True, 0, 0], None, 3])
def test_not_colours(color):
    assert parse_rgb(color) is None and hex_color(color) is None
    with pytest.raises(CellRCNNError, match=r"^the tumour colour must be #rrggbb, rgb\(r,g,b\) or \[r, g, b\]") as err:
        rgb_tuple(color, 'the tumour colour')
    assert '\n' not in str(err.value)


def test_components():
    assert rgb_components('#0a0b0c') == '10,11,12'


def test_exports_take_either_form(tmp_path):
    boxes, scores = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0.9, 0.8])
    path = tmp_path / 'n.geojson'
    exports.write_geojson(path, boxes, scores, classes=['Tumor', 'Stroma'],
                          class_colors={'Tumor': '#c80000', 'Stroma': [0, 200, 0]})
    text = path.read_text()
    assert '"color":[200,0,0]' in text and '"color":[0,200,0]' in text
    with pytest.raises(CellRCNNError, match="the class colour of 'Tumor' must be"):
        exports.write_geojson(path, boxes, scores, classes=['Tumor', 'Stroma'], class_colors={'Tumor': 'red'})
