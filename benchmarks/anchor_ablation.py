"""Anchor densification ablation: anchor_upsample 1 / 2 / 4 against two anchor centre offsets per cell.

Every variant gets the same synthetic training data, seed and step budget; each is evaluated on the same held-out
sets: mixed tissue at 20x, and crowded tissue (crowding 1) where recall on nuclei under 12 px is reported.

    python benchmarks/anchor_ablation.py run k2 --steps 600 --out runs/ablation      # one variant (k1 k2 k4 offsets2)
    python benchmarks/anchor_ablation.py run k2 --mpp 1.0 --out runs/ablation-10x    # the same at 10x (anchors halved)
    python benchmarks/anchor_ablation.py report runs/ablation                         # markdown table of all variants

Run variants in parallel processes with OMP_NUM_THREADS=1 on a small machine; timings are taken single-threaded.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from cellrcnn.checkpoint import load_model
from cellrcnn.config import ModelConfig
from cellrcnn.evaluate import calibrate_threshold, evaluate_model
from cellrcnn.inference import Detector
from cellrcnn.metrics import DEFAULT_SIZE_BINS
from cellrcnn.samples import labelled_set
from cellrcnn.synthetic import make_tile
from cellrcnn.train import TrainConfig, precise_bn, train

VARIANTS = {
    'k1': {'anchor_upsample': 1},
    'k2': {'anchor_upsample': 2},
    'k4': {'anchor_upsample': 4},
    'offsets2': {'anchor_upsample': 1, 'anchor_offsets': 2},
}


def crowded_set(seed, count, size=256, mpp=0.5):
    rng = np.random.default_rng(seed)
    return [make_tile(rng, size=size, mpp=mpp, crowding=1.0) for _ in range(count)]


def variant_config(variant, mpp):
    """The variant's model at ``mpp``: anchor sizes scale with the nuclei's size in pixels (halved at 10x)."""
    sizes = tuple(tuple(max(2, round(a * 0.5 / mpp)) for a in level) for level in ModelConfig().anchor_sizes)
    return ModelConfig(mpp=mpp, anchor_sizes=sizes, **VARIANTS[variant]).validate()


def seconds_per_tile(model, tile=512, repeats=6):
    """Median single-image inference time on a 512 px synthetic tile, after a warm-up."""
    detector = Detector(model, device='cpu', batch_size=1)
    image, _ = make_tile(np.random.default_rng(99), size=tile, mpp=model.config.mpp, crowding=0.7)
    detector.detect_tiles([image])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.detect_tiles([image])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(variant, steps, tiles, out, reuse=False, mpp=0.5):
    """Train (or, with reuse, take the weights an earlier run trained), then calibrate and evaluate."""
    torch.manual_seed(0)
    config = variant_config(variant, mpp)
    cfg = TrainConfig(steps=steps, synthetic_tiles=tiles, warmup_steps=min(200, steps // 10), workers=0,
                      checkpoint_every=max(1, steps // 4))
    run_dir = os.path.join(out, variant)
    result_path = os.path.join(out, f'{variant}.json')
    if reuse:
        model = load_model(os.path.join(run_dir, 'model.pt'))
        with open(result_path) as f:
            train_seconds = json.load(f)['train_seconds']
        samples = labelled_set(seed=cfg.synthetic_seed, count=cfg.synthetic_tiles, tile_size=cfg.tile_size,
                               mpp=model.config.mpp)
        precise_bn(model, samples, cfg.tile_size, 'cpu')
    else:
        started = time.perf_counter()
        model, _ = train(config, cfg, run_dir, device='cpu')
        train_seconds = time.perf_counter() - started
    threshold, _ = calibrate_threshold(model, labelled_set(seed=2000, count=100, mpp=mpp), device='cpu')
    bins = tuple(edge * 0.5 / mpp for edge in DEFAULT_SIZE_BINS)  # the same nuclei (6 and 12 um) at every mpp
    mixed = evaluate_model(model, labelled_set(seed=3000, count=200, mpp=mpp), device='cpu', size_bins=bins)
    crowded = evaluate_model(model, crowded_set(4000, 100, mpp=mpp), device='cpu', size_bins=bins)
    result = {
        'variant': variant, 'settings': VARIANTS[variant], 'mpp': mpp, 'anchor_sizes': config.anchor_sizes,
        'steps': steps, 'train_tiles': tiles,
        'train_seconds': train_seconds, 'threshold': threshold,
        'anchors_per_512_tile': anchors_per_tile(model, 512),
        'seconds_per_512_tile': seconds_per_tile(model),
        'mixed': {k: v for k, v in mixed.items() if isinstance(v, (int, float))},
        'crowded': {k: v for k, v in crowded.items() if isinstance(v, (int, float))},
    }
    with open(result_path, 'w') as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


def anchors_per_tile(model, tile):
    from torchvision.models.detection.image_list import ImageList

    from cellrcnn.anchors import upsample_features
    with torch.no_grad():
        x = torch.zeros(1, 3, tile, tile)
        features = model.backbone(x)
        dense = [upsample_features(features[str(lv)], model.config.anchor_upsample) for lv in model.config.rpn_levels]
        return int(model.rpn.anchor_generator(ImageList(x, [(tile, tile)]), dense)[0].shape[0])


def report(out):
    rows = []
    for variant in VARIANTS:
        path = os.path.join(out, f'{variant}.json')
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    print('| variant | analysis um/px | anchors / 512² tile | F1 mixed | AP mixed | AP50 mixed | F1 crowded | '
          'AP crowded | recall crowded < 6 um (n) | AP / AR crowded < 6 um | recall crowded 6-12 um | '
          's / 512² tile (1 thread) | train s |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')

    def f(value):
        return '-' if value is None else f'{value:.3f}'

    for r in rows:
        m, c = r['mixed'], r['crowded']
        print(f"| {r['variant']} | {r.get('mpp', 0.5)} | {r['anchors_per_512_tile']} | "
              f"{f(m['f1'])} | {f(m['AP'])} | {f(m['AP50'])} | "
              f"{f(c['f1'])} | {f(c['AP'])} | {f(c.get('recall_small'))} ({c['n_gt_small']}) | "
              f"{f(c.get('AP_small'))} / {f(c.get('AR_small'))} | {f(c.get('recall_medium'))} | "
              f"{r['seconds_per_512_tile']:.3f} | {r['train_seconds']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('run')
    p.add_argument('variant', choices=sorted(VARIANTS))
    p.add_argument('--steps', type=int, default=600)
    p.add_argument('--tiles', type=int, default=800)
    p.add_argument('--out', default='runs/ablation')
    p.add_argument('--mpp', type=float, default=0.5, help='analysis resolution (1.0: 10x, nuclei 4.5-15 px)')
    p.add_argument('--reuse', action='store_true',
                   help="evaluate the weights an earlier run left in OUT/VARIANT/model.pt, re-estimating BatchNorm")
    p = sub.add_parser('report')
    p.add_argument('out')
    args = parser.parse_args()
    if args.command == 'run':
        os.makedirs(args.out, exist_ok=True)
        run(args.variant, args.steps, args.tiles, args.out, args.reuse, args.mpp)
    else:
        report(args.out)


if __name__ == '__main__':
    main()
