"""Learning from dots and cell types: match codes, losses that skip dot-only box regression, the class head, and
checkpoints with and without cell types."""

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from cellrcnn.checkpoint import load_model, save_checkpoint
from cellrcnn.config import ModelConfig
from cellrcnn.errors import CellRCNNError
from cellrcnn.inference import Detector
from cellrcnn.model import build_model, to_tensor
from cellrcnn.samples import Augmenter, TileDataset
from cellrcnn.synthetic import make_tile
from cellrcnn.targets import BACKGROUND, DOT_POSITIVE, IGNORED, POSITIVE, cell_type_loss, match_codes
from cellrcnn.train import TrainConfig, initial_model, train

TINY = ModelConfig(backbone_width=0.25, fpn_channels=32, box_head_channels=64)
TYPED = dataclasses.replace(TINY, cell_types=('lymphocyte', 'tumour'), cell_type_colors=('#0000ff', '#ff0000'),
                            cell_type_labels=((), ('tumor_epithelial',)))


def target(boxes, extent, types=None):
    t = {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.ones(len(boxes), dtype=torch.int64),
         'has_extent': torch.tensor(extent)}
    if types is not None:
        t['cell_types'] = torch.tensor(types, dtype=torch.int64)
    return t


def test_match_codes_ignore_background_boxes_around_one_dot_and_skip_its_regression():
    matcher = build_model(TINY).roi_heads.proposal_matcher  # IoU 0.5, no low-quality matches
    square = [42.0, 42.0, 58.0, 58.0]   # the prior square of a dot at (50, 50)
    other = [62.0, 42.0, 78.0, 58.0]    # a dot at (70, 50)
    candidates = torch.tensor([square,
                               [38.0, 38.0, 62.0, 62.0],   # the tight box of a large nucleus: IoU 0.44 with the square
                               [40.0, 40.0, 80.0, 60.0],   # holds both centres: two nuclei, background
                               [100.0, 100.0, 116.0, 116.0]])  # far away
    _, dots = match_codes(candidates, target([square, other], [False, False]), matcher)
    assert dots.tolist() == [DOT_POSITIVE, IGNORED, BACKGROUND, BACKGROUND]
    _, boxes = match_codes(candidates, target([square, other], [True, True]), matcher)
    assert boxes.tolist() == [POSITIVE, BACKGROUND, BACKGROUND, BACKGROUND]
    # without has_extent, every nucleus has its box (torchvision's labels)
    plain = {'boxes': torch.tensor([square, other]), 'labels': torch.ones(2, dtype=torch.int64)}
    assert match_codes(candidates, plain, matcher)[1].tolist() == boxes.tolist()


def test_the_rpn_ignores_anchors_around_dots():
    model = build_model(TINY).train()
    anchors = torch.tensor([[42.0, 42.0, 58.0, 58.0], [34.0, 34.0, 66.0, 66.0], [0.0, 0.0, 16.0, 16.0]])
    codes, matched = model.rpn.assign_targets_to_anchors([anchors], [target([[42.0, 42.0, 58.0, 58.0]], [False])])
    assert codes[0].tolist() == [DOT_POSITIVE, IGNORED, BACKGROUND]
    assert torch.equal(matched[0][0], torch.tensor([42.0, 42.0, 58.0, 58.0]))


def _losses_and_regression_grads(extent, seed=0):
    torch.manual_seed(seed)
    model = build_model(TYPED).train()
    image, boxes = make_tile(3, size=96)
    t = target(boxes.tolist(), [extent] * len(boxes), [0] * len(boxes))
    torch.manual_seed(1)  # the same samples of anchors and proposals in both runs
    losses = model([to_tensor(image)], [t])
    sum(losses.values()).backward()
    grads = [model.rpn.head.bbox_pred.weight.grad, model.roi_heads.box_predictor.bbox_pred.weight.grad]
    return losses, [g.abs().sum().item() for g in grads]


def test_dot_only_nuclei_teach_no_box_regression():
    losses, grads = _losses_and_regression_grads(extent=False)
    assert losses['loss_rpn_box_reg'].item() == 0 and losses['loss_box_reg'].item() == 0
    assert grads == [0, 0]
    assert losses['loss_objectness'].item() > 0 and losses['loss_classifier'].item() > 0
    assert losses['loss_cell_type'].item() > 0  # their types still teach the class head
    boxed, boxed_grads = _losses_and_regression_grads(extent=True)
    assert boxed['loss_rpn_box_reg'].item() > 0 and boxed['loss_box_reg'].item() > 0
    assert min(boxed_grads) > 0


