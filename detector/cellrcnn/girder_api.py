"""Talking to a Girder / Digital Slide Archive server: one connection type with time-outs, retries and one-line
errors, and the few calls the project makes (folders of slides, downloads, uploads).

- Connection errors, time-outs, HTTP 429 and 5xx are retried with exponential back-off (``Retry-After`` is
  honoured); a retried create first checks whether the lost attempt landed, so a retry never duplicates.
  4xx answers are never retried.
- Every failure is one :class:`CellRCNNError` line (naming local files that are kept, when there are any).
- What a server answers is not trusted with local paths: ids must be Girder ObjectIds (:func:`object_id`), names
  become one safe path component (:func:`safe_name`), and a download lands only inside the folder the caller gives
  it (:func:`download_file`). Plain ``http://`` to a host other than this machine is refused unless asked for
  (:func:`check_transport`): the token would travel in clear.

Posting annotations is :mod:`cellrcnn.girder_post`; training from annotations is :mod:`cellrcnn.girder_training`.
"""

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import time
import urllib.parse

from .errors import CellRCNNError
from .files import atomic_write

#: a Girder id: a MongoDB ObjectId in hex
OBJECT_ID = re.compile(r'[0-9a-f]{24}')
#: what a server-given name may not hold in a local file name: path separators and control characters
_UNSAFE = re.compile(r'[/\\\x00-\x1f\x7f]')


def object_id(value, what, api_url):
    """``value`` when it is a Girder id (24 hex digits), else a one-line CellRCNNError: an id a server answers
    becomes part of local paths and of later requests."""
    if isinstance(value, str) and OBJECT_ID.fullmatch(value):
        return value
    raise CellRCNNError(f'Girder at {api_url} answered {what} {str(value)[:100]!r}, which is not a Girder id '
                        '(24 hex digits); refusing to use that server')


def safe_name(name):
    """A name a server gave (an item's, a folder's) as one path component: path separators and control characters
    become ``_``, and an empty name, ``.`` or ``..`` becomes ``_``."""
    name = _UNSAFE.sub('_', str(name)).strip()
    return '_' if name in ('', '.', '..') else name


def check_transport(api_url, insecure_http=False):
    """Refuse (one line) a plain ``http://`` URL to a host other than this machine's loopback, unless
    ``insecure_http``: the token and the slides would travel in clear, readable and changeable on the way."""
    parts = urllib.parse.urlsplit(str(api_url or ''))
    if parts.scheme != 'http' or insecure_http:
        return
    host = parts.hostname or ''
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == 'localhost'
    if not loopback:
        raise CellRCNNError(f'{api_url} is plain http:// to another machine: the Girder token would travel in clear; '
                            'use https://, or give --insecure-http if the network between is trusted')


def _transient(status):
    return status == 429 or 500 <= status < 600


def server_message(exc):
    """``HTTP status: message`` of a girder_client HttpError, for one-line errors."""
    try:
        message = json.loads(exc.responseText).get('message')
    except (ValueError, AttributeError, TypeError):
        message = None
    text = message or (exc.responseText or '').strip().replace('\n', ' ')[:200] or 'no message'
    return f'HTTP {exc.status}: {text}'


def _retry_after(response):
    try:
        return min(float(response.headers.get('Retry-After')), 60.0)
    except (AttributeError, TypeError, ValueError):
        return None


def timeout_session(timeout):
    import requests

    class Session(requests.Session):
        def request(self, *args, **kwargs):
            kwargs.setdefault('timeout', timeout)
            return super().request(*args, **kwargs)

    return Session()


