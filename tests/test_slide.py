"""Slides: opening and scale, tissue mask, tile grid, reading at analysis scale, mapping back, prefetch."""

import threading

import cv2
import histomicstk  # noqa: F401  (required, as large_image is: a broken install fails here rather than skipping)
import large_image  # noqa: F401
import numpy as np
import pytest
import pyvips

from cellrcnn.errors import CellRCNNError
from cellrcnn.slide import Slide
from cellrcnn.tiling import Tile, _spans, prefetch, tile_grid
from cellrcnn.tissue import find_tissue


def optical_density(rgb):
    return -np.log10(np.maximum(rgb.astype(np.float32), 1) / 242.0)


@pytest.fixture(scope='module')
def slide20x(synthetic_slide):
    """A 20x (0.5 um/px) synthetic slide, 2048 x 1536, tiles of 512, and its nucleus boxes."""
    path, boxes = synthetic_slide(2048, 1536, seed=4, mpp=0.5, tile_size=512)
    return str(path), boxes


def _write_vips(path, array, px_per_mm=None, tile=256):
    im = pyvips.Image.new_from_array(np.ascontiguousarray(array)).copy(interpretation='srgb')
    kwargs = {}
    if px_per_mm is not None:
        im = im.copy(xres=px_per_mm, yres=px_per_mm)
        kwargs['resunit'] = 'cm'
    else:
        im = im.copy(xres=1.0, yres=1.0)  # libvips' default: 1 px/mm, which large_image ignores (no resolution)
    im.tiffsave(path, tile=True, tile_width=tile, tile_height=tile, pyramid=True, compression='jpeg', Q=90,
                **kwargs)
    return path


# ---------------------------------------------------------------------------------------------------------------
# opening, scale
# ---------------------------------------------------------------------------------------------------------------

def test_open_native_and_half_magnification(slide20x):
    path, _ = slide20x
    s = Slide(path)
    assert s.base_size == (2048, 1536) and s.size == (2048, 1536)
    assert s.scale == 1 and s.mpp == pytest.approx(0.5) and s.magnification == pytest.approx(20)
    assert s.scale_from == 'metadata'
    s10 = Slide(path, magnification=10)
    assert s10.scale == pytest.approx(2) and s10.size == (1024, 768)
    assert s10.mpp == pytest.approx(1.0) and s10.magnification == pytest.approx(10)


def test_magnification_above_native(slide20x):
    path, _ = slide20x
    with pytest.raises(CellRCNNError, match='upsample'):
        Slide(path, magnification=40)
    # within 5% of native: analysed at native scale, and says so
    s = Slide(path, magnification=20.8)
    assert s.scale == 1 and s.magnification == pytest.approx(20)
    up = Slide(path, magnification=40, allow_upsample=True)
    assert up.scale == pytest.approx(0.5) and up.size == (4096, 3072)


@pytest.mark.parametrize('kwargs, match', [({'magnification': 0}, 'magnification'),
                                           ({'magnification': 'x'}, 'magnification'),
                                           ({'mpp': -0.5}, 'mpp')])
def test_bad_scale_arguments(slide20x, kwargs, match):
    with pytest.raises(CellRCNNError, match=match):
        Slide(slide20x[0], **kwargs)


def test_slide_without_resolution_needs_mpp(tmp_path):
    rgb = np.full((600, 800, 3), 240, np.uint8)
    rgb[100:400, 200:600] = (160, 80, 140)
    path = _write_vips(str(tmp_path / 'nores.tiff'), rgb)
    with pytest.raises(CellRCNNError, match=r'states no magnification or resolution; pass --mpp') as err:
        Slide(path)
    assert str(tmp_path / 'nores.tiff') in str(err.value) and '\n' not in str(err.value)
    s = Slide(path, mpp=0.25)  # a 40x scan, analysed at 20x
    assert s.scale_from == 'mpp' and s.native_magnification == pytest.approx(40)
    assert s.scale == pytest.approx(2) and s.size == (400, 300) and s.mpp == pytest.approx(0.5)
    # two of 208 x 158 cover 400 x 300 with 16 px shared
    tile = tile_grid(s, tile_size=256, overlap=16, min_tissue=0.05)[0]
    assert (tile.width, tile.height, tile.base_width, tile.base_height) == (208, 158, 416, 316)
    assert s.read(tile).shape == (158, 208, 3)


