"""Whole-slide benchmark of ``cellrcnn detect`` on synthetic slides with exact ground truth, and its peers.

    python benchmarks/slide_benchmark.py --sizes 4096 16384 32768 --model M.pt --out results.json \\
        [--device cpu|cuda] [--batch-size 2] [--peers [--peer-region X,Y,W,H]] [--workdir DIR]
    python benchmarks/slide_benchmark.py --versus-htk --sizes 4096 16384 [--repeats 3] [--warmups 1] --out vs.json

For each size S a synthetic S x S pyramidal JPEG TIFF at 20x (0.5 um/px) is written with
``cellrcnn.synthetic.write_slide`` (cached in --workdir with its ``.boxes.npy`` ground truth, so reruns reuse it),
then ``python -m cellrcnn detect SLIDE -o OUT --model M --no-resume --progress none`` runs in a subprocess whose
peak RSS is taken from ``wait4`` (the largest resident set of the process or any child it waited for); the sum over
the process tree is also sampled with psutil every 0.1 s.  The run's summary gives seconds per stage, tiles and
megapixels; its CSV is scored against the ground truth: precision, recall and F1 at IoU 0.5 of every written
detection (the model's own score threshold), best F1 over higher thresholds and, up to --coco-max-gt ground-truth
boxes, COCO AP50 (``cellrcnn.metrics.evaluate``).  Matching is local, so the slide is evaluated as windows: boxes
are linked when a prediction and a ground-truth box reach IoU 0.5, and whole linked groups go to the window of one
of their members, which gives exactly the matches of one slide-sized image in linear time.

With --peers, on the smallest size (whole slide, or --peer-region X,Y,W,H in base pixels; cellrcnn is then run
again on that ROI):

* stock torchvision ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` on the very tiles cellrcnn
  reads (same grid, tissue skipping, reader threads, batch size, channels-last and, on a GPU, float16 autocast),
  through the same detection loop (``cellrcnn.slide_detection.detect_slide`` with the stock model standing in for the detector):
  inference-only seconds and end-to-end seconds, in a subprocess (peak RSS).  Variant ``native`` keeps tiles at
  their size (torchvision's resize step turned off); ``resize800`` is torchvision's default resize.  The stock model is
  randomly initialised (no weights exist here): its speed is representative, its detections are not (no F1).
* HistomicsTK's NucleiDetection CLI run the way the DSA runs it (slicer_cli_web's CLI list entrypoint in
  histomicstk's ``cli`` folder) with ``--nuclei_annotation_format bbox``, with its defaults and with the parameter
  sets of --htk-variants, --htk-repeats times each (on a whole slide its Reinhard colour statistics come from an
  unseeded random pixel sample: detections vary between runs; the median-F1 run is shown, with the range); its
  rectangles are scored like cellrcnn's (no scores: best F1 = F1), and again widened by one pixel (they span
  pixel indices of the traced boundary, the ground truth spans pixel edges).
* the merge: ``cellrcnn.merge.merge_all`` (and ``StreamingNMS`` fed tile by tile, as the detection loop does) against one
  ``torchvision.ops.nms`` over the same simulated raw detections (``benchmarks/merge_cost.py``'s tiled-slide model,
  about --merge-raw-factor raw boxes per detection of the peer run), on the CPU and, with --device cuda, on the GPU.

With --versus-htk, instead, on every size: ``cellrcnn detect SLIDE -o OUT --progress none --no-resume`` (the
command's own defaults; --model passed on when given) and HistomicsTK's NucleiDetection run as below with its
defaults, alternately (--warmups unrecorded rounds, then --repeats recorded ones, the order flipping every round),
each timed whole process to whole process: medians of wall seconds, CPU seconds (user + system of the process tree:
``wait4``'s, which counts every descendant waited for, or the psutil-sampled sum when larger) and the largest
process's peak RSS, the ratios HistomicsTK / cellrcnn, and each run's F1 at IoU 0.5 against the slide's boxes.
HistomicsTK's defaults start a Dask LocalCluster of (physical cores - 1) worker processes, at least one, with one
thread each (``--num_workers -1``, ``--num_threads_per_worker 1``): one worker on a 2-core machine; cellrcnn's use
every core (torch's threads) and two tile reader threads.

Prints a markdown table per part and writes everything (plus the environment) to --out, rewritten after each step
so an interrupted run keeps what it measured.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MPP = 0.5  # 20x
IOU = 0.5

#: HistomicsTK parameter sets besides its defaults: name -> extra CLI arguments.  'sized20x' sets the LoG scale range
#: and the area floor from the nuclei these slides hold at 20x (0.5 um/px): 5-15 um across, i.e. radii of 5-15 px
#: (the default max_radius of 20 px is a 10 um radius: a 20 um nucleus, larger than any here), fibroblast spindles
#: 2.6-4.2 um wide with areas from ~20 um2 = 80 px2 (the default min_nucleus_area of 80 px2 drops the thinner ones).
#: Chosen from those sizes before any run, not tuned on results.
HTK_VARIANTS = {
    'sized20x': ['--min_radius', '4', '--max_radius', '12', '--local_max_search_radius', '8',
                 '--min_nucleus_area', '30'],
}


# ------------------------------------------------------------------------------------------------------------------
# measuring a subprocess
# ------------------------------------------------------------------------------------------------------------------

def run_measured(cmd, log_path, cwd=None, env=None):
    """Run ``cmd``; return wall seconds, exit status, CPU seconds and peak RSS (MB) of its process tree.

    ``wait4`` gives the user + system seconds of the process and of every descendant that was waited for, and the
    largest resident set among them (``peak_rss_mb``: the largest process).  psutil samples the tree every 0.1 s:
    the peak of its summed RSS (``peak_tree_rss_mb``) and, per process, the last CPU seconds seen
    (``tree_cpu_s``: a lower bound, which also counts descendants nobody waited for, such as orphaned workers).
    ``cpu_s`` is the larger of the two CPU figures (the sampled ones are None without psutil)."""
    with open(log_path, 'w') as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        tree_peak, tree_cpu = [None], {}
        done = threading.Event()

        def sample():
            try:
                import psutil
            except ImportError:
                return
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            peak = 0
            while not done.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                    total = 0
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                            t = p.cpu_times()
                            tree_cpu[(p.pid, p.create_time())] = t.user + t.system
                        except psutil.Error:
                            pass
                    peak = max(peak, total)
                    tree_peak[0] = peak / 2 ** 20
                except psutil.Error:
                    pass
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    waited_cpu = usage.ru_utime + usage.ru_stime
    sampled_cpu = sum(tree_cpu.values()) if tree_cpu else None
    return {'wall_s': seconds, 'returncode': proc.returncode, 'cpu_s': max(waited_cpu, sampled_cpu or 0),
            'waited_cpu_s': waited_cpu, 'tree_cpu_s': sampled_cpu, 'peak_rss_mb': usage.ru_maxrss / 1024,
            'peak_tree_rss_mb': tree_peak[0], 'log': log_path}


def tail(path, lines=15):
    with open(path, errors='replace') as f:
        return ''.join(f.readlines()[-lines:])


def check(run, what):
    if run['returncode'] != 0:
        sys.exit(f'{what} failed (exit status {run["returncode"]}); last lines of {run["log"]}:\n{tail(run["log"])}')


# ------------------------------------------------------------------------------------------------------------------
# slides and ground truth
# ------------------------------------------------------------------------------------------------------------------

def ensure_slide(workdir, size, seed):
    """A cached synthetic size x size slide at 20x and its ground-truth boxes (written when missing)."""
    from cellrcnn.synthetic import write_slide

    path = os.path.join(workdir, 'slides', f'synthetic_{size}_seed{seed}.tiff')
    if os.path.exists(path) and os.path.exists(path + '.boxes.npy'):
        return path, np.load(path + '.boxes.npy'), None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path[:-5] + '.part.tiff'
    started = time.perf_counter()
    write_slide(part, size, size, seed=seed, mpp=MPP)
    seconds = time.perf_counter() - started
    os.replace(part + '.boxes.npy', path + '.boxes.npy')
    os.replace(part, path)
    return path, np.load(path + '.boxes.npy'), seconds


def inside_mask(boxes, region):
    """Which boxes have their centre in region (x, y, w, h); all of them when region is None."""
    if region is None or len(boxes) == 0:
        return np.ones(len(boxes), bool)
    x, y, w, h = region
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)


def centres_inside(boxes, region):
    """Boxes whose centre lies in region (x, y, w, h); all of them when region is None."""
    return boxes[inside_mask(boxes, region)]


def read_csv_boxes(path):
    """Boxes and scores from a cellrcnn CSV (columns x1, y1, x2, y2, score)."""
    import csv

    with open(path, newline='') as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = [header.index(c) for c in ('x1', 'y1', 'x2', 'y2', 'score')]
        rows = [[float(r[c]) for c in cols] for r in reader]
    a = np.asarray(rows, np.float64).reshape(-1, 5)
    return a[:, :4], a[:, 4]


def read_htk_boxes(path):
    """Boxes of a HistomicsTK annotation's rectangle elements (centre, width, height; rotation 0)."""
    with open(path) as f:
        doc = json.load(f)
    docs = doc if isinstance(doc, list) else [doc]
    rects = [e for d in docs for e in d.get('elements', []) if e.get('type') == 'rectangle']
    if not rects:
        return np.zeros((0, 4))
    c = np.array([e['center'][:2] for e in rects], np.float64)
    wh = np.array([[e['width'], e['height']] for e in rects], np.float64)
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


