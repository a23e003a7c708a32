"""A whole slide through the DSA: the CellDetection task run by girder_worker in Docker, its results ingested, the
slide opened in HistomicsUI; seconds and memory per stage.

    ./install.sh --with-dsa
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/whole_slide_dsa.py [--size 16384] [--mpp 0.5] [--screenshots DIR]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/whole_slide_dsa.py --slide SLIDE [--screenshots DIR]

Takes ``--slide``, or writes a synthetic slide of ``--size``² px at ``--mpp`` um/px (20x at 0.5, the default:
16384² holds about 180 000 nuclei; 40x at 0.25: 60000² holds about 430 000; the generator's true nuclei are its
ground truth), starts the local DSA (``cellrcnn.devstack.local_dsa``: Girder with the DSA plugins on SecantusDB,
Redis, girder_worker, a Docker engine with the task image), uploads the slide and submits CellDetection as
HistomicsUI's analysis panel does, with the nuclei, map, pixelmap and density outputs. It prints:

- the job: seconds from submission to its end, and the task's own stages from its summary line in the job log
  (tissue, read wait, detect, merge, outputs written);
- the ingest: seconds from the job's end until each output is an annotation on the slide (girder_worker uploads
  the outputs before it ends the job; HistomicsUI turns each into an annotation as it arrives);
- HistomicsUI: seconds to load and log in, from opening the slide until the view the task chose (``--display
  auto``) is drawn (the boxes: every nucleus in the features; the pixelmap: its layer made and its tiles drawn), and
  to redraw after moving half a screen at 10x;
- memory: the largest resident set of Girder, of the database, and of Chromium's renderer, sampled every 0.5 s.
"""

import argparse
import math
import os
import re
import sys
import tempfile
import threading
import time

import large_image
import psutil

from cellrcnn.annotation import DEFAULT_NAME
from cellrcnn.devstack.local_dsa import JOB_SUCCESS, DSAStack, cell_detection_params
from cellrcnn.devstack.local_girder import ADMIN, girder_python, wait_for
from cellrcnn.devstack.viewer import CHROMIUM, log_in, move, open_slide, renderer_processes, wait_drawn, wait_pixelmap
from cellrcnn.nuclei_map import BOXES_SHOWN, MAP_NAME
from cellrcnn.nuclei_pixelmap import PIXELMAP_NAME
from cellrcnn.synthetic import write_slide

SUMMARY = re.compile(r'^(\d+) nuclei in .*; ([\d.]+) s \(tissue ([\d.]+), read wait ([\d.]+), detect ([\d.]+), '
                     r'merge ([\d.]+)\).*; outputs written in ([\d.]+) s$', re.M)


class PeakMemory(threading.Thread):
    """The largest resident set (MB) of each named process, sampled every half second until ``stop()``."""

    def __init__(self, procs):
        super().__init__(daemon=True)
        self.procs, self.peaks, self.done = procs, {}, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            for name, pid in self.procs().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2 ** 20
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)

    def stop(self):
        self.done.set()
        self.join()
        return ', '.join(f'{name} {mb:.0f} MB' for name, mb in sorted(self.peaks.items()))


def renderers():
    return {f'chromium renderer {proc.pid}': proc.pid for proc in renderer_processes()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=16384, help='slide side in px')
    parser.add_argument('--mpp', type=float, default=0.5, help='um per px of the slide (0.5: 20x, 0.25: 40x)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--slide', default=None, help='a slide to run on, instead of writing one')
    parser.add_argument('--screenshots', default=None)
    parser.add_argument('--timeout', type=float, default=3600)
    args = parser.parse_args()
    if args.slide and not os.path.isfile(args.slide):
        sys.exit(f'whole_slide_dsa: no slide at {args.slide}')
    python, why = girder_python()
    if python is None:
        sys.exit(f'whole_slide_dsa: {why}')
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix='whole-slide-') as tmp, DSAStack(python) as dsa:
        slide = args.slide or os.path.join(tmp, 'whole.tiff')
        if not args.slide:
            started = time.perf_counter()
            truth = write_slide(slide, args.size, args.size, seed=args.seed, mpp=args.mpp)
            print(f'{args.size}² {10 / args.mpp:g}x slide with {len(truth)} nuclei written in '
                  f'{time.perf_counter() - started:.0f} s', flush=True)
        tasks = dsa.register_task_image()
        item_id, file_id = dsa.upload_slide(slide)
        memory = PeakMemory(lambda: {proc.log_name: proc.pid for proc in dsa.procs})
        memory.start()
        submitted = time.perf_counter()
        job = dsa.run_task(tasks['CellDetection'], cell_detection_params(file_id, dsa.folder_id, 'whole'))
        job = dsa.wait_for_job(job['_id'], args.timeout)
        ended = time.perf_counter()
        log = ''.join(job['log'])
        if job['status'] != JOB_SUCCESS:
            sys.exit(f'whole_slide_dsa: the job failed: {log[-2000:]}')
        found = SUMMARY.search(log)
        print(f'job: {ended - submitted:.0f} s from submission to its end; the task: {found.group(1)} nuclei, '
              f'{found.group(2)} s (tissue {found.group(3)}, read wait {found.group(4)}, detect {found.group(5)}, '
              f'merge {found.group(6)}; outputs written {found.group(7)})', flush=True)
        nuclei = int(found.group(1))
        for name in (PIXELMAP_NAME, MAP_NAME, DEFAULT_NAME):
            wait_for(lambda: any(a['annotation']['name'] == name for a in dsa.annotations(item_id)), args.timeout,
                     f'the annotation {name!r}', pause=0.5)
            print(f'ingest: {name!r} on the slide {time.perf_counter() - ended:.1f} s after the job ended',
                  flush=True)
        print(f'peak memory from submission to ingest: {memory.stop()}', flush=True)

        memory = PeakMemory(renderers)
        memory.start()
        base = f'http://127.0.0.1:{dsa.port}'
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
            page = browser.new_page(viewport={'width': 1600, 'height': 1000})
            page.set_default_timeout(args.timeout * 1000)
            started = time.perf_counter()
            log_in(page, base, ADMIN['login'], dsa.password)
            print(f'HistomicsUI: loaded and logged in {time.perf_counter() - started:.1f} s', flush=True)
            opened = time.perf_counter()
            open_slide(page, base, item_id)
            if nuclei > BOXES_SHOWN:  # a large result opens on its pixelmap, drawn as tiles
                first, idle = wait_pixelmap(page, args.timeout, opened)
                print(f'HistomicsUI: the pixelmap\'s layer made {first:.1f} s after the slide was opened, its tiles '
                      f'drawn (map idle) {idle:.1f} s', flush=True)
            else:
                first, idle = wait_drawn(page, nuclei - 1, args.timeout, opened)
                print(f'HistomicsUI: every nucleus drawn {first:.1f} s after the slide was opened (map idle '
                      f'{idle:.1f} s)', flush=True)
            if args.screenshots:
                os.makedirs(args.screenshots, exist_ok=True)
                page.screenshot(path=os.path.join(args.screenshots, 'whole-slide-low.png'))
            magnification = large_image.open(slide).getMetadata()['magnification']
            move(page, halvings=max(0, round(math.log2(magnification / 10))))  # to 10x
            print(f'HistomicsUI: a move of half a screen at 10x redrawn in {move(page, screens=(0.5, 0.5)):.2f} s',
                  flush=True)
            if args.screenshots:
                page.screenshot(path=os.path.join(args.screenshots, 'whole-slide-10x.png'))
            browser.close()
        print(f'peak memory of the browser: {memory.stop()}', flush=True)


if __name__ == '__main__':
    main()