def test_mpp_overrides_metadata(slide20x):
    s = Slide(slide20x[0], mpp=0.25)
    assert s.scale_from == 'mpp' and s.scale == pytest.approx(2)


@pytest.mark.parametrize('kind', ['truncated', 'text', 'missing', 'empty'])
def test_unreadable_files_give_one_line_errors(slide20x, tmp_path, kind):
    path = tmp_path / f'{kind}.tiff'
    if kind == 'truncated':
        data = open(slide20x[0], 'rb').read()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'text':
        path.write_text('this is not a slide\n' * 50)
    elif kind == 'empty':
        path.write_bytes(b'')
    with pytest.raises(CellRCNNError) as err:
        Slide(path)
    msg = str(err.value)
    assert str(path) in msg and '\n' not in msg
    assert ('not found' if kind == 'missing' else 'cannot open slide') in msg


# ---------------------------------------------------------------------------------------------------------------
# tile grid
# ---------------------------------------------------------------------------------------------------------------

def _check_grid(tiles, x0, y0, x1, y1, size, overlap, align=1):
    assert [t.index for t in tiles] == list(range(len(tiles)))
    assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)  # row-major
    rows = max(t.row for t in tiles) + 1
    cols = max(t.col for t in tiles) + 1
    assert len(tiles) == rows * cols
    # the fewest tiles that cover the ROI with the overlap: one fewer per axis could not
    for n, length in ((cols, x1 - x0), (rows, y1 - y0)):
        assert n == 1 and length <= size or (n - 1) * (size - overlap) + overlap < length <= n * size
    grid = {(t.row, t.col): t for t in tiles}
    covered = np.zeros((y1 - y0, x1 - x0), np.int32)
    for t in tiles:
        assert t.width <= size and t.height <= size
        assert (t.x - x0) % align == 0 and (t.y - y0) % align == 0  # steps of whole fields from the corner
        assert t.width == grid[0, t.col].width and t.height == grid[t.row, 0].height
        if t.col < cols - 1 and t.row < rows - 1:  # one size for all but the last row and column, which end flush
            assert (t.width, t.height) == (grid[0, 0].width, grid[0, 0].height)
        assert x0 <= t.x and t.x + t.width <= x1 and y0 <= t.y and t.y + t.height <= y1
        covered[t.y - y0:t.y - y0 + t.height, t.x - x0:t.x - x0 + t.width] += 1
        if t.col + 1 < cols:
            right = grid[t.row, t.col + 1]
            assert right.y == t.y and t.x < right.x <= t.x + t.width - overlap
        if t.row + 1 < rows:
            below = grid[t.row + 1, t.col]
            assert below.x == t.x and t.y < below.y <= t.y + t.height - overlap
    assert covered.min() >= 1
    assert grid[0, 0].x == x0 and grid[0, 0].y == y0
    assert grid[0, cols - 1].x + grid[0, cols - 1].width == x1  # flush with the edges
    assert grid[rows - 1, 0].y + grid[rows - 1, 0].height == y1


def test_tile_grid_whole_slide(slide20x):
    s = Slide(slide20x[0])
    tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0.05)
    _check_grid(tiles, 0, 0, 2048, 1536, 512, 64)
    assert (max(t.col for t in tiles) + 1, max(t.row for t in tiles) + 1) == (5, 4)
    # shrunk to fit: 512 px tiles stepped by 448 with the last moved back to the edge would read 1.67x the slide
    assert sum(t.width * t.height for t in tiles) < 1.3 * 2048 * 1536
    aligned = tile_grid(s, tile_size=512, overlap=64, min_tissue=0.05, align=16)
    _check_grid(aligned, 0, 0, 2048, 1536, 512, 64, align=16)
    assert sum(t.width * t.height for t in aligned) < 1.3 * 2048 * 1536
    for t in tiles:  # native scale: the base region is the tile
        assert (t.base_x, t.base_y, t.base_width, t.base_height) == (t.x, t.y, t.width, t.height)


