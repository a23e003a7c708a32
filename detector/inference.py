"""Running a model on batches of tiles: device, mixed precision, channels-last, out-of-memory recovery."""

import torch

from .data import to_tensor
from .devices import autocast, resolve_device
from .errors import CellRCNNError


class Detector:
    """A loaded model ready for inference on RGB uint8 tiles (``engine.detect_slide`` runs it over a slide)."""

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

    def detect_tiles(self, tiles):
        """Detections (boxes float32 N x 4, scores float32 N) for each RGB uint8 tile, in tile pixels.

        A GPU out-of-memory error halves the batch size (for this and later calls) and carries on.
        """
        results = []
        start = 0
        while start < len(tiles):
            chunk = tiles[start:start + self.batch_size]
            try:
                results.extend(self._run(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise CellRCNNError('the GPU ran out of memory with one tile per batch; use a smaller '
                                       'tile size or --device cpu') from None
                torch.cuda.empty_cache()
                self.batch_size //= 2
                continue
            start += len(chunk)
        return results

    @torch.no_grad()
    def _run(self, tiles):
        images = [to_tensor(t).to(self.device, non_blocking=True) for t in tiles]
        with autocast(self.device):
            outputs = self.model(images)
        results = []
        for out in outputs:
            keep = out['scores'] >= self.score_thresh
            results.append((out['boxes'][keep].float().cpu().numpy(), out['scores'][keep].float().cpu().numpy()))
        return results
