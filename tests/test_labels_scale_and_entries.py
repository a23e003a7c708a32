"""cellrcnn.labels beyond the readers (tests/test_labels_formats.py): scale estimation, rescaling, the ``--data``
entries, splits, and the one-line errors."""

import json

import cv2
import numpy as np
import pytest
import tifffile

from cellrcnn import labels as L
from cellrcnn.errors import CellRCNNError
from labels_support import feature, imagescope_xml, needs_data


def one_line_error(call, *fragments):
    with pytest.raises(CellRCNNError) as info:
        call()
    message = str(info.value)
    assert '\n' not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# --------------------------------------------------------------------------- scale

def test_estimate_mpp_of_a_known_size(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((100, 100, 3), np.uint8))
    layers = [('', [({'Type': '1'}, [(x, y), (x + w, y), (x + w, y + h), (x, y + h)])
                    for x, y, w, h in [(0, 0, 16, 16), (20, 0, 8, 32), (40, 0, 30, 30), (0, 40, 4, 4),
                                       (50, 50, 10, 10)]])]
    (tmp_path / 'field.xml').write_text(imagescope_xml(layers))
    record = L.read_imagescope(str(tmp_path / 'field.xml'), str(tmp_path / 'field.png'), mpp='auto')
    # sizes sqrt(w * h): 16, 16, 30, 4, 10: median 16 px is the reference nucleus
    assert record.mpp == pytest.approx(L.REFERENCE_NUCLEUS_UM / 16)
    assert L.estimate_mpp(record, reference_um=4.0) == pytest.approx(0.25)


@needs_data
@pytest.mark.parametrize('factor', [2, 3, 0.5])
def test_an_image_enlarged_by_a_factor_is_estimated_at_that_factor_finer(dsb, tmp_path, factor):
    images, masks, boxes = dsb
    name = sorted(boxes)[2]
    [before] = L.read_entry(f'masks:{masks / name},mpp=auto')   # its image: in the folder images beside masks/
    labels = cv2.imread(str(masks / name), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(str(images / name))
    size = (round(labels.shape[1] * factor), round(labels.shape[0] * factor))
    (tmp_path / 'images').mkdir()
    (tmp_path / 'masks').mkdir()
    cv2.imwrite(str(tmp_path / 'masks' / name), cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))
    cv2.imwrite(str(tmp_path / 'images' / name), cv2.resize(image, size))
    [after] = L.read_entry(f'{tmp_path / "masks"},mpp=auto')
    # whole factors enlarge every nucleus exactly; halving rounds each side by up to a pixel
    assert after.mpp == pytest.approx(before.mpp / factor, rel=1e-6 if factor >= 1 else 0.1)


def test_dots_have_no_size_to_estimate_from(tmp_path):
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((10, 10, 3), np.uint8))
    (tmp_path / 'points.json').write_text(json.dumps({'a.png': [[1, 2, 'x']]}))
    one_line_error(lambda: L.read_points_json(tmp_path / 'points.json', tmp_path, mpp='auto'), 'points.json',
                   'no', 'extent')


def dark_rectangles(tmp_path, boxes, size=(120, 160)):
    image = np.full(size + (3,), 235, np.uint8)
    for x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = 30
    cv2.imwrite(str(tmp_path / 'field.png'), image)
    (tmp_path / 'boxes.json').write_text(json.dumps({'field.png': [list(b) for b in boxes]}))
    [record] = L.read_boxes_json(tmp_path / 'boxes.json', tmp_path, mpp=0.5)
    return record


@pytest.mark.parametrize('mpp', [1.0, 0.3125, 0.2])
def test_rescale_moves_the_labels_with_the_pixels(tmp_path, mpp):
    boxes = [(10, 20, 30, 44), (60, 8, 100, 28), (120, 80, 152, 112), (4, 90, 20, 118)]
    record = dark_rectangles(tmp_path, boxes)
    scaled = L.rescale(record, mpp)
    factor = 0.5 / mpp
    assert scaled.mpp == mpp and scaled.shape == (round(120 * factor), round(160 * factor))
    assert scaled.image.shape == scaled.shape + (3,) and scaled.load() is scaled.image
    # the dark rectangles found in the resized image are where the rescaled boxes say, to a pixel
    count, _, stats, _ = cv2.connectedComponentsWithStats((scaled.image.mean(axis=2) < 132).astype(np.uint8))
    found = sorted((x, y, x + w, y + h) for x, y, w, h, _ in stats[1:])
    np.testing.assert_allclose(found, sorted(map(tuple, scaled.boxes.tolist())), atol=1.0)
    np.testing.assert_allclose(scaled.points, record.points * factor, rtol=0.02)
    assert scaled.classes == record.classes and scaled.name == record.name


