"""``cellrcnn train --data``: entries of real labels mixed by weight with synthetic tiles, and their held-out
splits."""

import dataclasses
import json
import re

import cv2
import numpy as np
import pytest
import torch

from cellrcnn.__main__ import main
from cellrcnn.checkpoint import BUNDLED_MODEL, load_checkpoint, load_model
from cellrcnn.config import ModelConfig
from cellrcnn.errors import CellRCNNError
from cellrcnn.synthetic import make_tile
from cellrcnn.train import TrainConfig
from cellrcnn.training_data import entry_weight, held_out_entries, sample_weights, training_sources


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
    """Two small sets from synthetic tiles: dots with classes (points.json) and boxes (boxes.json), 5 images each."""
    root = tmp_path_factory.mktemp('labelled')
    points, boxes = {}, {}
    for kind, table in (('dots', points), ('boxed', boxes)):
        (root / kind / 'images').mkdir(parents=True)
        for i in range(5):
            image, truth = make_tile(100 + i + (10 if kind == 'boxed' else 0), size=160)
            name = f'{kind}{i}.png'
            cv2.imwrite(str(root / kind / 'images' / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            centres = (truth[:, :2] + truth[:, 2:]) / 2
            if kind == 'dots':
                table[name] = [[float(x), float(y), ('lymph', 'tumor_epithelial')[j % 2]]
                               for j, (x, y) in enumerate(centres)]
            else:
                table[name] = truth.tolist()
    (root / 'dots' / 'points.json').write_text(json.dumps(points))
    (root / 'boxed' / 'boxes.json').write_text(json.dumps(boxes))
    return root


def test_entry_weights_and_held_out_splits(tmp_path):
    assert entry_weight('points:a.json') == 1 and entry_weight('points:a.json,weight=2.5') == 2.5
    with pytest.raises(CellRCNNError, match='weight must be a number >= 0'):
        entry_weight('points:a.json,weight=-1')
    assert held_out_entries('masks:m,mpp=auto,split=train,weight=3') == ['masks:m,mpp=auto,split=val']
    assert held_out_entries('masks:m,mpp=auto') == []
    splits = tmp_path / 'splits.json'
    splits.write_text(json.dumps({'a.png': 'train', 'b.png': 'val', 'c.png': 'test'}))
    assert held_out_entries(f'points:p.json,splits={splits},split=train') == [
        f'points:p.json,splits={splits},split=val', f'points:p.json,splits={splits},split=test']


def test_sources_are_drawn_by_weight_whatever_their_size(labelled):
    dots = f'points:{labelled}/dots/points.json,mpp=0.25,weight=3'
    cfg = TrainConfig(data=(dots, f'boxes:{labelled}/boxed/boxes.json,mpp=0.5'), synthetic_weight=0.0)
    config = ModelConfig(cell_types=('lymphocyte', 'tumour'), cell_type_colors=('#0000ff', '#ff0000'),
                         cell_type_labels=(('lymph',), ('tumor_epithelial',)))
    sources = training_sources(cfg, config)
    assert [len(s) for _, s, _ in sources] == [5, 5] and [w for _, _, w in sources] == [3, 1]
    image, boxes, extent, types = sources[0][1][0]
    assert image.shape == (80, 80, 3)  # 160 px at 0.25 um/px, at the model's 0.5
    assert not extent.any() and set(types.tolist()) == {0, 1}
    side = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(side[(boxes[:, 0] > 0) & (boxes[:, 2] < 80)], 16)  # 8 um prior squares at 0.5 um/px
    assert sources[1][1][0][2].all() and (sources[1][1][0][3] == -1).all()
    weights = sample_weights(sources)
    assert torch.allclose(weights[:5].sum(), torch.tensor(0.75, dtype=torch.float64))
    # no real data: synthetic tiles only, as before --data entries
    assert TrainConfig().synthetic_share == 1 and cfg.synthetic_share == 0
    assert TrainConfig(data=dots).entries == (dots,)


def test_train_from_two_entries_runs_and_reports_held_out(labelled, tmp_path, capsys):
    run = tmp_path / 'run'
    assert main(['train', '-o', str(run),
                 '--data', f'points:{labelled}/dots/points.json,mpp=0.5,split=train,weight=2',
                 '--data', f'boxes:{labelled}/boxed/boxes.json,mpp=0.5,split=train',
                 '--synthetic-weight', '0', '--cell-types', 'lymphocyte=lymph', 'tumour=tumor_epithelial',
                 '--steps', '2', '--warmup-steps', '1', '--batch-size', '2', '--tile-size', '128', '--workers', '0',
                 '--backbone', 'resnet18', '--device', 'cpu', '--dot-boxes-from', BUNDLED_MODEL]) == 0
    out = capsys.readouterr().out
    assert out.count('held out: ') == 2 and 'confusion' in out and 'boxes (IoU >= 0.5)' in out
    # the bundled model boxed some of the dots before training (dot_boxes); the boxed entry has no dots
    boxed_line = re.search(r'^points:\S+: (\d+) of (\d+) dots boxed by cellrcnn-default.pt$', out, re.MULTILINE)
    assert boxed_line and 0 < int(boxed_line.group(1)) <= int(boxed_line.group(2)) and out.count('dots boxed') == 1
    assert load_checkpoint(run / 'last.pt')['train_config']['dot_boxes_from'] == BUNDLED_MODEL
    model = load_model(run / 'model.pt')
    assert model.config.cell_types == ('lymphocyte', 'tumour')
    held_out = load_checkpoint(run / 'model.pt')['held_out']
    dots = held_out[f'points:{labelled}/dots/points.json,mpp=0.5,split=val']
    assert dots['centroid']['n_gt'] > 0 and len(dots['centroid']['confusion']) == 3 and dots['boxes'] is None
    boxed = held_out[f'boxes:{labelled}/boxed/boxes.json,mpp=0.5,split=val']
    assert boxed['boxes']['n_gt'] == boxed['centroid']['n_gt'] > 0
    # cellrcnn evaluate takes the same entries and gives the same figures
    entry = f'points:{labelled}/dots/points.json,mpp=0.5,split=val'
    assert main(['evaluate', '--model', str(run / 'model.pt'), '--data', entry, '--device', 'cpu',
                 '--json', str(tmp_path / 'm.json')]) == 0
    figures = json.loads((tmp_path / 'm.json').read_text())[entry]
    assert figures['centroid']['confusion'] == dots['centroid']['confusion']
    assert 'confusion' in capsys.readouterr().out


def test_average_takes_the_weighted_mean_calibrates_and_reports_held_out(labelled, tmp_path, capsys):
    from cellrcnn.checkpoint import model_sha256, save_checkpoint
    from cellrcnn.model import build_model

    config = ModelConfig(backbone_width=0.25, fpn_channels=16, box_head_channels=32, threshold=0.9,
                         centre_distance_um=2.5)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f'm{seed}.pt')
        save_checkpoint(paths[-1], build_model(config))
    a, b = (load_checkpoint(p)['state_dict'] for p in paths)
    entry = f'points:{labelled}/dots/points.json,mpp=0.5,split=train'
    out = tmp_path / 'soup.pt'
    assert main(['average', *map(str, paths), '--weights', '3', '1', '-o', str(out), '--data', entry,
                 '--device', 'cpu']) == 0
    printed = capsys.readouterr().out
    payload = load_checkpoint(out)
    for key, tensor in payload['state_dict'].items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor.float(), 0.75 * a[key] + 0.25 * b[key], atol=2e-3, rtol=1e-2), key
        else:
            assert torch.equal(tensor, a[key]), key
    assert payload['averaged_from'] == [{'file': 'm1.pt', 'sha256': model_sha256(paths[0]), 'weight': 3.0},
                                        {'file': 'm2.pt', 'sha256': model_sha256(paths[1]), 'weight': 1.0}]
    # the operating point comes from the training images (an untrained model's best is not the first's 0.9), the
    # held-out split is reported, and the first model's inference settings are kept
    model = load_model(out)
    assert model.config.threshold != 0.9 and f'score >= {model.config.threshold:.3f}' in printed
    assert model.config.centre_distance_um == 2.5 and payload['calibrated_on'] == [entry]
    assert model.config.rpn_score_thresh == config.rpn_score_thresh
    assert list(payload['held_out']) == [f'points:{labelled}/dots/points.json,mpp=0.5,split=val']
    # --objectness-floor sets the RPN's floor of the model written, and nothing else of it
    assert main(['average', *map(str, paths), '-o', str(tmp_path / 'floor.pt'), '--objectness-floor', '0.6']) == 0
    floored = load_checkpoint(tmp_path / 'floor.pt')
    assert floored['config'] == {**load_checkpoint(paths[0])['config'], 'rpn_score_thresh': 0.6}
    # a model whose weights mean something else is refused in one line
    save_checkpoint(tmp_path / 'typed.pt', build_model(dataclasses.replace(
        config, cell_types=('a', 'b'), cell_type_colors=('#000000', '#ffffff'), cell_type_labels=((), ()))))
    assert main(['average', str(paths[0]), str(tmp_path / 'typed.pt'), '-o', str(tmp_path / 'x.pt')]) == 2
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and 'typed.pt cannot be averaged with ' in error and 'cell_types differ' in error
    assert not (tmp_path / 'x.pt').exists()
