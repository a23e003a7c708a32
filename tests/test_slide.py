"""Slides: opening and scale, tissue mask, reading at analysis scale, mapping back (the tile grid and prefetch:
test_tiling.py)."""

import cv2
import histomicstk  # noqa: F401  (required, as large_image is: a broken install fails here rather than skipping)
import large_image
import numpy as np
import pytest
import pyvips

from cellrcnn.errors import CellRCNNError
from cellrcnn.samples import read_image
from cellrcnn.slide import Slide
from cellrcnn.tiling import Tile, prefetch, tile_grid
from cellrcnn.tissue import find_tissue
from support import BLACK, BLUE_INK, GREEN_INK


def optical_density(rgb):
    return -np.log10(np.maximum(rgb.astype(np.float32), 1) / 242.0)


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


def test_a_slide_with_huge_tiles_is_refused_before_a_pixel_is_decoded(tmp_path):
    """A 3 MB TIFF whose one JPEG tile is 16384² (805 MB decoded as RGB, more through the tissue mask's reads)."""
    path = str(tmp_path / 'huge.tiff')
    (pyvips.Image.black(16384, 16384) + 200).cast('uchar').tiffsave(
        path, tile=True, tile_width=16384, tile_height=16384, compression='jpeg', Q=50, xres=2000, yres=2000,
        resunit='cm')
    assert large_image.open(path).getMetadata()['tileWidth'] == 16384
    with pytest.raises(CellRCNNError, match=f'^cannot open slide {path}: its tiles are 16384x16384 pixels, more '
                                            r'than the 16777216 \(4096x4096\)'):
        Slide(path)


def test_a_slide_of_float_pixels_is_refused(tmp_path):
    # large_image reads float pixels at full resolution, but its thumbnails and scaled reads of them are all zeros:
    # such a slide gave "no tissue found" and an empty result.
    import tifffile

    rgb = np.full((600, 800, 3), 0.94, np.float32)
    rgb[100:400, 200:600] = (0.6, 0.3, 0.55)
    path = str(tmp_path / 'float.tif')
    tifffile.imwrite(path, rgb, photometric='rgb')
    with pytest.raises(CellRCNNError, match=f'^cannot open slide {path}: its pixels are float32, which large_image '
                                            'cannot scale; save it as an 8-bit RGB image$'):
        Slide(path, mpp=0.5)


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


@pytest.mark.parametrize('mark', ['black', 'noisy black', 'blue ink', 'green ink'])
def test_a_mark_beside_the_tissue_is_background(tmp_path, slide20x, mark):
    # Some scanners and converters write black where nothing was scanned. Left to Otsu, the fill is the darkest
    # thing on the slide: it would be read as tissue and the real tissue skipped as background. A marker's ink is
    # darker than glass too, and would be read as tissue.
    s = Slide(slide20x[0])
    plain = find_tissue(s).mask
    width, height = s.size
    rgb = s.read(tile_grid(s, tile_size=4096, overlap=0, min_tissue=0)[0])[:height, :width]
    colour = {'blue ink': BLUE_INK, 'green ink': GREEN_INK}.get(mark, BLACK)
    noise = np.random.default_rng(1).integers(-8, 8, (height, width, 3)) + (8 if mark == 'noisy black' else 0)
    band = np.clip(np.array(colour) + noise * (mark != 'black'), 0, 255).astype(np.uint8)
    p = Slide(_write_vips(str(tmp_path / 'padded.tiff'), np.concatenate([rgb, band], axis=1), px_per_mm=2000))
    tissue = find_tissue(p)
    mask = tissue.mask
    half = mask.shape[1] // 2
    assert mask.shape == (plain.shape[0], 2 * plain.shape[1])
    assert not mask[:, half:].any() and tissue.marks[:, half + 1:].all()
    assert (mask[:, :half] == plain).mean() > 0.98  # all but a rim of 3 mask pixels (12 um) along the mark
    read = [t for t in tile_grid(p, tile_size=512, overlap=64, min_tissue=0.05) if not t.skipped]
    assert read and all(t.x < width for t in read)


@pytest.mark.parametrize('colour', [BLUE_INK, GREEN_INK], ids=['blue', 'green'])
def test_green_and_blue_are_tissue_when_asked(tmp_path, slide20x, colour):
    # Special stains colour tissue green or blue (Masson's trichrome, alcian blue): with ink=False a large area of
    # ink's colour is tissue, counted and read; black fill is still left out.
    s = Slide(slide20x[0])
    plain = find_tissue(s).mask
    width, height = s.size
    rgb = s.read(tile_grid(s, tile_size=4096, overlap=0, min_tissue=0)[0])[:height, :width]
    noise = np.random.default_rng(2).integers(-8, 8, (height, width, 3))
    band = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    black = np.zeros((height, width // 2, 3), np.uint8)
    p = Slide(_write_vips(str(tmp_path / 'stained.tiff'), np.concatenate([rgb, band, black], axis=1),
                          px_per_mm=2000))
    assert find_tissue(p).marks[:, plain.shape[1] + 2:].all()  # by default: ink, then fill
    tissue = find_tissue(p, ink=False)
    w = plain.shape[1]
    assert tissue.mask[:, w + 4:2 * w - 4].all() and not tissue.marks[:, w + 4:2 * w - 4].any()
    assert tissue.marks[:, 2 * w + 4:].all() and not tissue.mask[:, 2 * w:].any()
    assert (tissue.mask[:, :w - 4] == plain[:, :w - 4]).mean() > 0.98


@pytest.mark.parametrize('source', ['brca', 'dsb', 'ihc'])
def test_real_tissue_is_never_taken_for_a_mark(tmp_path, request, source):
    # A stain's own colours must not read as ink or fill: all of BRCA-M2C's breast fields, or of DSB 2018's H&E
    # images, side by side on glass in one slide; or scikit-image's IHC field (DAB and a blue haematoxylin
    # counterstain, hues up to 240 degrees) 36 times, 1.5 mm a side.
    if source == 'ihc':
        from skimage.data import immunohistochemistry

        tiles = [immunohistochemistry()] * 36
    else:
        tiles = [read_image(str(path)) for path in sorted(request.getfixturevalue(source)[0].iterdir())]
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    columns = 10
    mosaic = np.full((-(-len(tiles) // columns) * th, columns * tw, 3), 245, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = k // columns * th, k % columns * tw
        mosaic[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    tissue = find_tissue(Slide(_write_vips(str(tmp_path / 'mosaic.tiff'), mosaic, px_per_mm=2000)))
    assert tissue.marks is None
    assert tissue.mask.mean() > 0.25  # much of the fields and images is fat, lumen or pale background


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