# ------------------------------------------------------------------------------------------------------------------
# evaluation of a whole slide as independent windows
# ------------------------------------------------------------------------------------------------------------------

def linked_pairs(pred, gt, threshold, cell=64.0, chunk=200_000):
    """(i, j) of every prediction/ground-truth pair with IoU >= threshold (and possibly a few more), in linear time:
    boxes with both sides <= cell are found through a grid of their top-left corners (overlapping boxes lie in
    neighbouring cells), larger ones are compared with everything."""
    from cellrcnn.merge import concat_ranges
    from cellrcnn.boxes import box_iou, iou

    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if len(pred) == 0 or len(gt) == 0:
        return out_i[0], out_j[0]
    big_p = np.maximum(pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]) > cell
    big_g = np.maximum(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]) > cell
    sp, sg = np.flatnonzero(~big_p), np.flatnonzero(~big_g)
    if len(sp) and len(sg):
        origin = np.minimum(pred[sp, :2].min(0), gt[sg, :2].min(0)) - cell
        gcx = np.floor((gt[sg, 0] - origin[0]) / cell).astype(np.int64)
        gcy = np.floor((gt[sg, 1] - origin[1]) / cell).astype(np.int64)
        pcx_all = np.floor((pred[sp, 0] - origin[0]) / cell).astype(np.int64)
        pcy_all = np.floor((pred[sp, 1] - origin[1]) / cell).astype(np.int64)
        width = int(max(gcx.max(), pcx_all.max())) + 3
        key = gcy * width + gcx
        order = np.argsort(key, kind='stable')
        skey = key[order]
        for start in range(0, len(sp), chunk):
            pcx, pcy = pcx_all[start:start + chunk], pcy_all[start:start + chunk]
            q = np.arange(start, start + len(pcx))
            for dy in (-1, 0, 1):
                row = (pcy + dy) * width + pcx
                lo = np.searchsorted(skey, row - 1, 'left')
                hi = np.searchsorted(skey, row + 1, 'right')
                counts = hi - lo
                pi = sp[np.repeat(q, counts)]
                gj = sg[order[concat_ranges(lo, counts)]]
                hit = iou(pred[pi], gt[gj]) >= threshold
                out_i.append(pi[hit])
                out_j.append(gj[hit])
    for rows, against, flip in ((np.flatnonzero(big_p), gt, False), (np.flatnonzero(big_g), pred, True)):
        for start in range(0, len(rows), 256):
            r = rows[start:start + 256]
            overlap = box_iou((gt if flip else pred)[r], against)
            a, b = np.nonzero(overlap >= threshold)
            out_i.append(b if flip else r[a])
            out_j.append(r[a] if flip else b)
    return np.concatenate(out_i), np.concatenate(out_j)


