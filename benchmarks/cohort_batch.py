"""A cohort through ``cellrcnn batch`` with one command, its table checked against the slides' ground truth.

    python benchmarks/cohort_batch.py [--count 20] [--min-size 1024] [--max-size 2048] [--workdir DIR]
                                      [--scheduler local:2] [--keep]

Writes ``--count`` synthetic pyramidal slides at 20x (``cellrcnn.synthetic.write_slide``, sizes drawn between
--min-size and --max-size, spread over two "site" subfolders; cached in --workdir with their ``.boxes.npy`` ground
truth, so reruns reuse them), then runs ONE command in a subprocess:

    python -m cellrcnn batch WORKDIR/slides -o WORKDIR/out --device cpu [--scheduler ...]

(the output folder is emptied first unless --keep, so every slide is computed). From ``WORKDIR/out/cohort.csv`` and
each slide's annotation it prints, per slide: true and detected nuclei, count error in %, precision, recall and F1 at
IoU 0.5 (``cellrcnn.metrics.match_detections`` of every written detection against the exact boxes), seconds; and
for the cohort: mean and largest absolute count error, pooled precision / recall / F1, the command's wall time.
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np

IOU = 0.5


def write_cohort(folder, count, min_size, max_size, seed=7):
    """The slides (written once): {path: ground-truth boxes}."""
    from cellrcnn.synthetic import write_slide

    rng = np.random.default_rng(seed)
    slides = {}
    for i in range(count):
        width, height = (int(v) // 16 * 16 for v in rng.integers(min_size, max_size + 1, 2))
        path = os.path.join(folder, f'site_{"AB"[i % 2]}', f'case_{i:02d}.tiff')
        if not (os.path.exists(path) and os.path.exists(path + '.boxes.npy')):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_slide(path, width, height, seed=1000 + i)
        slides[path] = np.load(path + '.boxes.npy')
    return slides


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--count', type=int, default=20)
    parser.add_argument('--min-size', type=int, default=1024)
    parser.add_argument('--max-size', type=int, default=2048)
    parser.add_argument('--workdir', default=os.path.join('/tmp', 'cellrcnn-cohort-benchmark'))
    parser.add_argument('--scheduler', help='passed on to cellrcnn batch')
    parser.add_argument('--keep', action='store_true', help='keep earlier results (a resumed run)')
    args = parser.parse_args()

    from cellrcnn.annotation import annotation_to_detections, read_annotation_file
    from cellrcnn.metrics import match_detections
    from cellrcnn.slide import Slide

    source, output = os.path.join(args.workdir, 'slides'), os.path.join(args.workdir, 'out')
    t0 = time.perf_counter()
    truth = write_cohort(source, args.count, args.min_size, args.max_size)
    print(f'{len(truth)} slides in {source} ({time.perf_counter() - t0:.1f} s to write or find them)')
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, '-m', 'cellrcnn', 'batch', source, '-o', output, '--device', 'cpu']
    if args.scheduler:
        command += ['--scheduler', args.scheduler]
    print('$ ' + ' '.join(command), flush=True)
    t0 = time.perf_counter()
    run = subprocess.run(command)
    wall = time.perf_counter() - t0
    print(f'exit status {run.returncode}, {wall:.1f} s')

    with open(os.path.join(output, 'cohort.csv'), newline='') as f:
        rows = {os.path.abspath(r['slide']): r for r in csv.DictReader(f)}
    print('\n| slide | px | true | detected | count error | precision | recall | F1 | s |')
    print('|---|---|---|---|---|---|---|---|---|')
    errors, tp, fp, fn, pixels = [], 0, 0, 0, 0
    for path, boxes in truth.items():
        row = rows[os.path.abspath(path)]
        width, height = Slide(path).base_size
        pixels += width * height
        if row['status'] == 'failed':
            print(f'| {os.path.relpath(path, source)} | failed: {row["note"]} |')
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        found = annotation_to_detections(read_annotation_file(os.path.join(output, row['output'],
                                                                           stem + '.anot.json')))
        assert len(found['boxes']) == int(row['cells'])
        match = match_detections(found['boxes'], found['scores'], boxes, IOU)
        tp, fp, fn = tp + match.tp, fp + match.fp, fn + match.fn
        error = 100 * (int(row['cells']) - len(boxes)) / len(boxes)
        errors.append(error)
        precision, recall = match.tp / max(1, match.tp + match.fp), match.tp / max(1, match.tp + match.fn)
        f1 = 2 * precision * recall / max(1e-9, precision + recall)
        print(f'| {os.path.relpath(path, source)} | {width}x{height} | {len(boxes)} | {row["cells"]} | '
              f'{error:+.1f} % | {precision:.3f} | {recall:.3f} | {f1:.3f} | {row["seconds"]} |')
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    failed = sum(r['status'] == 'failed' for r in rows.values())
    print(f'\n{len(rows)} rows, {failed} failed; count error: mean absolute {np.mean(np.abs(errors)):.2f} %, '
          f'largest {np.max(np.abs(errors)):.2f} %; {sum(len(b) for b in truth.values())} true nuclei, pooled '
          f'precision {precision:.3f}, recall {recall:.3f}, F1 {2 * precision * recall / (precision + recall):.3f} '
          f'at IoU {IOU}; one command, {wall:.1f} s for {pixels / 1e6:.1f} Mpx ({pixels / 1e6 / wall:.2f} Mpx/s, '
          f'{60 * len(rows) / wall:.1f} slides/min)')
    return 0 if run.returncode == 0 and not failed else 1


if __name__ == '__main__':
    sys.exit(main())
