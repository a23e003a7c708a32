"""The whole Digital Slide Archive loop on this machine: what runs tasks, added to ``local_girder``'s server.

:class:`DSAStack` is a :class:`~cellrcnn.devstack.local_girder.GirderServer` (SecantusDB, Girder with the DSA
plugins and its
built web client, so HistomicsUI opens in a browser) plus a Redis broker, a real girder_worker and a Docker engine of
its own; everything listens on loopback and is stopped by its own process id. slicer_cli_web runs tasks only in
Docker containers, so this is the smallest stack on which "Cell detection" runs as it does in a DSA.

- ``cellrcnn dsa build`` (``./install.sh --with-dsa`` runs it) makes the images the stack runs: the task image from
  the checkout's ``Dockerfile`` on a Debian base made with mmdebstrap (Docker Hub cannot be reached here), and the
  ``busybox:latest`` girder_worker cleans its temporary volumes with.
- ``cellrcnn dsa up`` starts the stack, registers the task image through slicer_cli_web's own
  ``PUT /slicer_cli_web/docker_image``, uploads the bundled sample slide, prints where HistomicsUI shows it and waits;
  Ctrl-C stops everything. The tests (``tests/test_dsa.py``) start the same stack.

The Docker engine is started so that it leaves the host's network alone: no bridge, no NAT rules, no IP forwarding.
Task containers run without a network (``GIRDER_WORKER_DOCKER_RUN_OPTIONS``: ``network_mode`` ``none``): girder_worker
downloads their inputs and uploads their outputs, so a task reaches neither Girder, nor the broker, nor anything else
(the task's ``post_to_girder`` option, which needs Girder, fails in one line there). Its images and state are kept
in :func:`dsa_home` between runs.

The broker runs code: girder_worker decodes every message with jsonpickle (its ``girder_io`` serializer is kombu's
decoder for ``application/json``), which builds any Python object a message names, as pickle does, and the tasks
girder_worker sends need it (their arguments are such objects). So Redis has a password of its own for each stack,
new and random (``requirepass`` in a 0600 configuration file in the stack's 0700 root), which Girder and the worker
get in their environment (``GIRDER_WORKER_BROKER``) and Girder's ``worker.broker`` setting (administrators only);
it is on no command line.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import time

from ..errors import CellRCNNError, one_line
from . import CHECKOUT
from .local_girder import ADMIN, GirderServer, free_port, girder_python, stop_processes, wait_for, write_private

HOME_VAR = 'CELLRCNN_DSA_HOME'
TASK_IMAGE = 'cellrcnn:latest'
#: a Debian base with Python, made here from Debian packages, standing in for the Dockerfile's python:3.11-slim
BASE_IMAGE = 'cellrcnn-base:bookworm'
BASE_PACKAGES = 'python3,python3-venv,python3-dev,ca-certificates'
#: what girder_worker runs ``chmod`` in when it cleans up a job's temporary volume
BUSYBOX_IMAGE = 'busybox:latest'
CA_BUNDLE = '/etc/ssl/certs/ca-certificates.crt'
SETUP = './install.sh --with-dsa'
#: free disk (GB) a build of the task image needs under the engine's data root: its install layer (torch's CUDA
#: wheels downloaded and unpacked) peaks above the image it leaves (docs/deploy.md gives the measured sizes)
BUILD_DISK_GB = 13
#: the job statuses of girder_jobs
JOB_SUCCESS, JOB_ERROR, JOB_CANCELED = 3, 4, 5


def dsa_home():
    """Where the stack keeps its Docker engine's images and state: $CELLRCNN_DSA_HOME, else ~/.cache/cellrcnn/dsa."""
    return os.environ.get(HOME_VAR) or os.path.join(os.path.expanduser('~'), '.cache', 'cellrcnn', 'dsa')


def docker_cli():
    """Debian's docker CLI (docker.io: the classic builder with BuildKit, which the Dockerfile's build secret
    needs), else the first ``docker`` on PATH."""
    return '/usr/bin/docker' if os.access('/usr/bin/docker', os.X_OK) else shutil.which('docker')


def check_free_disk(path, need_gb, what):
    """Refuse, in one line, to start ``what`` with less than ``need_gb`` GB free on ``path``'s file system."""
    free = shutil.disk_usage(path).free / 1e9
    if free < need_gb:
        raise CellRCNNError(f'{what} needs about {need_gb} GB free under {path}, and {free:.1f} GB are: free some '
                            f'space, or point {HOME_VAR} at a larger disk')


