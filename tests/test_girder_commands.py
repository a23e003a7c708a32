"""cellrcnn's commands against a real Girder with the Digital Slide Archive's plugins: the CellDetection task run as
slicer_cli_web runs it (its outputs ingested by HistomicsUI, or posted directly), ``cellrcnn detect`` posting to Girder
and running the whole DSA loop on a local Girder (``--local-girder``), and that local Girder's own passwords.

Set up as tests/test_girder_posting.py says: the session's server, this module's items in a collection of its own.
"""

import json
import os
import re
import subprocess
import sys

import girder_client
import pytest

from cellrcnn.command_line import build_parser
from cellrcnn.commands import girder_poster
from cellrcnn.devstack.local_girder import girder_python, wait_for
from cellrcnn.errors import CellRCNNError
from girder_support import cellrcnn_annotations, nuclei, saved

PYTHON, WHY_NOT = girder_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT or '')

CLI_DIR = os.path.join(os.path.dirname(__file__), '..', 'cli')


@pytest.fixture(scope='module')
def slide_file(synthetic_slide):
    return synthetic_slide(640, 480, seed=21)[0]


def entrypoint(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'slicer_cli_web.cli_list_entrypoint', 'CellDetection', *args],
                          cwd=CLI_DIR, capture_output=True, text=True, timeout=300, env=env)


def task_args(slide_file, tmp_path, tiny_checkpoint, server, *extra):
    return (str(slide_file), str(tmp_path / 'nuclei.anot'), '--outputDensityAnnotationFile',
            str(tmp_path / 'density.anot'), '--model_file', str(tiny_checkpoint), '--analysis_tile_size', '256',
            '--device', 'cpu', '--api-url', server.api_url, '--girder-token', server.token, *extra)


def test_an_uploaded_slide_becomes_a_large_image(server, slide):
    item_id, file_id = slide
    tiles = server.client().get(f'item/{item_id}/tiles')
    assert (tiles['sizeX'], tiles['sizeY']) == (640, 480)
    assert server.client().getItem(item_id)['largeImage']['fileId'] == file_id


def test_the_task_output_is_ingested_by_histomicsui(server, slide, slide_file, tiny_checkpoint, tmp_path):
    """The normal DSA flow: slicer_cli_web runs the task, uploads its output files with its reference, and
    HistomicsUI turns each *AnnotationFile into an annotation on the slide."""
    item_id, file_id = slide
    run = entrypoint(*task_args(slide_file, tmp_path, tiny_checkpoint, server))
    assert run.returncode == 0, run.stderr
    docs = {}
    for output, identifier in (('nuclei.anot', 'outputCellAnnotationFile'),
                               ('density.anot', 'outputDensityAnnotationFile')):
        docs[identifier] = json.loads((tmp_path / output).read_text())
        server.upload_as_dsa(tmp_path / output, item_id, file_id, identifier)
    found = wait_for(lambda: len(cellrcnn_annotations(server, item_id)) == 2 and cellrcnn_annotations(server, item_id),
                     30, 'HistomicsUI to ingest the task outputs')
    by_name = {a['annotation']['name']: a for a in found}
    nuclei_doc, density_doc = docs['outputCellAnnotationFile'], docs['outputDensityAnnotationFile']
    assert set(by_name) == {nuclei_doc['name'], density_doc['name']}
    stored = server.client().get(f'annotation/{by_name[nuclei_doc["name"]]["_id"]}')
    assert len(nuclei_doc['elements']) > 0
    assert by_name[nuclei_doc['name']]['_elementCount'] == len(stored['annotation']['elements']) == \
        len(nuclei_doc['elements'])
    assert stored['annotation']['attributes']['model'] == 'tiny.pt'
    assert {e['type'] for e in stored['annotation']['elements']} == {'rectangle'}
    heat = server.client().get(f'annotation/{by_name[density_doc["name"]]["_id"]}')
    assert heat['annotation']['elements'][0]['type'] == 'griddata'


