"""A pathologist's path, in a real browser: HistomicsUI in headless Chromium (Debian's; Playwright drives it), the
slide opened, Analyses -> cellrcnn -> latest -> CellDetection picked, a region set, the job submitted and run by
girder_worker in Docker (the ``dsa`` fixture), and the nuclei annotation listed and drawn on the slide.

A classified result (the bundled model's, with its cell types, on the bundled sample, posted by ``cellrcnn detect
--girder-url``) is opened the same way: its cell types listed as groups in the model's colours and drawn in them.
A whole slide's 100 000 nuclei open on their nuclei map, drawn in the types' colours, and are drawn again where the
view moves to.

Screenshots of the panel and of the results go to $CELLRCNN_SCREENSHOTS, else the test's own output folder; their
paths are printed (``pytest -s``). docs/deploy.md shows and describes them."""

import os
import time

import numpy as np
import pytest

from cellrcnn.__main__ import main as cellrcnn
from cellrcnn.annotation import DEFAULT_NAME, read_annotation_file, write_annotation
from cellrcnn.checkpoint import BUNDLED_MODEL, load_model
from cellrcnn.colors import rgb_tuple
from cellrcnn.commands import SAMPLE_SLIDE
from cellrcnn.devstack.local_dsa import JOB_SUCCESS
from cellrcnn.devstack.local_girder import ADMIN, wait_for
from cellrcnn.devstack.viewer import CHROMIUM, log_in, move, open_slide, view_pixels, wait_drawn, wait_pixelmap
from cellrcnn.girder_post import post_annotations
from cellrcnn.nuclei_map import MAP_NAME, nuclei_map_annotation
from cellrcnn.nuclei_pixelmap import PIXELMAP_NAME, pixelmap_annotation, write_label_image
from cellrcnn.synthetic import write_slide
from cellrcnn.tissue_outline import BLURRED_COLOR, TISSUE_COLOR, TISSUE_NAME
from support import blur_right_half

REGION = '0,0,1200,1200'


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f'no {CHROMIUM}: run ./install.sh --with-dsa')
    with sync_playwright() as playwright:
        # Debian's Chromium: Playwright's own browser download cannot be reached here. No sandbox: the tests run as
        # root.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        try:
            yield chromium
        finally:
            chromium.close()


def panel_state(page):
    """What HistomicsUI's annotation panel lists, for a failure's message: each group, open or not, and in an open
    one each annotation's name, id and state (shown, hidden or loading)."""
    return page.locator('.h-annotation-group').evaluate_all('''gs => gs.map(g => ({
        group: g.dataset.groupName, open: g.classList.contains('h-group-expanded'),
        annotations: [...g.querySelectorAll('.h-annotation')].map(a => [
            a.querySelector('.h-annotation-name').textContent, a.dataset.id,
            a.querySelector('.icon-eye') ? 'shown' : a.querySelector('.icon-eye-off') ? 'hidden' : 'loading'])}))''')


def open_listing(page, annotation_id, groups, shown=False, timeout=180, reopen=None):
    """The selector of the annotation's row in HistomicsUI's annotation panel, once the panel lists it (and, with
    ``shown``, shows it drawn). An annotation is listed under each of its elements' groups, and a group lists its
    annotations only when open: every group among ``groups`` that the panel lists closed is opened, again as new
    ones are listed while results land. ``reopen`` (``page.reload``: the slide opened again) is called once,
    halfway, if the row is not there yet: the panel follows new results live, refetching its list on each job and
    annotation event, and CI once saw a result not shown for a minute after it landed; opened again, the slide lists
    what the server holds. Fails with what the panel lists."""
    row = f'.h-annotation[data-id="{annotation_id}"]'
    wanted = f'{row} .icon-eye' if shown else row
    missing = f'annotation {annotation_id} not listed{" and shown" if shown else ""}'
    started = time.monotonic()
    while not page.locator(wanted).count():
        waited = time.monotonic() - started
        assert waited < timeout, f'{missing} in {timeout} s; the panel: {panel_state(page)}'
        if reopen is not None and waited > timeout / 2:
            print(f'{missing} in {waited:.0f} s; the panel: {panel_state(page)}; the slide opened again')
            reopen()
            reopen = None
        for name in groups:
            closed = f'.h-annotation-group.h-group-collapsed[data-group-name="{name}"]'
            if page.locator(closed).count():
                page.click(f'{closed} .h-annotation-group-name')
                page.wait_for_selector(f'.h-annotation-group.h-group-expanded[data-group-name="{name}"]')
        page.wait_for_timeout(500)
    return row