def test_rescale_needs_a_scale(tmp_path):
    record = dark_rectangles(tmp_path, [(10, 20, 30, 44)])
    unknown = L.LabelledImage(**{**record.__dict__, 'mpp': None})
    one_line_error(lambda: L.rescale(unknown, 0.5), 'boxes.json', 'unknown', 'mpp=')


def test_a_scale_given_wrong_is_refused_before_the_image_is_enlarged(tmp_path):
    record = dark_rectangles(tmp_path, [(10, 20, 30, 44)])
    typed_as_magnification = L.LabelledImage(**{**record.__dict__, 'mpp': 20.0})  # mpp=20 for a 20x image
    one_line_error(lambda: L.rescale(typed_as_magnification, 0.5), 'boxes.json', 'enlarged 40 times',
                   'not a magnification')
    assert L.rescale(L.LabelledImage(**{**record.__dict__, 'mpp': 2.0}), 0.5).shape == (480, 640)  # a 5x image


# --------------------------------------------------------------------------- --data entries and splits

def test_parse_entry():
    assert L.parse_entry('points:/d/p.json,images=/d/im, mpp=0.5') == ('points', '/d/p.json',
                                                                       {'images': '/d/im', 'mpp': '0.5'})
    assert L.parse_entry('/d/masks') == (None, '/d/masks', {})
    assert L.parse_entry(r'C:\data\a.xml,mpp=auto') == (None, r'C:\data\a.xml', {'mpp': 'auto'})
    assert L.parse_entry('dsa:a.json,annotation=nuclei,split=val,seed=3')[2] == {'annotation': 'nuclei',
                                                                                 'split': 'val', 'seed': '3'}
    one_line_error(lambda: L.parse_entry('xml:/d/a.xml'), 'unknown format', "'xml'", 'imagescope')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,colour=red'), 'colour', 'keys')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,mpp=1,mpp=2'), 'mpp=2')
    one_line_error(lambda: L.parse_entry('points:/d/p.json,mpp=-1'), 'mpp', '-1')
    one_line_error(lambda: L.parse_entry('masks:/d/m,seed=4'), 'split=')
    one_line_error(lambda: L.parse_entry('points:,mpp=1'), 'no path')


def test_detect_format(tmp_path):
    (tmp_path / 'a.xml').write_text('<Annotations/>')
    assert L.detect_format(str(tmp_path / 'a.xml')) == 'imagescope'
    assert L.detect_format(str(tmp_path / 'x.geojson')) == 'qupath'
    assert L.detect_format(str(tmp_path / 'x.csv')) == 'csv'
    assert L.detect_format(str(tmp_path / 'x.tiff')) == 'masks'
    for content, fmt in [({'a.png': [[1, 2, 'c']]}, 'points'), ({'a.png': [], 'b.png': [[1, 2, 3, 4]]}, 'boxes'),
                         ({'type': 'FeatureCollection', 'features': []}, 'qupath'),
                         ([{'type': 'Feature'}], 'qupath'), ({'name': 'n', 'elements': []}, 'dsa'),
                         ([{'_id': 'x', 'annotation': {}}], 'dsa')]:
        (tmp_path / 'b.json').write_text(json.dumps(content))
        assert L.detect_format(str(tmp_path / 'b.json')) == fmt, content
    (tmp_path / 'b.json').write_text(json.dumps({'a.png': []}))
    one_line_error(lambda: L.detect_format(str(tmp_path / 'b.json')), 'b.json', 'FORMAT:PATH')
    one_line_error(lambda: L.detect_format(str(tmp_path)), 'several kinds')   # .xml and .json
    (tmp_path / 'b.json').unlink()
    assert L.detect_format(str(tmp_path)) == 'imagescope'
    (tmp_path / 'a.xml').unlink()
    cv2.imwrite(str(tmp_path / 'm.png'), np.zeros((4, 4), np.uint8))
    assert L.detect_format(str(tmp_path)) == 'masks'