def test_the_task_posts_directly_and_replaces_the_previous_result(server, slide, slide_file, tiny_checkpoint,
                                                                  tmp_path):
    item_id, file_id = slide
    gc = server.client()
    older = gc.post('annotation', {'itemId': item_id}, json=nuclei(5, model='tiny.pt'))['_id']
    other_model = gc.post('annotation', {'itemId': item_id}, json=nuclei(4, model='other.pt'))['_id']
    by_hand = gc.post('annotation', {'itemId': item_id}, json={'name': 'drawn by a person', 'elements': []})['_id']
    run = entrypoint(*task_args(slide_file, tmp_path, tiny_checkpoint, server, '--post_to_girder', 'true',
                                '--girder_slide', file_id,  # HistomicsUI fills in the open slide's file
                                '--outputNucleiPixelmapAnnotationFile', str(tmp_path / 'pixelmap.anot'),
                                '--outputNucleiLabelImage', str(tmp_path / 'labels.tiff')))
    assert run.returncode == 0, run.stderr
    detections = int(run.stdout.split(' nuclei in ')[0].split()[-1])
    assert f"posted 'cellrcnn nuclei' ({detections} elements) to item {item_id}" in run.stdout
    # the post is a stage of the job's progress of its own, after the detection's
    posting = run.stdout[run.stdout.index(f"<filter-comment>posting annotation 'cellrcnn nuclei' ({detections} "
                                          "elements)</filter-comment>"):]
    assert '<filter-progress>1.000</filter-progress>' in posting and '<filter-end>' in posting
    annotations = {a['_id']: a for a in server.annotations(item_id)}
    assert older not in annotations and {other_model, by_hand} <= set(annotations)
    mine = [a for a in annotations.values() if a['annotation'].get('attributes', {}).get('model') == 'tiny.pt']
    assert sorted(a['annotation']['name'] for a in mine) == ['cellrcnn nuclei', 'cellrcnn nuclei density']
    posted = next(a for a in mine if a['annotation']['name'] == 'cellrcnn nuclei')
    assert posted['_elementCount'] == detections > 0
    # The DSA then uploads the outputs, now empty lists: HistomicsUI adds nothing a second time.
    assert (tmp_path / 'nuclei.anot').read_text() == '[]' == (tmp_path / 'density.anot').read_text()
    # a direct post makes no pixelmap: its output is an empty list, and no label image is left to upload
    assert (tmp_path / 'pixelmap.anot').read_text() == '[]' and not (tmp_path / 'labels.tiff').exists()
    assert not list(tmp_path.glob('*.posted.json'))  # the posted files were removed once on the slide
    for output, identifier in (('nuclei.anot', 'outputCellAnnotationFile'),
                               ('density.anot', 'outputDensityAnnotationFile')):
        server.upload_as_dsa(tmp_path / output, item_id, file_id, identifier)
    # Girder hands uploads to HistomicsUI's ingest one at a time, in order (one events thread): once a marker
    # uploaded after them has landed, the two empty outputs have been ingested.
    marker = tmp_path / 'marker.anot'
    marker.write_text(json.dumps({'name': 'ingest marker', 'elements': []}))
    server.upload_as_dsa(marker, item_id, file_id, 'markerAnnotationFile')
    landed = wait_for(lambda: [a['_id'] for a in server.annotations(item_id)
                               if a['annotation']['name'] == 'ingest marker'], 30, 'the marker to be ingested')
    assert sorted(a['_id'] for a in server.annotations(item_id)) == sorted([other_model, by_hand, *landed] +
                                                                           [a['_id'] for a in mine])


def test_the_task_checks_the_token_before_detecting(server, slide, slide_file, tiny_checkpoint, tmp_path):
    item_id, _ = slide
    args = list(task_args(slide_file, tmp_path, tiny_checkpoint, server, '--post_to_girder', 'true',
                          '--girder_slide', item_id))
    args[args.index('--girder-token') + 1] = 'expired' * 8
    run = entrypoint(*args)
    assert run.returncode == 2
    assert run.stderr.strip() == (f'CellDetection: error: Girder at {server.api_url} does not accept the token '
                                  '(invalid or expired): get a new token (or API key) and post again')
    assert not (tmp_path / 'nuclei.anot').exists()  # nothing was computed