def drawn_in(page, row, color):
    """Show the hidden annotation of the panel's ``row`` (a selector): the view's pixels it draws in ``color`` (or
    within 60 of it, outlines being antialiased), as a boolean array."""
    hidden = view_pixels(page)
    page.click(f'{row} .h-toggle-annotation')
    page.wait_for_selector(f'{row} .icon-eye', timeout=60000)
    page.wait_for_timeout(3000)
    shown = view_pixels(page)
    return (np.abs(shown - hidden).max(axis=2) > 40) & (np.linalg.norm(shown - np.array(rgb_tuple(color)), axis=2) < 60)


def test_cell_detection_from_the_histomicsui_analysis_panel(dsa, browser, tmp_path):
    shots = os.environ.get('CELLRCNN_SCREENSHOTS') or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    gc = dsa.client()
    folder = gc.createFolder(dsa.folder_id, 'test_histomicsui', reuseExisting=True)['_id']
    item_id, _ = dsa.upload_slide(SAMPLE_SLIDE, folder_id=folder)
    base = f'http://127.0.0.1:{dsa.port}'

    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    log_in(page, base, ADMIN['login'], dsa.password)
    open_slide(page, base, item_id, bounds=(0, 0, 1400, 1400))  # the slide, zoomed to the region

    # Analyses -> cellrcnn -> latest -> CellDetection (the submenus open on click)
    page.click('.h-analyses-dropdown-link')
    page.click('.h-analyses-dropdown a[data-name="cellrcnn"]')
    page.click('.h-analyses-dropdown a:text-is("latest")')
    page.click('.h-analysis-item[data-cli="CellDetection"]')
    page.wait_for_selector('.s-info-panel-submit', timeout=30000)
    roi = page.locator('input#analysis_roi')
    for _ in range(5):  # a panel still rendering (a loaded machine) can put its default back: fill until it holds
        roi.fill(REGION)
        roi.press('Tab')
        page.wait_for_timeout(1000)  # the region's outline is drawn on the slide
        if roi.input_value().replace(' ', '') == REGION:
            break
    assert roi.input_value().replace(' ', '') == REGION
    page.screenshot(path=os.path.join(shots, 'histomicsui-panel.png'))

    jobs_before = {j['_id'] for j in gc.get('job', {'limit': 0})}
    page.click('.s-info-panel-submit')
    job = wait_for(lambda: next((j for j in gc.get('job', {'limit': 0}) if j['_id'] not in jobs_before), None), 60,
                   'the job HistomicsUI submits')
    job = dsa.wait_for_job(job['_id'], 600)
    assert job['status'] == JOB_SUCCESS, ''.join(job['log'])[-3000:]
    args = job['kwargs']['container_args']
    assert job['type'] == 'cellrcnn:latest#CellDetection'
    assert args[args.index('--analysis_roi') + 1] == '0, 0, 1200, 1200'
    # the panel fills in every output, the pixelmap's two among them
    assert '--outputNucleiPixelmapAnnotationFile' in args and '--outputNucleiLabelImage' in args
    # the nuclei, the density and (the bundled model has cell types) a density per type land one by one
    nuclei = wait_for(lambda: next((a for a in dsa.annotations(item_id) if a['annotation']['name'] == DEFAULT_NAME),
                                   None),
                      120, 'the nuclei annotation on the slide')
    wait_for(lambda: any(a['annotation']['name'] == PIXELMAP_NAME for a in dsa.annotations(item_id)), 120,
             'the nuclei pixelmap on the slide')

    # HistomicsUI lists the job's annotations and draws them. A classified result (the bundled model's) is listed
    # under its cell types' groups.
    row = open_listing(page, nuclei['_id'], load_model(BUNDLED_MODEL).config.cell_types, shown=True,
                       reopen=page.reload)
    # an annotation with nuclei of several types is listed in each open group of them
    assert set(page.locator(f'{row} .h-annotation-name').all_inner_texts()) == {nuclei['annotation']['name']}
    page.wait_for_timeout(3000)  # the boxes and the heatmap are drawn
    page.screenshot(path=os.path.join(shots, 'histomicsui-result.png'))
    with_boxes = view_pixels(page)
    page.click('.h-hide-all-annotations')
    page.wait_for_selector(f'.h-annotation[data-id="{nuclei["_id"]}"] .icon-eye-off')
    page.wait_for_timeout(2000)
    without = view_pixels(page)
    changed = (np.abs(with_boxes - without).max(axis=2) > 40).mean()
    assert changed > 0.01, f'only {changed:.2%} of the view changed when the annotations were hidden'
    print(f'screenshots: {shots}/histomicsui-panel.png, {shots}/histomicsui-result.png; the annotations changed '
          f'{changed:.1%} of the view')