def test_tile_spans_cover_each_axis_with_the_overlap_in_steps_of_whole_fields():
    rng = np.random.default_rng(0)
    for _ in range(4000):
        tile = int(rng.integers(1, 3000))
        overlap, length = int(rng.integers(0, tile)), int(rng.integers(1, 60000))
        align, origin = int(rng.choice([1, 4, 8, 16, 32])), int(rng.integers(0, 1000))
        spans = _spans(origin, length, tile, overlap, align)
        case = (origin, length, tile, overlap, align)
        assert spans[0][0] == origin and spans[-1][0] + spans[-1][1] == origin + length, case
        assert all(1 <= side <= tile for _, side in spans), case
        assert all(b[0] > a[0] and a[0] + a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:])), case
        assert all(side == spans[0][1] for _, side in spans[:-1]) and spans[-1][1] <= spans[0][1], case
        step = tile - overlap if tile - overlap < align else (tile - overlap) // align * align
        assert len(spans) == (1 if length <= tile else -(-(length - overlap) // step)), case  # no tile too many
        if tile - overlap >= align:
            assert all((start - origin) % align == 0 for start, _ in spans), case


@pytest.mark.parametrize('mag, roi', [(20, (300, 200, 1300, 900)), (10, (300, 201, 1301, 900)),
                                      (13, (0, 0, 2048, 1536)), (20, (1900, 1400, 500, 500)),
                                      (20, (10, 20, 100, 50)), (10, (-100, -100, 400, 300))])
def test_tile_grid_roi(slide20x, mag, roi):
    s = Slide(slide20x[0], magnification=mag)
    tiles = tile_grid(s, tile_size=256, overlap=32, min_tissue=0.05, roi=roi, align=16)
    x0, y0, x1, y1 = s.roi_to_analysis(roi)
    _check_grid(tiles, x0, y0, x1, y1, 256, 32, align=16)
    # the tiles' base regions cover the ROI (clipped to the slide) and stay inside the slide
    bx0, by0 = max(0, roi[0]), max(0, roi[1])
    bx1, by1 = min(2048, roi[0] + roi[2]), min(1536, roi[1] + roi[3])
    assert min(t.base_x for t in tiles) <= bx0 and min(t.base_y for t in tiles) <= by0
    assert max(t.base_x + t.base_width for t in tiles) >= bx1
    assert max(t.base_y + t.base_height for t in tiles) >= by1
    assert all(t.base_x + t.base_width <= 2048 and t.base_y + t.base_height <= 1536 for t in tiles)
    for t in tiles:
        assert t.base_x == round(t.x * s.scale) and t.base_width == pytest.approx(t.width * s.scale, abs=1)


@pytest.mark.parametrize('roi', [(3000, 0, 100, 100), (0, -500, 100, 400), (10, 10, 0, 5), (10, 10, 5, -1),
                                 ('a', 1, 2, 3), (1, 2, 3)])
def test_bad_roi(slide20x, roi):
    with pytest.raises(CellRCNNError, match='ROI'):
        tile_grid(Slide(slide20x[0]), tile_size=1024, overlap=64, min_tissue=0.05, roi=roi)


@pytest.mark.parametrize('size, overlap', [(0, 0), (256, 256), (256, -1)])
def test_bad_tile_size_or_overlap(slide20x, size, overlap):
    with pytest.raises(CellRCNNError, match='tile'):
        tile_grid(Slide(slide20x[0]), tile_size=size, overlap=overlap, min_tissue=0.05)


# ---------------------------------------------------------------------------------------------------------------
# tissue
# ---------------------------------------------------------------------------------------------------------------

def test_tissue_mask_and_fractions(slide20x):
    s = Slide(slide20x[0])
    tissue = find_tissue(s)
    mask = tissue.mask
    assert mask.dtype == bool and not mask.flags.writeable
    assert tissue.fx == pytest.approx(s.size[0] / mask.shape[1])
    assert mask.shape[1] == 256  # a 1 mm wide slide: 4 um mask pixels, not 1024 of them
    assert tissue.area_mm2((0, 0) + s.size) == pytest.approx(mask.mean() * s.size[0] * s.size[1] * (s.mpp / 1e3) ** 2)
    base = s.read(tile_grid(s, tile_size=4096, overlap=64, min_tissue=0.05)[0])
    # tissue is visibly stained (as test_synthetic), ignoring cracks and gaps of a few micrometres (smoothing the
    # stained mask, not the optical density, so that dark nuclei at a tissue edge do not spread onto the glass)
    truth = cv2.GaussianBlur((optical_density(base).sum(2) > 0.25).astype(np.float32), (0, 0), 4) > 0.5
    assert 0.2 < mask.mean() < 0.95
    assert abs(mask.mean() - truth.mean()) < 0.05
    for t in tile_grid(s, tile_size=256, overlap=0, min_tissue=0.05):
        true_frac = truth[t.y:t.y + t.height, t.x:t.x + t.width].mean()
        assert abs(t.tissue - true_frac) < 0.15, t  # thin strands at tile edges are where the thumbnail mask errs
        assert t.skipped == (t.tissue < 0.05)
    tiles = tile_grid(s, tile_size=256, overlap=0, min_tissue=0.05)
    assert max(t.tissue for t in tiles) > 0.95 and min(t.tissue for t in tiles) < 0.05  # tissue and glass


def test_all_glass_slide_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 3, (1200, 1600, 3)), 0, 255).astype(np.uint8)
    glass[200:240, 300:330] = 205  # a speck of dust, 20 x 15 um
    white = np.full((1200, 1600, 3), 255, np.uint8)
    for name, rgb in (('glass', glass), ('white', white)):
        s = Slide(_write_vips(str(tmp_path / f'{name}.tiff'), rgb, px_per_mm=2000))
        assert not find_tissue(s).mask.any(), name
        tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0.05)
        assert all(t.skipped and t.tissue == 0 for t in tiles)
        assert list(prefetch(s, tiles, workers=2)) == []
        assert len(list(prefetch(s, tiles, workers=2, skip=False))) == len(tiles)


