"""The box head with dot-aware training targets and an optional cell-type classifier.

Detection is torchvision's ``RoIHeads`` unchanged at inference: the same scores, thresholds and NMS, the same
boxes. The cell-type classifier (``cell_type_predictor``, a linear K-way softmax on the box head's representation)
is apart from detection: at inference it runs on the box head's features of the final detections (their refined
boxes, pooled again) and adds ``cell_type_logits`` (float32 N x K) to each image's output, which
:func:`name_cell_types` turns into types and their probabilities with the model's type bias. A model without cell
types has no classifier and no such key, and its weights are those of every checkpoint made before the
classifier.

Training (``targets`` has the target keys and match codes): proposals are matched to nuclei by IoU as torchvision
does, with dot-only nuclei (``has_extent`` False) matched through their prior squares, never regressed, and the
proposals holding their centre never background; the classifier learns with cross-entropy on the sampled proposals
matched to nuclei of known type only.
"""

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads

from .targets import box_head_losses, cell_type_loss, match_codes


class CellRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (box head only) plus ``num_cell_types`` cell types (0: no classifier)."""

    def __init__(self, num_cell_types, *args, **kwargs):
        super().__init__(*args, **kwargs)
        representation = self.box_predictor.cls_score.in_features
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
            losses['loss_cell_type'] = cell_type_loss(self.cell_type_predictor(box_features), cell_types)
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
        """Add ``cell_type_logits`` to each image's detections (in place)."""
        boxes = [r['boxes'] for r in result]
        logits = self.cell_type_predictor(self.box_head(self.box_roi_pool(features, boxes, image_shapes)))
        for r, image_logits in zip(result, logits.float().split([len(b) for b in boxes])):
            r['cell_type_logits'] = image_logits


def name_cell_types(logits, bias=()):
    """``(types, probabilities)`` of N detections from their cell-type ``logits`` (float N x K tensor): the type of
    the largest logit plus ``bias`` (``ModelConfig.cell_type_bias``; empty: none) and its softmax probability."""
    if len(bias):
        logits = logits + torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    scores, types = torch.softmax(logits, dim=1).max(dim=1)
    return types, scores
