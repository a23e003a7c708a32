"""The model's whole configuration: stored inside every checkpoint, so a checkpoint alone rebuilds its model."""

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .errors import CellRCNNError

BACKBONES = ('resnet18', 'resnet34', 'resnet50')
ANCHOR_UPSAMPLE_FACTORS = (1, 2, 4)
ANCHOR_OFFSET_COUNTS = (1, 2)

#: bounds of the numeric settings, ``name: (lowest, highest, whole number)``. Far beyond any useful nucleus detector,
#: and low enough that no checkpoint can ask for a model that does not fit in memory (the widest allowed box head,
#: 512 FPN channels x 7 x 7 into 2048, holds 51 million weights).
LIMITS = {
    'backbone_width': (0.125, 2, False),
    'fpn_channels': (8, 512, True),
    'box_head_channels': (8, 2048, True),
    'rpn_conv_depth': (1, 8, True),
    'mpp': (0.01, 100, False),
    'rpn_pre_nms_per_mpx_train': (1, 1_000_000, True),
    'rpn_post_nms_per_mpx_train': (1, 1_000_000, True),
    'rpn_pre_nms_per_mpx_test': (1, 1_000_000, True),
    'rpn_post_nms_per_mpx_test': (1, 1_000_000, True),
    'rpn_batch_size_per_image': (1, 100_000, True),
    'box_batch_size_per_image': (1, 100_000, True),
    'detections_per_mpx': (1, 1_000_000, True),
    'rpn_nms_thresh': (0, 1, False),
    'rpn_nms_thresh_test': (0, 1, False),
    'rpn_score_thresh': (0, 1, False),
    'box_score_thresh': (0, 1, False),
    'box_positive_fraction': (0, 1, False),
    'centre_distance_um': (0, 50, False),
    'stain_strength': (0, 1, False),
}
#: at most this many anchor sizes per level, aspect ratios, and classes
MAX_ANCHOR_SIZES, MAX_ASPECT_RATIOS, MAX_CLASSES = 8, 8, 64
#: the settings of the cell-type classifier, left out of a configuration without one (``to_dict``)
CELL_TYPE_SETTINGS = ('cell_types', 'cell_type_colors', 'cell_type_labels')
#: anchors and nuclei are at most this many pixels across
MAX_ANCHOR_SIZE = 1024