@needs_data
def test_read_entries_mixes_formats_and_splits(brca, dsb):
    images, points, _ = brca
    dsb_images, masks, boxes = dsb
    brca_dir, dsb_dir = images.parent, dsb_images.parent
    records = L.read_entries([f'points:{brca_dir}/points.json,images={images},mpp=0.5',
                              f'{masks},mpp=auto'])
    assert len(records) == 90 + 107
    assert all(r.mpp == 0.5 for r in records[:90])
    # DSB's scale varies between images (its README: 2-4x); estimated, every one is somewhere near 20x-40x
    estimated = [r.mpp for r in records[90:]]
    assert all(0.1 < mpp < 1.0 for mpp in estimated) and max(estimated) > 2 * min(estimated)

    splits = json.loads((brca_dir / 'splits.json').read_text())   # {image: 'train' or 'val'}
    val = L.read_entry(f'{brca_dir}/points.json,mpp=0.5,splits={brca_dir}/splits.json,split=val')
    assert sorted(r.name for r in val) == sorted(n for n, s in splits.items() if s == 'val')
    one_line_error(lambda: L.read_entry(f'{brca_dir}/points.json,splits={brca_dir}/splits.json,split=test'),
                   "no split 'test'", 'train', 'val')

    seeded = {s: L.read_entry(f'boxes:{dsb_dir}/boxes.json,split={s},seed=7') for s in ('train', 'val')}
    names = {s: {r.name for r in records} for s, records in seeded.items()}
    assert len(names['train']) == 86 and len(names['val']) == 21           # 80 / 20 of 107
    assert names['train'] | names['val'] == set(boxes) and not names['train'] & names['val']
    again = {r.name for r in L.read_entry(f'{masks},split=val,seed=7')}    # another format, same images: same split
    assert again == names['val']


def test_seeded_split_is_deterministic():
    names = [f'image{i}.png' for i in range(50)]
    split = L.seeded_split(names, seed=1)
    assert split == L.seeded_split(names[::-1], seed=1) == L.seeded_split(names + names[:5], seed=1)
    assert split != L.seeded_split(names, seed=2)
    assert [len(split['train']), len(split['val'])] == [40, 10]
    three = L.seeded_split(names, fractions={'a': 1, 'b': 1, 'c': 2})
    assert [len(v) for v in three.values()] == [12, 13, 25]   # ends at round(12.5) = 12 (half to even), 25, 50
    assert sorted(sum(three.values(), [])) == sorted(names)


def test_read_splits_both_layouts(tmp_path):
    (tmp_path / 'a.json').write_text(json.dumps({'x.png': 'train', 'y.png': 'val', 'z.png': 'train'}))
    assert L.read_splits(tmp_path / 'a.json') == {'train': ['x.png', 'z.png'], 'val': ['y.png']}
    (tmp_path / 'b.json').write_text(json.dumps({'train': ['x.png'], 'test': []}))
    assert L.read_splits(tmp_path / 'b.json') == {'train': ['x.png'], 'test': []}
    (tmp_path / 'c.json').write_text(json.dumps([1, 2]))
    one_line_error(lambda: L.read_splits(tmp_path / 'c.json'), 'c.json')


# --------------------------------------------------------------------------- one-line errors

