import numpy as np
import torch

from cellrcnn.checkpoint import load_checkpoint, load_model
from cellrcnn.config import ModelConfig
from cellrcnn.synthetic import make_dataset
from cellrcnn.train import TrainConfig, lr_factor, train

TINY = ModelConfig(backbone_width=0.25, fpn_channels=32, box_head_channels=64)


def test_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] < 0.02


def test_a_tiny_training_run_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    samples = make_dataset(7, 6, size=128)
    cfg = TrainConfig(steps=60, batch_size=2, lr=3e-3, warmup_steps=4, tile_size=128, workers=0, checkpoint_every=30)
    model, losses = train(TINY, cfg, tmp_path, device='cpu', samples=samples)
    assert len(losses) == 60
    # The RPN's objectness loss falls steadily; the box head's losses first rise as proposals turn positive.
    objectness = [step['loss_objectness'] for step in losses]
    assert np.mean(objectness[-10:]) < 0.5 * np.mean(objectness[:10])
    assert load_model(tmp_path / 'model.pt').config == model.config


def test_training_resumes_where_it_stopped(tmp_path):
    samples = make_dataset(8, 4, size=128)
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=1, tile_size=128, workers=0, checkpoint_every=2)
    train(TINY, cfg, tmp_path, device='cpu', samples=samples)
    assert load_checkpoint(tmp_path / 'last.pt')['train_state']['step'] == 4
    _, losses = train(TINY, TrainConfig(**{**cfg.__dict__, 'steps': 6}), tmp_path, device='cpu',
                      resume=tmp_path / 'last.pt', samples=samples)
    assert len(losses) == 2  # only the missing steps ran
    assert load_checkpoint(tmp_path / 'last.pt')['train_state']['step'] == 6


def test_precise_bn_gives_the_statistics_of_clean_tiles():
    from cellrcnn.model import to_tensor
    from cellrcnn.model import build_model
    from cellrcnn.train import precise_bn

    model = build_model(TINY)
    bn1 = model.backbone.body.bn1
    bn1.running_mean.fill_(5.0)  # stale statistics, as augmented batches leave them
    samples = make_dataset(3, 8, size=64)
    precise_bn(model, samples, 64, 'cpu', count=8, batch_size=4)
    assert not model.training
    with torch.no_grad():
        x = model.transform([to_tensor(image) for image, _ in samples])[0].tensors
        expected = model.backbone.body.conv1(x).mean((0, 2, 3))
    torch.testing.assert_close(bn1.running_mean, expected, rtol=1e-3, atol=1e-4)
    assert bn1.momentum == 0.1  # restored
