"""The model a folder-wide detection runs: a Girder file the user may read, stored in an assetstore, known by the
SHA-256 of its bytes (the bundled model, by its name)."""

import datetime
import hashlib

from girder.constants import AccessType
from girder.exceptions import GirderException, RestException

from .checkpoint_config import read_config
from .results import DEFAULT_MODEL, DEFAULT_MODEL_CONFIG, SHA_PATTERN

SHA_FIELD = 'cellrcnnSha256'  # on a model's file document: {"sha256", "of": what the file's content was then}
#: why a model file whose bytes its assetstore no longer holds (all or part of them) cannot be read
LOST_BYTES = ('its assetstore has lost its bytes (all or part of them): an administrator restores them, or the '
              'model is uploaded again')


def _content_stamp(model_file):
    """What a file's content is, as far as its document tells: replacing the content changes it."""
    created = model_file.get('created')
    created = created.isoformat() if isinstance(created, datetime.datetime) else str(created)
    return '/'.join(str(v) for v in (model_file.get('size'), created, model_file.get('assetstoreId'),
                                     model_file.get('sha512'), model_file.get('path')))


def file_sha256(model_file):
    """The hex SHA-256 of a Girder file's bytes, streamed from its assetstore once and kept on its document
    (:data:`SHA_FIELD`) for as long as its content stays the same. Called from the batch's own thread, never in a
    request: a model of gigabytes takes a while. A file that cannot be read whole (lost since the request checked
    it) raises a RestException in words its user may see."""
    from girder.models.file import File

    stamp = _content_stamp(model_file)
    known = model_file.get(SHA_FIELD)
    if isinstance(known, dict) and known.get('of') == stamp and SHA_PATTERN.fullmatch(str(known.get('sha256'))):
        return known['sha256']
    digest, count = hashlib.sha256(), 0
    try:
        with File().open(model_file) as handle:
            for block in iter(lambda: handle.read(1 << 20), b''):
                digest.update(block)
                count += len(block)
    except GirderException as exc:
        raise RestException(f'{_named(model_file)} cannot be read here: {_read_failure(exc)}') from None
    if count < (model_file.get('size') or 0):  # lost since the request read its configuration
        raise RestException(f'{_named(model_file)} cannot be read here: {LOST_BYTES}')
    sha = digest.hexdigest()
    File().update({'_id': model_file['_id']}, {'$set': {SHA_FIELD: {'sha256': sha, 'of': stamp}}}, multi=False)
    return sha


def model_of(user, model_file_id=None):
    """(model name as results record it, model file id or None for the task's bundled model, its configuration as a
    result records it: the parts a folder run uses, :mod:`.checkpoint_config`); the file must be one the user may
    read, stored in an assetstore (not a link), and a cellrcnn checkpoint."""
    if not model_file_id:
        return DEFAULT_MODEL, None, DEFAULT_MODEL_CONFIG
    from girder.models.file import File

    model_file = File().load(model_file_id, user=user, level=AccessType.READ, exc=False)
    if model_file is None:
        raise RestException(f'no model file {model_file_id} that you may read')
    which = _named(model_file)
    if not model_file.get('assetstoreId') or model_file.get('linkUrl'):
        raise RestException(f'{which} is a link, not a stored file: upload the checkpoint')
    try:
        with File().open(model_file) as handle:
            try:
                config = read_config(handle)
            except ValueError as exc:
                if _bytes_lost(handle, model_file):
                    raise RestException(f'{which} cannot be read here: {LOST_BYTES}') from None
                raise RestException(f'{which} is {exc}') from None
    except GirderException as exc:
        raise RestException(f'{which} cannot be read here: {_read_failure(exc)}') from None
    return model_file['name'], str(model_file['_id']), config


def _named(model_file):
    return f'the model file {model_file["_id"]} ({model_file.get("name")})'


def _bytes_lost(handle, model_file):
    """Whether the assetstore holds fewer bytes of ``model_file`` than its document records (cut short on disk)."""
    size = model_file.get('size') or 0
    if size <= 0:
        return False
    handle.seek(size - 1)
    return handle.read(1) == b''


def _read_failure(exc):
    """Why Girder would not read a file's bytes (a GirderException from its file handle), in words its user may see:
    a filesystem assetstore's message for a file gone from its disk names the server's own path."""
    if str(exc.identifier or '').endswith('file-does-not-exist'):
        return LOST_BYTES
    return exc.message  # a read beyond the server's limit for one (core.filehandle_max_size)


def model_sha256(model_file_id):
    """The SHA-256 of the model file's bytes (None for the bundled model)."""
    if not model_file_id:
        return None
    from girder.models.file import File

    model_file = File().load(model_file_id, force=True, exc=False)
    if model_file is None:
        raise RestException(f'the model file {model_file_id} is gone')
    return file_sha256(model_file)