def window_images(pred, scores, gt, window=1024):
    """Split a slide's predictions and ground truth into window-sized images that no possible match crosses."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, m = len(pred), len(gt)
    if n + m == 0:
        return [], []
    i, j = linked_pairs(pred, gt, IOU - 1e-6)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j + n)), shape=(n + m, n + m))
    _, label = connected_components(graph, directed=False)
    boxes = np.concatenate([pred, gt]) if n and m else (pred if n else gt)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell = np.floor(centre / window).astype(np.int64)
    cell -= cell.min(0)
    node_window = cell[:, 1] * (int(cell[:, 0].max()) + 1) + cell[:, 0]
    _, first = np.unique(label, return_index=True)
    comp_window = np.empty(label.max() + 1, np.int64)
    comp_window[label[first]] = node_window[first]
    win = comp_window[label]
    ids, inverse = np.unique(win, return_inverse=True)
    order = np.argsort(inverse, kind='stable')
    splits = np.searchsorted(inverse[order], np.arange(1, len(ids)))
    preds, gts = [], []
    for idx in np.split(order, splits):
        p, g = idx[idx < n], idx[idx >= n] - n
        preds.append({'boxes': pred[p], 'scores': scores[p]})
        gts.append(gt[g])
    return preds, gts


def score_detections(pred, scores, gt, coco):
    """P/R/F1 at IoU 0.5 of all given detections, best F1 over score thresholds and (with coco) COCO AP."""
    from cellrcnn import metrics

    started = time.perf_counter()
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    preds, gts = window_images(pred, scores, gt)
    if coco:
        r = metrics.evaluate(preds, gts, score_threshold=0.0, iou_threshold=IOU)
        out = {k: r[k] for k in ('n_gt', 'n_pred', 'tp', 'fp', 'fn', 'precision', 'recall', 'f1', 'best_f1',
                                 'best_f1_threshold', 'AP', 'AP50')}
    else:
        tp = fp = 0
        for p, g in zip(preds, gts):
            res = metrics.match_detections(p['boxes'], p['scores'], g, IOU)
            tp, fp = tp + res.tp, fp + res.fp
        n_gt = len(gt)
        precision = tp / (tp + fp) if tp + fp else float(n_gt == 0)
        recall = tp / n_gt if n_gt else float(tp + fp == 0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        thr, best, _, _ = metrics.best_f1_threshold(preds, gts, IOU) if preds else (1.0, 1.0, 1.0, 1.0)
        out = {'n_gt': n_gt, 'n_pred': len(pred), 'tp': tp, 'fp': fp, 'fn': n_gt - tp, 'precision': precision,
               'recall': recall, 'f1': f1, 'best_f1': best, 'best_f1_threshold': thr, 'AP': None, 'AP50': None}
    out['windows'] = len(preds)
    out['seconds'] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------------------------------------------------------
# cellrcnn
# ------------------------------------------------------------------------------------------------------------------

def run_cellrcnn(slide, out_dir, args, roi=None, plain=False):
    """``cellrcnn detect`` on a slide in a subprocess, with this benchmark's device, batch size, reader threads, tile
    size and overlap; with ``plain``, with the command's own defaults (the command as a user types it)."""
    stem = os.path.splitext(os.path.basename(slide))[0]
    cmd = [sys.executable, '-m', 'cellrcnn', 'detect', slide, '-o', out_dir, '--no-resume', '--progress', 'none']
    if not plain:
        cmd += ['--device', args.device, '--batch-size', str(args.batch_size), '--workers', str(args.workers),
                '--tile-size', str(args.tile_size), '--overlap', str(args.overlap)]
    if args.model:
        cmd += ['--model', args.model]
    if roi:
        cmd += ['--roi', ','.join(str(v) for v in roi)]
    os.makedirs(out_dir, exist_ok=True)
    run = run_measured(cmd, os.path.join(out_dir, 'log.txt'))
    check(run, 'cellrcnn detect')
    with open(os.path.join(out_dir, stem + '.summary.json')) as f:
        run['summary'] = json.load(f)
    run['csv'] = os.path.join(out_dir, stem + '.csv')
    return run


