"""Stain normalisation: each image's (each slide's) LAB statistics moved part of the way to the model's reference."""

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from cellrcnn.__main__ import main
from cellrcnn.checkpoint import load_checkpoint, load_model, save_checkpoint, stored_config
from cellrcnn.config import ModelConfig
from cellrcnn.errors import CellRCNNError
from cellrcnn.inference import Detector, DetectorSpec
from cellrcnn.model import to_tensor
from cellrcnn.region import region_settings
from cellrcnn.samples import read_image
from cellrcnn.slide import Slide
from cellrcnn.slide_adaptation import STAIN_SIDE, STAIN_TILES, adaptation_tiles
from cellrcnn.slide_detection import detect_slide
from cellrcnn.stain import StainNormaliser, StainStats
from cellrcnn.synthetic import make_tile
from cellrcnn.tiling import tile_grid
from cellrcnn.tissue import find_tissue
from cellrcnn.train import TrainConfig
from cellrcnn.training_data import training_sources
from support import BLACK, BLUE_INK, mark_beside

#: a pink, pale reference, far from the synthetic tiles' and the real images' own stain
REFERENCE = StainStats((8.9, -0.05, 0.06), (0.3, 0.08, 0.02))


def stats_array(stats):
    return np.array(stats.to_tuple())


@pytest.fixture(scope='module')
def real_pair(brca, dsb):
    """A breast field and a DSB image of another stain (RGB uint8, real)."""
    images, points, name = brca
    dsb_images, _, boxes = dsb
    return read_image(str(images / name)), read_image(str(dsb_images / sorted(boxes)[0]))


def test_full_strength_is_histomicstks_reinhard(real_pair):
    from histomicstk.preprocessing.color_normalization import reinhard

    breast, other = real_pair
    reference, source = StainStats.of([breast]), StainStats.of([other])
    ours = StainNormaliser(reference, 1.0)(to_tensor(other), source).permute(1, 2, 0).numpy() * 255
    theirs = reinhard(other, np.array(reference.mean), np.array(reference.std), src_mu=list(source.mean),
                      src_sigma=list(source.std))  # histomicstk truncates to uint8
    assert np.abs(np.floor(ours + 1e-3) - theirs).max() <= 1
    assert np.abs(ours - other).mean() > 5  # the two stains do differ


def test_strength_moves_the_statistics_that_share_of_the_way(real_pair):
    _, other = real_pair
    source = StainStats.of([other])
    assert torch.allclose(StainNormaliser(REFERENCE, 0.0)(to_tensor(other), source), to_tensor(other), atol=1e-4)
    for strength in (0.5, 1.0):
        out = StainNormaliser(REFERENCE, strength).normalise_image(other)
        target = strength * stats_array(REFERENCE) + (1 - strength) * stats_array(source)
        moved = stats_array(StainStats.of([out]))
        # the means and spreads land near the target (uint8 rounding and clipping aside), far from where they were
        assert np.abs(moved - target).max() < 0.25 * np.abs(stats_array(source) - target).max()


def test_statistics_leave_out_glass_and_need_pixels(real_pair):
    breast, _ = real_pair
    glass = np.full((breast.shape[0], 200, 3), 240, np.uint8)
    with_glass = np.concatenate([breast, glass], axis=1)
    assert np.allclose(stats_array(StainStats.of([with_glass])), stats_array(StainStats.of([breast])))
    # two images together are their pixels pooled; a typical one is the mean of each one's own
    halves = [breast[:, :100], breast[:, 100:]]
    assert StainStats.of(halves) == StainStats.of([breast])
    # every pixel counts, whatever their order: a flipped or turned image has the same statistics
    assert StainStats.of([np.rot90(breast)]) == StainStats.of([breast]) == StainStats.of([breast[::-1]])
    typical = StainStats.typical(halves)
    assert np.allclose(typical.mean, np.mean([StainStats.of([h]).mean for h in halves], axis=0))
    blank = np.full((64, 64, 3), 250, np.uint8)  # no tissue at all: every pixel counts, and the spread is capped
    out = StainNormaliser(REFERENCE, 1.0)(to_tensor(blank), StainStats.of([blank]))
    assert torch.isfinite(out).all()
    with pytest.raises(CellRCNNError, match='no images to take a stain reference from'):
        StainStats.typical([])
    with pytest.raises(CellRCNNError, match='need an RGB uint8 image'):
        StainStats.of([np.zeros((8, 8), np.uint8)])


