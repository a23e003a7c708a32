"""HistomicsUI's slide viewer driven from Playwright, for the browser tests and ``benchmarks/large_result.py``: log
in, open a slide, and read or move the geojs map HistomicsUI draws it on (large_image's own web tests reach the map
the same way: ``geo.jQuery('.geojs-map').data('data-geojs-map')``)."""

import io
import time

import numpy as np
from PIL import Image

CHROMIUM = '/usr/bin/chromium'
#: JavaScript that gives the page's geojs map
MAP = "window.geo.jQuery('.geojs-map').data('data-geojs-map')"
#: the number of data items the map's annotation features hold (0 before any annotation is drawn)
FEATURES = f'''() => {{ const m = {MAP}; if (!m) return 0; let n = 0;
    m.layers().forEach(l => (l.features ? l.features() : []).forEach(f => {{ n += (f.data() || []).length; }}));
    return n; }}'''


def log_in(page, base, login, password):
    """Log in to HistomicsUI at ``base`` (``http://host:port``) as the login dialog does it (a token cookie set from
    outside is not picked up)."""
    page.goto(f'{base}/histomics')
    page.wait_for_function('() => window.girder && window.girder.auth')
    page.evaluate('([login, password]) => girder.auth.login(login, password).then(() => true)', [login, password])


def open_slide(page, base, item_id, bounds=None):
    """Open the slide of ``item_id``, whole or showing ``bounds`` (left, top, right, bottom in base pixels; the
    viewer shows them at a whole zoom level, so a little more); returns once its viewer is there."""
    view = f'&bounds={",".join(map(str, bounds))},0' if bounds else ''
    page.goto(f'{base}/histomics#?image={item_id}{view}')
    page.wait_for_selector('.h-image-view-body canvas', timeout=60000)


def wait_drawn(page, above=0, timeout=600, started=None):
    """Seconds (from ``started``, a ``time.perf_counter()``, by default now) until the annotation features hold more
    than ``above`` items, and until the map is idle after that."""
    started = time.perf_counter() if started is None else started
    page.wait_for_function(f'() => ({FEATURES})() > {above}', timeout=timeout * 1000, polling=100)
    first = time.perf_counter() - started
    page.evaluate(f'() => new Promise(done => {MAP}.onIdle(() => done(true)))')
    return first, time.perf_counter() - started


def wait_pixelmap(page, timeout=600, started=None):
    """Seconds (from ``started``, by default now) until a pixelmap layer exists, and until the map is idle after
    that (its tiles drawn)."""
    started = time.perf_counter() if started is None else started
    page.wait_for_function(f'() => {{ const m = {MAP}; return m && m.layers().some(l => l instanceof '
                           'window.geo.pixelmapLayer); }', timeout=timeout * 1000, polling=100)
    first = time.perf_counter() - started
    page.evaluate(f'() => new Promise(done => {MAP}.onIdle(() => done(true)))')
    return first, time.perf_counter() - started


def move(page, halvings=None, screens=(0, 0), timeout=120):
    """Zoom to ``halvings`` levels below the slide's own resolution (1: half its magnification, 10x on a 20x slide),
    then move by ``screens`` (fractions of the view's width and height); seconds until the view is drawn again: the
    map idle (its tiles loaded) and every shown heatmap redrawn. geojs shows a heatmap's old canvas shifted (a CSS
    transform) while it waits to redraw it, and clears the transform when it has; the map's idle state does not
    wait for that. A move that the slide's edge stops leaves a shift of a rounding error (``translate(5.7e-14px,
    0px) scale(1)``) that geojs never redraws: a shift under half a pixel counts as none."""
    started = time.perf_counter()
    page.evaluate(f'''([halvings, sx, sy, timeout]) => new Promise((done, fail) => {{ const m = {MAP};
        if (halvings !== null) {{
            const tiles = m.layers().find(l => l.options && l.options.maxLevel !== undefined);
            m.zoom(tiles.options.maxLevel - halvings);
        }}
        const c = m.center(), s = m.size(), u = m.unitsPerPixel(m.zoom());
        m.center({{x: c.x + sx * s.width * u, y: c.y + sy * s.height * u}});
        const heatmaps = m.layers().filter(l => l.visible() && l.features && l.features().some(
            f => f instanceof window.geo.heatmapFeature && f.visible())).map(l => l.canvas()[0]);
        const unshifted = canvas => {{  // translate(x, y) scale(s) rotate(r), or nothing
            const n = (canvas.style.transform.match(/-?[0-9.]+(e[-+]?[0-9]+)?/gi) || []).map(Number);
            return !n.length || (Math.abs(n[0]) < 0.5 && Math.abs(n[1]) < 0.5 && Math.abs(n[2] - 1) < 1e-9
                                 && Math.abs(n[3] || 0) < 1e-9);
        }};
        const until = Date.now() + timeout * 1000;
        const redrawn = () => {{
            if (heatmaps.every(unshifted)) m.onIdle(() => done(true));
            else if (Date.now() > until) fail(new Error('a heatmap was not redrawn after the move'));
            else window.setTimeout(redrawn, 10);
        }};
        m.scheduleAnimationFrame(() => m.onIdle(redrawn)); }})''', [halvings, *screens, timeout])
    return time.perf_counter() - started


def renderer_processes():
    """Chromium's renderer processes (``psutil.Process``), whose memory is a page's."""
    import psutil

    return [proc for proc in psutil.process_iter(['cmdline'])
            if '--type=renderer' in ' '.join(proc.info['cmdline'] or ())]


def view_pixels(page):
    """The slide view as an RGB array (int16, so that differences do not wrap)."""
    shot = page.locator('.h-image-view-body').screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert('RGB'), dtype=np.int16)