def slide_row(size, run, score):
    s, sec = run['summary'], run['summary']['seconds']
    total = sec['total']
    return {'size': size, 'tissue_mm2': s['tissue_mm2'], 'tiles': s['tiles'], 'tiles_read': s['tiles_read'],
            'tiles_skipped': s['tiles_skipped'], 'detections': s['detections'], 'megapixels': s['megapixels'],
            'seconds': sec, 'process_wall_s': run['wall_s'], 'tiles_per_s': s['tiles_read'] / total if total else 0,
            'megapixels_per_second': s['megapixels_per_second'], 'merge_share': sec['merge'] / total if total else 0,
            'peak_rss_mb': run['peak_rss_mb'], 'peak_tree_rss_mb': run['peak_tree_rss_mb'], 'device': s['device'],
            'batch_size': s['batch_size'], 'eval': score}


# ------------------------------------------------------------------------------------------------------------------
# stock torchvision Faster R-CNN through the same detection loop (run in a child process: `_stock`)
# ------------------------------------------------------------------------------------------------------------------

class StockDetector:
    """torchvision's fasterrcnn_resnet50_fpn standing in for ``cellrcnn.inference.Detector`` in the detection loop."""

    def __init__(self, variant, tile_size, device, batch_size):
        import types

        import torch
        import torchvision

        from cellrcnn.devices import resolve_device

        self.device = resolve_device(device)
        net = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        if variant == 'native':  # no resizing at all (min_size = max_size = tile would still enlarge small tiles)
            net.transform.resize = lambda image, target=None: (image, target)
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self.batch_size = batch_size
        # what the detection loop reads of a cellrcnn model: its fields (the coarsest is the smallest image side and
        # the tiles' alignment) and the merge's IoU threshold
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(fields=(4, 8, 16, 32),
                                                                        nms_thresh=net.roi_heads.nms_thresh))

    def detect_tiles(self, tiles):
        import torch

        from cellrcnn.devices import autocast
        from cellrcnn.model import to_tensor

        out = []
        with torch.no_grad():
            for start in range(0, len(tiles), self.batch_size):
                images = [to_tensor(t).to(self.device, non_blocking=True) for t in tiles[start:start + self.batch_size]]
                with autocast(self.device):
                    results = self.net(images)
                out += [(r['boxes'].float().cpu().numpy(), r['scores'].float().cpu().numpy()) for r in results]
        return out


