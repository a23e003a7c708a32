"""Tests of the synthetic H&E generator (cellrcnn.synthetic)."""

import large_image
import numpy as np
import pytest

from cellrcnn import synthetic
from cellrcnn.synthetic import render, slides
from cellrcnn.synthetic.tiles import _make_tile


def optical_density(img):
    return -np.log10(np.maximum(img.astype(np.float32), 1) / 255.0)


def tiles(n, seed=0, **kw):
    return [synthetic.make_tile(np.random.default_rng([seed, i]), **kw) for i in range(n)]


@pytest.fixture(scope='module')
def sample():
    return tiles(16, seed=11)


def test_tile_format_and_boxes_inside(sample):
    total = 0
    for img, boxes in sample:
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        total += len(boxes)
        if len(boxes):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            # pixel-edge coordinates of integer pixel masks
            assert np.array_equal(boxes, np.round(boxes))
    assert total > 100
    img, boxes = synthetic.make_tile(np.random.default_rng(5), size=(120, 200), crowding=0.8)
    assert img.shape == (120, 200, 3)
    assert len(boxes) and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 120).all()


@pytest.mark.parametrize('mpp', [0.5, 0.25])
def test_nucleus_sizes_in_micrometres(mpp):
    size = 256 if mpp == 0.5 else 384
    boxes = np.concatenate([b for _, b in tiles(8, seed=3, size=size, mpp=mpp, crowding=0.7)])
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    # nuclei cut by the tile border have clipped boxes: judge sizes on the others
    whole = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < size) & (boxes[:, 3] < size)
    assert whole.sum() > 100
    longest = np.maximum(w, h)[whole] * mpp
    shortest = np.minimum(w, h)[whole] * mpp
    assert longest.min() >= synthetic.MIN_SIZE_UM - mpp  # one pixel of rasterisation tolerance
    assert longest.max() <= 15.0
    assert shortest.min() >= 2.0  # spindles lying along an axis are narrow
    assert 6.0 < np.median(longest) < 12.0
    # both small (lymphocyte) and large (tumour / fibroblast) nuclei occur
    assert (longest < 7.5).mean() > 0.1 and (longest > 10).mean() > 0.1


def test_deterministic():
    a_img, a_box = synthetic.make_tile(np.random.default_rng(42))
    b_img, b_box = synthetic.make_tile(np.random.default_rng(42))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_box, b_box)
    c_img, c_box = synthetic.make_tile(42)  # integer seed
    assert np.array_equal(a_img, c_img) and np.array_equal(a_box, c_box)
    d1 = synthetic.make_dataset(7, 3)
    d2 = synthetic.make_dataset(7, 3)
    assert len(d1) == 3
    for (i1, b1), (i2, b2) in zip(d1, d2):
        assert np.array_equal(i1, i2) and np.array_equal(b1, b2)


def test_different_seeds_differ():
    a_img, _ = synthetic.make_tile(np.random.default_rng(1))
    b_img, _ = synthetic.make_tile(np.random.default_rng(2))
    assert not np.array_equal(a_img, b_img)
    d1 = synthetic.make_dataset(1, 4)
    d2 = synthetic.make_dataset(2, 4)
    for i1, _ in d1:
        for i2, _ in d2:
            assert np.abs(i1.astype(int) - i2.astype(int)).mean() > 5
    # tiles within one dataset differ too
    assert not np.array_equal(d1[0][0], d1[1][0])


def test_crowding_controls_density():
    sparse = [len(b) for _, b in tiles(6, seed=5, crowding=0.1)]
    dense = [len(b) for _, b in tiles(6, seed=5, crowding=1.0)]
    # lymphocyte aggregates and sheets stay packed at any crowding; everything else thins out
    assert np.mean(dense) > 2 * np.mean(sparse)
    assert max(dense) > 60


def test_boxes_enclose_haematoxylin(sample):
    n_boxes = 0
    n_dark = 0
    inside_od, outside_od = [], []
    for img, boxes in sample:
        od = optical_density(img).sum(2)
        inbox = np.zeros(od.shape, bool)
        for x1, y1, x2, y2 in boxes.astype(int):
            patch = od[y1:y2, x1:x2]
            inbox[y1:y2, x1:x2] = True
            n_boxes += 1
            # nuclear chromatin: a box contains clearly stained pixels (glass/background is OD ~0)
            n_dark += np.percentile(patch, 90) > 0.8
        tissue = od > 0.25
        if inbox.any() and (tissue & ~inbox).sum() > 1000:
            inside_od.append(od[inbox].mean())
            outside_od.append(od[tissue & ~inbox].mean())
    assert n_boxes > 100
    assert n_dark / n_boxes > 0.97
    # inside boxes is darker than tissue outside them, tile by tile
    assert np.mean(np.array(inside_od) > np.array(outside_od)) > 0.9


