"""The cell Faster R-CNN, assembled from torchvision's detection parts and tuned for nuclei.

Differences from torchvision's fasterrcnn_resnet50_fpn, each for cells:
- a ResNet (18/34/50, optionally narrower, trained from scratch with BatchNorm) cut after the stages nuclei need, and
  a narrow FPN without the extra pooled level;
- an RPN on the finest levels only, whose feature maps are densified by ``anchor_upsample`` (see ``anchors``) and whose
  anchors come from ``CellAnchorGenerator`` with explicit fields and spacings;
- no resizing of inputs (torchvision resizes every image to 800 px), fixed normalisation;
- enough proposals and detections for hundreds of nuclei per tile;
- a cell-type classifier beside the box head (``roi_heads``, only when ``cell_types`` are configured), and
  training targets for nuclei labelled by dots only (``targets``);
- a lean box head on the finest level, whose RoIAlign is vectorised on the CPU (``roi_align``); head outputs in
  float32 so that mixed precision never rounds pixel coordinates.
"""

import math

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .anchors import CellAnchorGenerator, upsample_features
from .config import ModelConfig
from .errors import CellRCNNError
from .roi_align import RoIAlign
from .roi_heads import CellRoIHeads
from .targets import match_codes, rpn_losses


def to_tensor(image):
    """The model's input: an RGB uint8 H x W x 3 image as float C x H x W in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise CellRCNNError(f'expected an RGB image (H x W x 3), got an array of shape {image.shape}')
    # torch wraps only writable memory without a warning: a read-only tile (a reader's buffer) is copied first
    return torch.from_numpy(np.require(image, requirements=('C', 'W'))).permute(2, 0, 1).float().div_(255)


_RESNETS = {'resnet18': (BasicBlock, (2, 2, 2, 2)), 'resnet34': (BasicBlock, (3, 4, 6, 3)),
            'resnet50': (Bottleneck, (3, 4, 6, 3))}


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's width scaled and only the first ``stages`` stages built.

    At width 1 and 4 stages its convolutional body is torchvision's resnet18/34/50 (randomly initialised the same way).
    """

    def __init__(self, block, layers, width=1.0, stages=4, norm_layer=nn.BatchNorm2d):
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = max(8, round(64 * width))
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_channels = []
        for i in range(stages):
            planes = max(8, round(64 * width)) * 2 ** i
            setattr(self, f'layer{i + 1}', self._make_layer(block, planes, layers[i], stride=1 if i == 0 else 2))
            self.stage_channels.append(planes * block.expansion)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class NoResizeTransform(GeneralizedRCNNTransform):
    """Normalises and batches images, never resizes them: a nucleus keeps its size in pixels."""

    def resize(self, image, target=None):
        return image, target


class DenseRPN(RegionProposalNetwork):
    """An RPN that reads only its own FPN levels, upsampled by ``upsample`` before the head runs on them.

    At inference it decodes only the anchors that the per-level top-n lets through (torchvision decodes every anchor,
    of which the top-n keeps a small share; figures in docs/performance.md); the boxes kept are the same.
    """

    def __init__(self, level_names, upsample, **kwargs):
        super().__init__(**kwargs)
        self.level_names = list(level_names)
        self.upsample = upsample

    def forward(self, images, features, targets=None):
        dense = [upsample_features(features[name], self.upsample) for name in self.level_names]
        if self.training:
            return super().forward(images, dict(zip(self.level_names, dense)), targets)
        return self._propose(images, dense), {}

    def assign_targets_to_anchors(self, anchors, targets):
        """Per image, the match code of every anchor (``targets.match_codes``: dot-only nuclei teach no box
        regression, and anchors holding their centre are never background) and the box each is matched to."""
        codes, matched_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            matched, code = match_codes(anchors_per_image, target, self.proposal_matcher)
            boxes = target['boxes']
            matched_boxes.append(boxes[matched] if len(boxes) else torch.zeros_like(anchors_per_image))
            codes.append(code)
        return codes, matched_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        return rpn_losses(objectness, pred_bbox_deltas, labels, regression_targets, self.fg_bg_sampler)

    def _propose(self, images, features):
        """Inference proposals (boxes per image), as ``RegionProposalNetwork.forward`` makes them."""
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)[0]  # the same for every image of the batch
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        count = len(images.image_sizes)
        objectness = objectness.view(count, -1)
        top = self._get_top_n_idx(objectness, per_level)
        image = torch.arange(count, device=top.device)[:, None]
        proposals = self.box_coder.decode_single(deltas.view(count, -1, 4)[image, top].view(-1, 4),
                                                 anchors[top].view(-1, 4))
        kept = [min(n, self.pre_nms_top_n()) for n in per_level]
        boxes, _ = self.filter_proposals(proposals.view(count, -1, 4), objectness[image, top], images.image_sizes,
                                         kept)
        return boxes


