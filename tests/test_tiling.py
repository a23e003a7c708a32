"""The tile grid over a slide or a region of it, and reading tiles ahead of the consumer (``cellrcnn.tiling``)."""

import threading

import numpy as np
import pytest

from cellrcnn.errors import CellRCNNError
from cellrcnn.slide import Slide
from cellrcnn.tiling import MAX_TILES, _spans, prefetch, tile_grid
from cellrcnn.tissue import TissueMask

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
    tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0)  # the grid; tiles cut to tissue: below
    _check_grid(tiles, 0, 0, 2048, 1536, 512, 64)
    assert (max(t.col for t in tiles) + 1, max(t.row for t in tiles) + 1) == (5, 4)
    # shrunk to fit: 512 px tiles stepped by 448 with the last moved back to the edge would read 1.67x the slide
    assert sum(t.width * t.height for t in tiles) < 1.3 * 2048 * 1536
    aligned = tile_grid(s, tile_size=512, overlap=64, min_tissue=0, align=16)
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
    tiles = tile_grid(s, tile_size=256, overlap=32, min_tissue=0, roi=roi, align=16)
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


@pytest.mark.parametrize('mag, roi', [(20, (300, 200, 1300, 900)), (10, (301, 201, 700, 500)),
                                      (20, (10, 20, 100, 50)), (20, (0, 0, 2048, 1536))])
def test_a_region_on_the_slides_grid_is_the_slides_tiles_cut_to_it(slide20x, mag, roi):
    s = Slide(slide20x[0], magnification=mag)
    whole = tile_grid(s, tile_size=256, overlap=32, min_tissue=0, align=16)
    part = tile_grid(s, tile_size=256, overlap=32, min_tissue=0, roi=roi, align=16, slide_grid=True)
    x0, y0, x1, y1 = s.roi_to_analysis(roi)
    assert [t.index for t in part] == list(range(len(part)))
    assert {t.row for t in part} == set(range(max(t.row for t in part) + 1))  # rows and columns from 0
    assert {t.col for t in part} == set(range(max(t.col for t in part) + 1))
    covered = np.zeros((y1 - y0, x1 - x0), bool)
    for t in part:
        # each lies in a tile of the slide's grid, on its phase, and within the region grown by the overlap (its
        # start moved back to the phase by less than a field)
        assert any(w.x <= t.x and t.x + t.width <= w.x + w.width and w.y <= t.y and t.y + t.height <= w.y + w.height
                   and (t.x - w.x) % 16 == 0 and (t.y - w.y) % 16 == 0 for w in whole)
        assert x0 - 32 - 16 < t.x and t.x + t.width <= x1 + 32 and y0 - 32 - 16 < t.y and t.y + t.height <= y1 + 32
        assert t.base_x == round(t.x * s.scale) and t.base_width == pytest.approx(t.width * s.scale, abs=1)
        a, b = max(t.x, x0) - x0, max(t.y, y0) - y0
        covered[b:max(b, t.y + t.height - y0), a:max(a, t.x + t.width - x0)] = True
    assert covered.all()
    if roi == (0, 0, 2048, 1536) and mag == 20:  # the whole slide: its own grid
        assert [(t.x, t.y, t.width, t.height) for t in part] == [(t.x, t.y, t.width, t.height) for t in whole]


@pytest.mark.parametrize('roi', [(3000, 0, 100, 100), (0, -500, 100, 400), (10, 10, 0, 5), (10, 10, 5, -1),
                                 ('a', 1, 2, 3), (1, 2, 3)])
def test_bad_roi(slide20x, roi):
    with pytest.raises(CellRCNNError, match='ROI'):
        tile_grid(Slide(slide20x[0]), tile_size=1024, overlap=64, min_tissue=0.05, roi=roi)


@pytest.mark.parametrize('size, overlap', [(0, 0), (256, 256), (256, -1)])
def test_bad_tile_size_or_overlap(slide20x, size, overlap):
    with pytest.raises(CellRCNNError, match='tile'):
        tile_grid(Slide(slide20x[0]), tile_size=size, overlap=overlap, min_tissue=0.05)


def test_a_grid_of_too_many_tiles_is_refused_before_it_is_built(slide20x):
    """Tile 65 overlapping by 64 over 16384 x 12288 analysis px (the slide analysed at 8x its magnification) would
    make 200 M tiles: refused from their count, before the tissue mask or any tile is made."""
    slide = Slide(slide20x[0], magnification=160, allow_upsample=True)
    assert slide.size == (16384, 12288)
    with pytest.raises(CellRCNNError, match=r'^16320 x 12224 tiles of 65 px overlapping by 64 over 16384x12288 '
                                            f'analysis px of {slide20x[0]} are more than {MAX_TILES}: use larger'):
        tile_grid(slide, tile_size=65, overlap=64, min_tissue=0.05)
    assert len(tile_grid(slide, tile_size=4096, overlap=64, min_tissue=0.05)) == 20