def test_boxes_are_exact_mask_extents_and_nuclei_mostly_visible():
    for i in range(4):
        img, boxes, info = _make_tile(np.random.default_rng([9, i]), crowding=1.0)
        h, w = img.shape[:2]
        nuc, groups, label = info['nuclei'], info['groups'], info['label']
        n = len(nuc['cx'])
        assert n > 40
        visible = np.bincount(label[label >= 0], minlength=n)
        area = np.zeros(n)
        in_tile = np.zeros(n)
        ext = np.zeros((n, 4))
        for idx, oy, ox, mask, _ in groups:
            for k in range(len(idx)):
                rr, cc = np.nonzero(mask[k])
                rr = rr + oy[k]
                cc = cc + ox[k]
                area[idx[k]] = len(rr)
                ins = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                in_tile[idx[k]] = ins.sum()
                ext[idx[k]] = [cc.min(), rr.min(), cc.max() + 1, rr.max() + 1]
        # border rule: boxes for nuclei with >= VISIBLE_FRACTION of their area inside, clipped
        keep = in_tile >= synthetic.VISIBLE_FRACTION * area
        expect = ext[keep].copy()
        expect[:, [0, 2]] = np.clip(expect[:, [0, 2]], 0, w)
        expect[:, [1, 3]] = np.clip(expect[:, [1, 3]], 0, h)
        assert np.array_equal(np.sort(expect, 0), np.sort(boxes.astype(float), 0))
        # no nucleus is more than 30% hidden by others; crowded tiles do have touching/overlapping nuclei
        hidden = (in_tile - visible) / area
        assert hidden.max() <= 0.3
        assert (hidden > 0).sum() > 0


@pytest.fixture(scope='module')
def slide(synthetic_slide):
    path, boxes = synthetic_slide(2048, 1536, seed=4, mpp=0.5, tile_size=512)
    return str(path), boxes


def test_write_slide_metadata_and_boxes_file(slide):
    path, boxes = slide
    md = large_image.open(path).getMetadata()
    assert (md['sizeX'], md['sizeY']) == (2048, 1536)
    assert md['mm_x'] == pytest.approx(0.0005) and md['mm_y'] == pytest.approx(0.0005)
    assert md['magnification'] == pytest.approx(20, rel=0.01)
    assert md['levels'] >= 3 and md['tileWidth'] == 512
    saved = np.load(path + '.boxes.npy')
    assert saved.dtype == np.float32 and np.array_equal(saved, boxes)
    assert len(boxes) > 200
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 2048).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 1536).all()
    size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * 0.5
    assert size.max() <= 15
    # nuclei crossing the internal 512-pixel generation seams have exactly one box
    across = (boxes[:, 0] < 1024) & (boxes[:, 2] > 1024)
    assert across.sum() > 0
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_write_slide_pixels_match_boxes(slide):
    path, boxes = slide
    ts = large_image.open(path)
    img, _ = ts.getRegion(format=large_image.constants.TILE_FORMAT_NUMPY)
    img = np.ascontiguousarray(img[..., :3])
    assert img.shape == (1536, 2048, 3)
    od = optical_density(img).sum(2)
    tissue = od > 0.25
    assert 0.05 < tissue.mean() < 0.98  # tissue blobs on glass
    assert od[~tissue].mean() < 0.15  # glass is near white
    inbox = np.zeros(od.shape, bool)
    dark = 0
    for x1, y1, x2, y2 in boxes.astype(int):
        inbox[y1:y2, x1:x2] = True
        dark += np.percentile(od[y1:y2, x1:x2], 90) > 0.8
    assert dark / len(boxes) > 0.97
    assert od[inbox].mean() > 1.3 * od[tissue & ~inbox].mean()
    # no seams at generation-tile borders: the step across x = 1024 is like the step between other columns
    step_seam = np.abs(img[:, 1024].astype(int) - img[:, 1023].astype(int)).mean()
    step_other = np.mean([np.abs(img[:, c].astype(int) - img[:, c - 1].astype(int)).mean()
                          for c in (700, 900, 1200, 1300)])
    assert step_seam < 1.5 * step_other + 1
    # a region read back at a lower level is the downsampled slide
    low, _ = ts.getRegion(format=large_image.constants.TILE_FORMAT_NUMPY, output={'maxWidth': 512})
    assert low.shape[1] == 512
    ref = img.reshape(384, 4, 512, 4, 3).mean((1, 3))
    assert np.abs(low[..., :3].astype(float) - ref).mean() < 12


def test_write_slide_other_mpp(tmp_path):
    path = str(tmp_path / 'slide40x.tiff')
    boxes = synthetic.write_slide(path, 700, 600, seed=1, mpp=0.25, tile_size=256)
    md = large_image.open(path).getMetadata()
    assert md['mm_x'] == pytest.approx(0.00025)
    assert md['magnification'] == pytest.approx(40, rel=0.01)
    np.testing.assert_array_equal(np.load(path + '.boxes.npy'), boxes)
    assert len(boxes) > 50
    size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * 0.25
    assert size.max() <= 15


