"""`cellrcnn detect --scheduler`: tile batches on Dask workers give what the same command gives here, with every
override of the detector (anchor density, score threshold, NMS) reaching the workers."""

import json
import subprocess
import sys

import numpy as np
import pytest

OVERRIDES = ['--anchor-upsample', '2', '--threshold', '0.05', '--nms', '0.3']


@pytest.fixture(scope='module')
def slide(synthetic_slide):
    return synthetic_slide(900, 700, seed=11)[0]


def detect(slide, checkpoint, out, *options):
    run = subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', str(slide), '-o', str(out), '--model',
                          str(checkpoint), '--tile-size', '256', '--overlap', '48', '--min-tissue', '0',
                          '--device', 'cpu', '--progress', 'none', '--no-resume', *options],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / 'slide.anot.json').read_text())
    boxes = np.loadtxt(out / 'slide.csv', delimiter=',', skiprows=1, usecols=(2, 3, 4, 5), ndmin=2)
    return doc['attributes']['params'], boxes


def test_the_scheduler_runs_the_detector_the_options_ask_for(slide, tiny_checkpoint, tmp_path):
    here_params, here = detect(slide, tiny_checkpoint, tmp_path / 'here', *OVERRIDES)
    spread_params, spread = detect(slide, tiny_checkpoint, tmp_path / 'spread', *OVERRIDES, '--scheduler', 'local:1')
    assert spread_params == here_params and here_params['anchor_upsample'] == 2 and here_params['nms'] == 0.3
    assert len(spread) == len(here) > 0
    np.testing.assert_allclose(spread, here, atol=0.02)
    _, plain = detect(slide, tiny_checkpoint, tmp_path / 'plain')
    assert plain.shape != here.shape or not np.allclose(plain, here, atol=0.02)  # the overrides change the result
