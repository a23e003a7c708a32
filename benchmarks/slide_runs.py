"""The runs ``slide_benchmark.py`` measures, each tool in a subprocess timed whole (wall and CPU seconds, peak RSS):
``cellrcnn detect``, stock torchvision Faster R-CNN through cellrcnn's detection loop (the child side: the benchmark
runs itself with ``_stock``), HistomicsTK's NucleiDetection; and the merge against ``torchvision.ops.nms``.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from slide_scoring import read_htk_boxes

HERE = os.path.dirname(os.path.abspath(__file__))
MPP = 0.5  # 20x


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


# ------------------------------------------------------------------------------------------------------------------
# stock torchvision Faster R-CNN through the same detection loop (the child process of ``_stock``)
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
        # what the detection loop reads of a cellrcnn model: a module (whose BatchNorm statistics it saves and
        # restores: none here) with a config: its fields (the coarsest is the smallest image side and the tiles'
        # alignment), the merge's IoU threshold and its cell types (none)
        self.model = torch.nn.Module()
        self.model.config = types.SimpleNamespace(fields=(4, 8, 16, 32), nms_thresh=net.roi_heads.nms_thresh,
                                                  cell_types=(), centre_distance_px=0.0)
        self.normaliser = None  # no stain normalisation: the loop reads no stain statistics
        self.views = 1

    def detect_tiles_with_types(self, tiles, parts=False, stain=None):
        import torch

        from cellrcnn.devices import autocast
        from cellrcnn.model import to_tensor

        out = []
        with torch.no_grad():
            for start in range(0, len(tiles), self.batch_size):
                images = [to_tensor(t).to(self.device, non_blocking=True) for t in tiles[start:start + self.batch_size]]
                with autocast(self.device):
                    results = self.net(images)
                out += [{'boxes': r['boxes'].float().cpu().numpy(), 'scores': r['scores'].float().cpu().numpy()}
                        for r in results]
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
    from cellrcnn.slide import Slide, magnification_from_mpp
    from cellrcnn.slide_detection import detect_slide

    detector = StockDetector(a.variant, a.tile_size, a.device, a.batch_size)
    slide = Slide(a.slide, magnification=magnification_from_mpp(MPP))
    roi = tuple(float(v) for v in a.roi.split(',')) if a.roi else None
    result = detect_slide(slide, detector, roi=roi, tile_size=a.tile_size, overlap=a.overlap,
                          min_tissue=DetectionSettings.min_tissue, workers=a.workers)
    stats = {k: v for k, v in result.stats.items() if k != 'slide'}
    with open(a.json, 'w') as f:
        json.dump(stats, f, indent=2)


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