def test_the_detect_command_hook(server, slide, tmp_path, monkeypatch):
    item_id, file_id = slide
    monkeypatch.setenv('GIRDER_TOKEN', server.token)
    parser = build_parser()

    def poster(*options):
        return girder_poster(parser.parse_args(['detect', '-o', str(tmp_path), *options]))

    assert poster() is None
    with pytest.raises(CellRCNNError, match='needs both --girder-url and --item'):
        poster('--item', item_id)
    with pytest.raises(CellRCNNError, match='^no item'):  # checked before any detection
        poster('--girder-url', server.api_url, '--item', '1' * 24)
    post = poster('--girder-url', server.api_url, '--item', file_id)
    paths = dict(zip(['annotation', 'density'], saved(tmp_path, nuclei(12), nuclei(3, name='density'))))
    lines = post({**paths, 'csv': None})
    assert lines[0].startswith(f"posted 'cellrcnn nuclei' (12 elements) to item {item_id} as annotation ")
    assert sorted(a['_elementCount'] for a in cellrcnn_annotations(server, item_id)) == [3, 12]


def run_detect(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', *args, '--progress', 'none'],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '2', **(env or {})})


def test_the_main_job_runs_the_whole_dsa_loop_on_a_local_girder(slide_file, tmp_path):
    """README's `cellrcnn detect --local-girder`: its own server, the slide uploaded, detected, posted, read back."""
    run = run_detect(str(slide_file), '--local-girder', '-o', str(tmp_path))
    assert run.returncode == 0, run.stderr
    found = len(json.load(open(tmp_path / 'slide.anot.json'))['elements'])
    assert found > 0
    assert re.search(r"^local DSA at http://127\.0\.0\.1:\d+/api/v1: slide\.tiff uploaded as item \w{24}$",
                     run.stdout, re.M)
    assert re.search(rf"^read back from Girder: annotation 'cellrcnn nuclei' on item \w{{24}} with {found} "
                     'rectangle elements$', run.stdout, re.M)
    assert re.search(r"^read back from Girder: annotation 'cellrcnn nuclei density' .* 1 griddata elements$",
                     run.stdout, re.M)


def test_the_local_girder_loop_explains_what_is_missing(slide_file, tmp_path):
    run = run_detect(str(slide_file), '--local-girder', '-o', str(tmp_path),
                     env={'CELLRCNN_GIRDER_PYTHON': str(tmp_path / 'no-venv' / 'bin' / 'python')})
    assert run.returncode == 2
    assert run.stderr.startswith('cellrcnn: error: cannot start a local Girder: CELLRCNN_GIRDER_PYTHON=')
    assert 'Traceback' not in run.stderr and not os.path.exists(tmp_path / 'slide.anot.json')
    run = run_detect(str(slide_file), '--local-girder', '--item', 'x', '-o', str(tmp_path))
    assert run.returncode == 2 and run.stderr.strip() == ('cellrcnn: error: --local-girder starts its own server: '
                                                          'leave out --girder-url and --item')
    run = run_detect(str(slide_file), '--local-girder', '--pixelmap', '-o', str(tmp_path))
    assert run.returncode == 2 and run.stderr.strip() == (
        'cellrcnn: error: --pixelmap is written to files only: the CellDetection task posts a pixelmap to the DSA; '
        'leave it out when posting to Girder')
    damaged = tmp_path / 'damaged.svs'
    damaged.write_bytes(b'not a slide')
    run = run_detect(str(damaged), '--local-girder', '-o', str(tmp_path))  # refused before any server starts
    assert run.returncode == 2 and run.stderr.strip() == (f'cellrcnn: error: cannot open slide {damaged}: not a '
                                                          'whole-slide image large_image can read (unknown format, '
                                                          'truncated or damaged)')


def test_a_token_on_the_command_line_is_warned_about_and_a_token_file_is_not(server, slide, tmp_path):
    item_id, _ = slide
    token_file = tmp_path / 'token'
    token_file.write_text(server.token + '\n')
    common = ['--girder-url', server.api_url, '--item', '1' * 24, '-o', str(tmp_path / 'out')]
    env = {k: v for k, v in os.environ.items() if k != 'GIRDER_TOKEN'}
    shown = subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', *common, '--girder-token', server.token],
                           capture_output=True, text=True, timeout=300, env=env)
    hidden = subprocess.run([sys.executable, '-m', 'cellrcnn', 'detect', *common, '--girder-token-file',
                             str(token_file)], capture_output=True, text=True, timeout=300, env=env)
    warning = 'cellrcnn detect: warning: a token given with --girder-token is visible to every user of this machine'
    assert warning in shown.stderr and warning not in hidden.stderr
    for run in (shown, hidden):  # both tokens were taken: the server answered about the (missing) item
        assert run.returncode == 2 and f'no item {"1" * 24} on Girder' in run.stderr, run.stderr


