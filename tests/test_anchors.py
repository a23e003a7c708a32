import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList

from cellrcnn.anchors import CellAnchorGenerator, upsample_features, upsampled_length
from cellrcnn.config import ModelConfig
from cellrcnn.errors import CellRCNNError
from cellrcnn.model import build_model


def position_ramp(n, m, field):
    """A 1 x 2 x n x m feature map whose channels hold each feature's image position (x, y) under our convention."""
    ys = torch.arange(n, dtype=torch.float64) * field + 0.5
    xs = torch.arange(m, dtype=torch.float64) * field + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack([gx, gy])[None]


def centres(anchors):
    return torch.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2], dim=1)


@pytest.mark.parametrize('k', [1, 2, 4])
def test_anchor_centres_are_where_interpolated_features_were_sampled(k):
    field, n, m = 8, 5, 7
    sampled = upsample_features(position_ramp(n, m, field), k)[0]  # bilinear interpolation of a ramp is exact
    generator = CellAnchorGenerator([(16,)], [1.0], [field], upsample=k)
    anchors = generator.grid_anchors(0, *sampled.shape[-2:])
    where = sampled.permute(1, 2, 0).reshape(-1, 2).float()
    torch.testing.assert_close(centres(anchors), where, rtol=0, atol=1e-4)


@pytest.mark.parametrize('k', [1, 2, 4])
def test_anchor_count_spacing_and_edge_dropping(k):
    field, n, m = 4, 6, 9
    sizes, ratios = (8, 16), (0.5, 1.0, 2.0)
    generator = CellAnchorGenerator([sizes], ratios, [field], upsample=k)
    h, w = upsampled_length(n, k), upsampled_length(m, k)
    anchors = generator.grid_anchors(0, h, w)
    per_position = len(sizes) * len(ratios)
    assert anchors.shape == (h * w * per_position, 4)
    # k-1 positions per axis that would need extrapolated features are dropped, compared with a naive k*n grid
    assert h == k * n - (k - 1) and w == k * m - (k - 1)
    c = centres(anchors)[::per_position]
    xs, ys = c[:, 0].unique(), c[:, 1].unique()
    assert torch.allclose(xs.diff(), torch.full_like(xs.diff(), field / k))
    assert generator.spacing(0) == field / k
    # centres span exactly the real features: first on the first feature, last on the last one, none beyond
    assert xs.min() == 0.5 and xs.max() == field * (m - 1) + 0.5
    assert ys.min() == 0.5 and ys.max() == field * (n - 1) + 0.5


def test_anchor_shapes_follow_sizes_and_ratios():
    generator = CellAnchorGenerator([(10,)], [0.25, 1.0, 4.0], [4])
    a = generator.grid_anchors(0, 1, 1)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    torch.testing.assert_close(h / w, torch.tensor([0.25, 1.0, 4.0]))
    torch.testing.assert_close(w * h, torch.full((3,), 100.0))


def test_anchor_offsets_make_the_same_grid_without_interpolation():
    field, n = 8, 4
    generator = CellAnchorGenerator([(16,)], [1.0], [field], offsets=2)
    anchors = generator.grid_anchors(0, n, n)
    assert anchors.shape[0] == n * n * 4
    assert generator.spacing(0) == field / 2
    c = centres(anchors)
    xs = c[:, 0].unique()
    assert torch.allclose(xs.diff(), torch.full_like(xs.diff(), field / 2))
    assert xs.min() == 0.5


@pytest.mark.parametrize('k,offsets', [(1, 1), (2, 1), (4, 1), (1, 2)])
def test_rpn_anchors_line_up_with_head_outputs(k, offsets):
    model = build_model(ModelConfig(anchor_upsample=k, anchor_offsets=offsets)).eval()
    images = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        features = model.backbone(images)
        dense = [upsample_features(features[str(lv)], k) for lv in model.config.rpn_levels]
        objectness, _ = model.rpn.head(dense)
        anchors = model.rpn.anchor_generator(ImageList(images, [(96, 128)]), dense)[0]
    assert anchors.shape[0] == sum(o[0].numel() for o in objectness)
    for lv, fmap in zip(model.config.rpn_levels, dense):
        raw = features[str(lv)]
        assert fmap.shape[-2:] == (upsampled_length(raw.shape[-2], k), upsampled_length(raw.shape[-1], k))
        # the feature map really has the field the config claims
        assert raw.shape[-1] * model.config.fields[lv] == 128


def test_box_coding_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(200, 2, generator=g) * 500
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(200, 2, generator=g) * 40], 1)
    boxes = anchors + (torch.rand(200, 4, generator=g) - 0.5) * 6
    model = build_model()
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder, BoxCoder((1.0, 1.0, 1.0, 1.0))):
        codes = coder.encode_single(boxes, anchors)
        torch.testing.assert_close(coder.decode_single(codes, anchors), boxes, rtol=0, atol=1e-3)


@pytest.mark.parametrize('settings,message', [
    ({'backbone': 'vgg16'}, 'unknown backbone'),
    ({'anchor_upsample': 3}, 'anchor_upsample must be one of'),
    ({'anchor_upsample': 2, 'anchor_offsets': 2}, 'not both'),
    ({'anchor_sizes': ((2, 16), (24, 40)), 'anchor_upsample': 1}, 'smaller than its anchor spacing'),
    ({'anchor_sizes': ((8, 16),)}, 'one tuple per RPN level'),
    ({'aspect_ratios': (0.0, 1.0)}, 'aspect ratios must be positive'),
    ({'rpn_levels': (0, 5)}, 'must name FPN levels'),
])
def test_impossible_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(CellRCNNError, match=message) as info:
        build_model(ModelConfig(**settings))
    assert '\n' not in str(info.value)
