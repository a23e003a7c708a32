"""Dask helpers: detection of a slide's tile batches on a dask.distributed cluster, and the client that runs them.

Workers get the detector's :class:`cellrcnn.inference.DetectorSpec` and the BatchNorm statistics it runs with (as
adapted to the slide), and build the detector from them exactly as it is built here; the slide is reopened with its
own ``open_args``. The merge and the resume files stay with the caller.

A client unpickles what the scheduler and its workers send, so a scheduler can run code in the client's process:
:func:`scheduler_route` accepts only a cluster of local processes (``local:N``), a scheduler on this machine's
loopback (``tcp://127.0.0.1:PORT``) or one reached over TLS with the client certificate and CA of Dask's own
configuration (``tls://HOST:PORT``). The DSA task takes only ``local:N`` from its user; a cluster it may use is named
by :data:`SCHEDULER_ENV`, set by whoever runs the worker (docs/security.md).
"""

import dataclasses
import hashlib
import json
import os
import re
import time

from .adapt import batchnorm_stats
from .errors import CellRCNNError
from .focus import patch_blur
from .slide import Slide


def dask_batches(slide, detector, todo, scheduler, timing, stain=None):
    """(tiles, results) per batch, in order, computed on a dask.distributed cluster by the detector's ``spec``: a dict
    per tile, as ``Detector.detect_tiles_with_types`` gives (with the cell types of a model that has them), the
    tiles normalised from the slide's ``stain``, and the blur of its patches (``blur_patches``:
    ``focus.patch_blur``)."""
    if detector.spec is None:
        raise CellRCNNError('running on a Dask cluster needs a detector built from a model file (a DetectorSpec), '
                            'which its workers rebuild')
    spec = dataclasses.replace(detector.spec, model=os.path.abspath(detector.spec.model_path),
                               device=str(detector.device), batch_size=detector.batch_size,
                               views=detector.views)
    batchnorm = batchnorm_stats(detector.model)  # as adapted to this slide
    key = hashlib.sha1(json.dumps([slide.path, slide.open_args, dataclasses.asdict(spec)], sort_keys=True).encode())
    for name, value in batchnorm.items():
        key.update(name.encode() + value.tobytes())
    job = {'slide': slide.path, 'slide_args': slide.open_args, 'spec': spec, 'batchnorm': batchnorm,
           'key': key.hexdigest(), 'stain': stain}
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


#: the environment variable of a DSA worker that names the Dask scheduler the CellDetection task runs its tiles on;
#: set by whoever runs the worker, never by the task's user (whose ``scheduler`` parameter takes only ``local:N``)
SCHEDULER_ENV = 'CELLRCNN_DASK_SCHEDULER'

_LOCAL = re.compile(r'local:([0-9]{1,9})')
_LOOPBACK = re.compile(r'tcp://127\.0\.0\.1:([0-9]{1,5})')
_TLS = re.compile(r'tls://[A-Za-z0-9.-]+:([0-9]{1,5})')


def scheduler_route(scheduler):
    """How to reach a scheduler setting, matched exactly, else a one-line CellRCNNError:
    ``local:N`` (N from 1 to this machine's cores) gives ``(N, None)``; ``tcp://127.0.0.1:PORT`` gives
    ``(None, None)``; ``tls://HOST:PORT`` gives ``(None, security)``, a ``distributed.security.Security`` that requires
    encryption, with the CA and client certificate of Dask's configuration (``distributed.comm.tls.ca-file``,
    ``.client.cert``, ``.client.key``, e.g. ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``), refused without them."""
    scheduler = os.fspath(scheduler)
    text = repr(scheduler)[:60]
    local = _LOCAL.fullmatch(scheduler)
    if local or scheduler.startswith('local'):
        cores = os.cpu_count() or 1
        if not local or not 1 <= int(local[1]) <= cores:
            raise CellRCNNError(f'scheduler {text}: local:N takes a whole number N of processes from 1 to this '
                                f"machine's {cores} cores")
        return int(local[1]), None
    remote = _LOOPBACK.fullmatch(scheduler) or _TLS.fullmatch(scheduler)
    if not remote or not 1 <= int(remote[1]) <= 65535:
        raise CellRCNNError(f'scheduler {text} is not local:N, tcp://127.0.0.1:PORT or tls://HOST:PORT (a scheduler '
                            'on another machine is reached only over TLS with client certificates)')
    if scheduler.startswith('tcp://'):
        return None, None
    from distributed.security import Security

    security = Security(require_encryption=True)
    if not (security.tls_ca_file and security.tls_client_cert):
        raise CellRCNNError(f'scheduler {text}: tls:// needs a CA and a client certificate in Dask\'s configuration '
                            '(distributed.comm.tls.ca-file, .client.cert, .client.key)')
    return None, security


def connect_dask(scheduler):
    """A client for a scheduler address, or for a new LocalCluster of N single-threaded processes ('local:N'); what
    :func:`scheduler_route` accepts."""
    from distributed import Client, LocalCluster

    workers, security = scheduler_route(scheduler)
    try:
        if workers:
            return Client(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None))
        return Client(scheduler, timeout='15s', security=security)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CellRCNNError(f'cannot reach the Dask scheduler {scheduler!r}: {str(exc).splitlines()[0]}') from None


def close_dask(client, scheduler):
    """Close a client of :func:`connect_dask`, and the local cluster it started for 'local:N'."""
    cluster = client.cluster if scheduler_route(scheduler)[0] else None
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
    images = [slide.read(tile) for tile in tiles]
    results = detector.detect_tiles_with_types(images, parts=True, stain=job['stain'])
    return [{**out, 'blur_patches': patch_blur(image, tile.x, tile.y, slide.mpp)}
            for out, tile, image in zip(results, tiles, images)]
