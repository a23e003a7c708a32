import numpy as np
import pytest


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    """A small, untrained model saved the way `cellrcnn train` saves one."""
    import torch

    from cellrcnn.checkpoint import save_checkpoint
    from cellrcnn.config import ModelConfig
    from cellrcnn.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('model') / 'tiny.pt'
    save_checkpoint(path, build_model(ModelConfig(backbone_width=0.25, fpn_channels=16, box_head_channels=32,
                                                  detect_thresh=0.0)), half=True)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
