r"""cellrcnn on a GPU, end to end: the bundled sample and a 40x synthetic slide of at least 2 Gpx, with per-stage
seconds, peak GPU memory, the batch size found and Mpx/s, and float16 autocast against float32 on the same tiles.

    python benchmarks/gpu_benchmark.py --out gpu.json [--batch-size 8] [--workers 8] [--tile-size 1024]
    python benchmarks/gpu_benchmark.py --device cpu --size 4096 --block 2048 --compare-size 2048 \
        --out /tmp/gpu_benchmark_cpu.json                                   # a check of the script on the CPU

1. The device: with ``--device cuda`` (the default) the script stops at once (exit status 2) when torch sees no
   CUDA GPU, and after each run checks that the detector ran there (the run summary's device, GPU memory
   allocated); it never falls back to the CPU.
2. The bundled sample (CMU-1-Small-Region, 2220 x 2967 px at 20x) end to end as ``cellrcnn detect`` runs it
   (``cellrcnn.job.detect_to_files``: the model loaded, the slide opened, the detection loop, every output
   written), twice: the first run warms up (CUDA context, cuDNN's choice of kernels) and is kept as ``cold``.
3. A synthetic 40x slide (0.25 um/px) of ``--size``² base pixels (default 46080²: 2.12 Gpx), detected at 20x from its
   pyramid, end to end like the sample and scored against its exact boxes (F1 at IoU 0.5).  It is written here:
   ``cellrcnn.synthetic.write_slide`` streams a slide in bounded memory (a few rows of tiles) but renders about
   1.2 Mpx/s on one core, half an hour for 2 Gpx, so it writes a ``--block``² block (4608²: 26 s on a busy 2-core
   machine) and libvips, on every core, tiles it ``--size / --block`` times each way into a pyramidal JPEG TIFF (there:
   0.34 Gpx in 32 s, 175 MB), the block's boxes repeated likewise (``--block`` = ``--size`` writes the slide whole).
   Cached in ``--workdir``.
4. Reduced precision against float32 on the same tiles: the detection loop (``detect_slide``) over the top-left
   ``--compare-size``² base pixels of the synthetic slide, one detector, once per precision; detection count and F1
   must agree within 0.5 % (PASS / FAIL; exit status 1 on FAIL).  The library chooses precision by device alone
   (``cellrcnn.devices.autocast``, entered by ``inference.Detector``: float16 on CUDA, none on the CPU), so each
   pass sets the ``autocast`` the detector enters, and a forward hook on the model's first convolution checks the
   dtype it actually ran in.  On the CPU the reduced precision compared is bfloat16 (what torch's CPU autocast is
   made for; float16 there would be emulated).  ``speed_up``: float32's detection seconds over reduced precision's
   (the float32 pass runs first, so on a GPU it also pays for choosing its kernels).

Every figure goes to ``--out`` (JSON, rewritten after each step); a summary is printed.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from slide_scoring import centres_inside, inside_mask, score_detections  # noqa: E402

MPP_40X = 0.25
#: largest relative difference of detection count and F1 between reduced precision and float32
TOLERANCE = 0.005


# ------------------------------------------------------------------------------------------------------------------
# the device
# ------------------------------------------------------------------------------------------------------------------

def environment(device):
    import torch

    import cellrcnn

    env = {'python': platform.python_version(), 'torch': torch.__version__, 'cellrcnn': cellrcnn.__version__,
           'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'device': device,
           'cuda_available': torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2 ** 30)
    return env


def reset_gpu_peak(device):
    import torch

    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(device):
    """(peak allocated, peak reserved) GPU memory in MB since the last reset; (None, None) on the CPU."""
    import torch

    if not device.startswith('cuda'):
        return None, None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 20, torch.cuda.max_memory_reserved() / 2 ** 20


def check_ran_on(device, stats, peak_allocated):
    """Stop when a CUDA run did not run on the GPU."""
    if device.startswith('cuda') and (not stats['device'].startswith('cuda') or not peak_allocated):
        sys.exit(f'FAIL: --device {device} was asked for, but the run went to {stats["device"]} '
                 f'(peak GPU memory allocated: {peak_allocated} MB)')


# ------------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------------

def end_to_end(slide_path, out_dir, args):
    """``cellrcnn detect`` in this process: wall seconds, the run's own per-stage seconds, GPU memory, batch size
    found, Mpx/s (of the tiles read at 20x, and of the slide's base pixels)."""
    from cellrcnn.job import detect_to_files, output_paths
    from cellrcnn.settings import DetectionSettings

    settings = DetectionSettings(model=args.model, device=args.device, batch_size=args.batch_size,
                                 workers=args.workers, tile_size=args.tile_size, progress='none')
    paths = output_paths(out_dir, os.path.splitext(os.path.basename(slide_path))[0])
    reset_gpu_peak(args.device)
    started = time.perf_counter()
    result = detect_to_files(slide_path, paths, settings)
    wall = time.perf_counter() - started
    allocated, reserved = gpu_peak(args.device)
    s = result.stats
    check_ran_on(args.device, s, allocated)
    base_w, base_h = result.slide.base_size
    run = {'wall_s': wall, 'seconds': s['seconds'], 'outside_loop_s': wall - s['seconds']['total'],
           'detections': s['detections'], 'tiles_read': s['tiles_read'], 'tiles_skipped': s['tiles_skipped'],
           'megapixels_read': s['megapixels'], 'base_megapixels': base_w * base_h / 1e6,
           'mpx_per_s': s['megapixels'] / wall, 'base_mpx_per_s': base_w * base_h / 1e6 / wall,
           'device': s['device'], 'batch_size_asked': args.batch_size, 'batch_size_found': s['batch_size'],
           'gpu_peak_allocated_mb': allocated, 'gpu_peak_reserved_mb': reserved,
           'process_peak_rss_mb': s['peak_rss_mb']}
    return run, result


def describe(name, run):
    sec = run['seconds']
    stages = ', '.join(f'{k} {v:.2f}' for k, v in sec.items() if k != 'total')
    gpu = '' if run['gpu_peak_allocated_mb'] is None else f', GPU peak {run["gpu_peak_allocated_mb"]:.0f} MB'
    f1 = f', F1 {run["eval"]["f1"]:.4f}' if 'eval' in run else ''
    return (f'{name}: {run["wall_s"]:.2f} s end to end ({stages}; loop total {sec["total"]:.2f}, outside the loop '
            f'{run["outside_loop_s"]:.2f}), {run["tiles_read"]} tiles, {run["megapixels_read"]:.0f} Mpx read at '
            f'{run["mpx_per_s"]:.2f} Mpx/s ({run["base_mpx_per_s"]:.2f} base Mpx/s), batch size '
            f'{run["batch_size_asked"]} -> {run["batch_size_found"]}{gpu}, {run["detections"]} detections{f1}')


# ------------------------------------------------------------------------------------------------------------------
# the synthetic 40x slide
# ------------------------------------------------------------------------------------------------------------------

def synthetic_40x(workdir, size, block, seed):
    """A ``size``² slide at 40x and its boxes (cached): a ``block``² ``write_slide`` block tiled by libvips.
    Returns (path, boxes, seconds taken to write it or None when cached)."""
    import pyvips

    from cellrcnn.synthetic import write_slide

    path = os.path.join(workdir, f'synthetic40x_{size}_block{block}_seed{seed}.tiff')
    if os.path.exists(path) and os.path.exists(path + '.boxes.npy'):
        return path, np.load(path + '.boxes.npy'), None
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    block_path = os.path.join(workdir, f'block40x_{block}_seed{seed}.tiff')
    boxes = write_slide(block_path, block, block, seed=seed, mpp=MPP_40X)
    n = size // block
    if n > 1:
        part = path[:-5] + '.part.tiff'
        px_per_mm = 1000.0 / MPP_40X
        image = pyvips.Image.new_from_file(block_path).replicate(n, n).copy(xres=px_per_mm, yres=px_per_mm)
        image.tiffsave(part, tile=True, tile_width=512, tile_height=512, pyramid=True, compression='jpeg', Q=90,
                       bigtiff=True, resunit='cm')
        os.replace(part, path)
        offsets = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing='ij'), -1).reshape(-1, 2) * block
        boxes = (boxes[None] + np.tile(offsets, 2)[:, None].astype(np.float32)).reshape(-1, 4)
        os.unlink(block_path)
        os.unlink(block_path + '.boxes.npy')
    else:
        os.replace(block_path, path)
    np.save(path + '.boxes.npy', boxes)
    return path, boxes, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------------------------
