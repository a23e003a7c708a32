"""Dask helpers: detection of a slide's tile batches on a dask.distributed cluster, and the client that runs them.

Workers get the detector's :class:`cellrcnn.inference.DetectorSpec` and the BatchNorm statistics it runs with (as
adapted to the slide), and build the detector from them exactly as it is built here; the slide is reopened with its
own ``open_args``. The merge and the resume files stay with the caller.
"""

import dataclasses
import hashlib
import json
import os
import time

from .adapt import batchnorm_stats
from .errors import CellRCNNError
from .slide import Slide


def dask_batches(slide, detector, todo, scheduler, timing):
    """(tiles, results) per batch, in order, computed on a dask.distributed cluster by the detector's ``spec``: a dict
    per tile, as ``Detector.detect_tiles_with_types`` gives (with the cell types of a model that has them)."""
    if detector.spec is None:
        raise CellRCNNError('running on a Dask cluster needs a detector built from a model file (a DetectorSpec), '
                            'which its workers rebuild')
    spec = dataclasses.replace(detector.spec, model=os.path.abspath(detector.spec.model_path),
                               device=str(detector.device), batch_size=detector.batch_size)
    batchnorm = batchnorm_stats(detector.model)  # as adapted to this slide
    key = hashlib.sha1(json.dumps([slide.path, slide.open_args, dataclasses.asdict(spec)], sort_keys=True).encode())
    for name, value in batchnorm.items():
        key.update(name.encode() + value.tobytes())
    job = {'slide': slide.path, 'slide_args': slide.open_args, 'spec': spec, 'batchnorm': batchnorm,
           'key': key.hexdigest()}
    client = connect_dask(scheduler)
    batches = [todo[i:i + spec.batch_size] for i in range(0, len(todo), spec.batch_size)]
    try:
        futures = client.map(run_batch_on_worker, batches, job=job, pure=False)
        for batch, future in zip(batches, futures):
            t0 = time.perf_counter()
            results = future.result()
            timing['detect'] += time.perf_counter() - t0
            yield batch, results
    finally:
        close_dask(client, scheduler)


def connect_dask(scheduler):
    """A client for a scheduler address, or for a new LocalCluster of N single-threaded processes ('local:N')."""
    from distributed import Client, LocalCluster

    try:
        if scheduler.startswith('local'):
            n = int(scheduler.partition(':')[2] or os.cpu_count())
            return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None))
        return Client(scheduler, timeout='15s')
    except (OSError, TimeoutError, ValueError) as exc:
        raise CellRCNNError(f'cannot reach the Dask scheduler {scheduler!r}: {str(exc).splitlines()[0]}') from None


def close_dask(client, scheduler):
    """Close a client of :func:`connect_dask`, and the local cluster it started for 'local:N'."""
    cluster = client.cluster if scheduler.startswith('local') else None
    client.close()
    if cluster is not None:
        cluster.close()


_WORKER_STATE = {}


def run_batch_on_worker(tiles, job):
    """On a Dask worker: read and detect a batch of tiles. The slide and the detector (``job['spec'].build`` with the
    job's BatchNorm statistics) are set up once per worker and job ``key``."""
    key = job['key']
    if key not in _WORKER_STATE:
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (Slide(job['slide'], **job['slide_args']), job['spec'].build(batchnorm=job['batchnorm']))
    slide, detector = _WORKER_STATE[key]
    return detector.detect_tiles_with_types([slide.read(tile) for tile in tiles])