#: the bounds the classified result is opened at, in the sample's base pixels (HistomicsUI shows them at a whole zoom
#: level, so a little more): the upper part of the tissue, where the bundled model finds its three types side by side
TYPES_VIEW = (900, 600, 1700, 1100)
#: the sample's middle, where its sharp left half meets its blurred right half (base pixels)
FOCUS_VIEW = (710, 900, 1510, 1400)


def test_a_classified_result_shows_its_cell_types(server, browser, tmp_path, monkeypatch):
    """A classified result of the bundled model on the bundled sample, posted by ``cellrcnn detect --girder-url``:
    HistomicsUI lists the cell types as groups, each with the model's colour for it as legend, lists a heatmap per
    type, and draws the nuclei in their types' colours."""
    config = load_model(BUNDLED_MODEL).config
    colors = {name: rgb_tuple(color) for name, color in zip(config.cell_types, config.cell_type_colors)}
    assert len(colors) >= 2 and len(set(colors.values())) == len(colors), colors
    shots = os.environ.get('CELLRCNN_SCREENSHOTS') or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    item_id, _ = server.upload_slide(SAMPLE_SLIDE)
    monkeypatch.setenv('GIRDER_TOKEN', server.token)
    started = time.monotonic()
    assert cellrcnn(['detect', SAMPLE_SLIDE, '-o', str(tmp_path), '--device', 'cpu', '--progress', 'none',
                     '--no-resume', '--girder-url', server.api_url, '--item', item_id]) == 0
    detection_s = time.monotonic() - started
    stem = os.path.splitext(os.path.basename(SAMPLE_SLIDE))[0]
    counts = read_annotation_file(tmp_path / f'{stem}.anot.json')['attributes']['stats']['cell_types']
    assert set(counts) == set(colors), counts
    found = {name for name, count in counts.items() if count}
    assert len(found) >= 2, counts
    nuclei_id = next(a['_id'] for a in server.annotations(item_id) if a['annotation']['name'] == 'cellrcnn nuclei')

    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    base = server.api_url.replace('/api/v1', '')
    log_in(page, base, ADMIN['login'], server.password)
    open_slide(page, base, item_id, bounds=TYPES_VIEW)
    page.wait_for_selector(f'.h-annotation-group[data-group-name="{min(found)}"]', timeout=60000)

    # The panel lists a group per cell type found, and the annotations without groups (the heatmaps) apart.
    groups = set(page.locator('.h-annotation-group').evaluate_all('gs => gs.map(g => g.dataset.groupName)'))
    assert groups & set(counts) == found and len(groups - set(counts)) == 1, groups
    ungrouped = (groups - set(counts)).pop()

    # Only the nuclei shown: their outlines are drawn in the types' colours. The nuclei annotation is listed under
    # one of its groups: open them until it shows.
    page.click('.h-hide-all-annotations')
    page.wait_for_timeout(2000)
    without = view_pixels(page)
    nuclei = open_listing(page, nuclei_id, found)
    page.click(f'{nuclei} .h-toggle-annotation')
    page.wait_for_selector(f'{nuclei} .icon-eye', timeout=60000)
    page.wait_for_timeout(3000)
    shown = view_pixels(page)
    drawn = shown[np.abs(shown - without).max(axis=2) > 40]
    # Outlines are antialiased and thin: a drawn pixel counts for a type within this RGB distance of its colour.
    near = {name: int((np.linalg.norm(drawn - np.array(rgb), axis=1) < 50).sum()) for name, rgb in colors.items()}
    assert sum(count > 200 for count in near.values()) >= 2, (near, len(drawn))

    # With the nuclei loaded, each type's group shows the model's colour for it as its legend.
    def legend(name):
        return page.locator(f'.h-annotation-group[data-group-name="{name}"] .h-annotation-group-legend').evaluate(
            'e => getComputedStyle(e).borderTopColor')

    wait_for(lambda: all(legend(name) != 'rgba(0, 0, 0, 0)' for name in found), 30, 'the groups\' legends')
    assert {name: legend(name) for name in found} == {name: 'rgb({}, {}, {})'.format(*colors[name]) for name in found}
    # The heatmaps, one per type, are listed with the annotations without groups.
    page.click(f'.h-annotation-group[data-group-name="{ungrouped}"] .h-annotation-group-name')
    page.wait_for_selector(f'.h-annotation-group[data-group-name="{ungrouped}"] .h-annotation')
    names = page.locator(f'.h-annotation-group[data-group-name="{ungrouped}"] .h-annotation-name').all_inner_texts()
    assert sorted(names) == sorted([MAP_NAME, 'cellrcnn nuclei density', TISSUE_NAME,
                                    *(f'cellrcnn nuclei density ({name})' for name in counts)])
    page.screenshot(path=os.path.join(shots, 'histomicsui-cell-types.png'))

    # The tissue outline, listed there and hidden on open, is drawn in its orange when shown: where nuclei were sought.
    tissue_id = next(a['_id'] for a in server.annotations(item_id) if a['annotation']['name'] == TISSUE_NAME)
    orange = drawn_in(page, f'.h-annotation[data-id="{tissue_id}"]', TISSUE_COLOR).sum()
    assert orange > 200, orange
    page.screenshot(path=os.path.join(shots, 'histomicsui-tissue.png'))
    print(f'screenshots: {shots}/histomicsui-cell-types.png, {shots}/histomicsui-tissue.png; detection and posting '
          f'{detection_s:.0f} s, cell types {counts}; of {len(drawn)} drawn pixels, near each type\'s colour: {near}; '
          f'{orange} pixels of tissue outline')


