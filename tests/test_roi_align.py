import torch
from torchvision.ops import roi_align

from cellrcnn.roi_align import RoIAlign, gather_roi_align


def _boxes(count, seed):
    """Boxes in a 128 px image: small and large, degenerate, on and beyond every edge."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=g) * 120
    boxes = torch.cat([corner, corner + torch.rand(count, 2, generator=g) * 40 + 0.1], 1)
    edges = torch.tensor([[0., 0., 128., 128.], [120., 120., 128., 128.], [-6., -6., 130., 140.], [5., 5., 5., 5.],
                          [127., 0., 128., 3.]])
    return torch.cat([boxes, edges])


def _features(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def test_gather_roi_align_is_torchvisions_to_float32_rounding():
    features = _features(2, 16, 32, 32)
    boxes = [_boxes(50, 0), _boxes(30, 1)]
    for sampling_ratio in (1, 2):
        expected = roi_align(features, boxes, 7, 0.25, sampling_ratio)
        got = gather_roi_align(features.to(memory_format=torch.channels_last), boxes, 0.25, 7, sampling_ratio)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.equal(got, gather_roi_align(features, boxes, 0.25, 7, sampling_ratio))  # any layout, every time


def test_images_without_boxes_pool_nothing():
    got = gather_roi_align(_features(2, 16, 32, 32), [torch.zeros(0, 4), _boxes(20, 2)], 0.25, 7, 2)
    assert got.shape == (25, 16, 7, 7)


def test_module_uses_torchvision_while_training():
    pool = RoIAlign('0', field=4)
    features = {'0': _features(1, 8, 32, 32).requires_grad_()}
    boxes = [_boxes(5, 3)]
    out = pool.train()(features, boxes)
    out.sum().backward()  # torchvision's gradient
    assert features['0'].grad is not None
    with torch.no_grad():
        assert torch.allclose(pool.eval()(features, boxes), out, atol=1e-5)
