"""A throwaway Digital Slide Archive server on this machine: SecantusDB (MongoDB-compatible, in memory) and ``girder
serve`` with the DSA plugins (large_image, large_image_annotation, slicer_cli_web, histomicsui, and cellrcnn's own),
on free loopback ports, torn down with everything they wrote. Used by ``cellrcnn detect --local-girder``, the tests
and the benchmarks.

Loopback ports are open to every user of the machine, so each server has passwords of its own, new and random: the
Girder administrator's, and the database's (SecantusDB requires authentication from its first moment:
``secantusd_auth.py``). The database password is kept in a 0600 file in the server's 0700 root and in the
environment of the server's processes (``GIRDER_MONGO_URI``), never on a command line.

The DSA's Girder runs without torch, in a virtualenv of its own: ``CELLRCNN_GIRDER_PYTHON`` (its ``bin/python``),
else the checkout's ``.venv-girder`` that ``./install.sh --with-girder`` makes; see :data:`GIRDER_PIP` (PLUGIN: the
checkout's ``plugin/``, cellrcnn's own Girder plugin). The client side (girder_client, cellrcnn) runs in the test
interpreter.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from . import CHECKOUT

ENV_VAR = 'CELLRCNN_GIRDER_PYTHON'
GIRDER_PIP = ("'girder>=3.2.18,<5' girder-client 'girder-large-image==1.35.6' 'girder-large-image-annotation==1.35.6' "
              "'histomicsui==1.8.1' 'girder-slicer-cli-web==1.5.14' 'large-image[tiff,tifffile,pil]' "
              "'secantusdb==0.7.0b3' 'girder-worker[girder]<5' redis -e PLUGIN")
PLUGIN_DIR = os.path.join(CHECKOUT, 'plugin')
#: runs SecantusDB with authentication and Girder's database user (run by the server virtualenv's python)
SECANTUS_AUTH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'secantusd_auth.py')
#: the database user Girder connects as (a password of its own for each server: ``GirderServer.db_password``)
DB_USER = 'girder'
#: the administrator of a local server; its password is new and random for each server (``GirderServer.password``):
#: the server listens on loopback, where any user of this machine could otherwise log in as admin and, through a
#: filesystem assetstore, read what the caller may read
ADMIN = {'login': 'admin', 'email': 'admin@example.org', 'firstName': 'Ada', 'lastName': 'Admin'}


REPO_VENV = os.path.join(CHECKOUT, '.venv-girder', 'bin', 'python')


def girder_python():
    """(path of the server virtualenv's python, None) or (None, why the server cannot run). The python is
    $CELLRCNN_GIRDER_PYTHON, else the checkout's .venv-girder (``./install.sh --with-girder``) when it exists."""
    python = os.environ.get(ENV_VAR) or (os.path.normpath(REPO_VENV) if os.path.exists(REPO_VENV) else None)
    how = (f'run ./install.sh --with-girder, or set {ENV_VAR} to the python of a virtualenv with: '
           f'pip install {GIRDER_PIP.replace("PLUGIN", PLUGIN_DIR)}')
    if not python:
        return None, f'no .venv-girder and {ENV_VAR} is not set; {how}'
    bindir = os.path.dirname(python)
    missing = [name for name in ('python', 'girder', 'secantusd-py') if not os.access(os.path.join(bindir, name),
                                                                                        os.X_OK)]
    if not os.access(python, os.X_OK) or missing:
        return None, f'{ENV_VAR}={python}: no {", ".join(missing) or "python"} in {bindir}; {how}'
    return python, None


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(('127.0.0.1', port)) == 0


class GirderServer:
    """``with GirderServer(python) as server:`` a running server with an admin, a filesystem assetstore and a folder.

    ``server.api_url``, ``server.token`` (the admin's), ``server.client()`` (an authenticated girder_client),
    ``server.folder_id``, ``server.upload_slide(path)``; ``server.db_uri``: the database's address with its user
    and password (what ``GIRDER_MONGO_URI`` holds for the server's processes). Its files live in ``root`` (made
    0700)."""

    def __init__(self, python, root=None):
        self.python = python
        self.bindir = os.path.dirname(python)
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix='cellrcnn-girder-')
        os.chmod(self.root, 0o700)  # its passwords, logs, assetstore and scratch files are the caller's alone
        self.procs = []
        self.api_url = self.token = self.folder_id = self.user_id = None
        self.password = secrets.token_urlsafe(24)
        self.db_password = secrets.token_urlsafe(24)
        #: environment variables every process of the server gets
        self.env = {}

    # ------------------------------------------------------------------ processes
    def _spawn(self, name, argv, **env):
        """Start ``argv`` in a session of its own, its output in ROOT/NAME.log; ``env``: variables of its own."""
        log = open(os.path.join(self.root, f'{name}.log'), 'wb')
        # HOME and TMPDIR inside root: Girder's logs (~/.girder) and SecantusDB's scratch directory go there too.
        env = {**os.environ, 'HOME': os.path.join(self.root, 'home'), 'TMPDIR': os.path.join(self.root, 'tmp'),
               'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **self.env, **env}
        env.pop('PYTHONPATH', None)
        os.makedirs(env['HOME'], exist_ok=True)
        os.makedirs(env['TMPDIR'], exist_ok=True)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=self.root, start_new_session=True)
        log.close()
        proc.log_name = name
        self.procs.append(proc)
        return proc

    def log_tail(self, name='girder', chars=3000):
        try:
            with open(os.path.join(self.root, f'{name}.log'), errors='replace') as f:
                return f.read()[-chars:]
        except OSError:
            return ''

    def _wait(self, proc, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False  # exited: e.g. the port was taken after all
            if ready():
                return True
            time.sleep(0.1)
        raise RuntimeError(f'{what} did not start in {timeout} s:\n{self.log_tail(proc.log_name)}')

    def start(self, timeout=60):
        import requests

        password_file = write_private(os.path.join(self.root, 'database.password'), self.db_password)
        for _ in range(3):  # a free port can be taken between choosing and binding it
            self.db_port = free_port()
            db = self._spawn('secantus', [self.python, SECANTUS_AUTH, str(self.db_port), DB_USER,
                                          password_file])
            if self._wait(db, lambda: _port_open(self.db_port), timeout, 'SecantusDB'):
                break
            self.procs.remove(db)
        else:
            raise RuntimeError(f'SecantusDB would not start:\n{self.log_tail("secantus")}')
        # SecantusDB stores annotation elements (9 indexes each) at about 1-2 thousand a second here: more than
        # Girder's default 60 s socket time-out for one insert of 50 000 (a 100 000-element ingest).
        self.db_uri = (f'mongodb://{DB_USER}:{self.db_password}@127.0.0.1:{self.db_port}/girder?authSource=admin'
                       '&socketTimeoutMS=900000')
        self.env['GIRDER_MONGO_URI'] = self.db_uri  # girder serve's --database would put it on the command line
        for _ in range(3):
            self.port = free_port()
            self.api_url = f'http://127.0.0.1:{self.port}/api/v1'

            def up():
                try:
                    return requests.get(self.api_url + '/system/version', timeout=2).ok
                except requests.RequestException:
                    return False

            girder = self._spawn('girder', [os.path.join(self.bindir, 'girder'), 'serve', '--mode', 'production',
                                            '-H', '127.0.0.1', '-p', str(self.port)])
            if self._wait(girder, up, timeout, 'Girder'):
                break
            self.procs.remove(girder)
        else:
            raise RuntimeError(f'Girder would not start:\n{self.log_tail("girder")}')
        self._populate()
        return self

    def _populate(self):
        import girder_client

        gc = girder_client.GirderClient(apiUrl=self.api_url)
        gc.post('user', {**ADMIN, 'password': self.password})  # the first user is an administrator
        gc.authenticate(ADMIN['login'], self.password)
        self.token = gc.token
        self.user_id = gc.get('user/me')['_id']
        assetstore = os.path.join(self.root, 'assetstore')
        os.makedirs(assetstore, exist_ok=True)
        gc.post('assetstore', {'type': 0, 'name': 'files', 'root': assetstore})
        collection = gc.createCollection('slides', public=False)
        self.folder_id = gc.createFolder(collection['_id'], 'cohort', parentType='collection')['_id']
        self.collection_id = collection['_id']

    def stop(self):
        stop_processes(reversed(self.procs), 10)
        self.procs = []
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ helpers
    def client(self, token=None):
        import girder_client

        gc = girder_client.GirderClient(apiUrl=self.api_url)
        gc.setToken(self.token if token is None else token)
        return gc

    def upload_slide(self, path, name=None, timeout=60, folder_id=None):
        """Upload an image into the folder (or ``folder_id``); wait until large_image has made its item a large
        image. :returns: (item id, file id)."""
        gc = self.client()
        file = gc.uploadFileToFolder(folder_id or self.folder_id, os.fspath(path), filename=name)
        wait_for(lambda: _tiles(gc, file['itemId']), timeout, f'large image item for {path}')
        return file['itemId'], file['_id']

    def annotations(self, item_id):
        return self.client().get('annotation', {'itemId': item_id, 'limit': 0})

    def annotation_documents(self, item_id):
        """The whole documents (with their elements) of the item's annotations."""
        gc = self.client()
        return [gc.get(f'annotation/{summary["_id"]}')['annotation'] for summary in self.annotations(item_id)]

    def upload_as_dsa(self, path, item_id, file_id, identifier):
        """Upload a task's output file the way slicer_cli_web does (into the output folder, with the job's
        reference naming the output parameter and the input image), which makes HistomicsUI ingest it."""
        reference = {'slicer_cli_web': {'title': 'Cell detection', 'image': 'cellrcnn:test', 'name': 'CellDetection'},
                     'userId': self.user_id, 'fileId': file_id, 'itemId': item_id, 'uuid': 'job-uuid',
                     'identifier': identifier}
        return self.client().uploadFileToFolder(self.folder_id, os.fspath(path), reference=json.dumps(reference))


def write_private(path, text):
    """Write ``text`` into a new file ``path`` only this user may read or write (0600; made anew, never through
    something planted at its name). :returns: ``path``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, 'w', encoding='utf-8') as f:
        f.write(text)
    return path


def stop_processes(procs, timeout):
    """SIGTERM the process groups the ``procs`` lead, all at once; SIGKILL each one still running ``timeout``
    seconds later."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def _tiles(gc, item_id):
    import girder_client

    try:
        return gc.get(f'item/{item_id}/tiles')
    except girder_client.HttpError:
        return None


def wait_for(condition, timeout, what, pause=0.1):
    """Poll ``condition()`` until it answers something truthy; that answer. :raises TimeoutError: after ``timeout``
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


def detect_on_local_girder(slide_path, run, keep=False, log=print):
    """The whole DSA loop on this machine, for ``cellrcnn detect --local-girder``: start a throwaway DSA, upload the
    slide, call ``run(api_url, token, item_id)`` (a detection that posts its annotations to that item), read every
    annotation on the item back through REST, and stop the server (with ``keep``, only on Ctrl-C)."""
    import requests
    from girder_client import HttpError

    from ..errors import CellRCNNError, one_line

    python, why = girder_python()
    if python is None:
        raise CellRCNNError(f'cannot start a local Girder: {why}')
    server = GirderServer(python)
    try:
        try:
            server.start()
        except RuntimeError as exc:
            raise CellRCNNError(f'local Girder: {one_line(exc)}') from None
        try:
            item_id, _ = server.upload_slide(slide_path)
        except TimeoutError:
            raise CellRCNNError(f'the local Girder did not make {slide_path} a large image: large_image on the '
                                'server cannot read it') from None
        except (HttpError, requests.RequestException, OSError) as exc:
            raise CellRCNNError(f'cannot upload {slide_path} to the local Girder: {one_line(exc)}') from None
        log(f'local DSA at {server.api_url}: {os.path.basename(slide_path)} uploaded as item {item_id}')
        run(server.api_url, server.token, item_id)
        try:
            for doc in server.annotation_documents(item_id):
                kinds = sorted({el['type'] for el in doc['elements']})
                log(f'read back from Girder: annotation {doc["name"]!r} on item {item_id} with '
                    f'{len(doc["elements"])} {"/".join(kinds) or "no"} elements')
        except (HttpError, requests.RequestException) as exc:
            raise CellRCNNError(f'reading the annotations back from the local Girder failed ({one_line(exc)}); '
                                'the results are in the output folder') from None
        if keep:
            log(f'Girder stays up at {server.api_url} (user {ADMIN["login"]}, password {server.password}: made for '
                'this run and shown only here); Ctrl-C stops it')
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                log('stopping the local Girder')
    finally:
        server.stop()
