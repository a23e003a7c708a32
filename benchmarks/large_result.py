"""A whole slide's nuclei in HistomicsUI: seconds to store a large result and to draw it, boxes against the nuclei map
(and against the pixelmap).

    ./install.sh --with-dsa    # Girder with the DSA plugins and its web client (.venv-girder), Chromium, Playwright
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/large_result.py [--nuclei 100000] [--views map boxes]
        [--screenshots DIR]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/large_result.py --nuclei 500000 --views pixelmap

Starts a throwaway server the way the tests do (``cellrcnn.devstack.local_girder``: SecantusDB, Girder with the DSA
plugins and its built web client), writes a synthetic 20x slide sized for about that many nuclei and takes its true
nuclei as the result, each given one of the bundled model's three cell types at random, written with
cellrcnn's own writers (the nuclei annotation and the nuclei map, as ``cellrcnn detect`` writes them). It posts them
as the product does (``girder_post.post_annotations``: the map first, then the nuclei; each returns once the server
has stored it), then opens the slide in HistomicsUI in headless Chromium and, for each view asked for:

- **first drawn**: seconds from the view being asked for (the slide opened on the map; the boxes' eye clicked in the
  annotation panel) until its features hold data, and then until the map is idle;
- **pan**: seconds to redraw after zooming in to 10x and moving half a screen;
- **memory**: the browser's renderer processes' largest resident set, and the page's JavaScript heap.

The **pixelmap** view (alone: ``--views pixelmap``) measures what the CellDetection task posts for a large result
(``cellrcnn.nuclei_pixelmap``): one large_image ``pixelmap`` element, shown, with the nuclei map listed. The
pixelmap's label image (a tiled pyramidal RGB TIFF the size of the slide; nucleus k's box is label 2k inside and
2k + 1 on its one-pixel outline from 10x up, its whole box 2k + 1 below: a dot) is uploaded as a large image item;
the element names that item and gives each nucleus its cell type (``values``), each type a category with its colour
on the outline and a clear inside. large_image keeps a ``values`` array of more than 100 000 in a file beside the
element, and HistomicsUI draws the element as a tile layer. "Stored" is then the label image written, uploaded and a
large image, plus the annotations stored; "first drawn" is until the pixelmap's layer exists and the map is idle
(its tiles drawn); each zoom (5x, 10x, 20x) and pan is timed until the map is idle again.

Screenshots of each view zoomed out and in go to ``--screenshots``. Prints one line per step.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import psutil

from cellrcnn.annotation import DEFAULT_NAME, write_annotation, write_detections_annotation
from cellrcnn.checkpoint import BUNDLED_MODEL, load_model
from cellrcnn.devstack.local_girder import ADMIN, GirderServer, girder_python
from cellrcnn.devstack.viewer import (
    CHROMIUM,
    FEATURES,
    log_in,
    move,
    open_slide,
    renderer_processes,
    wait_drawn,
    wait_pixelmap,
)
from cellrcnn.girder_post import post_annotation_files
from cellrcnn.nuclei_map import nuclei_map_annotation
from cellrcnn.nuclei_pixelmap import pixelmap_annotation, write_label_image
from cellrcnn.synthetic import write_slide

#: slide pixels (20x) per nucleus on the synthetic slides, glass included (64 071 nuclei on 12288², 180 047 on 16384²)
AREA_PER_NUCLEUS = 2400


def synthetic_result(boxes, seed):
    """The slide's true nuclei as a result: their boxes, scores and cell types (indices into the bundled model's
    three, drawn at random: the synthetic tissue has no types)."""
    rng = np.random.default_rng(seed)
    return boxes, rng.uniform(0.5, 1.0, len(boxes)), rng.integers(0, 3, len(boxes))


def renderer_memory():
    """The largest resident set (MB) of Chromium's renderer processes."""
    largest = 0
    for proc in renderer_processes():
        try:
            largest = max(largest, proc.memory_info().rss)
        except psutil.Error:
            continue
    return largest / 2 ** 20


def memory(page):
    """The renderer's resident set and the page's JavaScript heap, MB."""
    heap = page.evaluate('performance.memory.usedJSHeapSize') / 2 ** 20
    return f'renderer {renderer_memory():.0f} MB, JS heap {heap:.0f} MB'


