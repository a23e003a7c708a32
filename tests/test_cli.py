import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from support import report_figures

from cellrcnn.__main__ import main
from cellrcnn.synthetic import make_tile


@pytest.fixture
def image_file(tmp_path):
    """A plain PNG: large_image opens it, but it states no resolution."""
    image, _ = make_tile(np.random.default_rng(3), size=(300, 420))
    path = tmp_path / 'tile.png'
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope='module')
def slide_file(synthetic_slide):
    return synthetic_slide(700, 520, seed=4)[0]


def test_detect_on_a_slide_writes_annotations_geojson_csv_and_overview(tmp_path, slide_file, tiny_checkpoint,
                                                                         capsys):
    out = tmp_path / 'out'
    assert main(['detect', str(slide_file), '-o', str(out), '--model', str(tiny_checkpoint), '--tile-size', '256',
                 '--element', 'point', '--progress', 'none']) == 0
    doc = json.loads((out / 'slide.anot.json').read_text())
    assert doc['elements'] and all(e['type'] == 'point' for e in doc['elements'])
    assert all(0 <= e['center'][0] <= 700 and 0 <= e['center'][1] <= 520 for e in doc['elements'])
    assert doc['attributes']['params']['tile_size'] == 256
    density = json.loads((out / 'slide.density.anot.json').read_text())
    assert density['elements'][0]['type'] == 'griddata'
    geojson = json.loads((out / 'slide.geojson').read_text())
    assert len(geojson['features']) == len(doc['elements'])
    assert len((out / 'slide.csv').read_text().splitlines()) == len(doc['elements']) + 1
    assert cv2.imread(str(out / 'slide.overlay.png')).shape == (520, 700, 3)
    summary = json.loads((out / 'slide.summary.json').read_text())
    assert summary['detections'] == len(doc['elements']) and summary['tiles_read'] >= 1
    assert not list(out.glob('.*partial'))  # partial results are removed once the outputs are written
    assert f'{len(doc["elements"])} nuclei' in capsys.readouterr().out


@pytest.mark.parametrize('option, tiles', [([], 0), (['--adapt-tiles', '2'], 2), (['--adapt-tiles', '8'], 8)])
def test_adapting_to_the_slide_is_off_by_default_and_set_by_its_option(tmp_path, slide_file, tiny_checkpoint, capsys,
                                                                     option, tiles):
    out = tmp_path / 'out'
    assert main(['detect', str(slide_file), '-o', str(out), '--model', str(tiny_checkpoint), '--tile-size', '256',
                 '--progress', 'none', *option]) == 0
    attributes = json.loads((out / 'slide.anot.json').read_text())['attributes']
    assert attributes['params']['adapt_tiles'] == tiles  # part of the run's identity
    assert attributes['stats']['adapt_tiles'] == tiles and attributes['stats']['tiles_read'] > 8
    assert (f' on {tiles} tiles, ' in capsys.readouterr().out) == (tiles > 0)  # named only when it ran


def test_an_image_without_resolution_needs_mpp(tmp_path, image_file, tiny_checkpoint):
    out = tmp_path / 'out'
    assert main(['detect', str(image_file), '-o', str(out), '--model', str(tiny_checkpoint), '--mpp', '0.5',
                 '--progress', 'none']) == 0
    assert (out / 'tile.anot.json').exists()


@pytest.mark.parametrize('args,message', [
    (['detect', 'missing.svs'], 'slide not found'),
    (['detect', '{image}'], 'states no magnification or resolution'),
    (['detect', '{model}'], 'cannot open slide'),
    (['detect', '{slide}', '--threshold', '1.5'], 'score threshold must be between 0 and 1'),
    (['detect', '{slide}', '--overlap', '2000'], 'overlap must be'),
    (['detect', '{slide}', '--roi', '9000,9000,10,10'], 'outside the slide'),
    (['detect', '{slide}', '--adapt-tiles', '-1'], 'number of tiles to adapt to the slide must be 0'),
    (['detect', '{slide}', '--magnification', '40'], 'would only upsample it'),
    (['detect', '{slide}', '--model', '{image}'], 'not a readable checkpoint'),
    (['detect', '{slide}', '--device', 'cuda'], 'no CUDA GPU'),
    (['train', '--backbone', 'vgg', '--steps', '1'], 'unknown backbone'),
    (['train', '--anchor-upsample', '3', '--steps', '1'], 'anchor_upsample must be one of'),
])
def test_bad_input_gets_one_error_line_and_a_nonzero_exit(tmp_path, image_file, slide_file, tiny_checkpoint, args,
                                                         message):
    args = [a.format(image=image_file, slide=slide_file, model=tiny_checkpoint) for a in args]
    args += ['-o', str(tmp_path / 'o')]
    if args[0] == 'detect' and '--model' not in args:
        args += ['--model', str(tiny_checkpoint)]
    run = subprocess.run([sys.executable, '-m', 'cellrcnn', *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count('\n') == 0, run.stderr
    assert message in run.stderr and run.stderr.startswith('cellrcnn: error:')


def test_tiny_image_is_refused(tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / 'small.png'
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))
    assert main(['detect', str(path), '-o', str(tmp_path), '--model', str(tiny_checkpoint), '--mpp', '0.5']) == 2
    assert 'the model needs at least' in capsys.readouterr().err


def test_synth_tiles_train_from_their_annotations_and_evaluate(tmp_path, capsys):
    data = tmp_path / 'tiles'
    assert main(['synth', str(data), '--count', '4', '--tile-size', '128', '--seed', '5']) == 0
    assert len(list(data.glob('*.png.json'))) == 4
    run = tmp_path / 'run'
    assert main(['train', '-o', str(run), '--data', str(data), '--steps', '3', '--batch-size', '2', '--tile-size',
                 '128', '--warmup-steps', '1', '--workers', '0', '--val-data', str(data)]) == 0
    truth = sum(len(json.loads(p.read_text())['elements']) for p in data.glob('*.png.json'))
    assert truth > 20
    # The 3-step model's figures are whatever they are, but they are the counts of its matches, and printed.
    capsys.readouterr()
    assert main(['evaluate', '--model', str(run / 'model.pt'), '--data', str(data), '--json',
                 str(tmp_path / 'm.json')]) == 0
    metrics = json.loads((tmp_path / 'm.json').read_text())
    assert metrics['n_images'] == 4 and metrics['n_gt'] == metrics['tp'] + metrics['fn'] == truth
    assert metrics['n_pred_kept'] == metrics['tp'] + metrics['fp'] <= metrics['n_pred']
    assert metrics['recall'] == pytest.approx(metrics['tp'] / truth)
    assert metrics['f1'] == pytest.approx(2 * metrics['tp'] / (2 * metrics['tp'] + metrics['fp'] + metrics['fn']))
    if metrics['n_pred_kept']:  # (none kept: precision 0 by convention)
        assert metrics['precision'] == pytest.approx(metrics['tp'] / metrics['n_pred_kept'])
    assert report_figures(capsys.readouterr().out) == report_figures(metrics)
    # The bundled model on the same tiles (the default model): an evaluation that finds its nuclei.
    assert main(['evaluate', '--data', str(data), '--tile-size', '128', '--device', 'cpu', '--json',
                 str(tmp_path / 'bundled.json')]) == 0
    bundled = json.loads((tmp_path / 'bundled.json').read_text())
    assert bundled['n_gt'] == truth and bundled['precision'] > 0.9 and bundled['recall'] > 0.85, bundled
    assert report_figures(capsys.readouterr().out) == report_figures(bundled)