class Float32RPNHead(RPNHead):
    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    def forward(self, x):
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


def build_backbone(config):
    """A from-scratch ResNet cut after ``backbone_stages`` stages, with an FPN over every kept stage.

    Levels that neither the RPN nor the box head reads (the box head pools level 0) only feed the FPN's top-down
    path: they get no output convolution.
    """
    block, layers = _RESNETS[config.backbone]
    resnet = ScaledResNet(block, layers, config.backbone_width, config.backbone_stages)
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f'layer{s}': str(s - 1) for s in range(1, config.backbone_stages + 1)},
        in_channels_list=resnet.stage_channels,
        out_channels=config.fpn_channels,
    )
    backbone.fpn.extra_blocks = None  # no extra pooled level: nuclei never need field 64
    for level in set(range(config.backbone_stages)) - set(config.rpn_levels) - {0}:
        backbone.fpn.layer_blocks[level] = nn.Identity()
    return backbone


class CellRCNN(GeneralizedRCNN):
    """Faster R-CNN for nuclei. Takes RGB float tensors in [0, 1] of any size; returns boxes in input pixels."""

    def __init__(self, config: ModelConfig):
        config.validate()
        backbone = build_backbone(config)
        anchor_generator = CellAnchorGenerator(config.anchor_sizes, config.aspect_ratios, config.rpn_fields,
                                               config.anchor_upsample, config.anchor_offsets)
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        rpn = DenseRPN(
            [str(level) for level in config.rpn_levels], config.anchor_upsample,
            anchor_generator=anchor_generator,
            head=Float32RPNHead(config.fpn_channels, num_anchors, conv_depth=config.rpn_conv_depth),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=config.rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n={'training': 0, 'testing': 0}, post_nms_top_n={'training': 0, 'testing': 0},
            nms_thresh=config.rpn_nms_thresh, score_thresh=config.rpn_score_thresh,
        )  # top-n limits are set per input size in forward()
        pooled = 7
        roi_heads = CellRoIHeads(
            len(config.cell_types),
            box_roi_pool=RoIAlign('0', config.fields[0], output_size=pooled, sampling_ratio=2),
            box_head=TwoMLPHead(config.fpn_channels * pooled ** 2, config.box_head_channels),
            box_predictor=Float32BoxPredictor(config.box_head_channels, len(config.class_names) + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=config.box_batch_size_per_image, positive_fraction=config.box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=config.box_score_thresh, nms_thresh=config.nms_thresh,
            detections_per_img=0,
        )
        transform = NoResizeTransform(min_size=1, max_size=1, image_mean=list(config.image_mean),
                                      image_std=list(config.image_std), size_divisible=config.fields[-1])
        super().__init__(backbone, rpn, roi_heads, transform)
        self.config = config

    def forward(self, images, targets=None):
        mpx = max(img.shape[-2] for img in images) * max(img.shape[-1] for img in images) / 1e6
        cfg = self.config
        self.rpn._pre_nms_top_n = {'training': math.ceil(cfg.rpn_pre_nms_per_mpx_train * mpx),
                                   'testing': math.ceil(cfg.rpn_pre_nms_per_mpx_test * mpx)}
        self.rpn._post_nms_top_n = {'training': math.ceil(cfg.rpn_post_nms_per_mpx_train * mpx),
                                    'testing': math.ceil(cfg.rpn_post_nms_per_mpx_test * mpx)}
        self.rpn.nms_thresh = cfg.rpn_nms_thresh if self.training else cfg.rpn_nms_thresh_test
        self.rpn.score_thresh = 0.0 if self.training else cfg.rpn_score_thresh
        self.roi_heads.detections_per_img = math.ceil(cfg.detections_per_mpx * mpx)
        return super().forward(images, targets)


def build_model(config=None):
    return CellRCNN(config or ModelConfig())
