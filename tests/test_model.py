import re
import zipfile

import pytest
import torch

from cellrcnn.checkpoint import BUNDLED_MODEL, load_checkpoint, load_model, require_safe_torch, save_checkpoint
from cellrcnn.config import ModelConfig
from cellrcnn.errors import CellRCNNError
from cellrcnn.model import build_model


def targets(n=2):
    boxes = torch.tensor([[10.0, 12, 30, 28], [60, 40, 72, 55], [90, 90, 110, 104]])
    return [{'boxes': boxes, 'labels': torch.ones(3, dtype=torch.int64)} for _ in range(n)]


@pytest.mark.parametrize('backbone', ['resnet18', 'resnet50'])
def test_forward_and_backward_on_cpu(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone)).train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    losses = model(images, targets())
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_inference_never_resizes_and_returns_input_pixels():
    torch.manual_seed(0)
    # no score floors: even an untrained model returns boxes, whose coordinates are checked
    model = build_model(ModelConfig(box_score_thresh=0.0, rpn_score_thresh=0.0)).eval()
    image = torch.rand(3, 100, 170)  # not a multiple of 32: padded, never resized
    with torch.no_grad():
        batch, _ = model.transform([image])
        out = model([image])[0]
    assert batch.image_sizes == [(100, 170)]
    assert batch.tensors.shape[-2:] == (112, 176)  # padded to the coarsest field, 16
    assert out['boxes'].dtype == torch.float32 and out['boxes'].shape[1] == 4
    assert len(out['boxes']) > 0
    assert out['boxes'][:, :2].min() >= 0
    assert out['boxes'][:, 2].max() <= 170 and out['boxes'][:, 3].max() <= 100  # the input's, not the padding's
    assert out['boxes'].shape[0] == out['scores'].shape[0] == out['labels'].shape[0]


def test_limits_scale_with_the_tile_area():
    model = build_model().eval()
    with torch.no_grad():
        model([torch.rand(3, 256, 256)])
        small = model.roi_heads.detections_per_img
        model([torch.rand(3, 512, 512)])
    assert model.roi_heads.detections_per_img == pytest.approx(4 * small, rel=0.01)
    assert small >= 200  # hundreds of nuclei fit a 256 px tile at 20x


def test_objectness_floor_applies_at_inference_only():
    model = build_model(ModelConfig(rpn_score_thresh=0.3))
    seen = []
    model.rpn.register_forward_pre_hook(lambda m, args: seen.append(m.score_thresh))
    model.train()(([torch.rand(3, 64, 64)]), targets(1))
    with torch.no_grad():
        model.eval()([torch.rand(3, 64, 64)])
    assert seen == [0.0, 0.3]  # training proposals are sampled from everything; inference drops weak anchors


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    torch.manual_seed(1)
    config = ModelConfig(anchor_upsample=4, fpn_channels=32, box_score_thresh=0.0)
    model = build_model(config).eval()
    image = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        expected = model.backbone(image[0][None])['0']
    save_checkpoint(tmp_path / 'full.pt', model, metrics={'f1': 0.5})
    save_checkpoint(tmp_path / 'half.pt', model, half=True)
    full = load_model(tmp_path / 'full.pt')
    half = load_model(tmp_path / 'half.pt')
    assert full.config == config and half.config == config
    with torch.no_grad():
        torch.testing.assert_close(full.backbone(image[0][None])['0'], expected)
        torch.testing.assert_close(half.backbone(image[0][None])['0'], expected, atol=0.05, rtol=0.05)
    assert (tmp_path / 'half.pt').stat().st_size < 0.6 * (tmp_path / 'full.pt').stat().st_size


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'not a zip file at all')
    # text given by mistake: torch's unpickler raises IndexError on the first, KeyError on the second
    text_files = [tmp_path / 'passwd', tmp_path / 'hello.txt']
    text_files[0].write_text('root:x:0:0:root:/root:/bin/bash\n')
    text_files[1].write_text('hello')
    foreign = tmp_path / 'foreign.pt'
    torch.save({'model': {'w': torch.zeros(2)}}, foreign)
    # a download cut short; a zip file that torch did not write
    cut, archive = tmp_path / 'cut.pt', tmp_path / 'slides.zip'
    cut.write_bytes(open(BUNDLED_MODEL, 'rb').read()[:100000])
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('a.txt', 'a slide list')
    for path, message in [(tmp_path / 'missing.pt', 'not found'), (corrupt, 'not a readable checkpoint'),
                          *[(text, 'not a readable checkpoint') for text in text_files],
                          (foreign, 'not a cellrcnn checkpoint'), (archive, 'not a readable checkpoint')]:
        with pytest.raises(CellRCNNError, match=message) as info:
            load_model(path)
        assert '\n' not in str(info.value)
    # not torch's format at all: said so, not the unpickler's bare key ('105')
    for path in (corrupt, cut, *text_files):
        with pytest.raises(CellRCNNError) as info:
            load_model(path)
        assert str(info.value) == (f'{path} is not a readable checkpoint (not a whole model file as torch writes them; '
                                   'cellrcnn train writes one)')


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path):
    model = build_model(ModelConfig(fpn_channels=32))
    save_checkpoint(tmp_path / 'm.pt', model)
    payload = torch.load(tmp_path / 'm.pt', weights_only=True)
    payload['config']['fpn_channels'] = 64
    torch.save(payload, tmp_path / 'm.pt')
    with pytest.raises(CellRCNNError, match='does not match its own configuration'):
        load_model(tmp_path / 'm.pt')