def stock_child(argv):
    p = argparse.ArgumentParser()
    p.add_argument('slide')
    p.add_argument('--json', required=True)
    p.add_argument('--variant', default='native')
    p.add_argument('--roi')
    p.add_argument('--tile-size', type=int, default=1024)
    p.add_argument('--overlap', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--device', default='cpu')
    a = p.parse_args(argv)
    from cellrcnn.settings import DetectionSettings
    from cellrcnn.slide import Slide
    from cellrcnn.slide_detection import detect_slide

    detector = StockDetector(a.variant, a.tile_size, a.device, a.batch_size)
    slide = Slide(a.slide, magnification=10 / MPP)
    roi = tuple(float(v) for v in a.roi.split(',')) if a.roi else None
    result = detect_slide(slide, detector, roi=roi, tile_size=a.tile_size, overlap=a.overlap,
                          min_tissue=DetectionSettings.min_tissue, workers=a.workers)
    stats = {k: v for k, v in result.stats.items() if k != 'slide'}
    with open(a.json, 'w') as f:
        json.dump(stats, f, indent=2)


def run_stock(slide, variant, roi, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stats_path = os.path.join(out_dir, 'stats.json')
    cmd = [sys.executable, os.path.abspath(__file__), '_stock', slide, '--json', stats_path, '--variant', variant,
           '--tile-size', str(args.tile_size), '--overlap', str(args.overlap), '--batch-size', str(args.batch_size),
           '--workers', str(args.workers), '--device', args.device]
    if roi:
        cmd += ['--roi', ','.join(str(v) for v in roi)]
    run = run_measured(cmd, os.path.join(out_dir, 'log.txt'))
    check(run, f'stock torchvision ({variant})')
    with open(stats_path) as f:
        run['summary'] = json.load(f)
    return run


# ------------------------------------------------------------------------------------------------------------------
# HistomicsTK NucleiDetection
# ------------------------------------------------------------------------------------------------------------------

def run_htk(slide, roi, extra, args, out_dir):
    """HistomicsTK's NucleiDetection through slicer_cli_web's entrypoint, in histomicstk's cli folder (as the DSA's
    docker entrypoint does), writing rectangles."""
    import histomicstk

    cli_dir = os.path.join(os.path.dirname(histomicstk.__file__), 'cli')
    os.makedirs(out_dir, exist_ok=True)
    anot = os.path.join(out_dir, 'nuclei.anot')
    cmd = [sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'NucleiDetection', os.path.abspath(slide),
           anot, '--nuclei_annotation_format', 'bbox']
    if roi:
        cmd += ['--analysis_roi', ','.join(str(int(v)) for v in roi)]
    if args.htk_workers is not None:
        cmd += ['--num_workers', str(args.htk_workers)]
    cmd += list(extra)
    run = run_measured(cmd, os.path.join(out_dir, 'log.txt'), cwd=cli_dir)
    check(run, 'HistomicsTK NucleiDetection')
    run['cmd'] = cmd[2:]
    with open(run['log'], errors='replace') as f:
        text = f.read()
    for key, label in (('dask', 'Creating dask LocalCluster with'), ('total_line', 'Total analysis time'),
                       ('detect_line', 'Nuclei detection time')):
        line = next((ln for ln in text.splitlines() if ln.startswith(label)), None)
        run[key] = line
    run['own_total_s'] = _hms(run['total_line'])
    run['own_detect_s'] = _hms(run['detect_line'])
    run['boxes'] = read_htk_boxes(anot)
    return run


def score_htk(boxes, gt):
    """F1 etc. of HistomicsTK's rectangles (no scores) as written, and widened by one pixel: they span the traced
    boundary's pixel indices (x2 = last column), the ground truth pixel edges (x2 = last column + 1)."""
    ones = np.ones(len(boxes))
    return (score_detections(boxes, ones, gt, coco=False),
            score_detections(boxes + [0, 0, 1, 1], ones, gt, coco=False))


def _hms(line):
    """Seconds from HistomicsTK's 'label = H:MM:SS.ffffff'."""
    if not line or '=' not in line:
        return None
    try:
        h, m, s = line.split('=')[1].strip().split(':')
        return int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------------------
# cellrcnn against HistomicsTK, both with their defaults, alternately
# ------------------------------------------------------------------------------------------------------------------

def versus_htk(size, path, gt, args, workdir, model_tag):
    """``cellrcnn detect`` and HistomicsTK's NucleiDetection, each with its own defaults, alternately on one slide:
    ``args.warmups`` unrecorded rounds, then ``args.repeats`` recorded ones (the order flips every round).  Medians
    of wall and CPU seconds and of the largest process's peak RSS, their ratios (HistomicsTK / cellrcnn) and each
    run's F1 at IoU 0.5 against the slide's exact boxes."""
    tools = {
        'cellrcnn': lambda: run_cellrcnn(path, os.path.join(workdir, 'runs', f'versus_{model_tag}_{size}'), args,
                                         plain=True),
        'htk': lambda: run_htk(path, None, [], args, os.path.join(workdir, 'runs', f'versus_htk_{size}')),
    }
    runs = {name: [] for name in tools}
    for round_ in range(args.warmups + args.repeats):
        for name in list(tools)[::1 if round_ % 2 == 0 else -1]:
            run = tools[name]()
            kind = 'warm-up' if round_ < args.warmups else f'run {round_ - args.warmups + 1}'
            figures = {k: run[k] for k in ('wall_s', 'cpu_s', 'waited_cpu_s', 'tree_cpu_s', 'peak_rss_mb',
                                           'peak_tree_rss_mb')}
            if name == 'cellrcnn':
                pred, scores = read_csv_boxes(run['csv'])
                figures['eval'] = score_detections(pred, scores, gt, coco=False)
                figures['own_seconds'] = run['summary']['seconds']
            else:
                figures['eval'], figures['eval_pixel_edges'] = score_htk(run['boxes'], gt)
                figures['dask'] = run['dask']
                figures['own_total_s'] = run['own_total_s']
            figures['detections'] = figures['eval']['n_pred']
            print(f'{size}² {name} {kind}: wall {run["wall_s"]:.1f} s, CPU {run["cpu_s"]:.1f} s, peak '
                  f'{run["peak_rss_mb"]:.0f} MB, {figures["detections"]} detections, F1 {figures["eval"]["f1"]:.3f}',
                  flush=True)
            if round_ >= args.warmups:
                runs[name].append(figures)
    out = {'size': size, 'slide': path, 'gt_nuclei': int(len(gt)), 'warmups': args.warmups, 'repeats': args.repeats,
           'htk_dask': runs['htk'][0]['dask'], 'runs': runs}
    for name, rs in runs.items():
        f1s = [r['eval']['f1'] for r in rs]
        out[name] = {key: float(np.median([r[key] for r in rs])) for key in ('wall_s', 'cpu_s', 'peak_rss_mb',
                                                                              'detections')}
        out[name].update(f1=float(np.median(f1s)), f1_min=min(f1s), f1_max=max(f1s))
    out['ratios'] = {key: out['htk'][key] / out['cellrcnn'][key] for key in ('wall_s', 'cpu_s', 'peak_rss_mb')}
    return out


def versus_table(rows):
    lines = ['| slide | tool | runs | wall s | CPU s | CPU s / wall s | peak RSS MB (largest process) | detections | '
             'F1 (min-max) |', '|' + ' --- |' * 9]
    for r in rows:
        for name, label in (('cellrcnn', 'cellrcnn detect'), ('htk', 'HistomicsTK NucleiDetection')):
            m = r[name]
            lines.append(f'| {r["size"]}² | {label} | {len(r["runs"][name])} | {f(m["wall_s"], 1)} | '
                         f'{f(m["cpu_s"], 1)} | {f(m["cpu_s"] / m["wall_s"])} | {f(m["peak_rss_mb"], 0)} | '
                         f'{f(m["detections"], 0)} | {f(m["f1"], 3)} ({f(m["f1_min"], 3)}-{f(m["f1_max"], 3)}) |')
    lines.append('')
    for r in rows:
        q = r['ratios']
        lines.append(f'{r["size"]}²: HistomicsTK / cellrcnn: wall {f(q["wall_s"])}x, CPU {f(q["cpu_s"])}x, peak RSS '
                     f'{f(q["peak_rss_mb"])}x (medians of {r["repeats"]} alternate runs after {r["warmups"]} '
                     f'warm-up rounds); HistomicsTK: {r["htk_dask"]}.')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------------------
# merge cost
# ------------------------------------------------------------------------------------------------------------------

def merge_peer(n_detections, factor, device, seed=0, max_reference=None):
    """merge_all and tile-by-tile StreamingNMS against one torchvision.ops.nms, on merge_cost's simulated raw
    detections (about ``factor`` raw boxes per detection)."""
    import torch
    from torchvision.ops import nms

    sys.path.insert(0, HERE)
    import merge_cost
    from cellrcnn.merge import merge_all

    rows = merge_cost.simulate(max(100, int(n_detections * factor)), np.random.default_rng(seed))
    boxes = np.concatenate([b for _, tiles in rows for b, _ in tiles])
    scores = np.concatenate([s for _, tiles in rows for _, s in tiles])
    out = {'raw': int(len(boxes)), 'tiles': f'{len(rows)} x {len(rows[0][1])} of {merge_cost.TILE} px',
           'iou': merge_cost.IOU, 'max_box': merge_cost.MAX_BOX, 'torch_threads': torch.get_num_threads()}
    t0 = time.perf_counter()
    kept = merge_all(boxes, scores, merge_cost.IOU, merge_cost.MAX_BOX)
    out['merge_all_s'] = time.perf_counter() - t0
    out['kept'] = int(len(kept))
    streamed, out['streaming_s'], out['streaming_peak_buffered'] = merge_cost.run_streaming(rows)
    out['streaming_same_as_merge_all'] = set(streamed.tolist()) == set(kept.tolist())
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    if max_reference is None or len(boxes) <= max_reference:
        t0 = time.perf_counter()
        ref = nms(tb, ts, merge_cost.IOU).numpy()
        out['nms_cpu_s'] = time.perf_counter() - t0
        out['same_kept'] = bool(np.array_equal(ref, kept))
    if device.startswith('cuda') and torch.cuda.is_available():
        gb, gs = tb.to(device), ts.to(device)
        nms(gb[:100], gs[:100], merge_cost.IOU)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref = nms(gb, gs, merge_cost.IOU).cpu().numpy()
        torch.cuda.synchronize()
        out['nms_cuda_s'] = time.perf_counter() - t0
        out['same_kept_cuda'] = bool(np.array_equal(ref, kept))
    return out


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------

def f(value, digits=2):
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def slides_table(rows):
    lines = ['| slide | tissue mm² | tiles read/skipped | detections | read s | detect s | merge s | total s | '
             'wall s | tiles/s | Mpx/s | merge % | peak RSS MB | F1 | P / R | eval s |',
             '|' + ' --- |' * 16]
    for r in rows:
        s, e = r['seconds'], r['eval']
        lines.append(
            f'| {r["size"]}² | {f(r["tissue_mm2"])} | {r["tiles_read"]}/{r["tiles_skipped"]} | {r["detections"]} | '
            f'{f(s["read"])} | {f(s["detect"])} | {f(s["merge"])} | {f(s["total"])} | {f(r["process_wall_s"], 1)} | '
            f'{f(r["tiles_per_s"])} | {f(r["megapixels_per_second"])} | {f(100 * r["merge_share"], 1)} | '
            f'{f(r["peak_rss_mb"], 0)} | {f(e["f1"], 3)} | {f(e["precision"], 3)} / {f(e["recall"], 3)} | '
            f'{f(e["seconds"], 1)} |')
    return '\n'.join(lines)


def peers_table(peers):
    c = peers['cellrcnn']
    base_detect, base_total, base_wall = c['seconds']['detect'], c['seconds']['total'], c['process_wall_s']
    mpx = peers['megapixels']
    lines = [f'Region: {peers["region_text"]} ({f(mpx)} Mpx at 20x), device {peers["device"]}.', '',
             '| method | timed | seconds | Mpx/s | × cellrcnn time | detections | peak RSS MB | F1 | P / R |',
             '|' + ' --- |' * 9]

    def row(name, timed, sec, base, dets, rss, ev):
        ratio = sec / base if sec is not None and base else None
        lines.append(f'| {name} | {timed} | {f(sec)} | {f(mpx / sec if sec else None)} | {f(ratio)} | {f(dets)} | '
                     f'{f(rss, 0)} | {f(ev and ev["f1"], 3)} | '
                     f'{f(ev and ev["precision"], 3)} / {f(ev and ev["recall"], 3)} |')

    row('cellrcnn', 'inference', base_detect, base_detect, c['detections'], c['peak_rss_mb'], c['eval'])
    row('cellrcnn', 'end to end (detection loop)', base_total, base_total, None, None, None)
    row('cellrcnn', 'process wall', base_wall, base_wall, None, None, None)
    for name, s in peers.get('stock', {}).items():
        row(f'torchvision R50-FPN ({name})', 'inference', s['seconds']['detect'], base_detect, s['detections'],
            s['peak_rss_mb'], None)
        row(f'torchvision R50-FPN ({name})', 'end to end (detection loop)', s['seconds']['total'], base_total, None, None,
            None)
    for name, h in peers.get('htk', {}).items():
        rss = h['peak_rss_mb'] if h['peak_tree_rss_mb'] is None else max(h['peak_rss_mb'], h['peak_tree_rss_mb'])
        row(f'HistomicsTK ({name})', 'process wall', h['wall_s_median'], base_wall, h['detections'], rss, h['eval'])
        row(f'HistomicsTK ({name})', 'its own total', h['own_total_s'], base_total, None, None, None)
    for name, h in peers.get('htk', {}).items():
        e = h['eval_pixel_edges']
        lines.append(f'\nHistomicsTK ({name}): median-F1 run of {len(h["runs"])} shown, F1 {f(h["f1_min"], 3)} to '
                     f'{f(h["f1_max"], 3)} over the runs; {h["dask"] or ""}; that run with its boxes widened by 1 px '
                     f'to pixel edges (x2, y2 + 1): F1 {f(e["f1"], 3)}, P / R {f(e["precision"], 3)} / '
                     f'{f(e["recall"], 3)}.')
    m = peers.get('merge')
    if m:
        lines += ['', f'Merge over {m["raw"]} simulated raw detections ({m["tiles"]}, IoU {m["iou"]}), '
                      f'{m["kept"]} kept:', '',
                  '| merge_all s | StreamingNMS tile by tile s | torchvision nms CPU s | torchvision nms CUDA s | '
                  'same kept (CPU / CUDA) |', '|' + ' --- |' * 5,
                  f'| {f(m["merge_all_s"], 3)} | {f(m["streaming_s"], 3)} | {f(m.get("nms_cpu_s"), 3)} | '
                  f'{f(m.get("nms_cuda_s"), 3)} | {m.get("same_kept", "-")} / {m.get("same_kept_cuda", "-")} |']
    return '\n'.join(lines)


def run_peers(size, path, gt, run, region, args, workdir, model_tag, results, save):
    """The peers on one slide (or its region), next to the cellrcnn run ``run`` of the whole slide."""
    peers = {'size': size, 'region': region, 'device': args.device,
             'region_text': f'{size}² slide ' + (f'ROI {",".join(map(str, region))}' if region else 'whole')}
    if region:
        run = run_cellrcnn(path, os.path.join(workdir, 'runs', f'{model_tag}_{args.device}_{size}_roi'), args,
                           roi=region)
    gt_r = centres_inside(gt, region)
    pred, scores = read_csv_boxes(run['csv'])
    keep = inside_mask(pred, region)
    s = run['summary']
    peers['megapixels'] = s['megapixels']  # of the tiles cellrcnn read; the stock model reads the same ones
    peers['cellrcnn'] = {'seconds': s['seconds'], 'process_wall_s': run['wall_s'], 'detections': s['detections'],
                         'peak_rss_mb': run['peak_rss_mb'], 'tiles_read': s['tiles_read'],
                         'eval': score_detections(pred[keep], scores[keep], gt_r, coco=False)}
    results['peers'] = peers
    save()
    peers['stock'] = {}
    for variant in args.stock_variants:
        st = run_stock(path, variant, region, args,
                       os.path.join(workdir, 'runs', f'stock_{variant}_{args.device}_{size}'))
        peers['stock'][variant] = {'seconds': st['summary']['seconds'], 'process_wall_s': st['wall_s'],
                                   'detections': st['summary']['detections'],
                                   'tiles_read': st['summary']['tiles_read'], 'peak_rss_mb': st['peak_rss_mb']}
        save()
        print(f'stock {variant}: inference {st["summary"]["seconds"]["detect"]:.1f} s', flush=True)
    peers['htk'] = {}
    for name in args.htk_variants:
        extra = [] if name == 'defaults' else HTK_VARIANTS[name]
        reps = []
        for rep in range(args.htk_repeats):
            h = run_htk(path, region, extra, args, os.path.join(workdir, 'runs', f'htk_{name}_{size}_{rep}'))
            boxes = centres_inside(h.pop('boxes'), region)
            h['detections'] = int(len(boxes))
            h['eval'], h['eval_pixel_edges'] = score_htk(boxes, gt_r)
            reps.append(h)
            print(f'HistomicsTK {name} run {rep + 1}: {h["wall_s"]:.1f} s, {h["detections"]} nuclei, '
                  f'F1 {h["eval"]["f1"]:.3f}', flush=True)
        # the run with the median F1 stands for the variant; every run is kept (its whole-slide colour statistics
        # come from an unseeded random pixel sample, so results vary from run to run)
        f1s = [h['eval']['f1'] for h in reps]
        median = reps[int(np.argsort(f1s)[(len(f1s) - 1) // 2])]
        peers['htk'][name] = {**median, 'extra_args': extra, 'f1_min': min(f1s), 'f1_max': max(f1s),
                              'wall_s_median': float(np.median([h['wall_s'] for h in reps])), 'runs': reps}
        save()
    peers['merge'] = merge_peer(s['detections'], args.merge_raw_factor, args.device,
                                max_reference=args.merge_reference_max)
    save()
    print()
    print(peers_table(peers))


def environment(args):
    import torch

    env = {'python': platform.python_version(), 'torch': torch.__version__, 'cpus': os.cpu_count(),
           'omp_num_threads': os.environ.get('OMP_NUM_THREADS'), 'torch_threads': torch.get_num_threads(),
           'machine': platform.machine(), 'device_arg': args.device}
    try:
        env['git'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip()
    except OSError:
        pass
    if args.device.startswith('cuda') and torch.cuda.is_available():
        env['gpu'] = torch.cuda.get_device_name(0)
    return env


def main():
    if len(sys.argv) > 1 and sys.argv[1] == '_stock':
        return stock_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', required=True, help='slide sides in pixels at 20x')
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--out', required=True, help='JSON file for all results')
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'cellrcnn_slide_benchmark'),
                        help='slide cache and run outputs (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='synthetic slide seed')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', dest='batch_size', type=int, default=2)
    parser.add_argument('--workers', type=int, default=2, help='tile reader threads')
    parser.add_argument('--tile-size', dest='tile_size', type=int, default=1024)
    parser.add_argument('--overlap', type=int, default=64)
    parser.add_argument('--coco-max-gt', dest='coco_max_gt', type=int, default=100_000,
                        help='COCO AP only up to this many ground-truth boxes (it costs ~0.5 ms per box)')
    parser.add_argument('--versus-htk', dest='versus_htk', action='store_true',
                        help='instead: cellrcnn detect and HistomicsTK NucleiDetection, each with its defaults, '
                             'alternately on every size')
    parser.add_argument('--repeats', type=int, default=3, help='--versus-htk: recorded runs of each tool per size')
    parser.add_argument('--warmups', type=int, default=1, help='--versus-htk: unrecorded rounds first')
    parser.add_argument('--peers', action='store_true', help='also run the peers on the smallest size')
    parser.add_argument('--peer-region', dest='peer_region', help='X,Y,W,H in base pixels (default: whole slide)')
    parser.add_argument('--stock-variants', dest='stock_variants', nargs='*', default=['native'],
                        choices=['native', 'resize800'])
    parser.add_argument('--htk-variants', dest='htk_variants', nargs='*', default=['defaults'] + list(HTK_VARIANTS),
                        help=f'defaults and/or {", ".join(HTK_VARIANTS)}')
    parser.add_argument('--htk-repeats', dest='htk_repeats', type=int, default=3,
                        help='runs per HistomicsTK variant (on a whole slide its colour normalisation statistics come '
                             'from an unseeded random sample of pixels, so F1 varies between runs)')
    parser.add_argument('--htk-workers', dest='htk_workers', type=int,
                        help="HistomicsTK's --num_workers (default: its own, physical cores - 1)")
    parser.add_argument('--merge-raw-factor', dest='merge_raw_factor', type=float, default=2.65,
                        help="simulated raw boxes per detection (merge_cost's model: 2.65, i.e. about one nucleus "
                             'per detection)')
    parser.add_argument('--merge-reference-max', dest='merge_reference_max', type=int, default=300_000,
                        help='skip the CPU torchvision.ops.nms reference above this many raw boxes (it is quadratic)')
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    if args.model:
        args.model = os.path.abspath(args.model)
    region = None
    if args.peer_region:
        region = tuple(int(float(v)) for v in args.peer_region.split(','))
        if len(region) != 4:
            parser.error('--peer-region needs X,Y,W,H')
    unknown = [name for name in args.htk_variants if name != 'defaults' and name not in HTK_VARIANTS]
    if unknown:
        parser.error(f'unknown --htk-variants {", ".join(unknown)}: choose from defaults, {", ".join(HTK_VARIANTS)}')
    if args.versus_htk and args.peers:
        parser.error('--versus-htk and --peers are separate runs')
    if args.repeats < 1 or args.warmups < 0:
        parser.error('--repeats must be at least 1 and --warmups at least 0')
    model_tag = os.path.splitext(os.path.basename(args.model or 'bundled'))[0]
    results = {'environment': environment(args), 'args': vars(args), 'slides': [], 'peers': None, 'versus_htk': []}

    def save():
        with open(args.out, 'w') as fh:
            json.dump(results, fh, indent=2, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))

    for size in sizes:
        path, gt, written_s = ensure_slide(workdir, size, args.seed)
        if written_s is not None:
            print(f'wrote {path} ({len(gt)} nuclei) in {written_s:.1f} s', flush=True)
        if args.versus_htk:
            results['versus_htk'].append(versus_htk(size, path, gt, args, workdir, model_tag))
            save()
            continue
        out_dir = os.path.join(workdir, 'runs', f'{model_tag}_{args.device}_{size}')
        run = run_cellrcnn(path, out_dir, args)
        pred, scores = read_csv_boxes(run['csv'])
        score = score_detections(pred, scores, gt, coco=len(gt) <= args.coco_max_gt)
        row = slide_row(size, run, score)
        row['slide'], row['slide_written_s'], row['gt_nuclei'] = path, written_s, int(len(gt))
        results['slides'].append(row)
        save()
        print(f'{size}²: {row["detections"]} detections, total {row["seconds"]["total"]:.1f} s, '
              f'F1 {score["f1"]:.3f}', flush=True)
        if args.peers and size == sizes[0]:  # the peers right after the smallest slide: their results come early
            run_peers(size, path, gt, run, region, args, workdir, model_tag, results, save)
    print()
    print(versus_table(results['versus_htk']) if args.versus_htk else slides_table(results['slides']))
    if results['peers']:
        print()
        print(peers_table(results['peers']))
    save()
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