def test_min_tissue_zero_keeps_everything(slide20x):
    tiles = tile_grid(Slide(slide20x[0]), tile_size=512, overlap=64, min_tissue=0)
    assert not any(t.skipped for t in tiles)


# ---------------------------------------------------------------------------------------------------------------
# reading and mapping back
# ---------------------------------------------------------------------------------------------------------------

def _dark_blob_centres(image, od_thresh=1.6, min_area=4):
    """Centres (x, y) of connected dark blobs (nuclei) in an RGB tile, in tile pixels (pixel-edge coordinates)."""
    from scipy import ndimage

    dark = optical_density(image).sum(2) > od_thresh
    lab, n = ndimage.label(dark)
    if not n:
        return np.zeros((0, 2))
    idx = np.arange(1, n + 1)
    area = ndimage.sum(dark, lab, idx)
    cy, cx = np.array(ndimage.center_of_mass(dark, lab, idx)).T
    keep = area >= min_area
    return np.stack([cx[keep] + 0.5, cy[keep] + 0.5], 1)


@pytest.mark.parametrize('mag', [20, 10, 13])
def test_read_and_to_base_match_ground_truth(slide20x, mag):
    path, gt = slide20x
    s = Slide(path, magnification=mag)
    tiles = [t for t in tile_grid(s, tile_size=384, overlap=48, min_tissue=0.05) if not t.skipped]
    assert tiles
    full = Slide(path)
    hits = total = 0
    offsets = []
    gt_centre = (gt[:, :2] + gt[:, 2:]) / 2
    for t in tiles[:6]:
        im = s.read(t)
        assert im.shape == (t.height, t.width, 3) and im.dtype == np.uint8
        # the tile is the base region, resampled
        base = full.read(Tile(0, 0, t.base_width, t.base_height, 0, 0, t.base_x, t.base_y, t.base_width,
                              t.base_height))
        ref = cv2.resize(base, (t.width, t.height), interpolation=cv2.INTER_AREA)
        assert np.abs(im.astype(int) - ref.astype(int)).mean() < 6
        # dark nuclei found in the tile lie inside ground-truth boxes once mapped to base pixels
        centres = _dark_blob_centres(im)
        points = s.to_base(np.concatenate([centres, centres], 1), t)[:, :2]
        inside = ((points[:, None, 0] >= gt[None, :, 0] - 1) & (points[:, None, 0] <= gt[None, :, 2] + 1) &
                  (points[:, None, 1] >= gt[None, :, 1] - 1) & (points[:, None, 1] <= gt[None, :, 3] + 1))
        hits += inside.any(1).sum()
        total += len(points)
        strict = ((points[:, None, 0] >= gt[None, :, 0]) & (points[:, None, 0] <= gt[None, :, 2]) &
                  (points[:, None, 1] >= gt[None, :, 1]) & (points[:, None, 1] <= gt[None, :, 3]))
        one = strict.sum(1) == 1
        offsets.append(points[one] - gt_centre[strict[one].argmax(1)])
    assert total > 100
    assert hits / total > 0.95  # a mapping 6 base px off gives ~0.68, a forgotten scale ~0.15
    # sub-pixel: blob centres sit on the box centres (a half analysis pixel error moves the median by >= 0.46)
    offsets = np.concatenate(offsets)
    assert np.all(np.abs(np.median(offsets, 0)) < 0.2)


