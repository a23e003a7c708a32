"""The box head with dot-aware training targets and an optional cell-type classifier.

Detection is torchvision's ``RoIHeads`` unchanged at inference: the same scores, thresholds and NMS, the same
boxes. The cell-type classifier (``cell_type_predictor``, a linear K-way softmax on the box head's representation,
and with ``cell_type_context`` on the tissue around the nucleus too) is apart from detection: at inference it runs
on the box head's features of the final detections (their refined boxes, pooled again) and adds ``cell_types``
(int64, index into ``ModelConfig.cell_types``) and ``cell_type_scores`` (float32, that type's softmax probability)
to each image's output. A model without cell types
has no classifier and no such keys, and its weights are those of every checkpoint made before the classifier.

Training (``targets`` has the target keys and match codes): proposals are matched to nuclei by IoU as torchvision
does, with dot-only nuclei (``has_extent`` False) matched through their prior squares, never regressed, and the
proposals holding their centre never background; the classifier learns with cross-entropy on the sampled proposals
matched to nuclei of known type only.

The context (``cell_type_context`` px, 0: none): a square of that side centred on the nucleus, pooled 3 x 3 from the
next coarser FPN level and embedded by one layer (``cell_type_context_head``). Where a nucleus lies says much of what
it is: a spindle nucleus in pink stroma, a large one among others in a nest, a small dark one in a crowd of them.
"""

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads

from .roi_align import RoIAlign
from .targets import box_head_losses, cell_type_loss, match_codes

#: the context square is pooled into this many bins a side, and embedded in this many features
CONTEXT_BINS, CONTEXT_FEATURES = 3, 128


class CellRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (box head only) plus ``num_cell_types`` cell types (0: no classifier), which also
    read ``context`` px around each nucleus from FPN level ``context_level`` (of stride ``context_field`` px)."""

    def __init__(self, num_cell_types, *args, context=0, context_level=1, context_field=8, context_channels=64,
                 **kwargs):
        super().__init__(*args, **kwargs)
        representation = self.box_predictor.cls_score.in_features
        self.cell_type_context = context
        if context:
            self.cell_type_context_pool = RoIAlign(str(context_level), context_field, output_size=CONTEXT_BINS)
            self.cell_type_context_head = nn.Sequential(
                nn.Flatten(), nn.Linear(context_channels * CONTEXT_BINS ** 2, CONTEXT_FEATURES), nn.ReLU())
            representation += CONTEXT_FEATURES
        self.cell_type_predictor = nn.Linear(representation, num_cell_types) if num_cell_types else None

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            result, losses = super().forward(features, proposals, image_shapes)
            if self.cell_type_predictor is not None:
                self._classify(features, result, image_shapes)
            return result, losses
        proposals, labels, codes, regression_targets, cell_types = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = box_head_losses(class_logits, box_regression, labels, codes,
                                                        regression_targets)
        losses = {'loss_classifier': loss_classifier, 'loss_box_reg': loss_box_reg}
        if self.cell_type_predictor is not None:
            logits = self._cell_type_logits(features, proposals, box_features, image_shapes)
            losses['loss_cell_type'] = cell_type_loss(logits, cell_types)
        return [], losses

    def select_training_samples(self, proposals, targets):
        """The sampled proposals per image with, concatenated over images: their classes (0 background), match
        codes (``targets``), regression targets, and cell types (-1: unknown or not a positive)."""
        self.check_targets(targets)
        gt_boxes = [t['boxes'].to(proposals[0].dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        sampled_proposals, labels, codes, regression_targets, cell_types = [], [], [], [], []
        for image_proposals, target, boxes in zip(proposals, targets, gt_boxes):
            matched, code = match_codes(image_proposals, target, self.proposal_matcher)
            sampled = self._subsample(code)
            image_proposals, matched, code = image_proposals[sampled], matched[sampled], code[sampled]
            positive = code > 0
            known = target.get('cell_types')
            types = known[matched] if known is not None and len(boxes) else torch.full_like(matched, -1)
            classes = target['labels'][matched] if len(boxes) else torch.zeros_like(matched)
            sampled_proposals.append(image_proposals)
            labels.append(torch.where(positive, classes, 0))
            codes.append(code)
            cell_types.append(torch.where(positive, types, -1))
            matched_boxes = boxes[matched] if len(boxes) else torch.zeros_like(image_proposals)
            regression_targets.append(self.box_coder.encode_single(matched_boxes, image_proposals))
        return (sampled_proposals, torch.cat(labels), torch.cat(codes), torch.cat(regression_targets),
                torch.cat(cell_types))

    def _subsample(self, codes):
        """Indices of the proposals torchvision's sampler keeps (positives: codes >= 1, negatives: 0)."""
        positive, negative = self.fg_bg_sampler([codes])
        return torch.where(positive[0] | negative[0])[0]

    def _classify(self, features, result, image_shapes):
        """Add ``cell_types`` and ``cell_type_scores`` to each image's detections (in place)."""
        boxes = [r['boxes'] for r in result]
        box_features = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        logits = self._cell_type_logits(features, boxes, box_features, image_shapes)
        scores, types = torch.softmax(logits.float(), dim=1).max(dim=1)
        for r, image_types, image_scores in zip(result, types.split([len(b) for b in boxes]),
                                                scores.split([len(b) for b in boxes])):
            r['cell_types'] = image_types
            r['cell_type_scores'] = image_scores

    def _cell_type_logits(self, features, boxes, box_features, image_shapes):
        """The cell-type logits of ``boxes`` (a list per image) from their box features and, with a context, the
        features of the square of ``cell_type_context`` px centred on each."""
        if not self.cell_type_context:
            return self.cell_type_predictor(box_features)
        half = self.cell_type_context / 2
        squares = [torch.cat([(b[:, :2] + b[:, 2:]) / 2 - half, (b[:, :2] + b[:, 2:]) / 2 + half], dim=1)
                   for b in boxes]
        context = self.cell_type_context_head(self.cell_type_context_pool(features, squares, image_shapes))
        return self.cell_type_predictor(torch.cat([box_features, context.to(box_features.dtype)], dim=1))
