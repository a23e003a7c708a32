"""Running a model on tiles and on whole images: batching, device, mixed precision, tiling with overlap."""

import numpy as np
import torch
from torchvision.ops import nms

from .data import to_tensor
from .devices import autocast, resolve_device
from .errors import CellRCNNError


def tile_origins(length, tile, overlap):
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` px shared by neighbours."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


class Detector:
    """A loaded model ready for inference: ``detect_tiles`` for batches of tiles, ``detect_image`` for an image."""

    def __init__(self, model, device='auto', batch_size=4, score_thresh=None, nms_thresh=None):
        self.device = resolve_device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.model.set_thresholds(nms_thresh=nms_thresh)
        cfg = self.model.config
        self.score_thresh = cfg.detect_thresh if score_thresh is None else score_thresh
        if not 0 <= self.score_thresh <= 1:
            raise CellRCNNError(f'score threshold must be between 0 and 1, not {self.score_thresh}')
        # the box head must keep everything the operating point may keep
        self.model.set_thresholds(score_thresh=min(cfg.score_thresh, self.score_thresh))
        if batch_size < 1:
            raise CellRCNNError(f'batch size must be at least 1, not {batch_size}')
        self.batch_size = batch_size

    @torch.no_grad()
    def detect_tiles(self, tiles):
        """Detections (boxes float32 N x 4, scores float32 N) for each RGB uint8 tile, in tile pixels."""
        results = []
        for start in range(0, len(tiles), self.batch_size):
            images = [to_tensor(t).to(self.device, non_blocking=True) for t in tiles[start:start + self.batch_size]]
            with autocast(self.device):
                outputs = self.model(images)
            for out in outputs:
                keep = out['scores'] >= self.score_thresh
                results.append((out['boxes'][keep].float().cpu().numpy(), out['scores'][keep].float().cpu().numpy()))
        return results

    def detect_image(self, image, tile=512, overlap=64):
        """Detections over a whole RGB image, tiled with overlap; duplicates across tile seams removed by NMS."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise CellRCNNError(f'expected an RGB image, got an array of shape {image.shape}')
        h, w = image.shape[:2]
        min_side = 2 ** (self.model.config.backbone_stages + 1)
        if h < min_side or w < min_side:
            raise CellRCNNError(f'image is {w}x{h} px; the model needs at least {min_side}x{min_side}')
        if not 0 <= overlap < tile:
            raise CellRCNNError(f'overlap must be at least 0 and below the tile size {tile}, not {overlap}')
        origins = [(y, x) for y in tile_origins(h, tile, overlap) for x in tile_origins(w, tile, overlap)]
        crops = [image[y:y + tile, x:x + tile] for y, x in origins]
        boxes, scores = [], []
        for (y, x), (b, s) in zip(origins, self.detect_tiles(crops)):
            boxes.append(b + np.array([x, y, x, y], np.float32))
            scores.append(s)
        boxes = torch.from_numpy(np.concatenate(boxes))
        scores = torch.from_numpy(np.concatenate(scores))
        keep = nms(boxes, scores, self.model.config.nms_thresh) if len(origins) > 1 else slice(None)
        return boxes[keep].numpy(), scores[keep].numpy()