def test_the_class_loss_ignores_unknown_types():
    logits = torch.randn(5, 3, requires_grad=True)
    types = torch.tensor([-1, 2, -1, 0, -1])
    loss = cell_type_loss(logits, types)
    expected = torch.nn.functional.cross_entropy(logits[[1, 3]], types[[1, 3]])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[[0, 2, 4]].abs().sum() == 0 and logits.grad[[1, 3]].abs().sum() > 0
    unknown = cell_type_loss(logits, torch.full((5,), -1))
    assert unknown.item() == 0 and torch.isfinite(unknown)
    # in the model: nuclei of unknown type give no class loss
    model = build_model(TYPED).train()
    image, boxes = make_tile(4, size=96)
    losses = model([to_tensor(image)], [target(boxes.tolist(), [True] * len(boxes), [-1] * len(boxes))])
    assert losses['loss_cell_type'].item() == 0


def bundled_without_cell_types():
    """The bundled model's weights without its cell-type head: a trained model without cell types."""
    typed = load_model()
    config = dataclasses.replace(typed.config, cell_types=(), cell_type_colors=(), cell_type_labels=(),
                                 cell_type_bias=())
    model = build_model(config)
    model.load_state_dict({k: v for k, v in typed.state_dict().items() if 'cell_type' not in k})
    return model.eval()