def test_tissue_out_of_focus_is_outlined_in_cyan(server, browser, tmp_path, monkeypatch):
    """The sample slide with its right half out of focus, detected by ``cellrcnn detect --girder-url``: the tissue
    outline annotation, shown, draws the blurred half's tissue in cyan, and nothing of the sharp half."""
    slide = blur_right_half(SAMPLE_SLIDE, tmp_path / 'half-blurred.tiff', 1.5)
    shots = os.environ.get('CELLRCNN_SCREENSHOTS') or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    item_id, _ = server.upload_slide(str(slide))
    monkeypatch.setenv('GIRDER_TOKEN', server.token)
    assert cellrcnn(['detect', str(slide), '-o', str(tmp_path / 'out'), '--device', 'cpu', '--progress', 'none',
                     '--no-resume', '--girder-url', server.api_url, '--item', item_id]) == 0
    tissue = next(a for a in server.annotations(item_id) if a['annotation']['name'] == TISSUE_NAME)
    blurred_mm2 = tissue['annotation']['attributes']['density']['out_of_focus_mm2']
    assert blurred_mm2 > 0.2 and 'out of focus (cyan)' in tissue['annotation']['description']

    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    base = server.api_url.replace('/api/v1', '')
    log_in(page, base, ADMIN['login'], server.password)
    open_slide(page, base, item_id, bounds=FOCUS_VIEW)
    row = open_listing(page, tissue['_id'], ['Other'])  # HistomicsUI's group of annotations without groups
    page.click('.h-hide-all-annotations')
    page.wait_for_timeout(2000)
    cyan = drawn_in(page, row, BLURRED_COLOR)
    columns = np.flatnonzero(cyan.any(axis=0))
    page.screenshot(path=os.path.join(shots, 'histomicsui-out-of-focus.png'))
    # the view shows the slide's middle: the sharp half left of the view's middle column, the blurred half right
    assert cyan.sum() > 500 and columns.min() > 0.3 * cyan.shape[1], (cyan.sum(), columns[:5])
    print(f'screenshot: {shots}/histomicsui-out-of-focus.png; {blurred_mm2} mm² out of focus, {cyan.sum()} '
          'pixels of it drawn in cyan')