def test_to_base_arithmetic(slide20x):
    s = Slide(slide20x[0], magnification=10)
    t = tile_grid(s, tile_size=256, overlap=32, min_tissue=0.05)[3]
    b = s.to_base([[0, 0, t.width, t.height], [10, 20, 30, 40]], t)
    assert b.dtype == np.float64 and b.shape == (2, 4)
    assert b[0].tolist() == [t.base_x, t.base_y, t.base_x + t.base_width, t.base_y + t.base_height]
    assert b[1].tolist() == pytest.approx([t.base_x + 20, t.base_y + 40, t.base_x + 60, t.base_y + 80])
    assert s.to_base(np.zeros((0, 4)), t).shape == (0, 4)


def test_grey_and_alpha_slides_read_as_rgb(tmp_path):
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., :3] = 120
    rgba[..., 3] = 255
    rgba[:, :200, 3] = 0  # transparent half: glass, not black
    im = pyvips.Image.new_from_array(rgba).copy(interpretation='srgb', xres=2000, yres=2000)
    path = str(tmp_path / 'rgba.tiff')
    im.tiffsave(path, tile=True, tile_width=128, tile_height=128, pyramid=True, compression='deflate',
                resunit='cm')
    s = Slide(path)
    out = s.read(tile_grid(s, tile_size=512, overlap=64, min_tissue=0.05)[0])
    assert out.shape == (300, 400, 3)
    assert out[:, :200].min() == 255 and np.all(out[:, 200:] == 120)


# ---------------------------------------------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('workers, queue', [(0, 1), (2, 4), (3, 1), (1, 2)])
def test_prefetch_matches_serial_reads_in_order(slide20x, workers, queue):
    s = Slide(slide20x[0], magnification=13)
    tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0.3)
    kept = [t for t in tiles if not t.skipped]
    assert 0 < len(kept) < len(tiles)
    got = list(prefetch(s, tiles, workers=workers, queue=queue))
    assert [t.index for t, _ in got] == [t.index for t in kept]
    for t, im in got:
        assert np.array_equal(im, s.read(t))


def test_prefetch_bounded_read_ahead(slide20x):
    s = Slide(slide20x[0])
    tiles = tile_grid(s, tile_size=256, overlap=0, min_tissue=0)
    lock = threading.Lock()
    started = []
    real_read = s.read

    def counting_read(tile):
        with lock:
            started.append(tile.index)
        return real_read(tile)

    s.read = counting_read
    it = prefetch(s, tiles, workers=2, queue=3)
    consumed = 0
    for tile, _ in it:
        consumed += 1
        with lock:
            assert len(started) <= consumed + 3
        if consumed == 5:
            break
    it.close()
    assert len(started) <= 5 + 3


def test_prefetch_propagates_read_errors_with_tile_position(slide20x):
    s = Slide(slide20x[0])
    tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0)
    bad = tiles[6]
    real = s.source.getRegion

    def failing(*args, **kwargs):
        if kwargs['region']['left'] == bad.base_x and kwargs['region']['top'] == bad.base_y:
            raise OSError('Read an unexpected number of bytes from an encoded tile')
        return real(*args, **kwargs)

    s.source.getRegion = failing
    try:
        seen = []
        with pytest.raises(CellRCNNError) as err:
            for tile, _ in prefetch(s, tiles, workers=2, queue=4):
                seen.append(tile.index)
        assert seen == list(range(6))  # everything before the bad tile was delivered, in order
        msg = str(err.value)
        assert f'row {bad.row}, col {bad.col}' in msg and slide20x[0] in msg and 'unexpected number' in msg
        assert '\n' not in msg
    finally:
        del s.source.getRegion


@pytest.mark.parametrize('workers, queue', [(-1, 2), (2, 0)])
def test_prefetch_bad_arguments(slide20x, workers, queue):
    s = Slide(slide20x[0])
    tiles = tile_grid(s, tile_size=1024, overlap=64, min_tissue=0.05)
    with pytest.raises(CellRCNNError):
        prefetch(s, tiles, workers=workers, queue=queue)  # raised at the call, not at the first next()