def test_slide_generation_canvases_agree_where_they_overlap():
    # neighbouring generation tiles are rendered on overlapping canvases: where they overlap (near the seam) the
    # pixels must agree, so that the written slide has no seams and nuclei crossing them are drawn identically
    gen = slides._SlideGen(1024, 512, 3, 0.5, 256)
    for tx in range(4):
        gen._place_tile(0, tx)
    for tx in range(4):
        gen._place_tile(1, tx)
    T, M = 256, gen.margin

    def canvas(tx):
        drawn = [(c['nuc'], c['groups']) for dx in (-1, 0, 1)
                 for c in [gen.cells.get((0, tx + dx)), gen.cells.get((1, tx + dx))] if c is not None and c['groups']]
        rgb, _ = render.render(gen.layout, gen.style, gen.noise, -M, tx * T - M, T + 2 * M, T + 2 * M, drawn)
        return render.finish(rgb, gen.style, gen.noise, -M, tx * T - M).astype(int)

    a, b = canvas(1), canvas(2)
    # global columns [2T - 16, 2T + 16): canvas a columns M + T - 16 ..., canvas b columns M - 16 ...
    strip_a = a[M:M + T, M + T - 16:M + T + 16]
    strip_b = b[M:M + T, M - 16:M + 16]
    assert np.abs(strip_a - strip_b).max() <= 2
    assert np.abs(a[M:M + T, M:M + 32] - b[M:M + T, M:M + 32]).mean() > 10  # (different places do differ)


def test_hard_negatives_are_drawn_off_the_nuclei_only():
    gen = slides._SlideGen(256, 256, 5, 0.5, 256)
    gen._place_tile(0, 0)
    drawn = [(gen.cells[(0, 0)]['nuc'], gen.cells[(0, 0)]['groups'])]
    plain, label = render.render(gen.layout, gen.style, gen.noise, 0, 0, 256, 256, drawn)
    strands = np.full((256, 256), 1.0, np.float32)
    cluttered, _ = render.render(gen.layout, gen.style, gen.noise, 0, 0, 256, 256, drawn,
                                 (strands, strands * 0.5, strands * 0.2))
    nuclei = label >= 0
    assert nuclei.sum() > 1000
    np.testing.assert_array_equal(cluttered[nuclei], plain[nuclei])  # a nucleus is never covered
    off = ~nuclei
    assert (cluttered[off].sum(1) < plain[off].sum(1) - 30).mean() > 0.8  # everything else is darkened


def test_hard_negative_kinds_occur_and_are_never_boxed():
    kinds = np.zeros(3)
    for i in range(40):
        H, E, P = render.clutter_maps(np.random.default_rng([3, i]), 256, 256, 2.0)
        kinds += [H.max() > 0.3, E.max() > 0.5, P.max() > 0.2]
    assert (kinds >= 3).all()  # dark strands and debris, red cells, pigment: each in several of 40 tiles
    # a tile's boxes are the nuclei: the same as the number of nuclei kept by the border rule, clutter or not
    img, boxes, info = _make_tile(np.random.default_rng(8))
    assert len(boxes) == int(info['keep'].sum())


def test_dataset_scale_enlarges_nuclei_in_pixels():
    def median_side(scale):
        boxes = np.concatenate([b for _, b in synthetic.make_dataset(21, 12, scale=scale)])
        inner = (boxes[:, :2] > 0).all(1) & (boxes[:, 2:] < 256).all(1)
        return np.median(np.sqrt((boxes[inner, 2] - boxes[inner, 0]) * (boxes[inner, 3] - boxes[inner, 1])))

    assert median_side((1.4, 1.4)) / median_side((1, 1)) == pytest.approx(1.4, rel=0.1)
    assert median_side((0.7, 0.7)) / median_side((1, 1)) == pytest.approx(0.7, rel=0.1)


def test_write_slide_wider_than_libtiff_reads_in_one_strip(tmp_path):
    # 36 000 px wide, 512-row strips would be 55 MB each: libtiff would stop reading at 50 MB allocated
    path = str(tmp_path / 'wide.tiff')
    boxes = synthetic.write_slide(path, 36000, 1024, seed=2)
    ts = large_image.open(path)
    assert (ts.sizeX, ts.sizeY) == (36000, 1024)
    assert len(boxes) > 0


def test_slide_strips_do_not_change_the_pixels(tmp_path, monkeypatch):
    whole = str(tmp_path / 'whole.tiff')
    synthetic.write_slide(whole, 700, 600, seed=4, tile_size=256)
    monkeypatch.setattr(slides, 'STRIP_BYTES', 700 * 3 * 40)  # strips of 32 rows
    split = str(tmp_path / 'split.tiff')
    synthetic.write_slide(split, 700, 600, seed=4, tile_size=256)
    read = [large_image.open(p).getRegion(format=large_image.constants.TILE_FORMAT_NUMPY)[0] for p in (whole, split)]
    np.testing.assert_array_equal(*read)
    np.testing.assert_array_equal(np.load(whole + '.boxes.npy'), np.load(split + '.boxes.npy'))