#: the side of the synthetic slides the large results lie on (20x)
WHOLE_SIDE = 8192


def random_result(server, tmp_path, seed, n=100_000):
    """A synthetic 20x slide of WHOLE_SIDE² px on the server and ``n`` random boxes on it, a tenth lymphocytes among
    tumour and stromal nuclei (the rare type must not vanish under the common ones): (item id, file id, boxes,
    types)."""
    slide = str(tmp_path / 'whole.tiff')
    write_slide(slide, WHOLE_SIDE, WHOLE_SIDE, seed=seed)
    item_id, file_id = server.upload_slide(slide)
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, WHOLE_SIDE - 24, (n, 2))
    types = rng.choice(3, n, p=[0.1, 0.6, 0.3])
    return item_id, file_id, np.hstack([corners, corners + rng.uniform(8, 24, (n, 2))]), types


def moved_view(page, halvings):
    """Zoom to ``halvings`` below the slide's resolution, move half a screen: the view after the move, and the
    fraction of it that changed."""
    move(page, halvings=halvings)
    before = view_pixels(page)
    move(page, screens=(0.5, 0.5))
    page.wait_for_timeout(1000)
    after = view_pixels(page)
    return after, (np.abs(after - before).max(axis=2) > 40).mean()


def near_colors(pixels, colors, within):
    """How many of ``pixels`` (... x 3) lie within ``within`` of each named colour."""
    flat = pixels.reshape(-1, 3)
    return {name: int((np.linalg.norm(flat - np.array(rgb_tuple(color)), axis=1) < within).sum())
            for name, color in colors.items()}


def test_a_whole_slides_nuclei_open_on_their_map(server, browser, tmp_path):
    """100 000 nuclei of the bundled model's three types on a 20x slide, as a whole slide's result is posted: their
    map is stored whole, drawn when the slide is opened, in the types' colours, and drawn again where the view
    moves to. (Timings: benchmarks/large_result.py.)"""
    config = load_model(BUNDLED_MODEL).config
    colors = dict(zip(config.cell_types, config.cell_type_colors))
    shots = os.environ.get('CELLRCNN_SCREENSHOTS') or str(tmp_path)
    item_id, _, boxes, types = random_result(server, tmp_path, seed=3)
    n = len(boxes)
    doc = nuclei_map_annotation(boxes, types, config.cell_types, colors, attributes={'model': 'whole.pt',
                                                                                     'cellrcnn': 'test'})
    posted = post_annotations(server.api_url, server.token, item_id, [doc])[0]
    stored = server.client().get(f'annotation/{posted["_id"]}')['annotation']
    assert {e['label']['value']: len(e['points']) for e in stored['elements']} == {
        name: int((types == i).sum()) for i, name in enumerate(config.cell_types)}

    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    base = server.api_url.replace('/api/v1', '')
    log_in(page, base, ADMIN['login'], server.password)
    open_slide(page, base, item_id)
    wait_drawn(page, above=n - 1, timeout=120)  # shown on open: every nucleus is in the map's features
    page.wait_for_timeout(1000)
    whole = view_pixels(page)
    page.screenshot(path=os.path.join(shots, 'histomicsui-map-whole.png'))
    page.click('.h-hide-all-annotations')
    page.wait_for_timeout(2000)
    slide_only = view_pixels(page)
    page.click('.h-show-all-annotations')
    wait_drawn(page, above=n - 1, timeout=120)
    page.wait_for_timeout(1000)

    # pixels the map changed that lie near each type's colour (its blobs blend with the tissue under them)
    near = near_colors(whole[np.abs(whole - slide_only).max(axis=2) > 40], colors, 90)
    assert all(count > 1000 for count in near.values()), near
    after, moved = moved_view(page, halvings=1)  # from the whole slide to about 10x
    page.screenshot(path=os.path.join(shots, 'histomicsui-map-10x.png'))
    assert moved > 0.2, f'only {moved:.1%} of the view changed when it moved'
    dots = near_colors(after, colors, 90)
    assert all(count > 1000 for count in dots.values()), dots
    print(f'screenshots: {shots}/histomicsui-map-whole.png, {shots}/histomicsui-map-10x.png; pixels near each '
          f'type\'s colour, whole slide {near}, at 10x after moving {dots}')


