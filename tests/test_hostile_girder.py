"""cellrcnn's Girder client against a hostile server: a small HTTP server on loopback (``http.server`` in a thread)
that answers the Girder REST calls the client makes with crafted ids and names. The real ``cellrcnn`` command talks
to it over real HTTP; nothing the server says may make the client write, read or delete a file outside the run's
own folder, and the token never goes to another machine over plain ``http://`` unless asked.
"""

import contextlib
import io
import json
import os
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cellrcnn.__main__ import main

ITEM, FILE, FOLDER, SUB = 'a' * 24, 'b' * 24, 'c' * 24, 'd' * 24


class HostileGirder:
    """A Girder look-alike: ``items`` (its answer to ``GET item``, any folder), ``folders`` (to ``GET folder``,
    for the top folder; none below) and ``data`` (the bytes of every file). Every request is kept in ``requests``
    as ``(method, path, Girder-Token header)``."""

    def __init__(self, host='127.0.0.1', items=(), folders=(), data=b''):
        self.items, self.folders, self.data, self.requests = list(items), list(folders), data, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body, kind='application/json'):
                body = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header('Content-Type', kind)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                path = url.path.removeprefix('/api/v1/')
                owner.requests.append(('GET', path, self.headers.get('Girder-Token')))
                if path == 'user/me':
                    return self.answer(200, {'_id': 'e' * 24, 'login': 'mallory'})
                if path == 'item':
                    return self.answer(200, owner.items)
                if path == 'folder':
                    return self.answer(200, owner.folders if query.get('parentId') == FOLDER else [])
                if path.startswith('folder/'):
                    return self.answer(200, {'_id': path.split('/')[1], 'name': 'top'})
                if path.startswith('file/') and path.endswith('/download'):
                    return self.answer(200, owner.data, 'application/octet-stream')
                if path.startswith('file/'):
                    return self.answer(200, {'_id': path.split('/')[1], 'size': len(owner.data), 'name': 'x.tiff',
                                             'created': '2024-01-01T00:00:00+00:00'})
                return self.answer(404, {'message': 'not here', 'type': 'rest'})

            def do_POST(self):
                owner.requests.append(('POST', self.path, self.headers.get('Girder-Token')))
                self.answer(404, {'message': 'not here', 'type': 'rest'})

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, host='127.0.0.1'):
        return f'http://{host}:{self.port}/api/v1'

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def image_item(item_id=ITEM, name='slide.tiff', file_id=FILE):
    return {'_id': item_id, 'name': name, 'largeImage': {'fileId': file_id}}


def cellrcnn(*args):
    """``cellrcnn ARGS`` here, with the token in the environment: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, args)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv('GIRDER_TOKEN', 'secret-token')


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder) for f in files)


def test_ids_that_are_paths_are_refused_before_anything_is_written(tmp_path):
    """A server answering an item id that is a local folder (and a file id, a folder id, that are not ids) is
    refused in one line: before the fix the download landed in that folder, as ``.bash_profile`` would."""
    victim = tmp_path / 'home'
    victim.mkdir()
    cases = [[image_item(item_id=str(victim), name='.bash_profile')], [image_item(file_id='../../etc/passwd')]]
    for items in cases:
        with HostileGirder(items=items, data=b'echo owned\n') as server:
            code, _, err = cellrcnn('batch', '-o', tmp_path / 'out', '--girder-url', server.url(),
                                    '--folder', FOLDER, '--device', 'cpu')
        assert code == 2 and err.count('\n') == 1 and 'which is not a Girder id' in err, err
        assert not any(path.endswith('/download') for _, path, _ in server.requests)
    with HostileGirder(items=[image_item()], folders=[{'_id': '/tmp', 'name': 'x'}]) as server:
        code, _, err = cellrcnn('train-girder', '-o', tmp_path / 'train', '--girder-url', server.url(),
                                '--folder', FOLDER, '--annotation-name', 'nuclei', '--device', 'cpu')
    assert code == 2 and "answered a folder id '/tmp', which is not a Girder id" in err, err
    assert files_under(victim) == []


def test_names_stay_inside_the_runs_cache_and_links_planted_there_are_refused(tmp_path, synthetic_slide):
    """Item and folder names that are paths (``../../x``) become one safe name inside ``OUT/.girder-cache``: the
    download lands there, is analysed, and its results kept when the post fails. A link planted at an item's cache
    folder (a shared output folder) is refused and nothing is written where it points."""
    data = open(synthetic_slide(320, 256, seed=5)[0], 'rb').read()
    out, victim = tmp_path / 'out', tmp_path / 'victim'
    victim.mkdir()
    items = [image_item(name='../../../escaped.tiff')]
    with HostileGirder(items=items, folders=[{'_id': SUB, 'name': '../..'}], data=data) as server:
        code, _, err = cellrcnn('batch', '-o', out, '--girder-url', server.url(), '--folder', FOLDER,
                                '--device', 'cpu', '--tile-size', '256')
    assert code == 2 and err.count('\n') == 1, err  # the server lists the item in both folders, takes no annotation
    assert (out / 'cohort.csv').read_text().count('but posting them failed') == 2
    assert sorted(os.listdir(tmp_path)) == ['out', 'victim']
    cached = files_under(out / '.girder-cache')
    assert len(cached) == 1 and cached[0].startswith(ITEM + '/') and cached[0].endswith('/.._.._.._escaped.tiff')
    results = files_under(out / 'slides')
    for folder in (f'.._.._.._escaped-{ITEM}', f'.._../.._.._.._escaped-{ITEM}'):
        assert f'{folder}/.._.._.._escaped.anot.json' in results

    planted = tmp_path / 'shared'
    (planted / '.girder-cache').mkdir(parents=True)
    (planted / '.girder-cache' / ITEM).symlink_to(victim, target_is_directory=True)
    with HostileGirder(items=[image_item()], data=data) as server:
        code, _, err = cellrcnn('batch', '-o', planted, '--girder-url', server.url(), '--folder', FOLDER,
                                '--device', 'cpu')
    assert code == 2
    table = (planted / 'cohort.csv').read_text()
    assert 'refusing to download Girder file' in table and 'a link is on the way' in table
    assert files_under(victim) == []


def non_loopback_address():
    """An address of this machine other than loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(('10.255.255.255', 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith('127.') else address


def test_plain_http_to_another_machine_is_refused_before_the_token_is_sent(tmp_path, synthetic_slide):
    address = non_loopback_address()
    if address is None:
        pytest.skip('this machine has no address other than loopback')
    slide = synthetic_slide(320, 256, seed=6)[0]
    with HostileGirder(host='0.0.0.0', items=[image_item(item_id='not an id')]) as server:
        url = server.url(address)
        commands = [('batch', '-o', tmp_path / 'b', '--folder', FOLDER),
                    ('detect', slide, '-o', tmp_path / 'd', '--item', ITEM),
                    ('train-girder', '-o', tmp_path / 't', '--folder', FOLDER, '--annotation-name', 'nuclei')]
        for command in commands:
            code, _, err = cellrcnn(*command, '--girder-url', url, '--device', 'cpu')
            assert code == 2 and err.count('\n') == 1 and 'plain http://' in err and '--insecure-http' in err, err
        assert server.requests == []
        code, _, err = cellrcnn(*commands[0], '--girder-url', url, '--device', 'cpu', '--insecure-http')
        assert code == 2 and 'not a Girder id' in err  # asked for: the client talks to it (and refuses its ids)
        assert server.requests and server.requests[0][2] == 'secret-token'
