r"""Whole-slide benchmark of ``cellrcnn detect`` on synthetic slides with exact ground truth, and its peers.

    python benchmarks/slide_benchmark.py --sizes 4096 16384 32768 --model M.pt --out results.json \
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
  through the same detection loop (``cellrcnn.slide_detection.detect_slide`` with the stock model standing in for
  the detector):
  inference-only seconds and end-to-end seconds, in a subprocess (peak RSS).  Variant ``native`` keeps tiles at
  their size (torchvision's resize step turned off); ``resize800`` is torchvision's default resize.  The stock model is
  randomly initialised (no weights exist here): its speed is representative, its detections are not (no F1).
* HistomicsTK's NucleiDetection CLI run the way the DSA runs it (slicer_cli_web's CLI list entrypoint in
  histomicstk's ``cli`` folder) with ``--nuclei_annotation_format bbox``, with its defaults and with the parameter
  sets of --htk-variants, --htk-repeats times each (on a whole slide its Reinhard colour statistics come from an
  unseeded random pixel sample: detections vary between runs; the median-F1 run is shown, with the range); its
  rectangles are scored like cellrcnn's (no scores: best F1 = F1), and again widened by one pixel (they span
  pixel indices of the traced boundary, the ground truth spans pixel edges).
* the merge: ``cellrcnn.merge.merge_all`` (and ``StreamingNMS`` fed tile by tile, as the detection loop does)
  against one
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
so an interrupted run keeps what it measured.  The scoring is in ``slide_scoring.py``, the measured runs of each tool
(and the stock model's ``_stock`` child process) in ``slide_runs.py``.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from slide_runs import MPP, check, merge_peer, run_cellrcnn, run_htk, run_measured, stock_child  # noqa: E402
from slide_scoring import centres_inside, inside_mask, read_csv_boxes, score_detections, score_htk  # noqa: E402

REPO = os.path.dirname(HERE)

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


# ------------------------------------------------------------------------------------------------------------------
# a cellrcnn run as a row of the slides table
# ------------------------------------------------------------------------------------------------------------------

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
# stock torchvision Faster R-CNN: this script run again as ``_stock`` (slide_runs.stock_child)
# ------------------------------------------------------------------------------------------------------------------

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
        row(f'torchvision R50-FPN ({name})', 'end to end (detection loop)', s['seconds']['total'], base_total,
            None, None, None)
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