def _last_line(path):
    """The last line with text in a log file."""
    with open(path, errors='replace') as f:
        return one_line(' '.join([line for line in f.read().splitlines() if line.strip()][-1:]))


class DockerEngine:
    """A ``dockerd`` of the stack's own, on a socket in ``home``, started without touching the host's network.

    ``with DockerEngine(home) as engine:`` ``engine.host`` is its ``DOCKER_HOST``; ``engine.docker(*args)`` runs the
    docker CLI against it."""

    def __init__(self, home):
        self.home = home
        self.socket = os.path.join(home, 'docker.sock')
        self.host = f'unix://{self.socket}'
        self.proc = None

    def docker(self, *args, timeout=120, check=True, **kwargs):
        """``docker ARGS`` against this engine: the CompletedProcess (text); one line on failure when ``check``."""
        run = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, 'DOCKER_HOST': self.host}, **kwargs)
        if check and run.returncode:
            raise CellRCNNError(f'docker {args[0]} failed: {one_line(run.stderr or run.stdout)}')
        return run

    def has_image(self, name):
        return self.docker('image', 'inspect', name, check=False).returncode == 0

    def start(self, timeout=60):
        dockerd = shutil.which('dockerd')
        if not dockerd or not docker_cli():
            raise CellRCNNError(f'no Docker engine on this machine (dockerd and docker): run {SETUP}')
        os.makedirs(self.home, exist_ok=True)
        log = open(os.path.join(self.home, 'dockerd.log'), 'ab')
        self.proc = subprocess.Popen(
            [dockerd, '--data-root', os.path.join(self.home, 'docker'), '--exec-root', os.path.join(self.home, 'exec'),
             '-H', self.host, '--pidfile', os.path.join(self.home, 'docker.pid'),
             # leave the host's network alone: no docker0 bridge, no NAT or filter rules, no IP forwarding
             '--bridge=none', '--iptables=false', '--ip-forward=false', '--ip-masq=false'],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while self.docker('version', check=False, timeout=10).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = os.path.join(self.home, 'dockerd.log')
                raise CellRCNNError(f'the Docker engine did not start: {_last_line(log)} (log: {log}; it needs root)')
            time.sleep(0.5)
        return self

    def stop(self):
        if self.proc is not None:
            stop_processes([self.proc], 60)  # dockerd stops its containers first (15 s each at most)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_images(engine, log=print):
    """Make what the stack runs, on a running ``engine``: the Debian base and busybox when missing, then the task
    image from the checkout's Dockerfile (Docker's layer cache makes an unchanged rebuild quick)."""
    if not engine.has_image(BASE_IMAGE):
        log(f'making {BASE_IMAGE} from Debian packages (mmdebstrap)')
        if not shutil.which('mmdebstrap'):
            raise CellRCNNError(f'mmdebstrap is missing: run {SETUP}')
        tar = os.path.join(engine.home, 'base.tar')
        run = subprocess.run(['mmdebstrap', '--mode=root', '--variant=minbase', f'--include={BASE_PACKAGES}',
                              'bookworm', tar], capture_output=True, text=True)
        if run.returncode:
            raise CellRCNNError(f'mmdebstrap failed: {one_line(run.stderr[-2000:])}')
        engine.docker('import', tar, BASE_IMAGE, timeout=600)
        os.remove(tar)
    if not engine.has_image(BUSYBOX_IMAGE):
        log(f'making {BUSYBOX_IMAGE} from Debian\'s busybox-static')
        tar = _busybox_tar(engine.home)
        engine.docker('import', tar, BUSYBOX_IMAGE)
        os.remove(tar)
    # build cache no image uses (an earlier build's, or one cut short) is space the build below may need
    prune = engine.docker('builder', 'prune', '--force', check=False, timeout=600)
    if prune.returncode:
        log(f'could not prune the build cache: {one_line(prune.stderr)}')
    check_free_disk(engine.home, BUILD_DISK_GB, f'building {TASK_IMAGE}')
    log(f'building {TASK_IMAGE} from {CHECKOUT}/Dockerfile (log: {engine.home}/build.log)')
    argv = [docker_cli(), 'build', '--network', 'host', '--build-arg', f'BASE_IMAGE={BASE_IMAGE}', '-t', TASK_IMAGE]
    if os.path.exists(CA_BUNDLE):  # pip inside the build trusts what this machine trusts (a site's own CA)
        argv += ['--secret', f'id=ca_bundle,src={CA_BUNDLE}']
    started = time.monotonic()
    log_path = os.path.join(engine.home, 'build.log')
    with open(log_path, 'w') as out:
        run = subprocess.run(argv + [CHECKOUT], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, 'DOCKER_HOST': engine.host, 'DOCKER_BUILDKIT': '1'})
    if run.returncode:
        raise CellRCNNError(f'building {TASK_IMAGE} failed: {_last_line(log_path)} (log: {log_path})')
    engine.docker('image', 'prune', '--force')  # the image this build replaced
    size = int(engine.docker('image', 'inspect', TASK_IMAGE, '--format', '{{.Size}}').stdout)
    log(f'{TASK_IMAGE}: {size / 1e9:.2f} GB, built in {time.monotonic() - started:.0f} s')