class GirderConnection:
    """A girder_client.GirderClient with time-outs, retries and one-line errors that name the kept files."""

    def __init__(self, api_url, token, retries, backoff, timeout, saved):
        import girder_client

        if not api_url or not str(api_url).startswith(('http://', 'https://')):
            raise CellRCNNError(f'the Girder API URL must start with http:// or https:// (got {api_url!r}); '
                                f'e.g. https://dsa.example.org/api/v1{self._kept(saved)}')
        self.api_url = str(api_url).rstrip('/')
        self.gc = girder_client.GirderClient(apiUrl=self.api_url)
        self.gc.setToken(token or '')
        self.token = token
        self.retries, self.backoff, self.timeout = max(0, int(retries)), float(backoff), timeout
        self.saved = [os.fspath(p) for p in saved or () if p]

    @staticmethod
    def _kept(saved):
        saved = [os.fspath(p) for p in saved or () if p]
        return f'; the annotations are kept in {", ".join(saved)}' if saved else ''

    def fail(self, message):
        return CellRCNNError(message + self._kept(self.saved))

    def http_error(self, exc, what, item_id=None):
        status, detail = exc.status, server_message(exc)
        if status == 401:
            return self.fail(f'Girder at {self.api_url} refused the token while {what} ({detail}): it is invalid or '
                             'expired; get a new token (or API key) and post again')
        if status == 403:
            return self.fail(f'Girder at {self.api_url} denied access while {what} ({detail}): the token is '
                             f'expired, or its user may not add annotations to item {item_id}')
        if item_id and status in (400, 404) and ('item' in detail.lower() or 'objectid' in detail.lower()):
            return self.fail(f'no item {item_id} on Girder at {self.api_url} ({detail}); give the id of the '
                             "slide's item")
        if status == 404:
            return self.fail(f'{self.api_url} answered {detail} while {what}: is it a Girder API URL '
                             '(ending in /api/v1)?')
        return self.fail(f'Girder at {self.api_url} answered {detail} while {what}')

    def _wait(self, attempt, response=None):
        delay = _retry_after(response)
        time.sleep(self.backoff * 2 ** attempt if delay is None else delay)

    def call(self, what, fn, landed=None, item_id=None, passthrough=()):
        """``fn()`` with retries of transient failures. ``landed()``, if given, is asked before each retry whether
        the failed attempt took effect after all (a lost answer); its non-None answer is returned instead.
        HTTP errors with a status in ``passthrough`` are raised as they are, for the caller to explain."""
        import requests
        from girder_client import HttpError

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                return fn()
            except HttpError as exc:
                if exc.status in passthrough:
                    raise
                if not _transient(exc.status) or last:
                    raise self.http_error(exc, what, item_id) from None
                self._wait(attempt, exc.response)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    reason = 'timed out' if isinstance(exc, requests.Timeout) else 'connection failed'
                    raise self.fail(f'cannot reach Girder at {self.api_url} while {what} ({reason} after '
                                    f'{self.retries + 1} tries): is the server up and the URL right?') from None
                self._wait(attempt)
            except ValueError:  # a 2xx answer that is not JSON
                raise self.fail(f'{self.api_url} did not answer with JSON while {what}: is it a Girder API URL '
                                '(ending in /api/v1)?') from None
            except requests.RequestException as exc:
                raise self.fail(f'cannot talk to Girder at {self.api_url} while {what}: '
                                f'{type(exc).__name__}: {exc}') from None
            if landed is not None:
                found = self.call(f'{what} (checking a lost answer)', landed, item_id=item_id)
                if found is not None:
                    return found

    @contextlib.contextmanager
    def session(self, timeout=None):
        """Requests of the block share one HTTP session whose requests time out after ``timeout`` seconds (default:
        the connection's)."""
        with self.gc.session(timeout_session(timeout or self.timeout)):
            yield self

    def user(self, then=''):
        """The token's user; a one-line error (ending in ``then``) when Girder does not accept the token."""
        me = self.get('checking the token', 'user/me')
        if not me:
            raise self.fail(f'Girder at {self.api_url} does not accept the token '
                            f'({"none given" if not self.token else "invalid or expired"}): get a new token '
                            f'(or API key){then}')
        return me

    def get(self, what, path, params=None, item_id=None, passthrough=()):
        return self.call(what, lambda: self.gc.get(path, parameters=params), item_id=item_id,
                         passthrough=passthrough)

    def slide_item(self, item_id):
        """The item with this id, or the item of the file with this id (what a DSA image parameter holds)."""
        from girder_client import HttpError

        try:
            return self.get('reading the item', f'item/{item_id}', item_id=item_id, passthrough=(400, 404))
        except HttpError as exc:
            missing = exc
        try:  # the id of the slide's file?
            file = self.get('reading the item', f'file/{item_id}', item_id=item_id, passthrough=(400, 404))
        except HttpError:
            file = None
        if not file or not file.get('itemId'):
            raise self.http_error(missing, 'reading the item', item_id)
        return self.get('reading the item', f'item/{file["itemId"]}', item_id=file['itemId'])


