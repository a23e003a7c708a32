"""The nuclei pixelmap: the label image read back by large_image, and the annotation that draws it."""

import large_image
import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.nuclei_pixelmap import OUTLINED_MPP, PIXELMAP_NAME, TILE, pixelmap_annotation, write_label_image

NUMPY = large_image.constants.TILE_FORMAT_NUMPY


def painted(boxes, width, height, outlined=True, pad=64):
    """The labels, painted box by box in order: 2k + 3 on the box's whole pixels, and (``outlined``) 2k + 2 inside
    its outline (a box across the image's edge has its outline outside)."""
    label = np.zeros((height + 2 * pad, width + 2 * pad), np.int64)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        x0, y0 = int(np.floor(x0)) + pad, int(np.floor(y0)) + pad
        x1, y1 = max(int(np.ceil(x1)) + pad, x0 + 1), max(int(np.ceil(y1)) + pad, y0 + 1)
        label[y0:y1, x0:x1] = 2 * k + 3
        if outlined:
            label[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = 2 * k + 2
    return label[pad:pad + height, pad:pad + width]


def labels_of(source, level):
    """The labels of one level of a label image opened by large_image."""
    scale = 2 ** (source.levels - 1 - level)
    width, height = -(-source.sizeX // scale), -(-source.sizeY // scale)
    rows = [np.concatenate([source.getTile(x, y, level, numpyAllowed='always')[..., :3]
                            for x in range(-(-width // TILE))], axis=1) for y in range(-(-height // TILE))]
    rgb = np.concatenate(rows, axis=0)[:height, :width].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_the_label_image_outlines_each_box_where_it_lies_and_fills_it_zoomed_out(tmp_path):
    rng = np.random.default_rng(0)
    width, height = 3 * TILE + 37, 2 * TILE + 5
    x0 = rng.uniform(-4, width - 10, 400)
    y0 = rng.uniform(-4, height - 10, 400)
    size = rng.uniform(1, 24, (400, 2))
    boxes = np.column_stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]])
    # across a tile corner, under a pixel, across the image's edge
    boxes[:3] = [[TILE - 5.5, TILE - 3, TILE + 6, TILE + 9], [0, 0, 0.5, 0.5],
                 [width - 3, height - 2, width + 4, height + 1]]
    path = str(tmp_path / 'labels.tiff')
    write_label_image(path, boxes, width, height, mpp=0.5)  # a 20x image

    source = large_image.open(path)
    assert (source.sizeX, source.sizeY, source.tileWidth) == (width, height, TILE)
    assert source.levels == 3  # 805 -> 403 -> 202 px: down to one tile
    top = source.levels - 1
    expected = painted(boxes, width, height)
    np.testing.assert_array_equal(labels_of(source, top), expected)  # across tile seams, at the edges
    assert set(np.unique(expected)) - {0} <= {2 * k + 2 for k in range(400)} | {2 * k + 3 for k in range(400)}
    # each level of 10x and finer is drawn from the boxes themselves (no label is ever averaged)
    half = labels_of(source, top - 1)
    assert OUTLINED_MPP == 1.0
    np.testing.assert_array_equal(half, painted(boxes / 2, half.shape[1], half.shape[0]))
    # zoomed further out each nucleus is a solid dot: its whole box is its outline's label, its type's colour
    quarter = labels_of(source, top - 2)
    np.testing.assert_array_equal(quarter, painted(boxes / 4, quarter.shape[1], quarter.shape[0], outlined=False))
    assert quarter.any() and (quarter[quarter > 0] % 2 == 1).all()
    # a 40x image outlines its boxes down to 10x: a level more
    path = str(tmp_path / 'labels40x.tiff')
    write_label_image(path, boxes, width, height, mpp=0.25)
    source = large_image.open(path)
    quarter = labels_of(source, top - 2)
    np.testing.assert_array_equal(quarter, painted(boxes / 4, quarter.shape[1], quarter.shape[0]))


def test_the_annotation_gives_each_nucleus_its_types_colour_on_its_outline():
    doc = pixelmap_annotation('a' * 24, 3, classes=[2, 0, 2], class_names=('lymphocyte', 'tumour', 'stromal'),
                              class_colors={'lymphocyte': '#0000ff', 'tumour': 'rgb(255,0,0)', 'stromal': '#00a000'},
                              attributes={'model': 'm.pt', 'cellrcnn': '1'}, visible=False)
    assert doc['name'] == PIXELMAP_NAME and doc['display'] == {'visible': False}
    assert doc['attributes'] == {'model': 'm.pt', 'cellrcnn': '1', 'density': {'kind': 'nuclei pixelmap', 'nuclei': 3}}
    (element,) = doc['elements']
    assert element['girderId'] == 'a' * 24 and element['boundaries'] is True
    assert element['values'] == [0, 3, 1, 3]  # region k is nucleus k: its type's category, 0 for none
    assert [c['label'] for c in element['categories']] == ['none', 'lymphocyte', 'tumour', 'stromal']
    assert [c['strokeColor'] for c in element['categories']] == ['rgba(0,0,0,0)', 'rgba(0,0,255,1)',
                                                                 'rgba(255,0,0,1)', 'rgba(0,160,0,1)']
    assert all(c['fillColor'].endswith(',0)') for c in element['categories'])  # the insides stay clear

    untyped = pixelmap_annotation('outputNucleiLabelImage', 2)['elements'][0]
    assert untyped['values'] == [0, 1, 1] and len(untyped['categories']) == 2


def test_bad_pixelmap_input_is_one_line(tmp_path):
    with pytest.raises(CellRCNNError, match='one class per nucleus'):
        pixelmap_annotation('x', 3, classes=[0, 1], class_names=('a', 'b'), class_colors={'a': '#000000',
                                                                                         'b': '#ffffff'})
    with pytest.raises(CellRCNNError, match="cannot write the pixelmap's label image"):
        write_label_image(str(tmp_path / 'missing' / 'labels.tiff'), np.zeros((0, 4)), 10, 10, 0.5)


def test_a_label_image_rewrite_cut_short_keeps_the_whole_one_before(tmp_path, monkeypatch):
    import cellrcnn.nuclei_pixelmap as nuclei_pixelmap

    path = tmp_path / 'labels.tiff'
    boxes = np.array([[10, 10, 30, 24], [500, 300, 520, 330]], float)
    write_label_image(str(path), boxes, 3 * TILE, 2 * TILE, mpp=0.5)
    whole = path.read_bytes()
    tiles = nuclei_pixelmap._label_tiles

    def cut_short(*args):  # the run stops (Ctrl-C, a killed job) after two tiles of the next image
        for i, tile in enumerate(tiles(*args)):
            if i == 2:
                raise KeyboardInterrupt
            yield tile

    monkeypatch.setattr(nuclei_pixelmap, '_label_tiles', cut_short)
    with pytest.raises(KeyboardInterrupt):
        write_label_image(str(path), boxes[:1], 3 * TILE, 2 * TILE, mpp=0.5)
    assert path.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['labels.tiff']
    source = large_image.open(str(path))
    assert (source.sizeX, source.sizeY) == (3 * TILE, 2 * TILE)