def _is_number(value, whole=False):
    """A finite int (or float, unless ``whole``); not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if whole else isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class ModelConfig:
    """How the detector is built.

    Two distances are kept apart everywhere (they were one variable, ``field``, in the TensorFlow code this grew from):

    - *field*: a feature level's stride in input pixels (its receptive-field step). The feature at index ``i`` of a
      level
      with field ``s`` is centred on pixel ``s * i`` (continuous position ``s * i + 0.5``).
    - *spacing*: the distance between neighbouring anchor centres: ``field / anchor_upsample`` when the feature map is
      interpolated, ``field / anchor_offsets`` when each feature cell carries several anchor centres.

    The fields come in three groups: the architecture (the weights depend on it, except for the anchor density),
    training sampling, and inference limits and thresholds. A model's configuration is fixed when it is built.
    """

    # -- architecture ---------------------------------------------------------------------------------------------
    backbone: str = 'resnet18'
    #: ResNet stages kept (layer1..layerN); their fields are 4, 8, 16, 32. Nuclei need no more than 3.
    backbone_stages: int = 3
    #: channel width relative to the standard ResNet (0.5 halves every stage: about 3x fewer operations).
    backbone_width: float = 0.5
    fpn_channels: int = 64
    #: FPN levels (0 = field 4) whose features feed the RPN, one tuple of anchor sizes (px) per level.
    rpn_levels: tuple = (0, 1)
    anchor_sizes: tuple = ((8, 16), (24, 40))
    #: height / width of the anchors.
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    #: interpolate the RPN's feature maps by this factor: spacing = field / anchor_upsample.
    anchor_upsample: int = 1
    #: alternative densification without interpolation: anchor_offsets**2 anchor centres per feature cell.
    anchor_offsets: int = 1
    rpn_conv_depth: int = 1
    box_head_channels: int = 256
    #: fixed input normalisation (RGB in [0, 1]); no resizing ever happens inside the model.
    image_mean: tuple = (0.70, 0.55, 0.72)
    image_std: tuple = (0.16, 0.20, 0.14)
    #: microns per pixel of the images the model was trained at (0.5 = 20x).
    mpp: float = 0.5
    class_names: tuple = ('nucleus',)
    #: cell types of the class head (a K-way classifier on the box head's features, apart from detection; empty:
    #: no class head, as in every checkpoint made before it); their display colours ('#rrggbb', one per type) and,
    #: per type, the class names of labelled data that mean it (e.g. BRCA-M2C's 'tumor_epithelial' for 'tumour').
    cell_types: tuple = ()
    cell_type_colors: tuple = ()
    cell_type_labels: tuple = ()

    # -- training sampling: used only while training -------------------------------------------------------------
    #: proposal limits per megapixel of input, so they scale with the tile size (a 20 um nucleus covers 1600 px^2 at
    #: 20x: a megapixel of packed tumour holds about 600-2500 nuclei).
    rpn_pre_nms_per_mpx_train: int = 16000
    rpn_post_nms_per_mpx_train: int = 8000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 256
    box_positive_fraction: float = 0.5

    # -- inference: the weights do not depend on these (``inference.DetectorSpec`` overrides some at build time) ---
    #: packed lymphocytes reach 3000-6000 nuclei per megapixel at 20x, so the budget must hold several proposals for
    #: each of them (2500 per megapixel capped recall in dense sheets at 0.66); anchors whose objectness is below
    #: ``rpn_score_thresh`` are dropped first, so sparse tissue does not pay for the dense budget
    #: (docs/real-tissue.md, benchmarks/proposal_limits.py).
    rpn_pre_nms_per_mpx_test: int = 16000
    rpn_post_nms_per_mpx_test: int = 8000
    rpn_nms_thresh_test: float = 0.6
    #: proposals whose objectness probability is below this are dropped at inference (training keeps them all).
    rpn_score_thresh: float = 0.3
    #: the box head keeps detections scoring at least box_score_thresh (low, for AP); results keep those scoring at
    #: least threshold, the operating point that maximised F1 on held-out data when the model was trained.
    box_score_thresh: float = 0.05
    threshold: float = 0.5
    nms_thresh: float = 0.35
    #: after the NMS, a detection whose box centre lies within this many microns of a higher-scoring detection's
    #: centre is dropped (0: none is): two boxes on one large or elongated nucleus overlap too little for the NMS,
    #: but hardly any two nuclei's centres are that close (``boxes.suppress_close_centres``; docs/training.md).
    centre_distance_um: float = 0.0
    detections_per_mpx: int = 8000
    #: added to the cell-type classifier's logits before its softmax, one per cell type (empty: none): a correction
    #: of the type priors the classifier learnt from its training mix, fitted on training images with types
    #: (``evaluate.calibrate_on_records``; docs/training.md). It changes which type a nucleus is called, never
    #: whether it is detected.
    cell_type_bias: tuple = ()
    #: stain normalisation (``stain``; empty: none, as in every checkpoint made before it): a reference's LAB mean
    #: and standard deviation over tissue pixels (six numbers, ``stain.StainStats.to_tuple``); each image's, or each
    #: slide's, own are moved ``stain_strength`` of the way to them before the model sees it, in training too.
    stain_reference: tuple = ()
    stain_strength: float = 0.75
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # JSON/checkpoint round trips turn tuples into lists: normalise so equality and hashing behave.
        self.rpn_levels = tuple(self.rpn_levels)
        self.anchor_sizes = tuple(tuple(s) for s in self.anchor_sizes)
        self.aspect_ratios = tuple(self.aspect_ratios)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        self.class_names = tuple(self.class_names)
        self.cell_types = tuple(self.cell_types)
        self.cell_type_colors = tuple(self.cell_type_colors)
        self.cell_type_labels = tuple(tuple(labels) for labels in self.cell_type_labels)
        self.cell_type_bias = tuple(self.cell_type_bias)
        self.stain_reference = tuple(self.stain_reference)

    @property
    def fields(self):
        """Field (stride in px) of each FPN level, finest first."""
        return tuple(4 * 2 ** i for i in range(self.backbone_stages))

    @property
    def centre_distance_px(self):
        """``centre_distance_um`` in the model's pixels."""
        return self.centre_distance_um / self.mpp

    @property
    def rpn_fields(self):
        return tuple(self.fields[level] for level in self.rpn_levels)

    @property
    def anchor_spacings(self):
        """Anchor spacing (px) of each RPN level."""
        density = self.anchor_upsample * self.anchor_offsets
        return tuple(f / density for f in self.rpn_fields)

    def validate(self):
        """Raise CellRCNNError with one line naming the first impossible setting: unknown, of the wrong kind, or
        outside its bounds (:data:`LIMITS`; a checkpoint's configuration is untrusted input)."""
        if not isinstance(self.backbone, str) or self.backbone not in BACKBONES:
            raise CellRCNNError(f'unknown backbone {str(self.backbone)[:40]!r}; choose one of {", ".join(BACKBONES)}')
        if not all(_is_number(v) for v in (self.threshold, self.nms_thresh)):
            raise CellRCNNError('threshold and nms_thresh must be numbers')
        if not 0 <= self.threshold <= 1:  # the options --threshold and --nms: checked first, in their words
            raise CellRCNNError(f'score threshold must be between 0 and 1, not {self.threshold}')
        if not 0 < self.nms_thresh <= 1:
            raise CellRCNNError(f'NMS IoU threshold must be above 0 and at most 1, not {self.nms_thresh}')
        for name, (low, high, whole) in LIMITS.items():
            value = getattr(self, name)
            if not _is_number(value, whole) or not low <= value <= high:
                kind = 'a whole number' if whole else 'a number'
                raise CellRCNNError(f'{name} must be {kind} between {low} and {high}, not {str(value)[:40]}')
        for name in ('backbone_stages', 'anchor_upsample', 'anchor_offsets'):
            if not _is_number(getattr(self, name), whole=True):
                raise CellRCNNError(f'{name} must be a whole number, not {str(getattr(self, name))[:40]}')
        if not all(_is_number(v, whole=True) for v in self.rpn_levels):
            raise CellRCNNError('rpn_levels must be whole numbers')
        if not all(_is_number(v) for sizes in self.anchor_sizes for v in sizes) or \
                not all(_is_number(v) for v in self.aspect_ratios + self.image_mean + self.image_std):
            raise CellRCNNError('anchor_sizes, aspect_ratios, image_mean and image_std must hold numbers')
        if any(len(sizes) > MAX_ANCHOR_SIZES or any(v > MAX_ANCHOR_SIZE for v in sizes) for sizes in self.anchor_sizes):
            raise CellRCNNError(f'at most {MAX_ANCHOR_SIZES} anchor sizes per level, each at most {MAX_ANCHOR_SIZE} px')
        if len(self.aspect_ratios) > MAX_ASPECT_RATIOS or any(not 0.05 <= r <= 20 for r in self.aspect_ratios
                                                             if r > 0):
            raise CellRCNNError(f'at most {MAX_ASPECT_RATIOS} aspect ratios, each between 0.05 and 20')
        if not self.class_names or len(self.class_names) > MAX_CLASSES or \
                not all(isinstance(c, str) and 0 < len(c) <= 100 for c in self.class_names):
            raise CellRCNNError(f'class_names must be 1 to {MAX_CLASSES} names of at most 100 characters')
        self._validate_cell_types()
        if self.stain_reference and (len(self.stain_reference) != 6 or not all(
                _is_number(v) and abs(v) <= 100 for v in self.stain_reference) or min(self.stain_reference[3:]) <= 0):
            raise CellRCNNError('stain_reference needs six numbers (LAB means, then positive standard deviations), '
                                'or none')
        if not isinstance(self.extra, dict):
            raise CellRCNNError('extra must be a dict')
        if self.backbone_stages not in (2, 3, 4):
            raise CellRCNNError(f'backbone_stages must be 2, 3 or 4, not {self.backbone_stages}')
        if self.anchor_upsample not in ANCHOR_UPSAMPLE_FACTORS:
            raise CellRCNNError(f'anchor_upsample must be one of {ANCHOR_UPSAMPLE_FACTORS}, not {self.anchor_upsample}')
        if self.anchor_offsets not in ANCHOR_OFFSET_COUNTS:
            raise CellRCNNError(f'anchor_offsets must be one of {ANCHOR_OFFSET_COUNTS}, not {self.anchor_offsets}')
        if self.anchor_upsample > 1 and self.anchor_offsets > 1:
            raise CellRCNNError('use either anchor_upsample or anchor_offsets to densify anchors, not both')
        if not self.rpn_levels or any(not 0 <= lv < self.backbone_stages for lv in self.rpn_levels) or \
                len(set(self.rpn_levels)) != len(self.rpn_levels):
            raise CellRCNNError(f'rpn_levels {list(self.rpn_levels)} must name FPN levels '
                                f'0..{self.backbone_stages - 1}, each once')
        if len(self.anchor_sizes) != len(self.rpn_levels):
            raise CellRCNNError(f'anchor_sizes needs one tuple per RPN level ({len(self.rpn_levels)}), '
                                f'got {len(self.anchor_sizes)}')
        if len({len(s) for s in self.anchor_sizes}) != 1:
            raise CellRCNNError('every RPN level needs the same number of anchor sizes (the RPN head is shared)')
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            raise CellRCNNError(f'aspect ratios must be positive, got {list(self.aspect_ratios)}')
        for sizes, spacing in zip(self.anchor_sizes, self.anchor_spacings):
            if any(s <= 0 for s in sizes):
                raise CellRCNNError(f'anchor sizes must be positive, got {list(sizes)}')
            if min(sizes) < spacing:
                raise CellRCNNError(f'anchor size {min(sizes)} px is smaller than its anchor spacing {spacing:g} px: '
                                    'objects between anchors could never be matched')
        if self.fpn_channels < 8 or self.box_head_channels < 8:
            raise CellRCNNError('fpn_channels and box_head_channels must be at least 8')
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise CellRCNNError('image_mean and image_std need three values, std positive')
        if self.mpp <= 0:
            raise CellRCNNError(f'mpp must be positive, not {self.mpp}')
        return self

    def _validate_cell_types(self):
        names = self.cell_types
        if len(names) > MAX_CLASSES or len(set(names)) != len(names) or \
                not all(isinstance(c, str) and 0 < len(c) <= 100 for c in names):
            raise CellRCNNError(f'cell_types must be at most {MAX_CLASSES} distinct names of at most 100 characters')
        if len(self.cell_type_colors) != len(names) or \
                not all(isinstance(c, str) and re.fullmatch(r'#[0-9a-fA-F]{6}', c) for c in self.cell_type_colors):
            raise CellRCNNError('cell_type_colors needs one #rrggbb colour per cell type')
        if len(self.cell_type_labels) != len(names) or \
                not all(isinstance(c, str) and len(c) <= 100 for labels in self.cell_type_labels for c in labels):
            raise CellRCNNError('cell_type_labels needs one tuple of class names per cell type')
        if self.cell_type_bias and (len(self.cell_type_bias) != len(names) or not all(
                _is_number(b) and abs(b) <= 100 for b in self.cell_type_bias)):
            raise CellRCNNError('cell_type_bias needs one number (at most 100 in size) per cell type, or none')

    def cell_type_index(self):
        """``{class name in labelled data: cell type index}``: each type's own name and its ``cell_type_labels``."""
        index = {}
        for i, (name, labels) in enumerate(zip(self.cell_types, self.cell_type_labels)):
            for label in (name, *labels):
                index.setdefault(label, i)
        return index

    def to_dict(self):
        """The settings as a dict; without cell types, without their three (empty) settings, as before they were;
        without a type bias or a stain reference, without their settings."""
        values = dataclasses.asdict(self)
        if not self.cell_types:
            for name in CELL_TYPE_SETTINGS:
                del values[name]
        if not self.cell_type_bias:
            del values['cell_type_bias']
        if not self.stain_reference:
            del values['stain_reference'], values['stain_strength']
        return values

    @classmethod
    def from_dict(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise CellRCNNError(f'unknown model settings: {", ".join(sorted(unknown))}')
        return cls(**values)