@pytest.mark.parametrize('mag', [20, 10])
def test_a_tile_with_little_tissue_is_read_where_its_tissue_lies(slide20x, mag):
    s = Slide(slide20x[0], magnification=mag)
    mask = np.zeros((48, 64), bool)
    mask[20:22, 40:42] = True  # one small piece alone on the glass
    fx, fy = s.size[0] / 64, s.size[1] / 48
    tissue = TissueMask(mask, fx, fy, s.mpp)
    piece = (40 * fx, 20 * fy, 42 * fx, 22 * fy)
    overlap, align = 32, 16
    whole = tile_grid(s, tile_size=256, overlap=overlap, min_tissue=0, tissue=tissue, align=align)
    cut = tile_grid(s, tile_size=256, overlap=overlap, min_tissue=0.5, tissue=tissue, align=align)
    assert [(t.row, t.col, t.index) for t in whole] == [(t.row, t.col, t.index) for t in cut]
    touched = [t for t in whole if t.x < piece[2] and piece[0] < t.x + t.width and t.y < piece[3] and
               piece[1] < t.y + t.height]
    assert touched and [t.index for t in cut if not t.skipped] == [t.index for t in touched]
    for t in touched:  # cut to the piece grown by the overlap, starting on the grid's phase, within the tile
        c = cut[t.index]
        x0 = max(t.x, int(piece[0] - overlap) // align * align)
        y0 = max(t.y, int(piece[1] - overlap) // align * align)
        x1 = min(t.x + t.width, int(np.ceil(piece[2] + overlap)))
        y1 = min(t.y + t.height, int(np.ceil(piece[3] + overlap)))
        assert (c.x, c.y, c.x + c.width, c.y + c.height) == (x0, y0, x1, y1)
        assert c.base_x == round(c.x * s.scale) and c.base_width == pytest.approx(c.width * s.scale, abs=1)
        assert c.tissue == pytest.approx(tissue.fraction(c.x, c.y, c.width, c.height)) and c.tissue > t.tissue
    # the image read for a cut tile is that part of the whole tile's
    t = touched[0]
    c = cut[t.index]
    if s.scale == 1:
        assert np.array_equal(s.read(c), s.read(t)[c.y - t.y:c.y - t.y + c.height, c.x - t.x:c.x - t.x + c.width])


@pytest.mark.parametrize('mag', [20, 13])
def test_every_piece_of_tissue_lies_in_a_tile_read(slide20x, mag):
    s = Slide(slide20x[0], magnification=mag)
    rng = np.random.default_rng(mag)
    for _ in range(20):
        mask = rng.random((48, 64)) < rng.choice([0.002, 0.01, 0.05])
        tissue = TissueMask(mask, s.size[0] / 64, s.size[1] / 48, s.mpp)
        roi = (int(rng.integers(0, 600)), int(rng.integers(0, 400)), int(rng.integers(300, 1400)),
               int(rng.integers(300, 1100)))
        whole = tile_grid(s, tile_size=256, overlap=32, min_tissue=0, roi=roi, tissue=tissue, align=16)
        cut = tile_grid(s, tile_size=256, overlap=32, min_tissue=0.3, roi=roi, tissue=tissue, align=16)
        x0, y0, x1, y1 = s.roi_to_analysis(roi)
        seen = np.zeros((y1 - y0, x1 - x0), bool)
        for w, c in zip(whole, cut):
            assert w.x <= c.x and c.x + c.width <= w.x + w.width and w.y <= c.y and c.y + c.height <= w.y + w.height
            assert c.skipped == (tissue.fraction(w.x, w.y, w.width, w.height) == 0)
            if not c.skipped:
                assert (c.x - x0) % 16 == 0 or c.x == w.x
                seen[c.y - y0:c.y - y0 + c.height, c.x - x0:c.x - x0 + c.width] = True
        # the analysis pixels of every tissue mask pixel inside the ROI are read
        ys, xs = np.mgrid[y0:y1, x0:x1]
        on_tissue = mask[(ys / tissue.fy).astype(int).clip(0, 47), (xs / tissue.fx).astype(int).clip(0, 63)]
        assert seen[on_tissue].all()


def test_min_tissue_zero_keeps_everything(slide20x):
    tiles = tile_grid(Slide(slide20x[0]), tile_size=512, overlap=64, min_tissue=0)
    assert not any(t.skipped for t in tiles)


# ---------------------------------------------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('workers, queue', [(0, 1), (2, 4), (3, 1), (1, 2)])
def test_prefetch_matches_serial_reads_in_order(slide20x, workers, queue):
    s = Slide(slide20x[0], magnification=13)
    mask = np.zeros((48, 64), bool)
    mask[:, :24] = mask[30:34, 50:52] = True  # tissue on the left and a small piece on the right
    tissue = TissueMask(mask, s.size[0] / 64, s.size[1] / 48, s.mpp)
    tiles = tile_grid(s, tile_size=512, overlap=64, min_tissue=0.3, tissue=tissue)
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
