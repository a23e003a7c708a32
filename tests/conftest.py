import copy
import inspect
import json

import numpy as np
import pytest

#: markers given by the fixtures a test uses (directly or through other fixtures); registered in pyproject.toml
FIXTURE_MARKERS = {'girder_session': 'girder', 'dsa': 'dsa', 'browser': 'browser'}


def pytest_collection_modifyitems(items):
    """Mark each test by the real servers it needs, so ``-m "not dsa"`` runs everything but the Docker-backed DSA."""
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, 'fixturenames', ()):
                item.add_marker(marker)


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
                                                  threshold=0.0)), half=True)
    return path


@pytest.fixture(scope='session')
def typed_checkpoint(tiny_checkpoint, tmp_path_factory):
    """``tiny_checkpoint`` with a cell-type classifier (lymphocyte, tumour, stromal) of seeded random weights, built
    as ``cellrcnn train --init ... --cell-types`` builds one."""
    import torch

    from cellrcnn.checkpoint import load_checkpoint, save_checkpoint, stored_config
    from cellrcnn.train import TrainConfig, initial_model

    torch.manual_seed(0)
    cfg = TrainConfig(cell_types=('lymphocyte', 'tumour', 'stromal'),
                      cell_type_colors=('#0000ff', '#ff0000', '#00ff00'))
    model = initial_model(stored_config(load_checkpoint(tiny_checkpoint)), cfg, init=tiny_checkpoint)
    path = tmp_path_factory.mktemp('model') / 'typed.pt'
    save_checkpoint(path, model, half=True)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope='session')
def synthetic_slide(tmp_path_factory):
    """``synthetic_slide(width, height, seed, **kwargs)``: ``(path, boxes)`` of a :func:`cellrcnn.synthetic.write_slide`
    slide (``slide.tiff``, in a folder of its own; boxes read-only), written once per session for each set of
    arguments: modules asking for the same slide share one file. Write nothing next to it."""
    from cellrcnn.synthetic import write_slide

    signature = inspect.signature(write_slide)
    made = {}

    def make(width, height, seed, **kwargs):
        bound = signature.bind(None, width, height, seed, **kwargs)
        bound.apply_defaults()
        key = tuple(sorted((k, v) for k, v in bound.arguments.items() if k != 'path'))
        if key not in made:
            path = tmp_path_factory.mktemp('slide') / 'slide.tiff'
            boxes = write_slide(str(path), width, height, seed, **kwargs)
            boxes.setflags(write=False)
            made[key] = path, boxes
        return made[key]

    return make


@pytest.fixture(scope='module')
def slide20x(synthetic_slide):
    """A 20x (0.5 um/px) synthetic slide, 2048 x 1536, tiles of 512, and its nucleus boxes."""
    path, boxes = synthetic_slide(2048, 1536, seed=4, mpp=0.5, tile_size=512)
    return str(path), boxes


@pytest.fixture(scope='session')
def girder_session(tmp_path_factory):
    """One real Girder with the DSA plugins (cellrcnn.devstack.local_girder.GirderServer) for the whole test session.

    Skipped only when its virtualenv, an optional install (``./install.sh --with-girder``), is missing. Its celery
    broker and result store are kombu's in-process memory (tests/test_plugin_folders.py: slicer_cli_web queues jobs
    that no worker takes). Modules use :func:`server`, not this."""
    from cellrcnn.devstack.local_girder import GirderServer, girder_python

    python, why_not = girder_python()
    if python is None:
        pytest.skip(why_not)
    with pytest.MonkeyPatch.context() as env:  # set while the server starts: it reads them then
        env.setenv('GIRDER_WORKER_BROKER', 'memory://')
        env.setenv('GIRDER_WORKER_BACKEND', 'cache+memory://')
        girder = GirderServer(python, root=str(tmp_path_factory.mktemp('girder'))).__enter__()
    try:
        yield girder
    finally:
        girder.__exit__(None, None, None)


@pytest.fixture(scope='module')
def server(girder_session, request):
    """The session's Girder as one test module sees it: the same server, admin and token, but ``collection_id`` and
    ``folder_id`` (where ``upload_slide`` and ``upload_as_dsa`` put files) are a private collection named after the
    module and its folder ``cohort``, so that no module lists another's items. A shallow copy: never stop it."""
    view = copy.copy(girder_session)
    gc = girder_session.client()
    view.collection_id = gc.createCollection(request.module.__name__, public=False)['_id']
    view.folder_id = gc.createFolder(view.collection_id, 'cohort', parentType='collection')['_id']
    return view