def test_the_reference_is_part_of_the_model_configuration(tiny_checkpoint, tmp_path):
    config = ModelConfig()
    assert 'stain_reference' not in config.to_dict() and StainNormaliser.of(config) is None
    for bad in ((1, 2, 3, 4, 5), (8, 0, 0, 0.4, 0.1, 0), (8, 0, 0, 0.4, 0.1, float('nan'))):
        with pytest.raises(CellRCNNError, match='stain_reference needs six numbers'):
            ModelConfig(stain_reference=bad).validate()
    with pytest.raises(CellRCNNError, match='stain_strength must be a number between 0 and 1'):
        ModelConfig(stain_reference=REFERENCE.to_tuple(), stain_strength=1.5).validate()
    model = load_model(tiny_checkpoint)
    model.config = dataclasses.replace(model.config, stain_reference=REFERENCE.to_tuple(), stain_strength=0.5)
    save_checkpoint(tmp_path / 'stained.pt', model, half=True)
    stored = stored_config(load_checkpoint(tmp_path / 'stained.pt'))
    assert stored.stain_reference == REFERENCE.to_tuple() and stored.stain_strength == 0.5


@pytest.fixture(scope='module')
def stained_checkpoint(tiny_checkpoint, tmp_path_factory):
    """``tiny_checkpoint`` with :data:`REFERENCE` as its stain reference, at full strength."""
    model = load_model(tiny_checkpoint)
    model.config = dataclasses.replace(model.config, stain_reference=REFERENCE.to_tuple(), stain_strength=1.0)
    path = tmp_path_factory.mktemp('model') / 'stained.pt'
    save_checkpoint(path, model, half=True)
    return path


def test_the_detector_normalises_each_image_or_from_its_slides_stain(stained_checkpoint, tiny_checkpoint):
    tile, _ = make_tile(7, size=192)
    pale = np.clip(tile.astype(int) + 40, 0, 255).astype(np.uint8)
    stained = Detector(load_model(stained_checkpoint), device='cpu', batch_size=2)
    plain = Detector(load_model(tiny_checkpoint), device='cpu', batch_size=2)
    assert plain.normaliser is None and torch.equal(plain.model_input(tile), to_tensor(tile))
    own = stained.model_input(pale)
    assert torch.equal(own, stained.normaliser(to_tensor(pale), StainStats.of([pale])))
    assert torch.equal(stained.model_input(pale, StainStats.of([tile])),
                       stained.normaliser(to_tensor(pale), StainStats.of([tile])))
    # at full strength an image and a paler copy of it become nearly the same input
    assert (stained.model_input(tile) - own).abs().mean() < 0.25 * (to_tensor(tile) - to_tensor(pale)).abs().mean()
    alone = stained.detect_tiles_with_types([pale])[0]
    given = stained.detect_tiles_with_types([pale], stain=StainStats.of([pale]))[0]
    assert len(alone['scores']) > 0 and all(np.array_equal(alone[k], given[k]) for k in alone)
    other = stained.detect_tiles_with_types([pale], stain=StainStats.of([tile]))[0]
    assert not np.array_equal(other['scores'], alone['scores'])
    viewed = Detector(load_model(stained_checkpoint), device='cpu', batch_size=2, views=2)
    assert len(viewed.detect_tiles_with_types([pale])[0]['scores']) > 0


def test_a_slide_is_normalised_from_the_stain_of_its_tissue_tiles(synthetic_slide, stained_checkpoint,
                                                                   tiny_checkpoint):
    slide = Slide(synthetic_slide(900, 700, seed=11)[0])
    run = dict(tile_size=256, overlap=48, min_tissue=0.0, workers=2)
    detector = DetectorSpec(model=str(stained_checkpoint), threshold=0.05, device='cpu', batch_size=3).build()
    result = detect_slide(slide, detector, **run)
    # squares of a grid of their own, the same whatever the detection's tile size
    chosen = adaptation_tiles(tile_grid(slide, STAIN_SIDE, 0, 0.0, tissue=find_tissue(slide)), STAIN_TILES)
    expected = StainStats.of(slide.read(t) for t in chosen)
    assert 1 < len(chosen) <= STAIN_TILES
    assert result.stats['stain'] == {'lab_mean': list(expected.mean), 'lab_std': list(expected.std)}
    other = detect_slide(slide, detector, **{**run, 'tile_size': 384})
    assert other.stats['stain'] == result.stats['stain']
    # a region, a rectangle or polygons, is normalised from the whole slide's stain, as the slide's run is there
    for region in ([0, 0, 300, 250], [0, 0, 300, 0, 300, 250, 0, 250]):
        assert detect_slide(slide, detector, **region_settings(region), **run).stats['stain'] == result.stats['stain']
    plain = DetectorSpec(model=str(tiny_checkpoint), threshold=0.05, device='cpu', batch_size=3).build()
    assert 'stain' not in detect_slide(slide, plain, **run).stats