def test_bad_input_gives_one_line_naming_the_file(tmp_path):
    cv2.imwrite(str(tmp_path / 'field.png'), np.zeros((20, 30, 3), np.uint8))
    image = str(tmp_path / 'field.png')

    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)

    one_line_error(lambda: L.read_entry(f'points:{tmp_path}/missing.json'), 'missing.json', 'no such file')
    # a label file of no image would train nothing and evaluate as perfect
    one_line_error(lambda: L.read_entry(f'points:{write("none.json", "{}")},images={tmp_path}'), 'none.json',
                   'labels no image')
    one_line_error(lambda: L.read_imagescope(write('bad.xml', '<Annotations><Annotation>'), image), 'bad.xml', 'XML')
    one_line_error(lambda: L.read_imagescope(write('svg.xml', '<svg/>'), image), 'svg.xml', '<svg>')
    one_line_error(lambda: L.read_imagescope(write('nov.xml', '<Annotations><Annotation><Regions><Region Type="0">'
                                                              '<Vertices/></Region></Regions></Annotation>'
                                                              '</Annotations>'), image), 'nov.xml', 'vertices')
    one_line_error(lambda: L.read_qupath(write('bad.geojson', '{"type": "Point"'), image), 'bad.geojson', 'JSON')
    one_line_error(lambda: L.read_qupath(write('pt.geojson', '{"type": "Point", "coordinates": [1, 2]}'), image),
                   'pt.geojson', 'Feature')
    one_line_error(lambda: L.read_qupath(write('poly.geojson', json.dumps(feature('Polygon', [[[1, 2]]]))), image),
                   'poly.geojson', 'feature 0')
    huge = json.dumps(feature('Polygon', [[[1, 2], [3, 2], [3, 4]]])).replace('[3, 4]', f'[1{"0" * 400}, 4]')
    one_line_error(lambda: L.read_qupath(write('huge.geojson', huge), image), 'huge.geojson', 'feature 0')  # no float
    one_line_error(lambda: L.read_qupath(write('deep.geojson', '[' * 100_000 + ']' * 100_000), image), 'deep.geojson',
                   'nests its JSON deeper')
    odd = feature('Point', [5, 5], 'tumour')
    odd['properties']['objectType'] = ['detection']  # not a name: read as none QuPath knows, its point a dot
    assert L.read_qupath(write('odd.geojson', json.dumps(odd)), image).points.tolist() == [[5, 5]]
    one_line_error(lambda: L.read_dsa(write('dsa.json', '{"elements": [{"type": "rectangle", "center": [1]}]}'),
                                      image), 'dsa.json', 'malformed rectangle')
    # a point outside its image (the image is 30 x 20)
    one_line_error(lambda: L.read_points_json(write('out.json', '{"field.png": [[5, 5], [31, 4]]}'), tmp_path),
                   'out.json', 'nucleus 1', '(31, 4)', 'outside', '30 x 20')
    one_line_error(lambda: L.read_points_json(write('row.json', '{"field.png": [[5, "y"]]}'), tmp_path),
                   'row.json', 'row 0')
    one_line_error(lambda: L.read_points_json(write('img.json', '{"other.png": []}'), tmp_path),
                   'img.json', "no image 'other.png'")
    one_line_error(lambda: L.read_boxes_json(write('flat.json', '{"field.png": [[5, 5, 5, 9]]}'), tmp_path),
                   'flat.json', 'empty box')
    one_line_error(lambda: L.read_csv(write('field.csv', 'a,b\n1,2\n'), tmp_path), 'field.csv', 'x and y')
    one_line_error(lambda: L.read_csv(write('field.csv', 'x,y\n1,z\n'), tmp_path), 'field.csv', 'line 2')
    # masks that are not label images
    cv2.imwrite(str(tmp_path / 'rgb.png'), np.zeros((20, 30, 3), np.uint8))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'rgb.png'), image), 'rgb.png', 'not a label image')
    tifffile.imwrite(tmp_path / 'float.tif', np.zeros((20, 30), np.float32))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'float.tif'), image), 'float.tif', 'float32')
    binary = np.zeros((20, 30), np.uint8)
    binary[2:5, 2:5] = binary[10:15, 10:15] = 255
    cv2.imwrite(str(tmp_path / 'binary.png'), binary)
    one_line_error(lambda: L.read_mask(str(tmp_path / 'binary.png'), image), 'binary.png', 'binary mask')
    cv2.imwrite(str(tmp_path / 'lossy.jpg'), binary // 255 * np.arange(20, dtype=np.uint8)[:, None])
    one_line_error(lambda: L.read_mask(str(tmp_path / 'lossy.jpg'), image), 'lossy.jpg', 'losslessly')
    cv2.imwrite(str(tmp_path / 'small.png'), np.ones((10, 30), np.uint8))
    one_line_error(lambda: L.read_mask(str(tmp_path / 'small.png'), image), 'small.png', '30 x 10', '30 x 20')
    write('text.png', b'not an image')
    one_line_error(lambda: L.read_mask(str(tmp_path / 'text.png'), image), 'text.png')
    one_line_error(lambda: L.read_mask(str(tmp_path / 'small.png'), str(tmp_path / 'text.png')), 'text.png')
    one_line_error(lambda: L.read_entry(f'masks:{tmp_path}/small.png,images={tmp_path}'), 'different folders')
    one_line_error(lambda: L.read_entry(f'masks:{tmp_path}/small.png,images={tmp_path}/none'), 'none', 'no such folder')
    one_line_error(lambda: L.read_entry(f'{tmp_path}/field.png.unknown'), 'field.png.unknown')
    one_line_error(lambda: L.read_entry(f'{tmp_path}/out.json,annotation=nuclei'), 'annotation=', 'dsa', 'points')