def test_a_model_without_cell_types_detects_as_torchvisions_roi_heads():
    model = bundled_without_cell_types()
    assert model.roi_heads.cell_type_predictor is None
    assert not any('cell_type' in k for k in model.state_dict())
    assert 'cell_types' not in model.config.to_dict()
    image, _ = make_tile(5, size=256)
    with torch.no_grad():
        ours = model([to_tensor(image)])[0]
        heads = model.roi_heads
        plain = RoIHeads(heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 256, 0.5, None,
                         heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
        model.roi_heads = plain.eval()
        theirs = model([to_tensor(image)])[0]
    assert set(ours) == {'boxes', 'scores', 'labels'} and len(ours['boxes']) > 20
    for key in ours:
        assert torch.equal(ours[key], theirs[key])


def test_a_checkpoint_with_cell_types_round_trips_and_classifies(tmp_path):
    model = build_model(TYPED)
    save_checkpoint(tmp_path / 'typed.pt', model)
    loaded = load_model(tmp_path / 'typed.pt')
    assert loaded.config.cell_types == ('lymphocyte', 'tumour')
    assert loaded.config.cell_type_colors == ('#0000ff', '#ff0000')
    assert loaded.config.cell_type_index() == {'lymphocyte': 0, 'tumour': 1, 'tumor_epithelial': 1}
    detector = Detector(loaded, 'cpu', 2, threshold=0.0)
    image, _ = make_tile(6, size=128)
    out = detector.detect_tiles_with_types([image])[0]
    assert len(out['cell_types']) == len(out['boxes']) == len(out['cell_type_scores']) > 0
    assert set(out['cell_types'].tolist()) <= {0, 1}
    assert ((out['cell_type_scores'] >= 0.5) & (out['cell_type_scores'] <= 1)).all()  # the larger of 2
    boxes, scores = detector.detect_tiles([image])[0]
    assert np.array_equal(boxes, out['boxes']) and np.array_equal(scores, out['scores'])


def test_the_type_bias_names_the_types_and_travels_with_the_checkpoint(tmp_path):
    model = build_model(TYPED)
    image, _ = make_tile(6, size=128)
    out = Detector(model, 'cpu', 2, threshold=0.0).detect_tiles_with_types([image], logits=True)[0]
    assert out['cell_type_logits'].shape == (len(out['boxes']), 2)
    assert np.array_equal(out['cell_types'], out['cell_type_logits'].argmax(1))
    save_checkpoint(tmp_path / 'biased.pt', build_model(dataclasses.replace(TYPED, cell_type_bias=(0.0, 30.0))))
    biased = load_model(tmp_path / 'biased.pt')
    assert biased.config.cell_type_bias == (0.0, 30.0)
    out = Detector(biased, 'cpu', 2, threshold=0.0).detect_tiles_with_types([image])[0]
    assert 'cell_type_logits' not in out and len(out['boxes']) > 0
    assert (out['cell_types'] == 1).all() and (out['cell_type_scores'] > 0.99).all()
    assert 'cell_type_bias' not in TYPED.to_dict()  # none: the settings are those of checkpoints made before it


def test_bad_cell_type_settings_are_one_line_errors():
    with pytest.raises(CellRCNNError, match='cell_type_colors'):
        dataclasses.replace(TYPED, cell_type_colors=('red', '#ff0000')).validate()
    with pytest.raises(CellRCNNError, match='cell_types must be'):
        dataclasses.replace(TYPED, cell_types=('a', 'a')).validate()
    for bias in ((0.5,), (0.0, float('nan')), (0.0, 'a')):
        with pytest.raises(CellRCNNError, match='cell_type_bias needs one number'):
            dataclasses.replace(TYPED, cell_type_bias=bias).validate()


def test_fine_tuning_adds_or_replaces_a_class_head_and_keeps_the_other_weights(tmp_path):
    save_checkpoint(tmp_path / 'old.pt', build_model(TINY))
    old = load_model(tmp_path / 'old.pt')
    cfg = TrainConfig(cell_types=('lymphocyte', 'tumour=tumor_epithelial'))
    model = initial_model(TINY, cfg, init=tmp_path / 'old.pt')
    assert model.config.cell_types == ('lymphocyte', 'tumour')
    assert model.config.cell_type_labels == ((), ('tumor_epithelial',))
    new = model.state_dict()
    for key, value in old.state_dict().items():
        assert torch.equal(new[key], value)
    model.config = dataclasses.replace(model.config, cell_type_bias=(0.0, 0.4))
    save_checkpoint(tmp_path / 'typed.pt', model)
    typed = load_model(tmp_path / 'typed.pt').state_dict()
    # the same types again: the bias fitted to the old weights is not kept
    assert initial_model(TINY, cfg, init=tmp_path / 'typed.pt').config.cell_type_bias == ()
    own = initial_model(TINY, TrainConfig(cell_types=('stromal', 'immune')), init=tmp_path / 'typed.pt')
    assert own.config.cell_types == ('stromal', 'immune')
    head = 'roi_heads.cell_type_predictor.weight'
    assert own.state_dict()[head].shape[0] == 2 and typed[head].shape[0] == 2
    assert not torch.equal(own.state_dict()[head], typed[head])  # a new head, not the old types' one renamed
    for key, value in typed.items():
        if 'cell_type' not in key:
            assert torch.equal(own.state_dict()[key], value)


def test_training_the_cell_types_alone_changes_nothing_else(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / 'typed.pt', build_model(TYPED))
    image, boxes = make_tile(8, size=160)
    samples = [(image, boxes, np.zeros(len(boxes), bool), np.arange(len(boxes)) % 2)]
    cfg = TrainConfig(steps=3, batch_size=2, tile_size=96, warmup_steps=1, lr=0.01, workers=0, cell_types_only=True)
    model, losses = train(TINY, cfg, tmp_path / 'run', device='cpu', samples=samples, init=tmp_path / 'typed.pt')
    assert all(step['loss_cell_type'] > 0 for step in losses)
    before = load_model(tmp_path / 'typed.pt').state_dict()
    after = load_model(tmp_path / 'run' / 'model.pt').state_dict()
    for key, value in before.items():  # weights and BatchNorm statistics alike
        if 'cell_type' not in key:
            assert torch.equal(after[key], value), key
    head = 'roi_heads.cell_type_predictor.weight'
    assert not torch.equal(after[head], before[head])
    with pytest.raises(CellRCNNError, match='needs a model with cell types'):
        train(TINY, TrainConfig(steps=1, warmup_steps=0, workers=0, cell_types_only=True), tmp_path / 'untyped',
              device='cpu', samples=samples)


def test_real_samples_carry_extent_and_types_through_augmentation():
    image, boxes = make_tile(7, size=160)
    extent = np.arange(len(boxes)) % 2 == 0
    types = np.arange(len(boxes)) % 3 - 1
    dataset = TileDataset([(image, boxes, extent, types)], Augmenter(96), seed=0,
                          real_augmenter=Augmenter(96, scale_range=(0.7, 1.4), stain_sigma=(0.3, 0.2)))
    _, t = dataset[0]
    assert 0 < len(t['boxes']) < len(boxes)
    assert len(t['has_extent']) == len(t['cell_types']) == len(t['boxes'])
    # each kept nucleus keeps its own extent flag and type: they alternate together in the source
    pairs = set(zip(t['has_extent'].tolist(), t['cell_types'].tolist()))
    source = set(zip(extent.tolist(), types.tolist()))
    assert pairs <= source
    _, plain = TileDataset([(image, boxes)], Augmenter(96), seed=0)[0]
    assert set(plain) == {'boxes', 'labels'}
