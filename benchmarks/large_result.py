"""A whole slide's nuclei in HistomicsUI: seconds to store a large result and to draw it, boxes against the nuclei map
(and against a pixelmap).

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

The **pixelmap** view (alone: ``--views pixelmap``) measures a form the product does not post yet: the nuclei as one
large_image ``pixelmap`` element. A label image (a tiled pyramidal RGB TIFF at the slide's scale, a pixel's label
``R + 256 G + 65536 B``; nucleus k's box is label 2k inside and 2k + 1 on its one-pixel outline, ``boundaries``) is
uploaded as a large image item; the element names that item and gives each nucleus its cell type (``values``), each
type a category with its colour on the outline and a clear inside. large_image keeps a ``values`` array of more than
100 000 in a file beside the element, and HistomicsUI draws the element as a tile layer. "Stored" is then the label
image written, uploaded and a large image, plus the annotation stored; "first drawn" is until its layer exists and
the map is idle; each zoom (5x, 10x, 20x) and pan is timed until the map is idle again. The nuclei map is not posted
in this view.

Screenshots of each view zoomed out and in go to ``--screenshots``. Prints one line per step.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import psutil
import tifffile

from cellrcnn.annotation import DEFAULT_NAME, write_annotation, write_detections_annotation
from cellrcnn.checkpoint import BUNDLED_MODEL, load_model
from cellrcnn.devstack.local_girder import ADMIN, GirderServer, girder_python
from cellrcnn.devstack.viewer import CHROMIUM, FEATURES, MAP, log_in, move, open_slide, renderer_processes, wait_drawn
from cellrcnn.girder_post import post_annotation_files
from cellrcnn.nuclei_map import nuclei_map_annotation, rgb_components
from cellrcnn.synthetic import write_slide

#: slide pixels (20x) per nucleus on the synthetic slides, glass included (64 071 nuclei on 12288², 180 047 on 16384²)
AREA_PER_NUCLEUS = 2400
#: the label image's tile side
TILE = 256


def synthetic_result(boxes, seed):
    """The slide's true nuclei as a result: their boxes, scores and cell types (indices into the bundled model's
    three, drawn at random: the synthetic tissue has no types)."""
    rng = np.random.default_rng(seed)
    return boxes, rng.uniform(0.5, 1.0, len(boxes)), rng.integers(0, 3, len(boxes))


def _tile_boxes(boxes, rows, cols):
    """``{(tile row, tile column): sorted indices of the boxes touching that tile}``."""
    x0, y0 = (np.clip(boxes[:, k] // TILE, 0, n - 1).astype(int) for k, n in ((0, cols), (1, rows)))
    x1, y1 = (np.clip(np.ceil(boxes[:, k]) // TILE, 0, n - 1).astype(int) for k, n in ((2, cols), (3, rows)))
    one = (x0 == x1) & (y0 == y1)  # most boxes lie within one tile: grouped at once
    keys = y0[one] * cols + x0[one]
    order = np.argsort(keys, kind='stable')
    tiles, starts = np.unique(keys[order], return_index=True)
    index = {divmod(int(k), cols): list(part) for k, part in zip(tiles, np.split(np.flatnonzero(one)[order],
                                                                                  starts[1:]))}
    for i in np.flatnonzero(~one).tolist():
        for ty in range(y0[i], y1[i] + 1):
            for tx in range(x0[i], x1[i] + 1):
                index.setdefault((ty, tx), []).append(i)
    for ids in index.values():
        ids.sort()
    return index


def _label_tiles(boxes, width, height):
    """The RGB tiles, row by row, of the label image of ``boxes`` (in this level's pixels) on a width x height
    level: nucleus k (from 1) is 2k inside its box and 2k + 1 on the box's outermost pixels; later boxes cover
    earlier ones."""
    rows, cols = -(-height // TILE), -(-width // TILE)
    index = _tile_boxes(boxes, rows, cols)
    corners = np.column_stack([np.floor(boxes[:, :2]), np.maximum(np.ceil(boxes[:, 2:]), np.floor(boxes[:, :2]) + 1)])
    corners = corners.astype(np.int64)
    for ty in range(rows):
        for tx in range(cols):
            label = np.zeros((TILE, TILE), np.int64)
            for i in index.get((ty, tx), ()):
                x0, y0, x1, y1 = corners[i] - [tx * TILE, ty * TILE, tx * TILE, ty * TILE]
                label[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 2 * i + 3
                label[max(y0 + 1, 0):max(y1 - 1, 0), max(x0 + 1, 0):max(x1 - 1, 0)] = 2 * i + 2
            yield np.stack([label & 255, label >> 8 & 255, label >> 16 & 255], axis=-1).astype(np.uint8)


def write_label_image(path, boxes, width, height):
    """The pixelmap's label image of ``boxes`` on a width x height slide: a tiled RGB TIFF with a level per halving
    down to one tile, each level drawn from the boxes themselves (labels are never averaged)."""
    if 2 * len(boxes) + 3 >= 1 << 24:
        raise ValueError(f'{len(boxes)} nuclei do not fit in 24-bit labels')
    boxes = np.asarray(boxes, np.float64)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        scale = 1
        while True:
            w, h = -(-width // scale), -(-height // scale)
            tif.write(_label_tiles(boxes / scale, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric='rgb', compression='zlib', compressionargs={'level': 1},
                      subfiletype=0 if scale == 1 else 1, metadata=None)
            if max(w, h) <= TILE:
                break
            scale *= 2


def pixelmap_annotation(item_id, types, names, colors, attributes):
    """A shown annotation of one pixelmap element over the label image item ``item_id``: region 0 is nothing,
    region k nucleus k, whose value is its cell type's category (each type's colour on the outline only)."""
    categories = [{'label': 'none', 'fillColor': 'rgba(0,0,0,0)', 'strokeColor': 'rgba(0,0,0,0)'}]
    categories += [{'label': name, 'fillColor': f'rgba({rgb_components(color)},0)',
                    'strokeColor': f'rgba({rgb_components(color)},1)'} for name, color in zip(names, colors)]
    element = {'type': 'pixelmap', 'girderId': item_id, 'boundaries': True, 'categories': categories,
               'values': [0] + (np.asarray(types) + 1).tolist()}
    return {'name': 'cellrcnn nuclei pixelmap', 'attributes': attributes, 'display': {'visible': True},
            'elements': [element]}


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
    page.wait_for_function(f'() => {{ const m = {MAP}; return m && m.layers().some(l => l instanceof '
                           'window.geo.pixelmapLayer); }', timeout=timeout * 1000, polling=100)
    first = time.perf_counter() - started
    page.evaluate(f'() => new Promise(done => {MAP}.onIdle(() => done(true)))')
    print(f'pixelmap: layer made {first:.1f} s after opening, map idle {time.perf_counter() - started:.1f} s; '
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
        write_annotation(nuclei_map_annotation(boxes, types, config.cell_types, colors, attributes=attributes),
                         map_file)
        print(f'written in {time.perf_counter() - started:.1f} s: nuclei {os.path.getsize(nuclei_file) / 1e6:.0f} MB,'
              f' map {os.path.getsize(map_file) / 1e6:.1f} MB', flush=True)
        files = [map_file] + ([nuclei_file] if 'boxes' in args.views else [])
        if args.views == ['pixelmap']:
            started = time.perf_counter()
            labels = os.path.join(tmp, 'nuclei-labels.tiff')
            write_label_image(labels, boxes, side, side)
            written = time.perf_counter() - started
            label_item, _ = server.upload_slide(labels, timeout=args.timeout)
            print(f'label image written in {written:.1f} s ({os.path.getsize(labels) / 1e6:.0f} MB), uploaded and a '
                  f'large image {time.perf_counter() - started - written:.1f} s later', flush=True)
            files = [write_annotation(pixelmap_annotation(label_item, types, config.cell_types,
                                                          config.cell_type_colors, attributes),
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
