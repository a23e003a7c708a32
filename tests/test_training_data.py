"""``cellrcnn train --data``: entries of real labels mixed by weight with synthetic tiles, and their held-out
splits."""

import json

import cv2
import numpy as np
import pytest
import torch

from cellrcnn.__main__ import main
from cellrcnn.checkpoint import load_checkpoint, load_model
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
                 '--backbone', 'resnet18', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert out.count('held out: ') == 2 and 'confusion' in out and 'boxes (IoU >= 0.5)' in out
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