def test_a_local_girder_has_a_new_random_admin_password(server, tmp_path):
    from cellrcnn.devstack.local_girder import ADMIN, GirderServer

    assert len(server.password) >= 24 and GirderServer(sys.executable, root=str(tmp_path)).password != server.password
    with pytest.raises(girder_client.AuthenticationError):
        girder_client.GirderClient(apiUrl=server.api_url).authenticate(ADMIN['login'], 'admin-password')
    girder_client.GirderClient(apiUrl=server.api_url).authenticate(ADMIN['login'], server.password)


NO_PASSWORD = '''
import json, os, sys
import pymongo
from pymongo.errors import OperationFailure

port, answers = sys.argv[1], {}
for who, uri in (('no password', f'mongodb://127.0.0.1:{port}/'),
                 ('a wrong password', f'mongodb://girder:wrong@127.0.0.1:{port}/?authSource=admin'),
                 ('the stack', os.environ['GIRDER_MONGO_URI'])):
    for collection in ('user', 'token'):
        try:
            found = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)['girder'][collection].find_one()
            answers[f'{who} reads {collection}'] = 'a document' if found else 'nothing'
        except OperationFailure as exc:
            answers[f'{who} reads {collection}'] = f'refused ({exc.code})'
print(json.dumps(answers))
'''