def test_a_checkpoint_with_the_old_threshold_names_loads_with_their_values(tmp_path):
    """Checkpoints written before the operating threshold was named ``threshold`` (and the box head's floor
    ``box_score_thresh``) store them as ``detect_thresh`` and ``score_thresh``."""
    from cellrcnn.inference import DetectorSpec

    save_checkpoint(tmp_path / 'old.pt', build_model(ModelConfig(fpn_channels=16)))
    payload = torch.load(tmp_path / 'old.pt', weights_only=True)
    config = payload['config']
    del config['threshold'], config['box_score_thresh']
    config['detect_thresh'], config['score_thresh'] = 0.37, 0.02
    torch.save(payload, tmp_path / 'old.pt')
    model = load_model(tmp_path / 'old.pt')
    assert (model.config.threshold, model.config.box_score_thresh) == (0.37, 0.02)
    assert model.roi_heads.score_thresh == 0.02
    assert DetectorSpec(model=str(tmp_path / 'old.pt'), device='cpu', batch_size=1).build().threshold == 0.37


@pytest.mark.parametrize('change, message', [
    ({'fpn_channels': 10 ** 6}, 'fpn_channels must be a whole number between 8 and 512'),
    ({'box_head_channels': 4.5}, 'box_head_channels must be a whole number'),
    ({'rpn_conv_depth': 0}, 'rpn_conv_depth must be a whole number between 1 and 8'),
    ({'backbone_width': float('nan')}, 'backbone_width must be a number between 0.125 and 2'),
    ({'rpn_pre_nms_per_mpx_test': 10 ** 9}, 'rpn_pre_nms_per_mpx_test must be'),
    ({'anchor_sizes': ((8, 16, 20, 24, 28, 32, 36, 40, 44), (24, 40))}, 'at most 8 anchor sizes per level'),
    ({'aspect_ratios': tuple(range(1, 10))}, 'at most 8 aspect ratios'),
    ({'class_names': ()}, 'class_names must be 1 to 64 names'),
    ({'backbone_stages': True}, 'backbone_stages must be a whole number'),
    ({'rpn_levels': (0, 0)}, 'must name FPN levels 0..2, each once'),
])
def test_model_settings_are_bounded(change, message):
    with pytest.raises(CellRCNNError, match=message):
        ModelConfig(**change).validate()
    ModelConfig().validate()  # the defaults are inside every bound


def test_checkpoints_are_refused_on_a_torch_whose_weights_only_check_can_be_bypassed(tiny_checkpoint):
    """torch 2.5.1 and older let a crafted file past ``torch.load(weights_only=True)`` (CVE-2025-32434): such a
    torch loads no checkpoint, and says so in one line; 2.6 and newer (2.10 too: versions are not compared as
    text) load them."""
    for old in ('2.5.1', '2.5.1+cu124', '2.6.0a0+ecf3bae', '1.13.1'):
        with pytest.raises(CellRCNNError, match=rf'^torch {re.escape(old)} cannot load checkpoints safely .*'
                                                r'install torch >= 2\.6$') as info:
            require_safe_torch(old)
        assert '\n' not in str(info.value)
    for new in ('2.6.0', '2.10.0+cu130', torch.__version__):
        require_safe_torch(new)
    assert load_checkpoint(tiny_checkpoint)['format'] == 'cellrcnn-checkpoint'