@pytest.fixture
def slide(server, slide_file, request):
    """A fresh large-image item of the module's ``slide_file`` on its :func:`server`: (item id, file id). For the
    test_girder_*.py modules; several other modules define a ``slide`` of their own."""
    return server.upload_slide(slide_file, name=f'{request.node.name[:40]}.tiff')


@pytest.fixture(scope='session')
def dsa(tmp_path_factory):
    """The whole DSA on this machine (cellrcnn.devstack.local_dsa.DSAStack): Girder with the DSA plugins and
    HistomicsUI's web
    client, Redis, a real girder_worker and a Docker engine holding the task image, with the image registered through
    slicer_cli_web (``dsa.tasks``: task name -> task item id). Nothing here is a stand-in, so a machine that cannot
    start it fails these tests (``./install.sh --with-dsa`` sets it up) instead of skipping them."""
    from cellrcnn.devstack.local_dsa import DSAStack
    from cellrcnn.devstack.local_girder import girder_python
    from cellrcnn.errors import CellRCNNError

    python, why_not = girder_python()
    if python is None:
        pytest.fail(f'the DSA tests need the Girder virtualenv: {why_not}')
    stack = DSAStack(python, root=str(tmp_path_factory.mktemp('dsa')))
    try:
        stack.start()
        stack.tasks = stack.register_task_image()
    except (CellRCNNError, RuntimeError) as exc:
        stack.stop()
        pytest.fail(f'the local DSA did not start: {exc}')
    try:
        yield stack
    finally:
        stack.stop()


# --------------------------------------------------------------------------- the Girder plugin's modules
# (test_plugin_*.py; helpers in plugin_support.py). Session-scoped where Girder holds one of a kind: one user named
# "reader", one "Tasks" collection (a second module making them again would be refused).


@pytest.fixture(scope='session')
def slide_file(synthetic_slide):
    """The plugin modules' slide. test_cli.py and the test_girder_*.py modules name slides of their own."""
    return synthetic_slide(512, 384, seed=5)[0]


@pytest.fixture(scope='session')
def result_files(slide_file, tmp_path_factory):
    """The bundled model's real outputs for the slide: {'annotation': nuclei file, 'density': density file}."""
    from cellrcnn.job import detect_to_files, output_paths
    from cellrcnn.settings import DetectionSettings

    paths = output_paths(str(tmp_path_factory.mktemp('result')), 'slide')
    paths = {key: paths[key] for key in ('annotation', 'density')}
    detect_to_files(str(slide_file), paths, DetectionSettings(device='cpu', tile_size=256, progress='none'))
    return paths


@pytest.fixture(scope='module')
def nuclei_doc(result_files):
    from cellrcnn.annotation import read_annotation_file
    from plugin_support import DEFAULT_MODEL

    doc = read_annotation_file(result_files['annotation'])
    assert doc['attributes']['model'] == DEFAULT_MODEL and len(doc['elements']) > 10
    return doc


@pytest.fixture(scope='session')
def worker_api_url(girder_session):
    """The worker.api_url setting an administrator sets: folder-wide detection needs it, and never sets it."""
    from plugin_support import set_setting

    set_setting(girder_session, 'worker.api_url', girder_session.api_url)
    return girder_session.api_url


@pytest.fixture(scope='session')
def cli_id(girder_session, worker_api_url):
    from plugin_support import register_cell_detection

    return register_cell_detection(girder_session)


@pytest.fixture(scope='session')
def reader(girder_session):
    """A second user, not an administrator: (id, token)."""
    gc = girder_session.client()
    user = gc.post('user', {'login': 'reader', 'email': 'reader@example.org', 'firstName': 'Re', 'lastName': 'Ader',
                            'password': 'reader-password'})
    client = girder_session.client(token='')
    client.authenticate('reader', 'reader-password')
    return user['_id'], client.token


# --------------------------------------------------------------------------- cellrcnn.labels' modules
# (test_labels_*.py; helpers in labels_support.py)


@pytest.fixture(scope='module')
def brca():
    """(images folder, points.json as loaded, name of one image with nuclei of all three classes)."""
    from labels_support import SHARED

    if SHARED is None:
        pytest.skip('no shared data')
    folder = SHARED / 'brca-m2c'
    points = json.loads((folder / 'points.json').read_text())
    name = next(n for n in sorted(points) if len({row[2] for row in points[n]}) == 3)
    return folder / 'images', points, name


@pytest.fixture(scope='module')
def dsb():
    """(images folder, masks folder, boxes.json as loaded)."""
    from labels_support import SHARED

    if SHARED is None:
        pytest.skip('no shared data')
    folder = SHARED / 'dsb2018-he'
    return folder / 'images', folder / 'masks', json.loads((folder / 'boxes.json').read_text())
