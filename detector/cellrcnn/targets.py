"""Training targets for nuclei with and without an extent, and the losses that use them (training only).

A training target (one per image) holds, besides torchvision's ``boxes`` (float N x 4, input pixels) and ``labels``:

- ``has_extent`` (bool N, optional, default all True): False for a nucleus labelled by a dot only. Its row of
  ``boxes`` is a *prior* square centred on the dot (``samples``), used only to match anchors and proposals to it.
- ``cell_types`` (int64 N, optional, default all -1): the index of the nucleus' cell type in
  ``ModelConfig.cell_types``, -1 where unknown.

Every anchor (RPN) or proposal (box head) gets a *match code*:

- ``1``: positive, matched to a nucleus with an extent: objectness / class loss and box regression loss;
- ``2``: positive, matched to a dot-only nucleus: objectness / class loss, **no** box regression loss (its prior
  square is not its extent);
- ``0``: background;
- ``-1``: ignored: between the matcher's IoU thresholds (torchvision's rule), or background by IoU but containing
  the centre of exactly one dot-only nucleus (a tight box of a nucleus larger or longer than the prior square must
  not be taught as background; a box holding two or more centres holds several nuclei and stays background).

Without ``has_extent`` the codes are torchvision's labels (1 / 0 / -1) and the losses are torchvision's.
"""

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

POSITIVE, DOT_POSITIVE, BACKGROUND, IGNORED = 1, 2, 0, -1


def has_extent(target):
    """The target's ``has_extent`` (bool N), all True when it has none."""
    boxes = target['boxes']
    extent = target.get('has_extent')
    return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device) if extent is None else extent.bool()


def match_codes(candidates, target, matcher):
    """``(matched index per candidate, clamped to >= 0; match code per candidate)`` for candidate boxes (anchors or
    proposals, K x 4) against one image's target, by ``matcher`` (torchvision's ``Matcher``) on IoU."""
    boxes = target['boxes'].to(candidates.dtype)
    if not len(boxes):
        zeros = torch.zeros(len(candidates), dtype=torch.int64, device=candidates.device)
        return zeros, zeros.clone()
    matched = matcher(box_iou(boxes, candidates))
    codes = torch.full_like(matched, POSITIVE)
    codes[matched == matcher.BELOW_LOW_THRESHOLD] = BACKGROUND
    codes[matched == matcher.BETWEEN_THRESHOLDS] = IGNORED
    matched = matched.clamp(min=0)
    extent = has_extent(target)
    if not extent.all():
        codes[(codes == POSITIVE) & ~extent[matched]] = DOT_POSITIVE
        dots = boxes[~extent]
        cx, cy = ((dots[:, 0] + dots[:, 2]) / 2)[None], ((dots[:, 1] + dots[:, 3]) / 2)[None]
        inside = ((candidates[:, 0:1] <= cx) & (cx <= candidates[:, 2:3]) &
                  (candidates[:, 1:2] <= cy) & (cy <= candidates[:, 3:4])).sum(dim=1)
        codes[(codes == BACKGROUND) & (inside == 1)] = IGNORED
    return matched, codes


def rpn_losses(objectness, deltas, codes, regression_targets, sampler):
    """torchvision's RPN losses (objectness BCE over the sampled anchors; smooth L1 over the sampled positives,
    divided by the number sampled), with box regression only for code-1 positives. ``codes``: per image, match codes
    of every anchor."""
    positive, negative = sampler(codes)  # the sampler counts codes >= 1 as positive, 0 as negative
    positive = torch.where(torch.cat(positive))[0]
    negative = torch.where(torch.cat(negative))[0]
    sampled = torch.cat([positive, negative])
    codes = torch.cat(codes)
    regressed = positive[codes[positive] == POSITIVE]
    box_loss = F.smooth_l1_loss(deltas[regressed], torch.cat(regression_targets)[regressed], beta=1 / 9,
                                reduction='sum') / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                         (codes[sampled] > 0).to(objectness.dtype))
    return objectness_loss, box_loss


def box_head_losses(class_logits, box_regression, labels, codes, regression_targets):
    """torchvision's ``fastrcnn_loss`` with box regression only for code-1 positives. ``labels``: the sampled
    proposals' classes (0 background), ``codes`` their match codes, both concatenated over images."""
    classification_loss = F.cross_entropy(class_logits, labels)
    regressed = torch.where(codes == POSITIVE)[0]
    box_regression = box_regression.reshape(len(class_logits), -1, 4)
    box_loss = F.smooth_l1_loss(box_regression[regressed, labels[regressed]], regression_targets[regressed],
                                beta=1 / 9, reduction='sum') / labels.numel()
    return classification_loss, box_loss


def cell_type_loss(logits, cell_types):
    """Cross-entropy of the cell-type logits (K' x K) against ``cell_types`` (K'; -1: unknown or background, ignored),
    averaged over the known ones; 0 (with a zero gradient) when none is known."""
    known = (cell_types >= 0).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), cell_types, ignore_index=-1, reduction='sum') / known
