import numpy as np
import pytest
import torch

from cellrcnn.errors import CellRCNNError
from cellrcnn.model import to_tensor
from cellrcnn.samples import Augmenter, TileDataset, read_image, rescanned, visible_boxes


def dark_squares_image(size=96):
    image = np.full((size, size, 3), 230, np.uint8)
    boxes = np.array([[10, 20, 22, 30], [50, 5, 70, 21], [60, 60, 75, 90]], np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 40
    return image, boxes


def mask_boxes(image, boxes, threshold=128):
    """For each box, the bounding box of the dark pixels inside it (one square per box)."""
    found = []
    for x1, y1, x2, y2 in np.round(boxes).astype(int):
        ys, xs = np.nonzero(image[y1:y2, x1:x2].mean(axis=2) < threshold)
        found.append([x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1])
    return np.array(found, np.float32)


@pytest.mark.parametrize('seed', range(8))
def test_flips_and_rotations_move_boxes_with_the_pixels(seed):
    image, boxes = dark_squares_image()
    augment = Augmenter(96, scale_jitter=0, stain_sigma=None)
    out, out_boxes = augment(image, boxes, np.random.default_rng(seed))
    assert len(out_boxes) == 3
    np.testing.assert_array_equal(mask_boxes(out, out_boxes), out_boxes)


def test_scale_jitter_and_stain_jitter_keep_boxes_on_the_objects(rng):
    image, boxes = dark_squares_image(128)
    augment = Augmenter(96, scale_jitter=0.2, stain_sigma=(0.2, 0.1))
    for _ in range(5):
        out, out_boxes = augment(image, boxes, rng)
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8
        assert len(out_boxes) >= 1
        found = mask_boxes(out, out_boxes, threshold=out.mean() * 0.6)
        np.testing.assert_allclose(found, out_boxes, atol=1.5)


def test_stain_jitter_changes_colour_but_is_reproducible():
    image, boxes = dark_squares_image()
    augment = Augmenter(96, scale_jitter=0, stain_sigma=(0.3, 0.2), flips=False)
    a, _ = augment(image, boxes, np.random.default_rng(5))
    b, _ = augment(image, boxes, np.random.default_rng(5))
    c, _ = augment(image, boxes, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def edge_strength(image):
    return np.abs(np.diff(image.astype(float).mean(axis=2), axis=1)).max()


def test_focus_augmentation_blurs_a_share_of_the_crops_and_keeps_the_boxes():
    image, boxes = dark_squares_image()
    sharp = Augmenter(96, scale_jitter=0, stain_sigma=None, flips=False)
    never = Augmenter(96, scale_jitter=0, stain_sigma=None, flips=False, blur=(0, 4))
    always = Augmenter(96, scale_jitter=0, stain_sigma=None, flips=False, blur=(1, 4))
    half = Augmenter(96, scale_jitter=0, stain_sigma=None, flips=False, blur=(0.5, 4))
    a, a_boxes = sharp(image, boxes, np.random.default_rng(1))
    b, b_boxes = never(image, boxes, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)  # share 0 draws nothing: runs without it are as before
    blurred = [always(image, boxes, np.random.default_rng(seed)) for seed in range(20)]
    for out, out_boxes in blurred:
        np.testing.assert_array_equal(out_boxes, a_boxes)
    strengths = [edge_strength(out) for out, _ in blurred]
    assert np.median(strengths) < edge_strength(a) / 2 and np.ptp(strengths) > 20  # sigmas drawn, not one
    changed = [not np.array_equal(half(image, boxes, np.random.default_rng(seed))[0], a) for seed in range(200)]
    assert 0.4 < np.mean(changed) < 0.6


def test_rescanned_blurs_by_sigma_and_stores_as_jpeg():
    image, _ = dark_squares_image()
    jpeg = rescanned(image, 0, 90)
    assert jpeg.dtype == np.uint8 and jpeg.shape == image.shape
    assert 0 < np.abs(jpeg.astype(int) - image).mean() < 2
    assert edge_strength(rescanned(image, 3, 90)) < edge_strength(rescanned(image, 1, 90)) < edge_strength(jpeg)


def test_visible_boxes_drops_boxes_mostly_outside():
    boxes = np.array([[-4, 0, 6, 10], [-8, 0, 2, 10], [5, 5, 15, 15], [20, 20, 30, 30]], np.float32)
    clipped, kept = visible_boxes(boxes, 16, 16)
    assert kept.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(clipped[kept], [[0, 0, 6, 10], [5, 5, 15, 15]])


def test_dataset_yields_model_inputs(rng):
    image, boxes = dark_squares_image()
    dataset = TileDataset([(image, boxes)], Augmenter(64, stain_sigma=None), seed=3)
    tensor, target = dataset[0]
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32 and tensor.max() <= 1
    assert target['boxes'].shape[1] == 4 and (target['labels'] == 1).all()


def test_bad_images_are_refused(tmp_path):
    import cv2
    gray = tmp_path / 'gray.png'
    cv2.imwrite(str(gray), np.zeros((32, 32), np.uint8))
    text = tmp_path / 'notes.png'
    text.write_text('hello')
    for path, message in [(tmp_path / 'missing.png', 'not found'), (text, 'cannot read image'),
                          (gray, 'not an 8-bit RGB image')]:
        with pytest.raises(CellRCNNError, match=message):
            read_image(str(path))
    with pytest.raises(CellRCNNError, match='expected an RGB image'):
        to_tensor(np.zeros((8, 8), np.uint8))


def test_a_read_only_or_strided_image_is_the_same_model_input_without_a_warning(recwarn):
    """A tile straight from a reader's buffer may be read-only, and a flipped view is strided: torch would warn of
    (or refuse) wrapping such memory, so the model's input is made from a copy, with the same values."""
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    read_only = image.copy()
    read_only.flags.writeable = False
    assert torch.equal(to_tensor(read_only), to_tensor(image))
    assert torch.equal(to_tensor(image[:, ::-1]), to_tensor(image[:, ::-1].copy()))
    assert to_tensor(image).shape == (3, 16, 24) and not [w for w in recwarn if w.category is UserWarning]