# reduced precision against float32
# ------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def precision(dtype):
    """The detector's forward passes under autocast to ``dtype`` (float32: none), in place of the device's own
    choice (``cellrcnn.devices.autocast``, which ``cellrcnn.inference`` enters)."""
    import torch

    from cellrcnn import inference

    if not hasattr(inference, 'autocast'):
        sys.exit('FAIL: cellrcnn.inference no longer enters cellrcnn.devices.autocast; update precision() here')
    own = inference.autocast
    if dtype == torch.float32:
        inference.autocast = lambda device: contextlib.nullcontext()
    else:
        inference.autocast = lambda device: torch.autocast(device.type, dtype=dtype)
    try:
        yield
    finally:
        inference.autocast = own


def compare_precisions(slide_path, gt, region, args):
    """The detection loop over ``region`` of the slide with one detector, under float32 and under the device's
    reduced precision; counts, F1 and seconds of each, and whether they agree within TOLERANCE."""
    import torch

    from cellrcnn.inference import DetectorSpec
    from cellrcnn.settings import DetectionSettings
    from cellrcnn.slide import Slide, magnification_from_mpp
    from cellrcnn.slide_detection import detect_slide

    reduced = torch.float16 if args.device.startswith('cuda') else torch.bfloat16
    detector = DetectorSpec(model=args.model, device=args.device, batch_size=args.batch_size).build()
    slide = Slide(slide_path, magnification=magnification_from_mpp(detector.model.config.mpp))
    first_conv = next(m for m in detector.model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = set()
    hook = first_conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    gt_r = centres_inside(gt, region)
    out = {'region': region, 'gt_nuclei': int(len(gt_r)), 'tolerance': TOLERANCE,
           'reduced': str(reduced).removeprefix('torch.')}
    try:
        for dtype in (torch.float32, reduced):
            name = str(dtype).removeprefix('torch.')
            seen.clear()
            reset_gpu_peak(args.device)
            with precision(dtype):
                result = detect_slide(slide, detector, roi=region, tile_size=args.tile_size,
                                      overlap=DetectionSettings.overlap, min_tissue=DetectionSettings.min_tissue,
                                      workers=args.workers)
            allocated, _ = gpu_peak(args.device)
            check_ran_on(args.device, result.stats, allocated)
            if seen != {dtype}:
                sys.exit(f'FAIL: the {name} pass ran its first convolution in {sorted(map(str, seen))}')
            keep = inside_mask(result.boxes, region)
            ev = score_detections(result.boxes[keep], result.scores[keep], gt_r, coco=False)
            out[name] = {'detections': int(keep.sum()), 'f1': ev['f1'], 'precision': ev['precision'],
                         'recall': ev['recall'], 'seconds': result.stats['seconds'],
                         'tiles': result.stats['tiles_read'], 'batch_size_found': result.stats['batch_size'],
                         'gpu_peak_allocated_mb': allocated}
    finally:
        hook.remove()
    a, b = out['float32'], out[out['reduced']]
    out['count_difference'] = abs(b['detections'] - a['detections']) / max(a['detections'], 1)
    out['f1_difference'] = abs(b['f1'] - a['f1']) / max(a['f1'], 1e-12)
    out['speed_up'] = a['seconds']['detect'] / b['seconds']['detect']
    out['pass'] = out['count_difference'] <= TOLERANCE and out['f1_difference'] <= TOLERANCE
    return out


# ------------------------------------------------------------------------------------------------------------------

def main():
    from cellrcnn.commands import SAMPLE_SLIDE
    from cellrcnn.settings import DetectionSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='JSON file for every figure')
    parser.add_argument('--device', default='cuda', help='cuda (default), cuda:N or cpu')
    parser.add_argument('--model', help='checkpoint (default: the bundled model)')
    parser.add_argument('--batch-size', dest='batch_size', type=int, default=8,
                        help='starting batch size (halved on GPU out-of-memory; default: %(default)s)')
    parser.add_argument('--workers', type=int, default=DetectionSettings.workers, help='tile reader threads')
    parser.add_argument('--tile-size', dest='tile_size', type=int, default=DetectionSettings.tile_size,
                        help='tile side in 20x pixels')
    parser.add_argument('--size', type=int, default=46080, help='synthetic 40x slide side in base pixels')
    parser.add_argument('--block', type=int, default=4608, help='side of the write_slide block it is tiled from')
    parser.add_argument('--compare-size', dest='compare_size', type=int, default=16384,
                        help='side of the top-left region (base pixels) detected under each precision')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'cellrcnn_gpu_benchmark'),
                        help='slide cache and run outputs (default: %(default)s)')
    args = parser.parse_args()
    if args.size % args.block or args.block % 16:
        parser.error('--size must be a multiple of --block, and --block a multiple of 16')
    if not 0 < args.compare_size <= args.size:
        parser.error('--compare-size must be between 1 and --size')

    import torch

    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print(f'FAIL: --device {args.device} was asked for, but torch {torch.__version__} sees no CUDA GPU '
              f'(torch.version.cuda = {torch.version.cuda})', file=sys.stderr)
        sys.exit(2)
    if args.model:
        args.model = os.path.abspath(args.model)
    results = {'environment': environment(args.device), 'args': vars(args)}

    def save():
        with open(args.out, 'w') as fh:
            json.dump(results, fh, indent=2, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))

    runs = os.path.join(args.workdir, 'runs')
    cold, _ = end_to_end(SAMPLE_SLIDE, os.path.join(runs, 'sample'), args)
    sample, _ = end_to_end(SAMPLE_SLIDE, os.path.join(runs, 'sample'), args)
    results['sample'] = {'cold': cold, **sample}
    save()
    print(describe('sample (cold)', cold), flush=True)
    print(describe('sample', sample), flush=True)

    path, gt, written_s = synthetic_40x(args.workdir, args.size, args.block, args.seed)
    results['synthetic'] = {'slide': path, 'size': args.size, 'block': args.block, 'mpp': MPP_40X,
                            'gt_nuclei': int(len(gt)), 'written_s': written_s}
    if written_s is not None:
        print(f'wrote {path}: {args.size}² px at 40x ({args.size ** 2 / 1e9:.2f} Gpx), {len(gt)} nuclei, in '
              f'{written_s:.1f} s', flush=True)
    run, result = end_to_end(path, os.path.join(runs, 'synthetic'), args)
    started = time.perf_counter()
    run['eval'] = score_detections(result.boxes, result.scores, gt, coco=False)
    run['eval_s'] = time.perf_counter() - started
    results['synthetic'].update(run)
    save()
    print(describe(f'synthetic 40x {args.size}²', run), flush=True)

    region = (0, 0, args.compare_size, args.compare_size)
    cmp = results['precision'] = compare_precisions(path, gt, region, args)
    save()
    reduced = cmp[cmp['reduced']]
    print(f'{cmp["reduced"]} against float32 on the same {reduced["tiles"]} tiles ({args.compare_size}² base px): '
          f'detections {reduced["detections"]} / {cmp["float32"]["detections"]} '
          f'({100 * cmp["count_difference"]:.2f} %), F1 {reduced["f1"]:.4f} / {cmp["float32"]["f1"]:.4f} '
          f'({100 * cmp["f1_difference"]:.2f} %), detection {reduced["seconds"]["detect"]:.2f} / '
          f'{cmp["float32"]["seconds"]["detect"]:.2f} s (speed-up {cmp["speed_up"]:.2f}x): '
          f'{"PASS" if cmp["pass"] else "FAIL"} (within {100 * TOLERANCE:g} %)')
    print(f'wrote {args.out}')
    if not cmp['pass']:
        sys.exit(1)


if __name__ == '__main__':
    main()