def folder_slides(api_url, token, folder_id, retries=4, backoff=1.0, timeout=60):
    """Every large-image item in a Girder folder and its subfolders, in path order. Every id the server answers is
    checked (:func:`object_id`): a server that answers another kind of id is refused in one line.

    :returns: a list of dicts ``{"item_id", "file_id" (the image file), "version" (what identifies the file's bytes:
        its ``size``, ``created`` (Girder renews it when the bytes are replaced), ``updated`` and ``sha512``, as far as
        Girder gives them), "name", "path" (folder names and the item name joined by "/", relative to the folder),
        "folders" (the names of the folders on the way, a list), "meta"}``."""
    server = GirderConnection(api_url, token, retries, backoff, timeout, None)
    slides = []
    with server.session():
        server.user()
        server.get('reading the folder', f'folder/{folder_id}', item_id=folder_id)
        todo = [(folder_id, [])]
        while todo:
            fid, folders = todo.pop()
            prefix = ''.join(f'{f}/' for f in folders)
            items = server.get('listing the folder', 'item', {'folderId': fid, 'limit': 0, 'sort': 'name'})
            for item in items:
                large = item.get('largeImage') or {}
                if large.get('fileId') and not large.get('expected'):
                    item_id = object_id(item.get('_id'), 'an item id', api_url)
                    file_id = object_id(large['fileId'], 'a file id', api_url)
                    file = server.get(f'reading the image file of {prefix}{item["name"]}', f'file/{file_id}')
                    slides.append({'item_id': item_id, 'file_id': file_id, 'name': item['name'],
                                   'version': {k: file.get(k) for k in ('size', 'created', 'updated', 'sha512')},
                                   'path': prefix + item['name'], 'folders': folders, 'meta': item.get('meta') or {}})
            subfolders = server.get('listing the folder', 'folder',
                                    {'parentType': 'folder', 'parentId': fid, 'limit': 0, 'sort': 'name'})
            todo.extend((object_id(sub.get('_id'), 'a folder id', api_url), [*folders, sub['name']])
                        for sub in reversed(subfolders))
    return sorted(slides, key=lambda s: s['path'])


def download_path(root, item_id, file_id, version, name):
    """Where the file of a :func:`folder_slides` slide (its ids, version and name) is downloaded under the folder
    ``root``:
    ``root/<item id>/<version key>/<safe name>``, the version key a hash of the file's id and version, so that a
    download of bytes Girder has since replaced is never taken for the new ones. ``root`` is resolved: the path holds
    no link."""
    key = hashlib.sha256(json.dumps([file_id, version], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(os.path.realpath(root), item_id, key, safe_name(name))


def inside(path, root):
    """Whether ``path`` (absolute) lies inside the folder ``root`` with no link on the way, so that writing or
    deleting it touches only what is under ``root``."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([path, real_root]) == real_root and os.path.realpath(path) == path


def download_file(api_url, token, file_id, path, root, retries=4, backoff=1.0, timeout=600):
    """Download a Girder file to ``path`` (written whole or not at all), unless a file is there already (from
    :func:`download_path`, whose path holds the file's version, it is an earlier download of the same bytes).
    ``path`` must lie :func:`inside` the folder ``root`` (a link planted on the way, or a path built from what a
    server said, is refused in one line); missing folders are made, readable only by their owner. :returns: path."""
    path = os.path.abspath(path)
    if not inside(path, root):
        raise CellRCNNError(f'refusing to download Girder file {file_id} to {path}: it is not inside '
                            f'{os.path.realpath(root)}, or a link is on the way')
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    server = GirderConnection(api_url, token, retries, backoff, timeout, None)
    with server.session(), atomic_write(path, 'download', binary=True) as f:
        def download():  # a retry starts the file over
            f.seek(0)
            f.truncate()
            server.gc.downloadFile(file_id, f)

        server.call(f'downloading file {file_id}', download)
    return path


def upload_files(api_url, token, folder_id, paths, retries=4, backoff=1.0, timeout=600):
    """Upload local files into a Girder folder, each as a new item named after the file (Girder renames it
    ``NAME (1)`` when the name is taken). A retried upload first looks for the file the lost attempt made.
    :returns: the Girder file documents (``_id``, ``itemId``, ``name``, ``size``)."""
    server = GirderConnection(api_url, token, retries, backoff, timeout, None)
    uploaded = []
    with server.session():
        server.get('reading the output folder', f'folder/{folder_id}', item_id=folder_id)
        for path in paths:
            path = os.fspath(path)
            name, size = os.path.basename(path), os.path.getsize(path)
            before = {item['_id'] for item in server.get('listing the output folder', 'item',
                                                         {'folderId': folder_id, 'limit': 0})}

            def landed():
                for item in server.get('listing the output folder', 'item', {'folderId': folder_id, 'limit': 0}):
                    if item['_id'] not in before and item['name'].startswith(name):
                        files = server.get('listing the uploaded item', f'item/{item["_id"]}/files')
                        if len(files) == 1 and files[0]['size'] == size:
                            return files[0]
                return None

            uploaded.append(server.call(f'uploading {path}', lambda: server.gc.uploadFileToFolder(folder_id, path),
                                        landed=landed))
    return uploaded