def test_a_local_girders_database_needs_its_own_password(server):
    """Any user of the machine can reach the database's loopback port: without the stack's password (random, in a
    0600 file in the 0700 root and in its processes' environment, on no command line) they read nothing, neither
    users nor tokens; Girder, which has it, works."""
    env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, 'GIRDER_MONGO_URI': server.db_uri}
    run = subprocess.run([PYTHON, '-c', NO_PASSWORD, str(server.db_port)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == {
        'no password reads user': 'refused (13)', 'no password reads token': 'refused (13)',
        'a wrong password reads user': 'refused (18)', 'a wrong password reads token': 'refused (18)',
        'the stack reads user': 'a document', 'the stack reads token': 'a document'}
    assert server.client().get('user/me')['login'] == 'admin'
    password_file = os.path.join(server.root, 'database.password')
    assert open(password_file).read() == server.db_password and len(server.db_password) >= 24
    assert (os.stat(password_file).st_mode & 0o777, os.stat(server.root).st_mode & 0o777) == (0o600, 0o700)
    for proc in server.procs:
        with open(f'/proc/{proc.pid}/cmdline', 'rb') as f:
            assert server.db_password.encode() not in f.read()


def test_the_task_counts_inside_the_slides_annotation_of_a_name(server, slide_file, tiny_checkpoint, tmp_path):
    """``--region_annotation tumour``: the task reads the slide's annotations named 'tumour' from Girder (the slide
    given as HistomicsUI gives it, its file's id) and counts inside the areas they outline; the result records the
    name, for the plugin's folder runs. What cannot be read is one line."""
    from cellrcnn.annotation import read_annotation_file
    from cellrcnn.region import inside

    item_id, file_id = server.upload_slide(slide_file, name='regions.tiff')
    quad = [[40, 40, 0], [400, 80, 0], [360, 400, 0], [60, 360, 0]]
    server.client().post('annotation', {'itemId': item_id}, json={'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': quad}, {'type': 'point', 'center': [600, 20, 0]}]})
    run = entrypoint(*task_args(slide_file, tmp_path, tiny_checkpoint, server, '--region_annotation', 'tumour',
                                '--girder_slide', file_id))
    assert run.returncode == 0, run.stderr
    doc = read_annotation_file(tmp_path / 'nuclei.anot')
    params = doc['attributes']['params']
    assert params['region_annotation'] == 'tumour' and params['polygons'] == [[p[:2] for p in quad]]
    assert params['roi'] == [40, 40, 360, 360]
    centres = [((e['center'][0]), e['center'][1]) for e in doc['elements']]
    assert len(centres) > 10 and inside(params['polygons'], *zip(*centres)).all()

    # given the polygons too (a folder run of the plugin reads them), the task reads nothing from Girder
    points = ','.join(str(v) for p in quad + quad[:1] for v in p[:2])
    (tmp_path / 'given').mkdir()
    run = entrypoint(*task_args(slide_file, tmp_path / 'given', tiny_checkpoint, server, '--region_annotation',
                                'tumour', '--analysis_roi', points, '--girder-token', ''))
    assert run.returncode == 0, run.stderr
    given = read_annotation_file(tmp_path / 'given' / 'nuclei.anot')
    assert given['attributes']['params'] == params and len(given['elements']) == len(doc['elements'])

    for extra, message in ((('--region_annotation', 'stroma', '--girder_slide', item_id),
                            "no annotation named 'stroma' on the slide"),
                           (('--region_annotation', 'tumour', '--girder_slide', item_id, '--analysis_roi',
                             '0,0,100,100'), 'a region annotation outlines polygons, not a rectangle'),
                           (('--region_annotation', 'tumour'), 'region_annotation is read from Girder: it needs')):
        run = entrypoint(*task_args(slide_file, tmp_path / 'bad', tiny_checkpoint, server, *extra))
        assert run.returncode == 2 and run.stderr.strip().startswith(f'CellDetection: error: {message}'), run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_cellrcnn_detect_counts_inside_the_items_region_annotation(server, slide_file, tiny_checkpoint, tmp_path):
    """``cellrcnn detect SLIDE --girder-url --item ITEM --region-annotation tumour``: the region is read from the
    item the results go to, and the posted result records its name."""
    from cellrcnn.region import inside

    item_id, _ = server.upload_slide(slide_file, name='detect-region.tiff')
    quad = [[60, 60, 0], [420, 90, 0], [380, 420, 0], [70, 380, 0]]
    server.client().post('annotation', {'itemId': item_id}, json={'name': 'tumour', 'elements': [
        {'type': 'polyline', 'closed': True, 'points': quad}]})
    run = run_detect(str(slide_file), '-o', str(tmp_path), '--model', str(tiny_checkpoint), '--tile-size', '256',
                     '--device', 'cpu', '--girder-url', server.api_url, '--item', item_id, '--region-annotation',
                     'tumour', env={'GIRDER_TOKEN': server.token})
    assert run.returncode == 0, run.stderr
    (posted,) = [a for a in cellrcnn_annotations(server, item_id)
                 if a['annotation']['name'] == 'cellrcnn nuclei inside tumour']
    doc = server.client().get(f'annotation/{posted["_id"]}')['annotation']
    assert doc['attributes']['params']['region_annotation'] == 'tumour'
    centres = [e['center'][:2] for e in doc['elements']]
    assert len(centres) > 10 and inside([[p[:2] for p in quad]], *zip(*centres)).all()
