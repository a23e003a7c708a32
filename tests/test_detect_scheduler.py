"""`cellrcnn detect --scheduler`: tile batches on Dask workers give what the same command gives here, with every
override of the detector (anchor density, score threshold, NMS, views) reaching the workers; which schedulers the
command and the DSA task may use (docs/security.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CLI_DIR = os.path.join(os.path.dirname(__file__), '..', 'cli')
OVERRIDES = ['--anchor-upsample', '2', '--threshold', '0.05', '--nms', '0.3', '--views', '2']


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
    assert here_params['views'] == 2
    assert len(spread) == len(here) > 0
    np.testing.assert_allclose(spread, here, atol=0.02)
    _, plain = detect(slide, tiny_checkpoint, tmp_path / 'plain')
    assert plain.shape != here.shape or not np.allclose(plain, here, atol=0.02)  # the overrides change the result


@pytest.fixture(scope='module')
def loopback_cluster():
    """A real dask.distributed scheduler on 127.0.0.1 with one worker process (which imports cellrcnn as we do)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host='127.0.0.1',
                      dashboard_address=None) as cluster:
        yield cluster


def ran_on(cluster):
    return 'run_batch_on_worker' in cluster.scheduler.task_prefixes


def test_detect_runs_on_a_scheduler_on_loopback(slide, tiny_checkpoint, tmp_path, loopback_cluster):
    assert loopback_cluster.scheduler_address.startswith('tcp://127.0.0.1:')
    _, boxes = detect(slide, tiny_checkpoint, tmp_path, '--scheduler', loopback_cluster.scheduler_address)
    assert len(boxes) and ran_on(loopback_cluster)


def test_the_task_takes_no_scheduler_from_its_user_but_the_administrators(slide, tiny_checkpoint, tmp_path,
                                                                         loopback_cluster):
    """A DSA user's scheduler could run code in the task (which holds the job's Girder token): the task refuses the
    address of a real, listening scheduler; the address the worker's administrator sets is used."""
    from cellrcnn.dask_cluster import SCHEDULER_ENV

    def task(*options, env=None):
        return subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'CellDetection', str(slide),
                               str(tmp_path / 'nuclei.anot'), '--model_file', str(tiny_checkpoint),
                               '--analysis_tile_size', '256', '--device', 'cpu', '--api-url', '', '--girder-token', '',
                               *options], cwd=CLI_DIR, capture_output=True, text=True, timeout=600,
                              env={**os.environ, **(env or {})})

    address = loopback_cluster.scheduler_address
    before = ran_on(loopback_cluster)
    for asked in address, 'localhost:8786', 'local', f'local:{os.cpu_count() + 1}':
        refused = task('--scheduler', asked)
        assert refused.returncode == 2 and refused.stderr.count('\n') == 1, refused.stderr
        assert refused.stderr.startswith('CellDetection: error: ')
    assert 'the scheduler parameter takes only local:N' in task('--scheduler', address).stderr
    assert ran_on(loopback_cluster) == before
    done = task(env={SCHEDULER_ENV: address})
    assert done.returncode == 0, done.stderr
    assert ran_on(loopback_cluster) and json.loads((tmp_path / 'nuclei.anot').read_text())['elements']
