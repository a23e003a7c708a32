"""The detector: a model loaded with its run-time choices, run on batches of tiles (device, mixed precision,
channels-last, out-of-memory recovery).

A :class:`DetectorSpec` names everything a detector is made of (the checkpoint file, the overrides of its score
threshold, NMS and anchor density, the device, batch size and views) and builds it the same way wherever it runs:
here, or on a Dask worker (``dask_cluster``), which gets the spec and nothing else.
:meth:`DetectorSpec.from_settings` is the one place where a run's settings (``settings.DetectionSettings``) become a
spec. The model's configuration is fixed when the model is built, with the overrides in it, and is never changed
afterwards.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batchnorm_folding import FoldedModel
from .boxes import suppress_close_centres
from .devices import autocast, keep_freed_memory, resolve_device
from .errors import CellRCNNError
from .model import CellRCNN, to_tensor
from .roi_heads import name_cell_types
from .stain import StainNormaliser, StainStats
from .views import boxes_from_view, fuse_views, to_view, view_transforms

if TYPE_CHECKING:
    from .config import ModelConfig

#: what the model gives for a tile's detections (the cell-type logits only for a model with cell types)
_OUTPUTS = ('boxes', 'scores', 'cell_type_logits')


@dataclass(frozen=True, kw_only=True)
class DetectorSpec:
    """What a :class:`Detector` is built from: a checkpoint, overrides of its run-time settings (None: the
    checkpoint's own value), the device and the batch size."""

    #: checkpoint file (None: the bundled model)
    model: str = None
    #: score threshold of the results (the checkpoint's calibrated ``threshold`` by default)
    threshold: float = None
    #: IoU above which the box head's NMS drops the lower-scoring box
    nms: float = None
    #: anchor density upsampling at inference (``anchors``; the RPN head's weights do not depend on it)
    anchor_upsample: int = None
    #: where the model runs: 'auto', 'cpu', 'cuda' or 'cuda:N' (``devices.resolve_device``)
    device: str
    #: tiles per model call
    batch_size: int
    #: views each tile is seen in, flipped and turned, their detections fused (``views``; 1: the tile as it is)
    views: int = 1

    @classmethod
    def from_settings(cls, settings) -> 'DetectorSpec':
        """The spec a run's :class:`cellrcnn.settings.DetectionSettings` ask for (the settings are not imported here:
        the stages never read settings, the run hands them their values)."""
        return cls(model=settings.model, threshold=settings.threshold, nms=settings.nms,
                   anchor_upsample=settings.anchor_upsample, device=settings.device, batch_size=settings.batch_size,
                   views=settings.views)

    @property
    def model_path(self) -> str:
        from .checkpoint import BUNDLED_MODEL

        return self.model or BUNDLED_MODEL

    def configure(self, stored: 'ModelConfig') -> 'ModelConfig':
        """The model configuration a checkpoint's ``stored`` one becomes with this spec's overrides (validated)."""
        changes = {}
        if self.anchor_upsample is not None:
            changes['anchor_upsample'] = self.anchor_upsample
        if self.nms is not None:
            changes['nms_thresh'] = self.nms
        if self.threshold is not None:
            # the box head must keep everything the operating point keeps
            changes.update(threshold=self.threshold, box_score_thresh=min(stored.box_score_thresh, self.threshold))
        return dataclasses.replace(stored, **changes).validate()

    def _model(self):
        """``(model on the CPU with these overrides, the checkpoint's own configuration)``; one line on any problem."""
        from .checkpoint import load_checkpoint, model_from_checkpoint, stored_config

        payload = load_checkpoint(self.model_path)
        stored = stored_config(payload, self.model_path)
        return model_from_checkpoint(payload, source=self.model_path, config=self.configure(stored)), stored

    def check(self) -> 'ModelConfig':
        """Build the model on the CPU without moving it to the device: a batch's head node checks once what its
        workers will build. :returns: the model's configuration."""
        return self._model()[0].config

    def build(self, batchnorm: dict | None = None) -> 'Detector':
        """The :class:`Detector`; ``batchnorm``: BatchNorm statistics (``adapt.batchnorm_stats``) to run with."""
        from .adapt import load_batchnorm_stats

        if resolve_device(self.device).type == 'cpu':
            keep_freed_memory()  # before the model is loaded: the heap reuses more the less it is fragmented
        model, stored = self._model()
        if batchnorm is not None:
            load_batchnorm_stats(model, batchnorm)
        return Detector(model, device=self.device, batch_size=self.batch_size, spec=self, checkpoint_config=stored,
                        views=self.views)


class Detector:
    """A model ready for inference on RGB uint8 tiles, keeping the detections scoring at least ``threshold``
    (default: the model's operating point, ``config.threshold``). ``spec``: the :class:`DetectorSpec` it was built
    from, if any (what Dask workers rebuild it from); ``checkpoint_config``: the configuration its checkpoint holds."""

    def __init__(self, model: CellRCNN, device: str, batch_size: int, threshold: float | None = None,
                 spec: DetectorSpec | None = None, checkpoint_config: 'ModelConfig | None' = None, views: int = 1):
        self.device = resolve_device(device)
        if self.device.type == 'cpu':
            keep_freed_memory()
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        #: what runs: the model with its BatchNorm folded into the convolutions (less CPU time per tile, same boxes)
        self.folded = FoldedModel(self.model)
        self.threshold = model.config.threshold if threshold is None else threshold
        if not 0 <= self.threshold <= 1:
            raise CellRCNNError(f'score threshold must be between 0 and 1, not {self.threshold}')
        if batch_size < 1:
            raise CellRCNNError(f'batch size must be at least 1, not {batch_size}')
        self.batch_size = batch_size
        view_transforms(views)  # checked here, before any tile
        #: each tile is seen in this many views, their detections fused (``views``; 1: the tile as it is)
        self.views = views
        self.spec = spec
        #: the configuration the checkpoint holds (``model.config`` is it with the spec's overrides)
        self.checkpoint_config = checkpoint_config or model.config
        #: moves each image's stain toward the model's reference (``stain``); None: the model has none
        self.normaliser = StainNormaliser.of(model.config)

    def detect_tiles(self, tiles: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Detections (boxes float32 N x 4, scores float32 N) for each RGB uint8 tile, in tile pixels.

        A GPU out-of-memory error halves the batch size (for this and later calls) and carries on.
        """
        return [(out['boxes'], out['scores']) for out in self.detect_tiles_with_types(tiles)]

    def detect_tiles_with_types(self, tiles, parts=False, logits=False, stain=None):
        """:meth:`detect_tiles` as a dict per tile: ``boxes``, ``scores`` and, for a model with cell types
        (``ModelConfig.cell_types``), ``cell_types`` (int64 N, index into them) and ``cell_type_scores`` (float32 N,
        that type's probability), both with the model's ``cell_type_bias`` (``roi_heads.name_cell_types``), and with
        ``logits`` the classifier's own ``cell_type_logits`` (float32 N x K) too.

        Each tile is an image of its own, its detections suppressed by centre distance
        (``ModelConfig.centre_distance_um``), unless ``parts``: tiles of one slide, whose detections are merged
        across the tiles before that suppression (``slide_detection``).

        A model with a stain reference (``ModelConfig.stain_reference``) normalises each tile from ``stain``: the
        :class:`cellrcnn.stain.StainStats` of the slide the tiles come from (``slide_adaptation.slide_stain``);
        None: each tile's own."""
        results = []
        start = 0
        while start < len(tiles):
            chunk = tiles[start:start + self.batch_size]
            try:
                results.extend(self._run(chunk, parts, logits, stain))
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
    def _run(self, tiles, parts, logits, stain):
        results = []
        distance = self.model.config.centre_distance_px
        sources = [(stain or StainStats.of([tile])) if self.normaliser else None for tile in tiles]
        for out in self._model_outputs(tiles, sources):
            keep = out['scores'] >= self.threshold
            kept = {key: out[key][keep] for key in _OUTPUTS if key in out}
            if 'cell_type_logits' in kept:
                kept['cell_types'], kept['cell_type_scores'] = name_cell_types(
                    kept['cell_type_logits'], self.model.config.cell_type_bias)
                if not logits:
                    del kept['cell_type_logits']
            result = {key: (v.float() if v.is_floating_point() else v).cpu().numpy() for key, v in kept.items()}
            if not parts:
                far = suppress_close_centres(result['boxes'], result['scores'], distance)
                result = {key: value[far] for key, value in result.items()}
            results.append(result)
        return results

    def _model_outputs(self, tiles, sources):
        """The model's detections (above its box head's floor) of each tile, normalised from its stain ``sources``
        (None each without a stain reference); with :attr:`views` > 1, those of the tile's views fused
        (``views.fuse_views``)."""
        if self.views == 1:
            return self._forward(tiles, sources)
        transforms = view_transforms(self.views)
        viewed = [to_view(tile, t) for tile in tiles for t in transforms]
        stains = [source for source in sources for _ in transforms]
        seen = [out for start in range(0, len(viewed), self.batch_size)  # as many images per call as without views
                for out in self._forward(viewed[start:start + self.batch_size],
                                         stains[start:start + self.batch_size])]
        fused = []
        for i, tile in enumerate(tiles):
            detections = []
            for t, out in zip(transforms, seen[i * len(transforms):(i + 1) * len(transforms)]):
                found = {key: out[key].float().cpu().numpy() for key in _OUTPUTS if key in out}
                found['boxes'] = boxes_from_view(found['boxes'], t, tile.shape)
                detections.append(found)
            fused.append({key: torch.from_numpy(value) for key, value in
                          fuse_views(detections, self.model.config.nms_thresh).items()})
        return fused

    def model_input(self, tile, source=None):
        """The model's input tensor of an RGB uint8 tile, on the device, normalised from the stain ``source``
        (a :class:`cellrcnn.stain.StainStats`; None: the tile's own) when the model has a stain reference."""
        image = to_tensor(tile).to(self.device, non_blocking=True)
        if self.normaliser is None:
            return image
        return self.normaliser(image, source or StainStats.of([tile]))

    def _forward(self, tiles, sources):
        """The model's outputs for each tile. Tiles of one size run together: a smaller tile padded to a larger one's
        size would take the padding for image, and its detections would depend on the tiles it was batched with."""
        outputs = [None] * len(tiles)
        sizes = {}
        for i, tile in enumerate(tiles):
            sizes.setdefault(tile.shape[:2], []).append(i)
        for same in sizes.values():
            images = [self.model_input(tiles[i], sources[i]) for i in same]
            with autocast(self.device):
                for i, out in zip(same, self.folded(images)):
                    outputs[i] = out
        return outputs