def _busybox_tar(home):
    """A root file system of Debian's static busybox with its applet links (chmod, sh, ...)."""
    busybox = shutil.which('busybox')
    if not busybox:
        raise CellRCNNError(f'busybox is missing: run {SETUP}')
    applets = subprocess.run([busybox, '--list'], capture_output=True, text=True, check=True).stdout.split()
    path = os.path.join(home, 'busybox.tar')
    with tarfile.open(path, 'w') as tar:
        tar.add(busybox, 'bin/busybox')
        for name in applets:
            if name != 'busybox':
                link = tarfile.TarInfo(f'bin/{name}')
                link.type, link.linkname = tarfile.SYMTYPE, 'busybox'
                tar.addfile(link)
    return path


class DSAStack(GirderServer):
    """``with DSAStack(python) as dsa:`` a running DSA that runs tasks: the Girder server of ``GirderServer`` (same
    helpers), Redis, girder_worker and a Docker engine holding the task image.

    ``dsa.register_task_image()`` registers the image as an administrator does; ``dsa.run_task(...)`` submits a task
    the way HistomicsUI does and ``dsa.wait_for_job(...)`` waits for its end. ``dsa.broker_url``: Redis's address
    with its password."""

    def __init__(self, python, home=None, root=None):
        super().__init__(python, root)
        self.engine = DockerEngine(home or dsa_home())
        self.broker_password = secrets.token_urlsafe(24)
        self.broker_url = None

    def start(self, timeout=60):
        static = os.path.join(os.path.dirname(self.bindir), 'share', 'girder', 'static', 'built')
        if not os.path.isdir(static):
            raise CellRCNNError(f'the Girder web client (HistomicsUI) is not built: run {SETUP}')
        if not shutil.which('redis-server'):
            raise CellRCNNError(f'redis-server is missing: run {SETUP}')
        self.engine.start()
        for image in (TASK_IMAGE, BUSYBOX_IMAGE):
            if not self.engine.has_image(image):
                raise CellRCNNError(f'the Docker engine has no {image}: run {SETUP} (or cellrcnn dsa build)')
        redis_port = free_port()
        config = write_private(os.path.join(self.root, 'redis.conf'), (
            f'port {redis_port}\nbind 127.0.0.1\nsave ""\nappendonly no\nrequirepass {self.broker_password}\n'))
        self._spawn('redis', ['redis-server', config])
        self.broker_url = broker = f'redis://:{self.broker_password}@127.0.0.1:{redis_port}/0'
        # Girder (queueing, cancelling, registering images) and the worker (running containers) both read these
        self.env.update(GIRDER_WORKER_BROKER=broker, GIRDER_WORKER_BACKEND=broker, DOCKER_HOST=self.engine.host)
        super().start(timeout)
        gc = self.client()
        for key, value in (('worker.broker', broker), ('worker.backend', broker), ('worker.api_url', self.api_url)):
            gc.put('system/setting', {'key': key, 'value': value})
        worker = self._spawn('worker', [os.path.join(self.bindir, 'girder-worker'), '-l', 'info', '--concurrency', '1'],
                             # celery runs no worker as root unless told to; task containers get no network
                             C_FORCE_ROOT='1', GIRDER_WORKER_DOCKER_RUN_OPTIONS=json.dumps({'network_mode': 'none'}))
        if not self._wait(worker, lambda: ' ready.' in self.log_tail('worker', 100000), timeout, 'girder_worker'):
            raise RuntimeError(f'girder_worker stopped:\n{self.log_tail("worker")}')
        return self

    def stop(self):
        super().stop()
        self.engine.stop()

    def register_task_image(self, image=TASK_IMAGE, timeout=300):
        """Register ``image``'s tasks as an administrator does, through ``PUT /slicer_cli_web/docker_image``, into
        the public collection Tasks: ``{task name: task item id}``."""
        gc = self.client()
        tasks = next((c for c in gc.listCollection() if c['name'] == 'Tasks'), None) or \
            gc.createCollection('Tasks', public=True)
        folder = gc.createFolder(tasks['_id'], 'Slicer CLI Web Tasks', parentType='collection', public=True,
                                 reuseExisting=True)
        job = gc.put('slicer_cli_web/docker_image', {'name': json.dumps([image]), 'folder': folder['_id']})
        job = self.wait_for_job(job['_id'], timeout)
        if job['status'] != JOB_SUCCESS:
            raise CellRCNNError(f'registering {image} failed: {one_line(job.get("log") or "")}')
        return {cli['name']: cli['_id'] for cli in gc.get('slicer_cli_web/cli') if cli.get('image') == image}

    def run_task(self, cli_id, params, token=None):
        """Submit a task as HistomicsUI's analysis panel does (``POST /slicer_cli_web/cli/{id}/run``): its job."""
        return self.client(token).post(f'slicer_cli_web/cli/{cli_id}/run', params)

    def wait_for_job(self, job_id, timeout):
        """The job once it has ended (succeeded, failed or cancelled)."""
        gc = self.client()
        return wait_for(lambda: (lambda job: job if job['status'] in (JOB_SUCCESS, JOB_ERROR, JOB_CANCELED)
                                 else None)(gc.get(f'job/{job_id}')), timeout, f'job {job_id}', pause=0.5)