@pytest.mark.parametrize('colour', [BLACK, BLUE_INK], ids=['black fill', 'blue ink'])
def test_a_mark_beside_a_slide_leaves_its_stain_as_it_was(tmp_path, synthetic_slide, stained_checkpoint, colour):
    # Most of this slide is glass or fill, so the squares the statistics come from must be chosen among those with
    # tissue, and the fill's black pixels left out; before, the fill took L's mean from about 8 to about 3. A
    # marker's ink, read as tissue, moved them too.
    source = synthetic_slide(900, 700, seed=11)[0]
    detector = DetectorSpec(model=str(stained_checkpoint), threshold=0.05, device='cpu', batch_size=3).build()
    run = dict(tile_size=512, overlap=32, min_tissue=0.05, workers=2)
    # both written alike: JPEG moves the stain's spread a little
    plain, padded = (detect_slide(Slide(mark_beside(source, tmp_path / f'{width}.tiff', width, colour, quality=90)),
                                  detector, **run).stats['stain'] for width in (0, 1800))
    assert np.allclose(padded['lab_mean'], plain['lab_mean'], atol=0.05)
    assert np.allclose(padded['lab_std'], plain['lab_std'], rtol=0.1)


def test_training_sees_its_images_normalised(tmp_path, stained_checkpoint):
    (tmp_path / 'images').mkdir()
    table = {}
    for i in range(2):
        image, truth = make_tile(30 + i, size=128)
        cv2.imwrite(str(tmp_path / 'images' / f'{i}.png'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        table[f'{i}.png'] = truth.tolist()
    (tmp_path / 'boxes.json').write_text(json.dumps(table))
    cfg = TrainConfig(data=(f'boxes:{tmp_path}/boxes.json,mpp=0.5',), synthetic_weight=0.0)
    config = stored_config(load_checkpoint(stained_checkpoint))
    normalised = training_sources(cfg, config)[0][1]
    raw = training_sources(cfg, dataclasses.replace(config, stain_reference=()))[0][1]
    normaliser = StainNormaliser.of(config)
    for (image, *_), (original, *_) in zip(normalised, raw):
        assert np.array_equal(image, normaliser.normalise_image(original))
        assert not np.array_equal(image, original)


def test_average_sets_or_clears_a_stain_reference(tmp_path, tiny_checkpoint, stained_checkpoint, capsys):
    (tmp_path / 'images').mkdir()
    images, table = [], {}
    for i in range(2):
        image, truth = make_tile(40 + i, size=128)
        images.append(image)
        cv2.imwrite(str(tmp_path / 'images' / f'{i}.png'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        table[f'{i}.png'] = truth.tolist()
    (tmp_path / 'boxes.json').write_text(json.dumps(table))
    entry = f'boxes:{tmp_path}/boxes.json,mpp=0.5'
    out = tmp_path / 'with.pt'
    assert main(['average', str(tiny_checkpoint), str(tiny_checkpoint), '-o', str(out), '--stain-reference', entry,
                 '--stain-strength', '0.6']) == 0
    config = stored_config(load_checkpoint(out))
    assert np.allclose(config.stain_reference, StainStats.typical(images).to_tuple())
    assert config.stain_strength == 0.6
    assert main(['average', str(stained_checkpoint), str(stained_checkpoint), '-o', str(tmp_path / 'without.pt'),
                 '--stain-reference', 'none']) == 0
    assert stored_config(load_checkpoint(tmp_path / 'without.pt')).stain_reference == ()
    # a bare folder of images with DSA JSON is read as training reads it: at the model's scale
    folder = tmp_path / 'dsa' / 'tiles'  # away from the boxes' images folder above, which would be taken for its own
    assert main(['synth', str(folder), '--count', '2', '--tile-size', '128']) == 0
    assert main(['average', str(tiny_checkpoint), str(tiny_checkpoint), '-o', str(tmp_path / 'dsa.pt'),
                 '--stain-reference', str(folder)]) == 0
    typical = StainStats.typical(read_image(str(p)) for p in sorted(folder.glob('*.png')))
    assert np.allclose(stored_config(load_checkpoint(tmp_path / 'dsa.pt')).stain_reference, typical.to_tuple())
    capsys.readouterr()