def measure_pixelmap(page, nuclei, started, shots, timeout):
    """Print the seconds until the pixelmap layer exists and the map is idle, then to zoom to 5x, 10x and 20x, each
    with a move of half a screen, and to move again at 20x."""
    first, idle = wait_pixelmap(page, timeout, started)
    print(f'pixelmap: layer made {first:.1f} s after opening, map idle {idle:.1f} s; '
          f'{memory(page)}', flush=True)
    if shots:
        page.screenshot(path=os.path.join(shots, f'pixelmap-{nuclei}-low.png'))
    for halvings, magnification in ((2, '5x'), (1, '10x'), (0, '20x')):
        seconds = move(page, halvings=halvings, screens=(0.5, 0.5))
        print(f'pixelmap: zoom to {magnification} and a move, redrawn {seconds:.2f} s; {memory(page)}', flush=True)
        if shots:
            page.screenshot(path=os.path.join(shots, f'pixelmap-{nuclei}-{magnification}.png'))
    print(f'pixelmap: a move at 20x redrawn {move(page, screens=(0.5, 0.5)):.2f} s; {memory(page)}', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nuclei', type=int, default=100_000)
    parser.add_argument('--views', nargs='+', choices=['map', 'boxes', 'pixelmap'], default=['map', 'boxes'])
    parser.add_argument('--screenshots', default=None, help='folder for the screenshots (default: none taken)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--timeout', type=float, default=1800, help='seconds to wait for a step')
    args = parser.parse_args()
    if 'pixelmap' in args.views and len(args.views) > 1:
        parser.error('the pixelmap view is measured alone')
    python, why = girder_python()
    if python is None:
        sys.exit(f'large_result: {why}')
    from playwright.sync_api import sync_playwright

    config = load_model(BUNDLED_MODEL).config
    colors = dict(zip(config.cell_types, config.cell_type_colors))
    side = int(np.sqrt(args.nuclei * AREA_PER_NUCLEUS)) // 256 * 256 + 256
    shots = args.screenshots
    if shots:
        os.makedirs(shots, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='large-result-') as tmp, GirderServer(python) as server:
        slide = os.path.join(tmp, 'slide.tiff')
        started = time.perf_counter()
        boxes, scores, types = synthetic_result(write_slide(slide, side, side, seed=args.seed), args.seed)
        item_id, _ = server.upload_slide(slide)
        nuclei = len(boxes)
        print(f'{nuclei} nuclei on a {side}² slide (written and uploaded in {time.perf_counter() - started:.0f} s)',
              flush=True)
        attributes = {'model': 'benchmark.pt', 'cellrcnn': 'benchmark'}
        nuclei_file, map_file = os.path.join(tmp, 'nuclei.anot.json'), os.path.join(tmp, 'map.anot.json')
        started = time.perf_counter()
        write_detections_annotation(nuclei_file, boxes, scores, labels=types, class_names=list(config.cell_types),
                                    class_colors=colors, attributes=attributes, visible=False)
        # with the pixelmap the slide opens on it, the map listed (shown_on_open)
        write_annotation(nuclei_map_annotation(boxes, types, config.cell_types, colors, attributes=attributes,
                                               visible=args.views != ['pixelmap']), map_file)
        print(f'written in {time.perf_counter() - started:.1f} s: nuclei {os.path.getsize(nuclei_file) / 1e6:.0f} MB,'
              f' map {os.path.getsize(map_file) / 1e6:.1f} MB', flush=True)
        files = [map_file] + ([nuclei_file] if 'boxes' in args.views else [])
        if args.views == ['pixelmap']:
            started = time.perf_counter()
            labels = os.path.join(tmp, 'nuclei-labels.tiff')
            write_label_image(labels, boxes, side, side, mpp=0.5)
            written = time.perf_counter() - started
            label_item, _ = server.upload_slide(labels, timeout=args.timeout)
            print(f'label image written in {written:.1f} s ({os.path.getsize(labels) / 1e6:.0f} MB), uploaded and a '
                  f'large image {time.perf_counter() - started - written:.1f} s later', flush=True)
            files = [map_file, write_annotation(pixelmap_annotation(label_item, nuclei, types, config.cell_types,
                                                                    colors, attributes=attributes),
                                                os.path.join(tmp, 'pixelmap.anot.json'))]
        for result in post_annotation_files(server.api_url, server.token, item_id, files,
                                            ingest_timeout=args.timeout):
            print(f'stored {result["name"]!r} ({result["elements"]} elements, {result["route"]} route) in '
                  f'{result["seconds"]:.1f} s', flush=True)
        ids = {a['annotation']['name']: a['_id'] for a in server.annotations(item_id)}
        base = server.api_url.replace('/api/v1', '')
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
            page = browser.new_page(viewport={'width': 1600, 'height': 1000})
            log_in(page, base, ADMIN['login'], server.password)
            for view in args.views:
                started = time.perf_counter()
                open_slide(page, base, item_id)
                if view == 'pixelmap':
                    measure_pixelmap(page, nuclei, started, shots, args.timeout)
                    continue
                above = nuclei - 1  # the map: every nucleus is a point of its features
                if view == 'boxes':  # the map is shown on open: swap it for the boxes in the annotation panel
                    wait_drawn(page, above, args.timeout)
                    page.click('.h-hide-all-annotations')
                    page.wait_for_timeout(1000)
                    above = page.evaluate(FEATURES) + nuclei - 1  # a hidden layer may keep its data
                    row = f'.h-annotation[data-id="{ids[DEFAULT_NAME]}"]'
                    for name in config.cell_types:
                        page.click(f'.h-annotation-group[data-group-name="{name}"] .h-annotation-group-name')
                        if page.locator(row).count():
                            break
                    started = time.perf_counter()
                    page.click(f'{row} .h-toggle-annotation')
                first, idle = wait_drawn(page, above, args.timeout, started)
                print(f'{view}: first drawn {first:.1f} s after asking, map idle {idle:.1f} s '
                      f'({page.evaluate(FEATURES)} items in features); {memory(page)}', flush=True)
                if shots:
                    page.screenshot(path=os.path.join(shots, f'{view}-{nuclei}-low.png'))
                move(page, halvings=1)  # 20x base: from the whole slide to about 10x
                seconds = move(page, screens=(0.5, 0.5))
                print(f'{view}: pan redrawn {seconds:.2f} s; {memory(page)}', flush=True)
                if shots:
                    page.screenshot(path=os.path.join(shots, f'{view}-{nuclei}-high.png'))
            browser.close()


if __name__ == '__main__':
    main()