def cell_detection_params(file_id, folder_id, stem, **options):
    """The parameters HistomicsUI's panel posts for CellDetection on the slide file ``file_id``: the nuclei, map,
    pixelmap (with its label image), density and tissue outline outputs into ``folder_id``, named after ``stem``;
    ``options``: other parameters (``analysis_roi``, ...)."""
    outputs = {'outputCellAnnotationFile': '.anot', 'outputNucleiMapAnnotationFile': '.anot',
               'outputNucleiPixelmapAnnotationFile': '.anot', 'outputNucleiLabelImage': '.tiff',
               'outputDensityAnnotationFile': '.anot', 'outputTissueAnnotationFile': '.anot'}
    params = {'inputImageFile': file_id}
    for name, extension in outputs.items():
        params.update({name: f'{stem}-{name}{extension}', f'{name}_folder': folder_id})
    return {**params, **options}


def stack_up(slide_path, run_task=False, log=print):
    """``cellrcnn dsa up``: start the stack, register the task image, upload ``slide_path``; with ``run_task``
    run CellDetection on it through the worker and stop, else wait for Ctrl-C."""
    python, why = girder_python()
    if python is None:
        raise CellRCNNError(f'cannot start a local DSA: {why}')
    dsa = DSAStack(python)
    try:
        started = time.monotonic()
        try:
            dsa.start()
        except RuntimeError as exc:
            raise CellRCNNError(f'local DSA: {one_line(exc)}') from None
        tasks = dsa.register_task_image()
        item_id, file_id = dsa.upload_slide(slide_path)
        log(f'local DSA up in {time.monotonic() - started:.0f} s; {TASK_IMAGE} registered ({", ".join(sorted(tasks))})')
        if run_task:
            stem = os.path.splitext(os.path.basename(slide_path))[0]
            began = time.monotonic()
            job = dsa.wait_for_job(dsa.run_task(tasks['CellDetection'], cell_detection_params(
                file_id, dsa.folder_id, stem))['_id'], 1800)
            seconds = time.monotonic() - began
            if job['status'] != JOB_SUCCESS:
                raise CellRCNNError(f'the CellDetection job did not succeed: {one_line(job.get("log") or "")}')
            wait_for(lambda: len(dsa.annotations(item_id)) >= 3, 120, 'the annotations to be ingested')
            for doc in dsa.annotation_documents(item_id):
                log(f'annotation {doc["name"]!r}: {len(doc["elements"])} elements')
            log(f'CellDetection ran through girder_worker in Docker: job {job["_id"]} took {seconds:.1f} s from '
                'submission to its end')
            return
        log(f'HistomicsUI: http://127.0.0.1:{dsa.port}/histomics#?image={item_id} (user {ADMIN["login"]}, password '
            f'{dsa.password}: made for this run and shown only here); Analyses -> cellrcnn -> latest -> CellDetection. '
            'Ctrl-C stops the stack')
        # Ctrl-C, or a SIGTERM (a service manager, kill), stops the stack, even when started in the background
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log('stopping the local DSA')
    finally:
        dsa.stop()


def build(log=print):
    """``cellrcnn dsa build``: start the stack's Docker engine, make its images, stop it."""
    with DockerEngine(dsa_home()) as engine:
        build_images(engine, log)
