"""Seconds to post a whole-slide result (100 000 detections) to Girder and to read it back through REST.

    ./install.sh --with-girder    # or set CELLRCNN_GIRDER_PYTHON to the python of such a virtualenv
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/girder_post.py [--detections 100000] [--element rectangle|point]
        [--route auto|post|upload ...] [--rerun]

Starts a throwaway server the way the tests do (cellrcnn.devstack.local_girder: SecantusDB in memory + ``girder serve``
with the DSA plugins, in .venv-girder or the virtualenv CELLRCNN_GIRDER_PYTHON names), uploads a synthetic slide,
then for each route asked for: posts the annotation with ``cellrcnn.girder_post.post_annotations`` (for the upload route
this includes the server's ingest: it returns once the annotation is stored) and reads it back with
``GET /annotation/{id}``, checking the element count. With --rerun it posts again, which replaces (deletes) the
first: the cost of re-running a slide. Prints one line per post, with the CPU seconds each server process used;
'auto' is the route post_annotations picks.

On SecantusDB (the tests' MongoDB stand-in) the server's time is almost all the database inserting the elements,
one document each with 9 indexes: 100 000 took about 185 s on this project's 2 shared cores (the database process
about 260-290 CPU seconds, Girder 7, the client under 1 s to send). A DSA on MongoDB was not measured here.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from cellrcnn.annotation import detections_to_annotation
from cellrcnn.devstack.local_girder import GirderServer, girder_python
from cellrcnn.girder_post import post_annotations
from cellrcnn.synthetic import write_slide


def server_cpu(server):
    """CPU seconds (user + system) each server process has used so far."""
    ticks = os.sysconf('SC_CLK_TCK')
    out = {}
    for proc in server.procs:
        with open(f'/proc/{proc.pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        out[proc.log_name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--detections', type=int, default=100_000)
    parser.add_argument('--element', choices=['rectangle', 'point'], default='rectangle')
    parser.add_argument('--route', nargs='+', choices=['auto', 'post', 'upload'], default=['auto'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--rerun', action='store_true', help='post again: replaces (deletes) the first')
    parser.add_argument('--ingest-timeout', type=float, default=1800, help='seconds to wait for the ingest')
    args = parser.parse_args()
    python, why = girder_python()
    if python is None:
        sys.exit(f'girder_post: {why}')

    rng = np.random.default_rng(args.seed)
    side = 4096
    xy = rng.uniform(0, side - 16, (args.detections, 2))
    boxes = np.hstack([xy, xy + rng.uniform(6, 16, (args.detections, 2))])
    doc = detections_to_annotation(boxes, rng.uniform(0.5, 1, args.detections), element_type=args.element,
                                   attributes={'model': 'benchmark.pt', 'cellrcnn': 'benchmark'})
    with tempfile.TemporaryDirectory(prefix='girder-post-') as tmp, GirderServer(python) as server:
        slide = os.path.join(tmp, 'slide.tiff')
        write_slide(slide, side, side, seed=args.seed)
        item_id, _ = server.upload_slide(slide)
        gc = server.client()
        print(f'{args.detections} {args.element} elements; Girder {gc.get("system/version")["release"]} on '
              f'SecantusDB at {server.api_url}')
        for route in args.route:
            limits = {'auto': {}, 'post': {'large_bytes': float('inf'), 'large_elements': float('inf')},
                      'upload': {'large_bytes': 0}}[route]
            for attempt in ('first post', 're-run (replaces)')[:2 if args.rerun else 1]:
                before = server_cpu(server)
                start = time.perf_counter()
                result = post_annotations(server.api_url, server.token, item_id, doc,
                                          ingest_timeout=args.ingest_timeout, **limits)[0]
                posted = time.perf_counter() - start
                start = time.perf_counter()
                stored = gc.get(f'annotation/{result["_id"]}')
                read = time.perf_counter() - start
                count = len(stored['annotation']['elements'])
                assert count == args.detections, f'read back {count} elements'
                left = gc.get('annotation', {'itemId': item_id, 'limit': 0})
                assert len(left) == 1, f'{len(left)} annotations on the item'
                cpu = {name: f'{after - before[name]:.0f}' for name, after in server_cpu(server).items()}
                ingest = (f' (sent in {result["sent_seconds"]:.1f} s, then ingested)'
                          if result['route'] == 'upload' else '')
                print(f'{route} route ({result["route"]}), {attempt}: post {posted:.1f} s{ingest}, read back '
                      f'{count} elements {read:.1f} s, total {posted + read:.1f} s; server CPU s: '
                      f'{", ".join(f"{k} {v}" for k, v in cpu.items())}')


if __name__ == '__main__':
    main()