def test_a_whole_slides_nuclei_open_on_their_pixelmap(server, browser, tmp_path):
    """100 000 nuclei as the task posts a large result: the label image and the pixelmap uploaded as its outputs (the
    element names the output, which the server resolves to the image's item), the slide opened on the pixelmap: a dot
    per nucleus in its type's colour zoomed out, outlined boxes with clear insides at 20x, redrawn where the view
    moves. (Timings: benchmarks/large_result.py --views pixelmap.)"""
    config = load_model(BUNDLED_MODEL).config
    colors = dict(zip(config.cell_types, config.cell_type_colors))
    shots = os.environ.get('CELLRCNN_SCREENSHOTS') or str(tmp_path)
    item_id, file_id, boxes, types = random_result(server, tmp_path, seed=4)
    n = len(boxes)
    labels, pixelmap = tmp_path / 'labels.tiff', tmp_path / 'pixelmap.anot'
    write_label_image(str(labels), boxes, WHOLE_SIDE, WHOLE_SIDE, mpp=0.5)
    write_annotation(pixelmap_annotation('outputNucleiLabelImage', n, types, config.cell_types, colors,
                                         attributes={'model': 'whole.pt', 'cellrcnn': 'test'}), str(pixelmap))
    server.upload_as_dsa(labels, item_id, file_id, 'outputNucleiLabelImage')
    server.upload_as_dsa(pixelmap, item_id, file_id, 'outputNucleiPixelmapAnnotationFile')
    stored = wait_for(lambda: server.annotation_documents(item_id), 120, 'the pixelmap on the slide')[0]
    assert stored['name'] == PIXELMAP_NAME and len(stored['elements'][0]['values']) == n + 1
    assert server.client().get(f'item/{stored["elements"][0]["girderId"]}')['name'] == 'labels.tiff'

    page = browser.new_page(viewport={'width': 1600, 'height': 1000})
    base = server.api_url.replace('/api/v1', '')
    log_in(page, base, ADMIN['login'], server.password)
    open_slide(page, base, item_id)
    wait_pixelmap(page, timeout=120)
    page.wait_for_timeout(1000)
    whole = view_pixels(page)
    page.screenshot(path=os.path.join(shots, 'histomicsui-pixelmap-whole.png'))

    zoomed_out = near_colors(whole, colors, 60)
    assert all(count > 1000 for count in zoomed_out.values()), zoomed_out  # every type's dots, the rare one too
    after, moved = moved_view(page, halvings=0)  # the slide's own 20x: outlines
    page.screenshot(path=os.path.join(shots, 'histomicsui-pixelmap-20x.png'))
    assert moved > 0.2, f'only {moved:.1%} of the view changed when it moved'
    outlines = near_colors(after, colors, 60)
    # outlines in every type's colour, their insides clear: far fewer coloured pixels than the boxes cover
    assert all(count > 200 for count in outlines.values()), outlines
    assert sum(outlines.values()) < 0.5 * after.shape[0] * after.shape[1], outlines
    print(f'screenshots: {shots}/histomicsui-pixelmap-whole.png, {shots}/histomicsui-pixelmap-20x.png; pixels of '
          f'each type\'s colour, whole slide {zoomed_out}, at 20x after moving {outlines}')
